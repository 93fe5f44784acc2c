"""Tiny models whose shapes exercise FSDP2's padding: odd hidden size (63) and MLP width (101)."""

from __future__ import annotations

from pathlib import Path

import pytest


def build_odd_llama(path: Path, tied: bool = False) -> Path:
    """A 2-layer Llama (hidden 63, 7 heads of 8, 1 KV head, MLP 101) + the demo tokenizer: most
    of its weights have an odd number of rows, so 2-rank shards are padded and unequal."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.demo.tiny import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=63, head_dim=8, num_attention_heads=7,
                         num_key_value_heads=1, intermediate_size=101, num_hidden_layers=2,
                         max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def odd_model_dir(tmp_path_factory) -> Path:
    return build_odd_llama(tmp_path_factory.mktemp("odd-llama"))


@pytest.fixture(scope="session")
def odd_tied_model_dir(tmp_path_factory) -> Path:
    return build_odd_llama(tmp_path_factory.mktemp("odd-tied-llama"), tied=True)
