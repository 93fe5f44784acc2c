"""preflight (shardtune/preflight.py) runs in the launcher of a multi-rank run and, for a single
process, before the recipe is imported: a run it refuses, and the launcher of every run, never
import the recipe's libraries (transformers, peft, bitsandbytes, torch._dynamo: ~6 s CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY_PACKAGES = ("transformers", "peft", "bitsandbytes")
HEAVY_MODULES = ("torch._dynamo", "torch._inductor", "shardtune.finetuning", "shardtune.model.peft")


def _imported(stderr: str) -> set[str]:
    """The modules a process imported, from its ``-X importtime`` lines (``... | ... | name``)."""
    return {line.rpartition("|")[2].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("launch", [["--nproc_per_node", "2", "--enable_fsdp"], []], ids=["launcher", "single_process"])
def test_a_run_refused_by_preflight_never_imports_the_recipe(tmp_path, tiny_model_dir, launch):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}] * 4))
    (tmp_path / "a-file").write_text("not a directory")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "shardtune", "finetune", *launch,
                           "--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset",
                           "--alpaca_dataset.data_path", str(data), "--output_dir", str(tmp_path / "a-file")],
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and len(errors) == 1 and "is a file" in errors[0], proc.stderr[-3000:]
    imported = _imported(proc.stderr)
    assert {"shardtune.preflight", "shardtune.model.loading", "torch"} <= imported  # the checks ran here
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY_PACKAGES or m.startswith(HEAVY_MODULES))
    assert not heavy, heavy


def test_a_missing_data_file_is_refused_in_the_launcher(tmp_path, tiny_model_dir):
    """Refused once, by the launcher, before ranks start (it was found by every rank after the
    recipe's imports: ~17 s of CPU for a 2-rank job and one error per rank)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "shardtune", "finetune", "--nproc_per_node",
                           "2", "--enable_fsdp", "--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset",
                           "--alpaca_dataset.data_path", str(tmp_path / "missing.json"),
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "missing.json does not exist. Point --alpaca_dataset.data_path at a" in errors[0]
    assert "shardtune.finetuning" not in _imported(proc.stderr) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("launch", [["--nproc_per_node", "2", "--enable_fsdp"], []], ids=["launcher", "single_process"])
def test_a_bad_flag_value_is_refused_before_torch_is_imported(tmp_path, launch):
    """Option values are checked by the config layer, which imports no torch: such a refusal
    takes ~0.1 s instead of the ~2 s of importing torch first."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "shardtune", "finetune", *launch,
                           "--model_name", str(tmp_path), "--lr", "inf", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and errors == ["error: --lr must be a finite number, got 'inf'."], proc.stderr[-3000:]
    imported = _imported(proc.stderr)
    assert "shardtune.config.parse" in imported and "torch" not in imported, sorted(imported)


@pytest.mark.parametrize("case", ["damaged_weights_launcher", "damaged_weights_generate", "resume_from_launcher"])
def test_damaged_weights_and_a_wrong_resume_from_are_refused_before_the_model_code_loads(tmp_path, tiny_model_dir,
                                                                                         case):
    """Found from the files alone: a truncated copy of the weights (its safetensors header no longer
    covers the file) and a --resume_from that is not a checkpoint are refused by the launcher before
    any rank starts, and by generate before transformers' model code is imported."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "copied-model")
    weights = model / "model.safetensors"
    if case.startswith("damaged"):
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    (tmp_path / "notes").mkdir()
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}] * 4))
    launcher = ["finetune", "--nproc_per_node", "2", "--enable_fsdp", "--model_name", str(model),
                "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data),
                "--output_dir", str(tmp_path / "out")]
    args, expected = {
        "damaged_weights_launcher": (launcher, f"the weight file {weights} is damaged"),
        "damaged_weights_generate": (["generate", str(model), "--prompt", "hi", "--device", "cpu"],
                                     f"the weight file {weights} is damaged"),
        "resume_from_launcher": ([*launcher, "--resume_from", str(tmp_path / "notes")],
                                 f"{tmp_path / 'notes'} is not a shardtune checkpoint"),
    }[case]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "shardtune", *args],
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0], errors[0]
    imported = _imported(proc.stderr)
    assert not any(m.startswith(("transformers.models", "shardtune.finetuning")) for m in imported)
    assert not (tmp_path / "out").exists()
