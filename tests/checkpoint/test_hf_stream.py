"""Streaming HF export: sharded files + index, dtype conversion. (The merged LoRA model is written
by convert's merge: tests/convert/test_merge.py, tests/test_finetuning.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardtune.checkpoint.hf_export import save_hf_model
from shardtune.checkpoint.sizes import parse_size
from shardtune.parallel.distributed import DistEnv


def _logits(model, model_dir) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode("stream me")])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("1GiB") == 2**30 and parse_size(1234) == 1234
    with pytest.raises(ValueError):
        parse_size("lots")


def test_small_shards_write_an_index_that_from_pretrained_reads(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    save_hf_model(model, tok, tmp_path / "out", env=DistEnv(), max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded, tiny_model_dir), _logits(model, tiny_model_dir), rtol=0, atol=0)
    assert not list((tmp_path / "out").glob(".saving-*")) and not list((tmp_path / "out").glob(".part-*"))


def test_export_dtype_converts_weights_and_config(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    save_hf_model(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "bf16", env=DistEnv(),
                  dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert next(loaded.parameters()).dtype == torch.bfloat16
