from __future__ import annotations

import pytest

from shardtune.config.errors import ShardtuneError
from shardtune.model.low_cpu import safetensors_index
from shardtune.model.names import checkpoint_key


def test_checkpoint_key_undoes_peft_renames():
    assert checkpoint_key("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert (checkpoint_key("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
            == "model.layers.0.self_attn.q_proj.weight")


def test_index_lists_every_tensor_of_a_model_dir(tiny_model_dir):
    index = safetensors_index(str(tiny_model_dir))
    assert "model.embed_tokens.weight" in index and all(p.is_file() for p in index.values())


def test_a_model_without_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ShardtuneError, match="--low_cpu_fsdp reads weights"):
        safetensors_index(str(tmp_path))
