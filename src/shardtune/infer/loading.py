"""Load a model for inference (generate, chat, eval) from whatever a run left behind.

``load_for_inference(path)`` takes any of:

* an HF model directory (or hub id);
* a PEFT adapter directory, on the base model its config names (or ``base``);
* a shardtune step checkpoint, a llama-recipes ``.distcp`` folder or FULL_STATE_DICT ``.pt``
  file (``base`` names the architecture when the checkpoint does not): read through
  ``shardtune convert``'s own detection and key mapping into a model in memory, one tensor at a
  time, with no converted copy on disk (``convert/in_memory.py``);

and returns the model in eval mode with its tokenizer, or its processor for a vision model. The
model class and whether a processor feeds it come from the family table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch

from ..config.errors import ShardtuneError
from ..outputs.ownership import verify_recorded
from ..convert.conversion import tokenizer_folder
from ..convert.in_memory import build_model, open_checkpoint
from ..convert.sources import hf_weight_files
from ..model.family import ModelFamily, family_for_config
from ..model.loading import (check_model_source, check_weight_files, from_pretrained_checked, load_config,
                             load_processor, load_tokenizer, text_tokenizer)

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


def is_checkpoint(path: str) -> bool:
    """True for what ``shardtune convert`` reads (step checkpoints, llama-recipes ``.distcp`` folders
    and ``.pt`` files), False for an HF model directory, an adapter directory or a hub id."""
    p = Path(path)
    if not p.exists():
        return False  # a hub id, or a missing path: the HF loader says which
    if p.is_file():
        return True
    return not ((p / "adapter_config.json").is_file() or (p / "config.json").is_file() and hf_weight_files(p))


def model_family(path: str, base: Optional[str] = None) -> ModelFamily:
    """The family of the model at ``path``, or of an adapter's base model (reads config only)."""
    if is_checkpoint(path):
        return family_for_config(open_checkpoint(path, model=base).spec.config)
    adapter_base = _adapter_base(Path(path), base)
    return family_for_config(load_config(adapter_base or path))


def _note(line: str) -> None:
    """Notes of the loaders (a checkpoint without digests, an edited config) go to stderr, so
    that generated text on stdout stays clean."""
    if line.startswith("note:"):
        print(line, file=sys.stderr, flush=True)


def _load_checkpoint(path: str, base: Optional[str], device: str, dtype: Optional[torch.dtype]):
    """A step / llama-recipes checkpoint as (model, tokenizer or processor), through convert's plan
    (which checks the files against their recorded digests first)."""
    conv = open_checkpoint(path, model=base, log=_note)
    family = family_for_config(conv.spec.config)
    model = build_model(conv, dtype=dtype, device=device, log=lambda line: _note(f"note: {line}"))
    folder = tokenizer_folder(conv)
    if folder is None:
        raise ShardtuneError(f"{path} names no tokenizer, and its model {conv.spec.name!r} is not a local folder "
                             "with one; pass --model with the local Hugging Face model folder it was trained from.")
    inputs = load_processor(str(folder), "--model") if family.uses_processor else load_tokenizer(str(folder), "--model")
    return model, inputs


def load_for_inference(path: str, base: Optional[str] = None, device: str = "cpu",
                       dtype: Optional[torch.dtype] = None):
    """(model in eval mode on ``device``, tokenizer or processor) from any ``path`` kind (see the
    module doc); ``dtype`` None keeps the stored dtype."""
    if is_checkpoint(path):
        return _load_checkpoint(path, base, device, dtype)
    p = Path(path)
    base = _adapter_base(p, base)
    if base is None:
        check_model_source(path, "MODEL")
    for folder in (path, base):  # files shardtune wrote are checked against their recorded digests
        if folder and Path(folder).is_dir():
            verify_recorded(folder, _note)
    weights, what = (path, "MODEL") if base is None else (base, "--base")
    check_weight_files(weights, what)  # any other weight file: its header, before transformers' model code
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
