"""``shardtune checkpoints PATH``: what a checkpoint folder holds, at a glance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from ..config.errors import ShardtuneError
from . import layout
from .hf_stream import human_size
from .sharded import TRAIN_STATE


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(run: Path) -> list[dict]:
    """One row per ``step-N`` folder (complete or not) and leftover temporary folder."""
    if not run.is_dir():
        raise ShardtuneError(f"{run} is not a folder. Pass <dist_checkpoint_root_folder>/"
                             "<dist_checkpoint_folder> (or a run's <output_dir>/checkpoints/fine-tuned).")
    latest = layout.latest_checkpoint(run)
    rows = []
    for child in sorted(run.iterdir()):
        if not child.is_dir() or not (child.name.startswith("step-") or child.name.startswith(".tmp-step-")):
            continue
        row = {"name": child.name, "complete": layout.is_complete(child), "size": _size(child),
               "latest": latest is not None and child == latest}
        try:
            state = json.loads((child / TRAIN_STATE).read_text())
            pos = state.get("position", {})
            row.update(step=state.get("step"), epoch=pos.get("epoch"), batch=pos.get("batch"),
                       eval_loss=pos.get("best_val"), ranks=state.get("world_size"),
                       optimizer=state.get("has_optimizer"))
        except (OSError, json.JSONDecodeError):
            pass
        rows.append(row)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="shardtune checkpoints", description=__doc__)
    ap.add_argument("path", help="a run's checkpoint folder (<root>/<dist_checkpoint_folder>)")
    args = ap.parse_args(argv)
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
