"""Resumable sharded checkpoints with 2 real ranks: exact resume (full and LoRA), resharding to
one process, refusal of a mismatched model, crash during a save, SIGTERM, listing."""

from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardtune.checkpoint import layout
from shardtune.config.errors import ShardtuneError
from shardtune.finetuning import main as finetune

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"Spell {i}.", "output": " ".join(str(i))} for i in range(n)]


def _common(model: Path, data: Path, out: Path) -> list[str]:
    return ["--model_name", str(model), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
            str(data), "--output_dir", str(out), "--device", "cpu", "--batching_strategy", "padding",
            "--context_length", "64", "--lr", "2e-3", "--seed", "3", "--num_epochs", "2",
            "--save_model", "False", "--run_validation", "False", "--gradient_accumulation_steps", "2"]


def _close(a, b, rtol=1e-5) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory, run_fsdp_cases):
    root = tmp_path_factory.mktemp("resume")
    data = root / "data.json"
    data.write_text(json.dumps(_rows(48)))
    cases, dirs = {}, {}
    for kind, extra in (("full", []), ("lora", ["--use_peft", "--peft_method", "lora"])):
        out = root / kind
        dirs[kind] = out
        base = [*_common(tiny_model_dir, data, out), "--enable_fsdp", "--batch_size_training", "2", *extra]
        cases[f"{kind}_uninterrupted"] = {"args": [*base, "--output_dir", str(root / f"{kind}-ref")]}
        cases[f"{kind}_first_part"] = {"args": [*base, "--save_every_n_steps", "2", "--max_train_step", "5"]}
        cases[f"{kind}_resumed"] = {"args": [*base, "--resume"]}
    # the full run's checkpoint resumed by a LoRA set-up: a different model, refused
    cases["mismatch"] = {"expect_error": True,
                         "args": [*_common(tiny_model_dir, data, root / "full"), "--enable_fsdp",
                                  "--batch_size_training", "2", "--use_peft", "--resume"]}
    return {"results": run_fsdp_cases(root, cases), "dirs": dirs, "data": data,
            "model": tiny_model_dir, "root": root}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resumed_run_continues_with_the_uninterrupted_losses(runs, kind):
    r = runs["results"]
    full = r[f"{kind}_uninterrupted"]["losses"]
    first, resumed = r[f"{kind}_first_part"]["losses"], r[f"{kind}_resumed"]["losses"]
    assert len(full) == 12 and len(first) == 5
    assert _close(first, full[:5])
    # the last checkpoint of the first part is step 4 (every 2 steps): resume redoes step 5
    assert _close(resumed, full[4:]), (resumed, full[4:])


def test_checkpoint_layout_and_contents(runs):
    run = runs["dirs"]["full"] / "checkpoints" / "fine-tuned"
    done = layout.complete_checkpoints(run)
    assert [p.name for p in done][:2] == ["step-000002", "step-000004"]
    ckpt = done[0]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_params.yaml", "train_state.json",
            "COMPLETE"} <= {p.name for p in ckpt.iterdir()}
    params = (ckpt / "train_params.yaml").read_text()
    assert "lr: 0.002" in params and "torch:" in params and "transformers:" in params
    assert (run / "latest").read_text().strip() == layout.latest_checkpoint(run).name
    # each rank hashed its share of the files (a resumed run's re-saves: tests/checkpoint/test_digests.py)
    from shardtune.checkpoint.sharded import verify_checkpoint

    for path in done:
        assert {"__0_0.distcp", "__1_0.distcp", "rng-rank1.pt"} <= set(layout.read_manifest(path))
        assert verify_checkpoint(path)


def test_a_checkpoint_of_another_model_is_refused_by_name(runs):
    error = runs["results"]["mismatch"]["error"]
    assert error and "--use_peft is False in the checkpoint and True now" in error


def test_two_rank_checkpoint_resumes_in_one_process_on_the_same_global_batch(runs, capsys):
    r = runs["results"]
    full = r["full_uninterrupted"]["losses"]
    ckpt = runs["dirs"]["full"] / "checkpoints" / "fine-tuned" / "step-000004"
    args = [*_common(runs["model"], runs["data"], runs["root"] / "single"), "--batch_size_training", "4",
            "--resume_from", str(ckpt)]
    resumed = finetune(args)["train_step_loss"]
    assert re.search(r"^note: Checkpoint .* was written by 2 ranks and is resumed on 1", capsys.readouterr().err, re.M)
    assert _close(resumed, full[4:], rtol=1e-4)


def test_two_rank_checkpoint_resumes_in_one_process_on_another_global_batch(runs, capsys):
    """2 ranks x 2 (global batch 4) to 1 x 2: the 32 samples trained by step 4 are skipped, the epoch's
    other 14 are trained in 7 micro-batches (4 steps of 2), then epoch 2's 23 in 12 steps."""
    ckpt = runs["dirs"]["full"] / "checkpoints" / "fine-tuned" / "step-000004"
    capsys.readouterr()
    results = finetune([*_common(runs["model"], runs["data"], runs["root"] / "single-b2"),
                        "--batch_size_training", "2", "--resume_from", str(ckpt)])
    captured = capsys.readouterr()
    assert re.search(r"^note: Checkpoint .* was written by 2 ranks and is resumed on 1", captured.err, re.M)
    assert ("32 samples of epoch 1 were trained in global batches of 4 (seed 3); its other 14 samples are "
            "trained now in 7 global batches of 2") in captured.out
    assert results["steps"] == 4 + 4 + 12


