"""Progress output in a log file: plain lines with the step figures, no carriage-return frames."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys


def test_a_run_logged_to_a_file_has_plain_progress_lines(tiny_model_dir, tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(40)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    log = tmp_path / "run.log"
    with log.open("w") as f:  # as `... > run.log 2>&1` or Slurm's output file
        proc = subprocess.run(
            [sys.executable, "-m", "shardtune.finetuning", "--model_name", str(tiny_model_dir), "--device", "cpu",
             "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(tmp_path / "data.json"),
             "--batching_strategy", "padding", "--batch_size_training", "2", "--num_epochs", "1",
             "--save_model", "False", "--output_dir", str(tmp_path / "out")],
            stdout=f, stderr=subprocess.STDOUT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "Warning" not in text, text[-3000:]
    lines = re.findall(r"^Training Epoch 1/1: step (\d+)/19 \(\d+%\) loss=[\d.]+ tok_s=[\d,]+ tflops=\S+ "
                       r"mfu=[\d.]+% mem=[\d.]+G lr=[\d.e+-]+ elapsed=[\d.]+s$", text, re.M)
    assert [int(n) for n in lines] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19], text[-3000:]  # 10% of 19 steps: 2
    assert re.search(r"^Evaluating: batch 2/2 \(100%\)", text, re.M), text[-3000:]


def test_progress_lines_come_at_a_steady_interval(capsys, monkeypatch):
    from shardtune.train import progress

    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))  # one second per call
    bar = progress.LoopProgress("Training Epoch 1/1", total=59, bar=False)
    for i in range(59):
        bar.update({"loss": f"{1 + i / 100:.4f}", "lr": "1.00e-04"})
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    steps = [int(ln.split()[4].split("/")[0]) for ln in lines]
    # the first step, then every 6 steps (10% of 59) or 30 s, and the last
    assert steps == [1, 7, 13, 19, 25, 31, 37, 43, 49, 55, 59], lines
    assert lines[-1].startswith("Training Epoch 1/1: step 59/59 (100%) loss=1.5800 lr=1.00e-04 elapsed=")
    quiet = progress.LoopProgress("Training", total=3, enabled=False, bar=False)
    quiet.update({"loss": "1"})
    quiet.close()
    assert capsys.readouterr().out == ""
