"""Streaming HF export: sharded files + index, dtype conversion, merged LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardtune.checkpoint.hf_export import save_hf_model
from shardtune.checkpoint.hf_stream import parse_size
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


def test_merged_lora_equals_the_adapter_model(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter (B is zero at init)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    save_hf_model(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "out", env=DistEnv(),
                  merge_lora=True)
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, tiny_model_dir), _logits(model, tiny_model_dir),
                               rtol=1e-4, atol=1e-4)


def _perturbed_peft(model_dir, **lora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, lora_alpha=8, **lora))
    with torch.no_grad():  # a trained adapter: every LoRA factor and saved copy non-zero
        for name, p in model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_merged_export_equals_the_adapter_model_for_every_lora_layer_kind(tiny_model_dir):
    """Linear (q/v, lm_head), Embedding (embed_tokens) and modules_to_save: a dropped or wrongly
    merged layer changes the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardtune.checkpoint.hf_stream import merged_lora_tensors

    model = _perturbed_peft(tiny_model_dir, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"],
                            modules_to_save=["norm"])
    merged = dict(merged_lora_tensors(model))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    ids = torch.tensor([[1, 5, 9, 30, 2, 44, 7]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
        assert (base - model(input_ids=ids).logits).abs().max() > 1e-2  # the adapter does change the model


def test_merge_refuses_what_it_cannot_merge_exactly(tiny_model_dir, tiny_tied_model_dir):
    import pytest

    from shardtune.checkpoint.hf_stream import check_mergeable, merged_lora_tensors
    from shardtune.config.errors import ShardtuneError

    with pytest.raises(ShardtuneError, match="cannot merge the LoRA layer .*DoRA"):
        check_mergeable(_perturbed_peft(tiny_model_dir, target_modules=["q_proj"], use_dora=True))
    tied = _perturbed_peft(tiny_tied_model_dir, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ShardtuneError, match="layer model.embed_tokens .*tied"):
        list(merged_lora_tensors(tied))
    saved_head = _perturbed_peft(tiny_tied_model_dir, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ShardtuneError, match="trained copy of lm_head .*tied"):
        check_mergeable(saved_head)