def test_truncated_shard_is_a_clear_error_and_leaves_the_files(runs, tmp_path):
    import shutil

    src = runs["dirs"]["full"] / "checkpoints" / "fine-tuned" / "step-000002"
    broken = tmp_path / "step-000002"
    shutil.copytree(src, broken)
    shard = broken / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    args = [*_common(runs["model"], runs["data"], tmp_path / "out"), "--batch_size_training", "4",
            "--resume_from", str(broken)]
    with pytest.raises(ShardtuneError, match=r"__1_0\.distcp has \d+ bytes, \d+ were written"):
        finetune(args)  # caught by the recorded digests, before DCP reads anything
    assert shard.exists()


def test_shardtune_checkpoints_lists_them(runs, shardtune_cli):
    proc = shardtune_cli(["checkpoints", str(runs["dirs"]["full"] / "checkpoints" / "fine-tuned")], env=ENV)
    assert proc.returncode == 0
    assert "step-000004" in proc.stdout and "complete" in proc.stdout and "latest" in proc.stdout


def _launch(args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", "-m", "shardtune.finetuning", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, **(extra_env or {})}, start_new_session=True)


def _kill_all(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and every rank (torchrun starts ranks in their own sessions)."""
    import psutil

    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.communicate()


def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_usable(tiny_model_dir, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(_rows(48)))
    out = tmp_path / "out"
    args = [*_common(tiny_model_dir, data, out), "--enable_fsdp", "--batch_size_training", "2",
            "--save_every_n_steps", "1"]
    proc = _launch(args, {"SHARDTUNE_TEST_SAVE_DELAY_S": "1.5"})
    run = out / "checkpoints" / "fine-tuned"
    try:
        assert _wait_for(lambda: (run / ".tmp-step-000002").is_dir(), 120), proc.communicate(timeout=5)
        time.sleep(0.3)  # shards being written / waiting to be published
    finally:
        _kill_all(proc)
    assert (run / "latest").read_text().strip() == "step-000001"
    assert layout.latest_checkpoint(run) == run / "step-000001"
    assert not (run / "step-000002").exists()
    resumed = finetune([*_common(tiny_model_dir, data, out), "--batch_size_training", "4",
                        "--save_every_n_steps", "100", "--resume", "--max_train_step", "2"])
    assert len(resumed["train_step_loss"]) == 1  # continued after step 1
    assert not list(run.glob(".tmp-step-*"))  # the interrupted save's leftovers are cleaned up


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_to_the_launcher_saves_exits_0_and_resumes_exactly(runs, nproc, tmp_path):
    """`kill -TERM <launcher>` mid-epoch (what Slurm and Kubernetes send) with the default DataLoader
    worker: torchrun signals each rank's whole process group, workers included. The workers
    must not die of it; the ranks finish the step, save and exit 0, and so does the launcher.
    The resumed run continues with the uninterrupted run's losses."""
    out = tmp_path / "out"
    args = [*_common(runs["model"], runs["data"], out), "--enable_fsdp", "--batch_size_training", str(4 // nproc),
            "--num_epochs", "500", "--save_metrics"]
    launch = ["--nproc_per_node", str(nproc), *(["--nnodes", "1"] if nproc == 1 else [])]  # torchrun at 1 rank too
    proc = subprocess.Popen([sys.executable, "-m", "shardtune", "finetune", *launch, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        assert _wait_for(lambda: (out / "metrics.json").is_file(), 240)  # the first epoch is done
        os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as a scheduler does
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            _kill_all(proc)
    assert proc.returncode == 0, stderr[-4000:]
    assert "Traceback" not in stderr and "exited unexpectedly" not in stderr, stderr[-6000:]
    assert "pre-empted (SIGTERM)" in stdout and "--resume" in stdout
    assert "pre-empted (SIGTERM): every rank saved a checkpoint" in stderr
    ckpt = layout.latest_checkpoint(out / "checkpoints" / "fine-tuned")
    state = json.loads((ckpt / "train_state.json").read_text())
    full = runs["results"]["full_uninterrupted"]["losses"]  # 2 ranks x batch 2: the same global batches
    assert state["has_optimizer"] and 6 <= state["step"] < len(full)
    resumed = finetune([*_common(runs["model"], runs["data"], out), "--batch_size_training", "4", "--resume",
                        "--num_epochs", "500", "--max_train_step", str(len(full)), "--save_metrics"])
    # the curve (the history up to the checkpoint, then the resumed steps) is the uninterrupted one
    assert _close(resumed["train_step_loss"], full), (resumed["train_step_loss"], full)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_step"] == list(range(1, len(full) + 1))


def test_resume_from_a_run_folder_takes_its_newest_checkpoint(runs):
    from shardtune.checkpoint.manager import Checkpointer
    from shardtune.parallel.distributed import DistEnv

    run = runs["dirs"]["full"] / "checkpoints" / "fine-tuned"
    found = Checkpointer(run, env=DistEnv(), config_dict={}).find_resume_point(False, str(run))
    assert found == layout.latest_checkpoint(run)
    with pytest.raises(ShardtuneError, match="does not exist"):
        Checkpointer(run, env=DistEnv(), config_dict={}).find_resume_point(False, str(run / "nope"))


def test_resume_with_nothing_left_to_train_says_so(runs, tmp_path, capsys):
    import shutil

    out = tmp_path / "done"
    shutil.copytree(runs["dirs"]["full"], out)
    step = json.loads((layout.latest_checkpoint(out / "checkpoints" / "fine-tuned") / "train_state.json")
                      .read_text())["step"]
    results = finetune([*_common(runs["model"], runs["data"], out), "--batch_size_training", "4", "--resume",
                        "--max_train_step", str(step)])
    assert results["steps"] == step
    assert f"nothing to train: the checkpoint is at step {step} and --max_train_step is {step}" in capsys.readouterr().out
