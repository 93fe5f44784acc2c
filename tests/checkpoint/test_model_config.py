"""An output's config.json is its base model's, changed only where training changed the model
(checkpoint/model_config.py): Meta's Llama 3.2 format (rope_theta, llama3 rope_scaling,
torch_dtype) survives the recipe's export, and the output loads with the trained model's logits."""

from __future__ import annotations

import json
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from shardtune.checkpoint.hf_export import save_hf_model, write_config
from shardtune.parallel.distributed import DistEnv


def _load(folder, cls=AutoModelForCausalLM):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(folder, dtype=torch.float32).eval()


def test_full_fine_tune_export_keeps_metas_config(meta_outputs, keeps_base_config):
    """The recipe trained in fp32 and wrote fp32: torch_dtype says so, every other key is Meta's
    (no transformers 5 rope_parameters / dtype), and transformers 5 reads the llama3 rope."""
    got = keeps_base_config(meta_outputs.full, meta_outputs.base, "float32")
    assert got["rope_theta"] == 500000.0 and got["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_parameters" not in got and "dtype" not in got
    model = _load(meta_outputs.full)
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    assert model.config.rope_parameters["factor"] == 32.0
    with torch.no_grad():
        logits = model(input_ids=meta_outputs.ids).logits
    torch.testing.assert_close(logits, meta_outputs.trained_logits, rtol=0, atol=0)


def test_export_in_the_bases_dtype_writes_its_config_byte_for_byte(meta_format_model_dir, tmp_path):
    model = _load(meta_format_model_dir)
    save_hf_model(model, AutoTokenizer.from_pretrained(meta_format_model_dir), tmp_path / "out", env=DistEnv(),
                  dtype=torch.bfloat16)
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (meta_format_model_dir / name).read_bytes(), name


def test_a_grown_vocabulary_is_written_and_nothing_else(meta_format_model_dir, tmp_path):
    """match_vocab grows the embeddings to a larger tokenizer: vocab_size follows, under the
    base's key, and the output loads with the grown embeddings."""
    model = _load(meta_format_model_dir)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    save_hf_model(model, AutoTokenizer.from_pretrained(meta_format_model_dir), tmp_path / "out", env=DistEnv())
    base = json.loads((meta_format_model_dir / "config.json").read_text())
    got = json.loads((tmp_path / "out" / "config.json").read_text())
    assert got == {**base, "vocab_size": base["vocab_size"] + 8, "torch_dtype": "float32"}
    assert _load(tmp_path / "out").get_input_embeddings().weight.shape[0] == base["vocab_size"] + 8


def test_a_model_built_in_memory_gets_transformers_config(tmp_path):
    """No base config.json to keep: transformers writes the config, recording the written dtype."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    write_config(model, tmp_path, torch.bfloat16)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["dtype"] == "bfloat16" and written["model_type"] == "llama"
    assert (tmp_path / "generation_config.json").is_file()
    assert LlamaConfig.from_pretrained(tmp_path).to_dict()["rope_parameters"] == model.config.rope_parameters


def test_a_vision_models_config_changes_only_in_its_text_config(tiny_vision_model_dir, tmp_path):
    """Mllama keeps vocab_size in text_config: a grown vocabulary changes it there (no top-level
    key appears), and everything else is the base file's."""
    from transformers import MllamaForConditionalGeneration

    model = _load(tiny_vision_model_dir, MllamaForConditionalGeneration)
    (tmp_path / "same").mkdir()
    write_config(model, tmp_path / "same", torch.float32)
    assert (tmp_path / "same" / "config.json").read_bytes() == (tiny_vision_model_dir / "config.json").read_bytes()
    base = json.loads((tiny_vision_model_dir / "config.json").read_text())
    model.resize_token_embeddings(base["text_config"]["vocab_size"] + 8)
    (tmp_path / "grown").mkdir()
    write_config(model, tmp_path / "grown", torch.float32)
    got = json.loads((tmp_path / "grown" / "config.json").read_text())
    base["text_config"]["vocab_size"] += 8
    assert got == base
