"""Outputs load in transformers 4.x as they do in 5.x: one subprocess with transformers 4.57 first
on its path (the ``transformers4_path`` fixture builds it once per machine) loads every output
written from the Meta-format base, model and tokenizer, and must read the same llama3 rope and
give the same logits as transformers 5 here.

The control: the same base config re-serialised by transformers 5 (what outputs were before
checkpoint/model_config.py) reads in 4.57 as rope_theta 10000 without scaling, the silently
different model this test exists to catch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PROBE = Path(__file__).with_name("transformers4_probe.py")
TEXT = "Add 3 and 4. The answer is 7."


def _transformers5(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits, AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]


def test_outputs_load_in_transformers_4_with_the_same_rope_and_logits(transformers4_path, meta_outputs, tmp_path):
    control = tmp_path / "transformers5-config"
    shutil.copytree(meta_outputs.full, control)
    AutoConfig.from_pretrained(meta_outputs.full).save_pretrained(control)  # what outputs used to carry
    folders = {"export": meta_outputs.full, "convert": meta_outputs.converted,
               "convert-bf16": meta_outputs.converted_bf16, "merge_lora": meta_outputs.merged, "control": control}
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"ids": meta_outputs.ids.tolist(), "text": TEXT,
                                   "folders": {k: str(v) for k, v in folders.items()}}))
    env = {**os.environ, "PYTHONPATH": str(transformers4_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(PROBE), str(request), str(tmp_path / "result.json")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "result.json").read_text())

    control4 = results.pop("control")
    assert control4["transformers"].startswith("4.57."), control4
    assert control4["rope_theta"] == 10000.0 and control4["rope_scaling"] is None, control4  # the trap is real
    for name, got in results.items():
        assert "model_error" not in got and "tokenizer_error" not in got, (name, got)
        assert got["rope_theta"] == 500000.0, (name, got["rope_theta"])
        assert got["rope_scaling"] == {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}, name
        logits5, text_ids5 = _transformers5(folders[name], meta_outputs.ids)
        torch.testing.assert_close(torch.tensor(got["logits"]), logits5, rtol=0, atol=1e-5, msg=name)
        assert got["tokenizer_class"] == "PreTrainedTokenizerFast" and got["text_ids"] == text_ids5, (name, got)
