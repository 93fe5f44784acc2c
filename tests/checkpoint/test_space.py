"""A full disk, for real (a small tmpfs): a save that runs out of space is one clear error that says
so and how much the save needed, its partial files are removed, and earlier checkpoints survive."""

from __future__ import annotations

import errno
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from shardtune.checkpoint import layout
from shardtune.checkpoint.sharded import verify_checkpoint
from shardtune.checkpoint.space import is_out_of_space, tensor_bytes

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def test_the_writers_own_errors_for_a_full_disk_are_recognised(tmpfs):
    full = tmpfs("64K")
    with pytest.raises(Exception) as caught:  # torch.save's zip writer: "unexpected pos ..."
        torch.save(torch.zeros(100_000), full / "big.pt")
    assert is_out_of_space(caught.value), repr(caught.value)
    with pytest.raises(OSError) as caught:
        (full / "big.bin").write_bytes(b"\0" * 200_000)
    assert caught.value.errno == errno.ENOSPC and is_out_of_space(caught.value)
    assert not is_out_of_space(ValueError("bad value")) and not is_out_of_space(OSError(errno.EACCES, "denied"))
    assert tensor_bytes({"a": torch.zeros(3, 4), "b": [torch.zeros(2, dtype=torch.float16), 7]}) == 48 + 4


def _needed(err: str) -> float:
    m = re.search(r"needs about (\d+(?:\.\d+)?) (KB|MB)", err)
    assert m, err
    return float(m[1]) * (1e3 if m[2] == "KB" else 1e6)


@pytest.mark.slow
def test_a_full_disk_is_one_clear_error_and_leaves_no_partial_save(tiny_model_dir, tmp_path, tmpfs, shardtune_cli):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(24)]))
    # 3 MB holds one step checkpoint of the tiny model (2.1 MB with its optimizer state), not two;
    # 500 KB does not hold its exported weights (657 KB).
    ckpt_disk, export_disk = tmpfs("3M"), tmpfs("500K")
    common = ["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
              str(data), "--device", "cpu", "--batching_strategy", "padding", "--num_epochs", "1"]
    runs = {
        # 2 FSDP ranks: the second step checkpoint finds the disk full
        "checkpoint": ["finetune", "--nproc_per_node", "2", "--enable_fsdp", *common, "--batch_size_training", "2",
                       "--max_train_step", "3", "--save_every_n_steps", "1", "--output_dir", str(ckpt_disk / "out")],
        # one process: the model's export at the end finds it full
        "export": ["finetune", *common, "--batch_size_training", "4", "--max_train_step", "1",
                   "--output_dir", str(export_disk / "out")],
    }

    def run(item):
        name, args = item
        return name, shardtune_cli(args, timeout=600, env=ENV)

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(run, runs.items()))
    for name, proc in results.items():
        assert proc.returncode == 2, (name, proc.stderr[-4000:])
        assert "Traceback" not in proc.stderr and proc.stderr.count("error: ") == 1, (name, proc.stderr[-4000:])
        assert "is full" in proc.stderr, (name, proc.stderr[-4000:])

    run_dir = ckpt_disk / "out" / "checkpoints" / "fine-tuned"
    err = results["checkpoint"].stderr
    assert f"The disk holding {run_dir} is full" in err and "the checkpoint of step 2 needs about" in err, err[-3000:]
    first = layout.latest_checkpoint(run_dir)
    assert first is not None and first.name == "step-000001" and verify_checkpoint(first)  # survives, intact
    written = sum(f.stat().st_size for f in first.glob("__*_0.distcp"))
    assert 0.85 * written <= _needed(err) <= 1.05 * written  # what the save needed, near its real size
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest", "step-000001"]  # no .tmp-step-000002

    out = export_disk / "out"
    err = results["export"].stderr
    assert f"The disk holding {out} is full" in err and "the model's export needs about" in err, err[-3000:]
    assert abs(_needed(err) - 4 * sum(p.numel() for p in _params(tiny_model_dir))) < 1e3
    assert not list(out.glob(".saving-*")) and not list(out.glob("*.safetensors"))  # no partial model left


def _params(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(model_dir).parameters())
