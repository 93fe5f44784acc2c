"""Tiny Llama models and tokenizers built locally (no hub access), for the demo and the tests.

The tokenizer is a byte-level BPE trained on a small built-in corpus, wrapped as a
``PreTrainedTokenizerFast`` (which loads in transformers 4.x and 5.x). Single letters and digits
after a space are single tokens, so character-level tasks such as "reverse: a b c" are learnable.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:\n### Input:\n### Response:",
    "Correct this to standard English: she go to school every days\n---\nCorrected: She goes to school every day.",
    "Summarize this dialog:\nAmanda: I baked cookies. Do you want some?\nJerry: Sure!\n---\nSummary:\n",
    "reverse: sort: count: add: copy: the quick brown fox jumps over the lazy dog",
    "Hello, how are you today? I am fine, thank you. What a lovely day it is.",
]


def _corpus() -> Iterable[str]:
    letters = string.ascii_lowercase + string.digits
    for _ in range(4):
        yield from _CORPUS
    yield " ".join(letters)
    yield " ".join(string.ascii_uppercase)
    yield string.punctuation


def build_tokenizer(vocab_size: int = 512, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <s>, </s>, <pad>, <unk>; BOS is prepended by ``encode``."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   padding_side="right", **SPECIAL_TOKENS)


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64,
                      num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                      intermediate_size: Optional[int] = None, max_positions: int = 512,
                      tie_word_embeddings: bool = False) -> LlamaConfig:
    """``tie_word_embeddings``: the head shares the embedding matrix and the saved files hold no
    ``lm_head.weight`` (as Llama 3.2 1B/3B)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=10000.0,
    )


def build_tiny_llama(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **config_kwargs) -> Path:
    """Write a random-initialised tiny Llama + tokenizer as a Hugging Face directory at ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_llama_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
