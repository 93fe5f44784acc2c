"""model/peft.py is imported only by PEFT runs: peft imports bitsandbytes and torch._inductor
(~2.3 s CPU in every rank and single process of a full fine-tune, for nothing)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_a_full_fine_tune_that_saves_never_imports_peft(tmp_path, tiny_model_dir):
    (tmp_path / "rows.json").write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(8)]))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "shardtune", "finetune", "--device", "cpu",
                           "--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset",
                           "--alpaca_dataset.data_path", str(tmp_path / "rows.json"), "--batching_strategy", "padding",
                           "--batch_size_training", "2", "--max_train_step", "2", "--save_every_n_steps", "1",
                           "--run_validation", "False", "--num_workers_dataloader", "0",
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "out").glob("*.safetensors"))  # the model and a step checkpoint were saved
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "shardtune.finetuning" in imported
    assert not {"peft", "bitsandbytes", "shardtune.model.peft"} & imported
