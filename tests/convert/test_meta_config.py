"""``shardtune convert`` (a step checkpoint -> HF) and ``--merge_lora`` (convert's merge) keep the
base's Meta-format config.json: only torch_dtype follows the dtype written, and the outputs load
in transformers 5 with the trained model's logits (transformers 4.x: tests/checkpoint/test_transformers4.py)."""

from __future__ import annotations

import warnings

import torch
from transformers import AutoModelForCausalLM


def _logits(folder, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    assert model.config.rope_parameters["rope_type"] == "llama3"
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_convert_keeps_metas_config_and_records_the_checkpoints_dtype(meta_outputs, keeps_base_config):
    keeps_base_config(meta_outputs.converted, meta_outputs.base, "float32")  # the fp32 checkpoint's dtype
    torch.testing.assert_close(_logits(meta_outputs.converted, meta_outputs.ids), meta_outputs.trained_logits,
                               rtol=0, atol=0)


def test_convert_to_the_bases_dtype_writes_its_config_byte_for_byte(meta_outputs):
    for name in ("config.json", "generation_config.json"):
        assert (meta_outputs.converted_bf16 / name).read_bytes() == (meta_outputs.base / name).read_bytes(), name
    bf16 = _logits(meta_outputs.converted_bf16, meta_outputs.ids)
    assert (bf16 - meta_outputs.trained_logits).abs().max() < 0.1  # the trained model, rounded to bf16


def test_merge_lora_keeps_metas_config(meta_outputs, keeps_base_config):
    keeps_base_config(meta_outputs.merged, meta_outputs.base, "float32")
    torch.testing.assert_close(_logits(meta_outputs.merged, meta_outputs.ids), meta_outputs.adapted_logits,
                               rtol=0, atol=1e-5)
