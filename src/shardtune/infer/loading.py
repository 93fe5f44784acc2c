"""Load a model for inference (generate, chat, eval) from what a run left behind.

``load_for_inference(path)`` takes an HF model directory or a PEFT adapter directory (on the
base model its config names, or ``base``) and returns the model in eval mode with its tokenizer,
or its processor for a vision model. The model class and whether a processor feeds it come from
the family table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..config.errors import ShardtuneError
from ..model.family import ModelFamily, family_for_config
from ..model.loading import (check_model_source, from_pretrained_checked, load_config, load_processor,
                             load_tokenizer, text_tokenizer)

# Files AutoProcessor.save_pretrained writes besides the tokenizer's.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _adapter_base(path: Path, base: Optional[str]) -> Optional[str]:
    """The base model of an adapter directory (``base`` if given); None for a full model directory."""
    adapter_cfg = path / "adapter_config.json"
    if not adapter_cfg.is_file():
        return None
    base = base or json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise ShardtuneError(f"{path} is a PEFT adapter without a recorded base model; pass --base.")
    check_model_source(base, "--base")
    return base


def model_family(path: str, base: Optional[str] = None) -> ModelFamily:
    """The family of the model at ``path``, or of an adapter's base model (reads config only)."""
    adapter_base = _adapter_base(Path(path), base)
    return family_for_config(load_config(adapter_base or path))


def load_for_inference(path: str, base: Optional[str] = None, device: str = "cpu",
                       dtype: Optional[torch.dtype] = None):
    """(model, tokenizer or processor) from a full HF dir, or from an adapter dir on top of its base
    model. The model class and whether a processor feeds it come from the family table."""
    p = Path(path)
    base = _adapter_base(p, base)
    if base is None:
        check_model_source(path, "MODEL")
    family = family_for_config(load_config(base or path))
    cls = family.model_class()
    if base is not None:
        from peft import PeftModel

        model = from_pretrained_checked(cls, base, "--base", dtype=dtype)
        try:
            model = PeftModel.from_pretrained(model, str(p))
        except RuntimeError as exc:  # torch's "size mismatch for ...lora_A..." from load_state_dict
            if "size mismatch" not in str(exc):
                raise
            first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "")
            raise ShardtuneError(
                f"The adapter {path} does not fit the base model {base!r}: its weights have other shapes "
                f"({first[:200]}). It was trained on a different base model; pass that one with --base "
                "(the adapter records it in adapter_config.json as base_model_name_or_path).") from None
        # An adapter dir may carry its own tokenizer/processor (the recipe saves it there); else the base's.
        own = _PROCESSOR_FILES if family.uses_processor else ("tokenizer_config.json",)
        if any((p / f).is_file() for f in own):
            return model.to(device).eval(), _load_adapter_inputs(p, family)
        src, what = base, "--base"
    else:
        model = from_pretrained_checked(cls, path, "MODEL", dtype=dtype)
        src, what = path, "MODEL"
    inputs = load_processor(src, what) if family.uses_processor else load_tokenizer(src, what)
    return model.to(device).eval(), inputs


def _load_adapter_inputs(path: Path, family: ModelFamily):
    """The processor or tokenizer saved in an adapter directory (which has no config.json, so the
    model-directory loaders refuse it)."""
    from transformers import AutoProcessor, AutoTokenizer

    kind = "processor" if family.uses_processor else "tokenizer"
    try:
        inputs = (AutoProcessor if family.uses_processor else AutoTokenizer).from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ShardtuneError(f"Could not load the {kind} saved in the adapter directory {path}: {exc}") from None
    tokenizer = text_tokenizer(inputs)
    if tokenizer.pad_token_id is None:  # as load_tokenizer: Llama ships without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    return inputs
