"""The HF directory written after training loads with plain transformers/peft and matches."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardtune.checkpoint.hf_export import save_hf_model
from shardtune.config import parse_args
from shardtune.model.peft import apply_peft
from shardtune.parallel.distributed import DistEnv


def probe(tokenizer):
    return tokenizer(["reverse: a b c =", "hello there"], return_tensors="pt", padding=True)


def train_a_little(model, tokenizer, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = probe(tokenizer)
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_full_model_round_trip(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_a_little(model, tok)
    out = tmp_path / "hf"
    (out).mkdir()
    (out / "metrics.json").write_text("{}")  # other run outputs in output_dir survive a save
    save_hf_model(model, tok, out, env=DistEnv(), max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").is_file()  # sharded
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "metrics.json").is_file() and not list(out.glob(".saving-*"))
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float32
    batch = probe(AutoTokenizer.from_pretrained(out))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    # a second save with fewer shards removes the stale ones
    save_hf_model(model, tok, out, env=DistEnv())
    assert not list(out.glob("model-*-of-*.safetensors")) and (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("method", ["lora", "llama_adapter"])
def test_peft_adapter_round_trip(tiny_model_dir, tmp_path, method):
    from peft import PeftModel

    cfg = parse_args(["--use_peft", "--peft_method", method, "--llama_adapter_config.adapter_layers", "2",
                      "--lora_config.lora_dropout", "0"]).config
    model = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_a_little(model, tok)  # LoRA B / adapter gates start at zero: train so outputs change
    out = tmp_path / "adapter"
    save_hf_model(model, tok, out, env=DistEnv())
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("model*.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = probe(tok)
    with torch.no_grad():
        base_logits = base(**batch).logits
        loaded = PeftModel.from_pretrained(base, out).eval()
        model.eval()
        expected = model(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected, base_logits)  # the adapter did learn something
