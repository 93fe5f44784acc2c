"""One run per output folder, through the real CLI: a second run into a folder a live run holds is
refused with one clear error and touches nothing; a killed run never leaves its folder locked."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardtune.outputs.ownership import LOCK, foreign_entries, verify_recorded

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _finetune(model: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = ["finetune", "--model_name", str(model), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
            str(data), "--device", "cpu", "--batching_strategy", "padding", "--batch_size_training", "4",
            "--num_epochs", "1", "--max_train_step", "2", "--output_dir", str(out), *extra]
    return subprocess.Popen([sys.executable, "-m", "shardtune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _locked(out: Path) -> bool:
    """Some process holds ``out``'s lock (asked the way a second run asks: a non-blocking flock)."""
    path = out / LOCK
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the lock if this test got it
    return False


def _wait_until_locked(proc: subprocess.Popen, out: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not _locked(out):
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before holding {out}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not lock {out} within {timeout_s} s")
        time.sleep(0.05)  # polling for an event of another process, not a fixed wait


def test_a_second_run_into_a_held_folder_is_refused_and_a_killed_run_blocks_nothing(tiny_model_dir, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(24)]))
    out = tmp_path / "out"

    # The first run, frozen (SIGSTOP) once it holds the folder: the second starts while it is surely alive.
    first = _finetune(tiny_model_dir, data, out, "--save_every_n_steps", "1")
    _wait_until_locked(first, out)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(first.args, capture_output=True, text=True, timeout=300,
                                env=ENV)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"--output_dir '{out}' is in use by another shardtune run (process {first.pid}" in errors[0], errors[0]
    assert "saved the" not in second.stdout and "Training" not in second.stderr  # refused before any work

    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert "saved the model" in stdout
    assert verify_recorded(out)  # its model: every recorded file has the bytes it wrote
    assert foreign_entries(out) == []  # the lock file is shardtune's: the folder's next run is not refused
    assert (out / "checkpoints" / "fine-tuned" / "latest").read_text().strip() == "step-000002"

    # A run killed (SIGKILL) while it holds the folder: the kernel drops its lock, the next run goes
    # ahead and removes what an interrupted save left there.
    killed = _finetune(tiny_model_dir, data, out)
    _wait_until_locked(killed, out)
    killed.kill()
    killed.communicate(timeout=60)
    leftover = out / ".saving-999999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a model")
    after = subprocess.run(first.args, capture_output=True, text=True, timeout=600, env=ENV)
    assert after.returncode == 0, after.stderr[-3000:]
    assert "saved the model" in after.stdout and not leftover.exists()
    assert verify_recorded(out) and foreign_entries(out) == []
