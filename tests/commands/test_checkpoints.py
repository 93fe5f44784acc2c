"""``shardtune checkpoints``: a listing reads the folders' JSON and imports no torch (0.1 s, not 3 s);
torch and DCP come only with ``--verify`` (tests/checkpoint/test_digests.py runs that path)."""

from __future__ import annotations

import json
import subprocess
import sys

from shardtune.checkpoint.layout import TRAIN_STATE


def test_a_listing_imports_no_torch(tmp_path):
    step = tmp_path / "run" / "step-000003"
    step.mkdir(parents=True)
    (step / TRAIN_STATE).write_text(json.dumps({"step": 3, "position": {"epoch": 0, "batch": 3}, "world_size": 2}))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "shardtune", "checkpoints", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("step-000003")]
    assert row and row[0].split()[1:4] == ["3", "1", "3"]  # step, epoch (from 1), batch, proc.stdout
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "shardtune.commands.checkpoints" in imported and "torch" not in imported
