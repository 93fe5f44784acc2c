"""``shardtune checkpoints PATH``: what a checkpoint folder holds, at a glance.

``--verify`` checks every checkpoint's files against the digests recorded when it was written
(``outputs/digests.py``). A checkpoint without recorded digests (llama-recipes', or an older
shardtune's) is checked as far as it can be: its files against the sizes its DCP index gives,
and every tensor read and found finite. Exit status 1 when any checkpoint is damaged.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..checkpoint import layout
from ..checkpoint.listing import describe
from ..checkpoint.sizes import human_size
from ..config.errors import ShardtuneError
from ..outputs.digests import DamagedFiles


def check_without_digests(path: Path) -> str:
    """A checkpoint with no recorded digests: sizes against its DCP index, then every tensor read
    and checked finite. Returns what was checked; raises ShardtuneError for what is wrong."""
    import torch

    from ..convert.sources import open_source  # the readers of every checkpoint kind: only when needed

    src = open_source(path)  # a missing or truncated shard file is an error here
    non_finite = []
    for key, entry in src.entries.items():
        if not entry.dtype.is_floating_point:
            continue
        tensor = src.read([key])[key]
        if not torch.isfinite(tensor).all():
            non_finite.append(key)
    if non_finite:
        raise ShardtuneError(f"{path}: {len(non_finite)} tensors hold NaN or infinite values "
                             f"({', '.join(non_finite[:3])}).")
    return f"no digests recorded; sizes and {len(src.entries)} tensors checked (readable, finite)"


def verify_one(path: Path) -> tuple[bool, str]:
    """(ok, what was found) for one checkpoint folder."""
    from ..checkpoint.sharded import verify_checkpoint  # torch and DCP: only for --verify (a listing takes 0.1 s)

    try:
        if verify_checkpoint(path, advice=""):
            return True, "verified: every file matches its recorded sha256"
        return True, check_without_digests(path)
    except DamagedFiles as exc:
        return False, "DAMAGED: " + "; ".join(exc.problems)
    except ShardtuneError as exc:
        return False, f"DAMAGED: {exc}"


def verify_main(target: Path) -> bool:
    """``--verify``: one checkpoint, or every step-N of a run folder; True when all are good."""
    if (target / ".metadata").is_file():
        checkpoints = [target]
    else:
        checkpoints = [p for p in sorted(target.iterdir()) if layout.step_of(p) is not None and layout.is_complete(p)] \
            if target.is_dir() else []
        if not checkpoints:
            raise ShardtuneError(f"{target} holds no complete checkpoint to verify (a run's checkpoint folder, or "
                                 "one checkpoint: a folder with .metadata).")
    good = True
    for path in checkpoints:
        ok, what = verify_one(path)
        good &= ok
        print(f"{path.name:<18} {what}", flush=True)
    return good


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="shardtune checkpoints", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a run's checkpoint folder (<root>/<dist_checkpoint_folder>), or one checkpoint "
                                 "with --verify")
    ap.add_argument("--verify", action="store_true", help="check every file against its recorded digest")
    args = ap.parse_args(argv)
    if args.verify:
        if not verify_main(Path(args.path)):
            raise SystemExit(1)
        return
    rows = describe(Path(args.path))
    if not rows:
        print(f"no checkpoints in {args.path}")
        return
    print(f"{'checkpoint':<18} {'step':>7} {'epoch':>6} {'batch':>6} {'best eval':>10} {'ranks':>5} "
          f"{'optim':>5} {'size':>9}  state")
    for r in rows:
        loss = r.get("eval_loss")
        state = ("complete" if r["complete"] else "INCOMPLETE (interrupted save)") + ("  <- latest" if r["latest"] else "")
        epoch = r.get("epoch")
        print(f"{r['name']:<18} {r.get('step', '?')!s:>7} {'?' if epoch is None else epoch + 1!s:>6} "
              f"{r.get('batch', '?')!s:>6} {'-' if loss is None else f'{loss:.4f}':>10} "
              f"{r.get('ranks', '?')!s:>5} {'yes' if r.get('optimizer') else 'no':>5} "
              f"{human_size(r['size']):>9}  {state}")
