"""The model on the meta device: parameters without memory, real non-persistent buffers.

Used by low-CPU loading (each rank fills its shards after FSDP wrapping) and by conversion
(names, shapes and dtypes of the target without building it). The class comes from the family
table, so a Llama 3.2 Vision config builds the whole ``MllamaForConditionalGeneration``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .attention import register_attention
from .family import family_for_config


def build_meta_model(config, *, cls: Optional[type] = None, dtype: Optional[torch.dtype] = None,
                     attn: Optional[str] = None, generation_from: Optional[str | Path] = None) -> nn.Module:
    """``cls`` (default: the family's class) built from ``config`` with meta parameters.

    Non-persistent buffers (the rotary ``inv_freq``) are built for real: they are in no checkpoint,
    and ``to_empty`` would otherwise leave garbage (TRAPS.md). ``generation_from``: a folder
    whose generation_config.json the model keeps.
    """
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn is not None:
        register_attention(attn)
        kwargs["attn_implementation"] = attn
    with init_empty_weights(include_buffers=False):
        if cls is None:
            cls = family_for_config(config).model_class()
        if hasattr(cls, "from_config"):  # an Auto class
            model = cls.from_config(config, **kwargs)
        elif kwargs:
            model = cls._from_config(config, **kwargs)
        else:  # the class's default dtype (fp32), not the config's: conversion records the source dtypes
            model = cls(config)
    # init_empty_weights re-registers every parameter as a new meta tensor, which cuts the tie
    # between lm_head and embed_tokens (tie_word_embeddings: Llama 3.2 1B/3B). Tie again here,
    # outside the context, so FSDP shards one shared parameter and the head is never "missing".
    model.tie_weights()
    if generation_from is not None:
        with contextlib.suppress(OSError, ValueError):  # keep the source's generation settings
            model.generation_config = GenerationConfig.from_pretrained(generation_from)
    return model
