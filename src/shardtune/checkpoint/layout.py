"""Where resumable checkpoints live, and how a checkpoint becomes visible only when complete.

    <dist_checkpoint_root_folder>/<dist_checkpoint_folder>/
        step-000200/      DCP files (__<rank>_0.distcp, .metadata), train_params.yaml, COMPLETE
                          (COMPLETE lists every file with its size and SHA-256: outputs/digests.py)
        step-000400/
        latest            text file naming the newest complete checkpoint

A checkpoint is written under ``.tmp-step-N`` and renamed to ``step-N`` after every rank has
finished writing and the ``COMPLETE`` marker is in place; ``latest`` is replaced last. A crash
at any moment leaves the previous checkpoint intact and ``latest`` pointing at it. Writing a
step that exists again moves the old folder to ``.replaced-step-N`` first; ``prune`` puts it
back if a crash came before the new one was in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from ..config import Config, ShardtuneError
from ..config.configs import StateDictType
from ..outputs.atomic import atomic_write, fsync_path
from ..outputs.digests import DamagedFiles

COMPLETE_MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"  # a checkpoint's step, position, world size and options
_PRE_DIGEST_MARKER = "ok"  # what COMPLETE held before shardtune recorded digests
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def run_dir(root: str | Path, folder: str) -> Path:
    """The checkpoint folder of a run. Unlike llama-recipes, the model path is never glued in."""
    return Path(root) / folder


def checkpoint_run_dir(cfg: Config) -> Path:
    """``<dist_checkpoint_root_folder>/<dist_checkpoint_folder>``; llama-recipes' placeholder
    root (never set by the user) means ``<output_dir>/checkpoints``."""
    t = cfg.train
    root = t.dist_checkpoint_root_folder
    if root == type(t)().dist_checkpoint_root_folder:
        root = str(Path(t.output_dir) / "checkpoints")
    return run_dir(root, t.dist_checkpoint_folder)


def writes_resumable_checkpoints(cfg: Config) -> bool:
    t = cfg.train
    sharded = t.enable_fsdp and cfg.fsdp.checkpoint_type == StateDictType.SHARDED_STATE_DICT
    return sharded or t.save_every_n_steps > 0 or t.resume or bool(t.resume_from)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def temp_dir_for(run: Path, step: int) -> Path:
    return run / f".tmp-{step_dir_name(step)}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / ".metadata").is_file()


def complete_checkpoints(run: Path) -> list[Path]:
    """Complete ``step-N`` folders of a run, oldest first."""
    if not run.is_dir():
        return []
    found = []
    for child in run.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> Optional[int]:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def latest_checkpoint(run: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names when it is complete, else the newest complete one."""
    pointer = run / LATEST
    if pointer.is_file():
        target = run / pointer.read_text().strip()
        if is_complete(target):
            return target
    done = complete_checkpoints(run)
    return done[-1] if done else None


def read_manifest(path: Path) -> Optional[dict[str, dict]]:
    """The file digests a checkpoint's ``COMPLETE`` marker records; None only for a checkpoint
    that really has no digest record: no marker at all (llama-recipes'), or the marker an older
    shardtune wrote before it recorded digests (just ``ok``). A marker that exists but cannot be
    read or is not a complete record is a damaged checkpoint (:class:`DamagedFiles`): treating
    it as "old" would switch verification off for exactly the checkpoints that need it."""
    marker = path / COMPLETE_MARKER
    if not marker.exists():
        return None
    try:
        text = marker.read_text()
    except (OSError, ValueError) as exc:
        raise _damaged(path, f"cannot be read ({exc})") from None
    if text.strip() == _PRE_DIGEST_MARKER:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        raise _damaged(path, "is not valid JSON") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        raise _damaged(path, "records no file digests")
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise _damaged(path, f"has no size or sha256 for {name}")
    return files


