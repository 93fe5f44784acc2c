"""One run per output folder, through the real CLI: a second run into a folder a live run holds is
refused with one clear error and touches nothing; a killed run never leaves its folder locked, and a
2-rank run whose launcher alone was killed still holds it while its ranks go on."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shardtune.outputs.ownership import LOCK, foreign_entries, verify_recorded

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _finetune(model: Path, data: Path, out: Path, *extra: str, steps: int = 2) -> subprocess.Popen:
    args = ["finetune", "--model_name", str(model), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
            str(data), "--device", "cpu", "--batching_strategy", "padding", "--batch_size_training", "4",
            "--num_epochs", "1", "--max_train_step", str(steps), "--output_dir", str(out), *extra]
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


def test_a_second_run_into_a_held_folder_is_refused_and_a_killed_run_blocks_nothing(tiny_model_dir, tmp_path, shardtune_cli):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(24)]))
    out = tmp_path / "out"

    # The first run, frozen (SIGSTOP) once it holds the folder: the second starts while it is surely alive.
    first = _finetune(tiny_model_dir, data, out, "--save_every_n_steps", "1")
    _wait_until_locked(first, out)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = shardtune_cli(first.args[3:], timeout=300, env=ENV)
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
    assert "Warning" not in stderr, stderr[-3000:]  # its step checkpoints without a process group: no DCP warning
    assert verify_recorded(out)  # its model: every recorded file has the bytes it wrote
    assert foreign_entries(out) == []  # the lock file is shardtune's: the folder's next run is not refused
    assert (out / "checkpoints" / "fine-tuned" / "latest").read_text().strip() == "step-000002"

    # A 2-rank run whose launcher alone is killed (kill -9, the out-of-memory killer): its ranks go on
    # training and writing the folder, so rank 0 takes the lock over and a new run is still refused.
    long = tmp_path / "long.json"
    long.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(4000)]))
    killed = _finetune(tiny_model_dir, long, out, "--nproc_per_node", "2", "--enable_fsdp", steps=1000)
    seen = b""
    while b"loss=" not in seen:  # the ranks train (tqdm's postfix after a step)
        chunk = killed.stdout.buffer.read1(4096)
        if not chunk:
            pytest.fail(f"the 2-rank run ended (exit {killed.wait()}): {killed.stderr.read()[-3000:]}")
        seen += chunk
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(killed.pid).children()}
    killed.kill()
    killed.wait(timeout=60)  # not communicate(): the ranks still hold its output pipes
    try:
        while_ranks_run = shardtune_cli(first.args[3:], timeout=300, env=ENV)
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())
    finally:  # then the ranks are killed too: the kernel drops the lock, none is left stuck
        family = [q for p in ranks.values() for q in [p, *p.children(recursive=True)]]
        for p in family:
            p.kill()
        psutil.wait_procs(family, timeout=60)
        killed.communicate(timeout=60)
    assert while_ranks_run.returncode == 2, while_ranks_run.stderr[-3000:]
    assert f"is in use by another shardtune run (process {ranks['0'].pid}" in while_ranks_run.stderr, \
        while_ranks_run.stderr[-3000:]
    # The next run goes ahead and removes what an interrupted save left there.
    leftover = out / ".saving-999999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a model")
    after = shardtune_cli(first.args[3:], timeout=600, env=ENV)
    assert after.returncode == 0, after.stderr[-3000:]
    assert "saved the model" in after.stdout and not leftover.exists()
    assert verify_recorded(out) and foreign_entries(out) == []
