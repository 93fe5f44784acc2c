"""What a run's checkpoint folder holds, one row per checkpoint (step, epoch, position, best eval
loss, ranks, size, complete or not): read by ``shardtune checkpoints`` (``commands/checkpoints.py``)
and the recipe's save messages.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config.errors import ShardtuneError
from . import layout
from .layout import TRAIN_STATE


def checkpoint_size(path: Path) -> int:
    """Bytes of every file under ``path``."""
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
        row = {"name": child.name, "complete": layout.is_complete(child), "size": checkpoint_size(child),
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
