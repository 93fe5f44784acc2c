"""Load a local (or, when online, hub) Hugging Face Llama model and its tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..config.errors import ShardtuneError

log = logging.getLogger(__name__)


def check_model_source(name: str, what: str = "--model_name") -> None:
    """Fail early, clearly, for a path that is not an HF model directory.

    A string that does not exist locally is treated as a hub id only if it looks like one
    (``org/name``); whether it can be downloaded is then up to the hub client.
    """
    path = Path(name)
    if path.exists():
        if path.is_file():
            raise ShardtuneError(
                f"{what} {name!r} is a file, but a Hugging Face model directory (with config.json "
                "and *.safetensors) is expected. Pass the folder that contains it.")
        if not (path / "config.json").is_file():
            raise ShardtuneError(
                f"{what} {name!r} has no config.json, so it is not a Hugging Face model directory. "
                "Point it at the folder written by save_pretrained (or convert your checkpoint "
                "with `shardtune convert`).")
        return
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ShardtuneError(
            f"{what} {name!r} does not exist. Pass a local Hugging Face model directory "
            "or a hub id such as meta-llama/Llama-3.1-8B.")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    check_model_source(name, "--tokenizer_name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise ShardtuneError(f"Could not load a tokenizer from {name!r}: {exc}") from None
    if tokenizer.pad_token_id is None:  # Llama ships without a pad token (llama-recipes does the same)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name: str):
    check_model_source(name)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ShardtuneError(f"Could not read the model config of {name!r}: {exc}") from None


def load_model(name: str, *, dtype: torch.dtype, attn: str, device: Optional[torch.device] = None):
    """Load the model with real weights on the host, then move it to ``device``."""
    check_model_source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as exc:
        raise ShardtuneError(f"Could not load the model from {name!r}: {exc}") from None
    if device is not None:
        model.to(device)
    return model


def match_vocab(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer has more tokens than the model (llama-recipes does too)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        log.warning("Resizing the token embeddings to the tokenizer's %d tokens.", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))


def check_vocab_fits(model, tokenizer) -> None:
    """With weights loaded later slice by slice (low-CPU path), the embeddings cannot grow."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ShardtuneError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embeddings have {rows} rows; "
            "--low_cpu_fsdp cannot resize embeddings. Use the model's own tokenizer, or drop "
            "--low_cpu_fsdp so the embeddings can be resized.")