def read_train_state(path: Path) -> dict:
    if not path.is_dir():
        raise ShardtuneError(f"Checkpoint {path} does not exist or is not a folder.")
    if not is_complete(path):
        started = step_of(path) is not None or any(path.glob("*.distcp")) or (path / ".metadata").exists()
        steps = [p.name for p in path.iterdir() if step_of(p) is not None] if path.is_dir() else []
        if steps:
            raise ShardtuneError(
                f"{path} is a run's checkpoint folder, but none of its checkpoints ({', '.join(sorted(steps)[:5])}) "
                f"is complete (each lacks its {COMPLETE_MARKER} marker or DCP .metadata: their saves were "
                "interrupted). There is nothing to resume from; start without --resume_from.")
        if not started:
            raise ShardtuneError(
                f"{path} is not a shardtune checkpoint: it has no DCP files (.metadata, *.distcp), no "
                f"{COMPLETE_MARKER} marker and no step-N checkpoints. Pass a run's checkpoint "
                "folder (<dist_checkpoint_root_folder>/<dist_checkpoint_folder>, by default "
                "<output_dir>/checkpoints/fine-tuned) or one of its step-N folders; `shardtune "
                "checkpoints FOLDER` lists them.")
        raise ShardtuneError(
            f"Checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker or no DCP "
            ".metadata): its save was interrupted. Resume from an earlier checkpoint instead.")
    try:
        return json.loads((path / TRAIN_STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardtuneError(f"Checkpoint {path} has an unreadable {TRAIN_STATE}: {exc}") from None


def resume_point(resume_from: str | Path) -> Path:
    """The checkpoint ``--resume_from`` names: a step folder, or a run's folder (its newest
    complete checkpoint). Refuses one that is missing, incomplete or not a shardtune checkpoint,
    from the files alone (no torch): preflight refuses it before any rank starts."""
    path = Path(resume_from)
    if _restorable(path):  # the run puts it back (prune) before it loads anything
        return path
    newest = latest_checkpoint(path)
    if newest is not None:
        path = newest
    read_train_state(path)  # exists, complete, readable: or a clear error
    return path


def _restorable(path: Path) -> bool:
    """``path`` (a step folder, or a run's folder) has a checkpoint that ``prune`` puts back."""
    asides = [_replaced_dir(path)] if not path.exists() else list(path.glob(".replaced-step-*"))
    return any(aside.is_dir() and _to_restore(aside) for aside in asides)


def _to_restore(aside: Path) -> bool:
    """A complete checkpoint that a save set aside (``.replaced-step-N``) and crashed before
    publishing its replacement: it is the step's checkpoint again."""
    return not (aside.parent / aside.name[len(".replaced-"):]).exists() and is_complete(aside)


def _damaged(path: Path, what: str) -> DamagedFiles:
    return DamagedFiles(path, [f"its {COMPLETE_MARKER} marker (the record of every file's size and sha256) "
                               f"{what}, so none of its files can be verified"],
                        advice="It was not loaded: restore the folder from a good copy, or use an earlier checkpoint.")


def commit(tmp: Path, final: Path, manifest: Optional[dict[str, dict]] = None) -> None:
    """Publish a fully written checkpoint: the marker (with the digests of every file it holds),
    rename into place, then move ``latest``."""
    marker = {"complete": True, "algorithm": "sha256", "files": manifest or {}}
    (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    fsync_path(tmp)
    replaced = None
    if final.exists():  # same step written again (e.g. the pre-emption save of a saved step):
        replaced = _replaced_dir(final)  # moved aside, not deleted, until the new one is in place
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    fsync_path(final.parent)
    atomic_write(final.parent / LATEST, final.name + "\n")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _replaced_dir(final: Path) -> Path:
    return final.parent / f".replaced-{final.name}"


def prune(run: Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest ``keep_last_n`` complete checkpoints (0 keeps all) and stale temps."""
    removed = []
    for tmp in run.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    for aside in run.glob(".replaced-step-*"):  # a crash mid-commit: put it back if not superseded
        if _to_restore(aside):
            os.replace(aside, run / aside.name[len(".replaced-"):])
        else:
            shutil.rmtree(aside, ignore_errors=True)
            removed.append(aside)
    if keep_last_n > 0:
        for old in complete_checkpoints(run)[:-keep_last_n]:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed
