"""Load a local (or, when online, hub) Hugging Face model and what feeds it: the tokenizer of a
text model, the processor (image processor + tokenizer) of a vision model. The model class comes
from the family table (``model/family.py``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from ..config.errors import ShardtuneError
from .attention import register_attention
from .family import family_for_config

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


# The files one of which a folder needs for AutoTokenizer / AutoProcessor to load it without a
# config.json (tokenizer_config.json names the class; the others are read by the fast or slow
# tokenizer classes; a processor folder has its own config).
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json",
                    "processor_config.json", "preprocessor_config.json")


def check_tokenizer_source(name: str, what: str = "--tokenizer_name") -> None:
    """Like ``check_model_source``, but a folder that holds only tokenizer (or processor) files,
    as ``tokenizer.save_pretrained`` writes, is a valid source: AutoTokenizer loads it."""
    path = Path(name)
    if path.is_dir() and not (path / "config.json").is_file():
        if any((path / file).is_file() for file in _TOKENIZER_FILES):
            return
        raise ShardtuneError(
            f"{what} {name!r} holds no tokenizer: none of {', '.join(_TOKENIZER_FILES)} is in it. Point it "
            "at a folder written by tokenizer.save_pretrained (or a model folder with its tokenizer).")
    check_model_source(name, what)


def load_tokenizer(name: str, what: str = "--tokenizer_name") -> PreTrainedTokenizerBase:
    """The tokenizer of ``name``; ``what`` is the flag that named it (for error messages)."""
    from transformers import AutoTokenizer  # here: the path checks above serve preflight without transformers

    check_tokenizer_source(name, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise ShardtuneError(f"Could not load a tokenizer from {name!r}: {exc}") from None
    if tokenizer.pad_token_id is None:  # Llama ships without a pad token (llama-recipes does the same)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_tokenizer(tokenizer_or_processor):
    """The tokenizer inside a processor, or the tokenizer itself."""
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


def load_processor(name: str, what: str = "--model_name"):
    """A vision model's ``AutoProcessor`` (image processor, tokenizer, chat template), with the
    tokenizer padding on the right and a pad token, as training needs."""
    from transformers import AutoProcessor

    check_tokenizer_source(name, what)
    try:
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ShardtuneError(
            f"Could not load the processor (image processor + tokenizer) of the vision model {what} "
            f"{name!r}: {str(exc)[:300]}. The folder needs processor_config.json (or "
            "preprocessor_config.json) and the tokenizer files, as AutoProcessor.save_pretrained writes.") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ShardtuneError(
            f"{what} {name!r} is a vision model but its processor ({type(processor).__name__}) has no image "
            "processor and tokenizer. Save the model's AutoProcessor into that folder.")
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_inputs(model_name: str, tokenizer_name: Optional[str] = None):
    """What feeds the model: its processor for a vision family, else the tokenizer
    (``tokenizer_name`` when given). The recipe passes it wherever data meets the model."""
    config = load_config(model_name)
    source, what = (tokenizer_name, "--tokenizer_name") if tokenizer_name else (model_name, "--model_name")
    if family_for_config(config).uses_processor:
        return load_processor(source, what)
    return load_tokenizer(source, what)


def load_config(name: str):
    from transformers import AutoConfig

    check_model_source(name)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ShardtuneError(f"Could not read the model config of {name!r}: {exc}") from None


def damaged_weight_files(name: str | Path) -> list[str]:
    """``"FILE is damaged (reason)"`` for each safetensors file of a local model folder that cannot be opened
    (a truncated file fails its header check)."""
    from safetensors import safe_open

    path = Path(name)
    damaged = []
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors' own error type, OSError for unreadable files
            damaged.append(f"{file} is damaged ({str(exc)[:160]})")
    return damaged


def check_weight_files(name: str | Path, what: str = "--model_name") -> None:
    """Refuse a local model folder whose safetensors files do not all open (headers only: no
    tensor is read), before any model code is imported or any rank is started."""
    damaged = damaged_weight_files(name)
    if damaged:
        raise ShardtuneError(_damaged(what, name, damaged[0]))


def _damaged(what: str, name: str | Path, first: str) -> str:
    return (f"{what} {str(name)!r}: the weight file {first}: it is truncated or corrupt. "
            "Copy or download it again (or convert the checkpoint it came from again).")


def from_pretrained_checked(cls, name: str, what: str = "--model_name", **kwargs):
    """``cls.from_pretrained(name, **kwargs)``; a damaged weight file or an unloadable folder is a
    clear error naming the file instead of a traceback from safetensors or transformers."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except Exception as exc:
        damaged = damaged_weight_files(name)
        if damaged:
            raise ShardtuneError(_damaged(what, name, damaged[0])) from None
        if isinstance(exc, (OSError, ValueError)):
            raise ShardtuneError(f"Could not load the model from {what} {name!r}: {exc}") from None
        raise


def load_model(name: str, *, dtype: torch.dtype, attn: str, device: Optional[torch.device] = None,
               quantization=None):
    """Load the model with real weights on the host, then move it to ``device``.

    With a bitsandbytes ``quantization`` config the weights are quantized as they are loaded,
    straight onto ``device`` (a quantized model cannot be moved afterwards).
    """
    check_model_source(name)
    cls = family_for_config(load_config(name)).model_class()
    register_attention(attn)
    if quantization is not None:
        return from_pretrained_checked(cls, name, dtype=dtype, attn_implementation=attn,
                                       quantization_config=quantization,
                                       device_map={"": str(device or torch.device("cpu"))})
    model = from_pretrained_checked(cls, name, dtype=dtype, attn_implementation=attn)
    if device is not None:
        model.to(device)
    return model


def match_vocab(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer has more tokens than the model (llama-recipes does too)."""
    tokenizer = text_tokenizer(tokenizer)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        log.warning("Resizing the token embeddings to the tokenizer's %d tokens.", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))


def check_vocab_fits(model, tokenizer, flag: str = "--low_cpu_fsdp") -> None:
    """Where the embeddings cannot grow (weights loaded later slice by slice, or a quantized
    model), a tokenizer larger than them is refused; ``flag`` is the option responsible."""
    rows = model.get_input_embeddings().weight.shape[0]
    tokenizer = text_tokenizer(tokenizer)
    if len(tokenizer) > rows:
        raise ShardtuneError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embeddings have {rows} rows; "
            f"{flag} cannot resize embeddings. Use the model's own tokenizer, or drop {flag} so the "
            "embeddings can be resized.")
