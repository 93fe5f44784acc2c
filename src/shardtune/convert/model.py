"""The target model: which config, which class, and its parameter names from a meta-device build.

The model config comes from (first found) ``--model``, a ``config.json`` next to the checkpoint,
the run's ``train_params.yaml`` (``model_name``) or a PEFT adapter's ``base_model_name_or_path``.
The class comes from ``config.architectures`` (e.g. ``MllamaForConditionalGeneration``), else
from the model type (causal LM, or image-text-to-text when the config has a vision part).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config.errors import ShardtuneError
from ..model.loading import check_model_source, check_weight_files
from .sources import Entry, Source


@dataclass
class ModelSpec:
    name: str                 # as given (folder, config.json file or hub id)
    origin: str               # where the name came from, for messages
    config: object
    folder: Optional[Path]    # local folder with tokenizer / generation config, when there is one
    cls: type

    @property
    def describe(self) -> str:
        return f"{self.cls.__name__} from {self.name} ({self.origin})"


def load_model_config(name: str, what: str):
    """An HF config from a model folder, a config.json file or a (cached) hub id."""
    from transformers import AutoConfig

    path = Path(name)
    try:
        if path.is_file():
            data = json.loads(path.read_text())
            model_type = data.pop("model_type", None)
            if not model_type:
                raise ShardtuneError(f"{what} {name!r} is a JSON file without \"model_type\": not a model config.json.")
            return AutoConfig.for_model(model_type, **data), path.parent
        check_model_source(name, what)
        return AutoConfig.from_pretrained(name), (path if path.is_dir() else None)
    except ShardtuneError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ShardtuneError(f"Could not read the model config of {what} {name!r}: {str(exc)[:300]}") from None


def model_class(config) -> type:
    """The model class the config's checkpoints belong to (``architectures[0]`` when known)."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    autos = [transformers.AutoModelForCausalLM]
    if hasattr(transformers, "AutoModelForImageTextToText"):
        vision = getattr(config, "vision_config", None) is not None
        autos.insert(0 if vision else 1, transformers.AutoModelForImageTextToText)
    for auto in autos:
        with contextlib.suppress(KeyError, ValueError):
            return auto._model_mapping[type(config)]
    raise ShardtuneError(
        f"No model class is known for model type {getattr(config, 'model_type', '?')!r} "
        f"(architectures {getattr(config, 'architectures', None)}); shardtune convert supports causal "
        "language models (Llama) and Llama 3.2 Vision (Mllama).")


def resolve_model(source: Source, model_arg: Optional[str], *, base: bool = False) -> ModelSpec:
    """The model (config + class) to convert ``source`` into; a clear error when none is known."""
    if model_arg:
        name, origin = model_arg, "--model"
    elif source.model_hint:
        name, origin = source.model_hint, source.hint_origin or "recorded in the checkpoint"
    else:
        what = "the base model to merge into" if base else "the model config"
        raise ShardtuneError(
            f"{source.path} ({source.title}) does not say which model it belongs to, so {what} is "
            "unknown: pass --model with the Hugging Face model folder (or its config.json) it was "
            "trained from.")
    what = "--model" if origin == "--model" else "model_name"
    if origin != "--model" and not Path(name).exists() and (name.count("/") != 1 or name.startswith(".")):
        raise ShardtuneError(
            f"The model {name!r} named by {origin} does not exist here (a relative path is resolved "
            "from the current folder). Pass --model with the Hugging Face model folder (or config.json) "
            "the checkpoint was trained from.")
    config, folder = load_model_config(name, what)
    if base and folder is not None:  # a merge reads its weights: a truncated file is refused before any work
        check_weight_files(folder, what)
    return ModelSpec(name=name, origin=origin, config=config, folder=folder, cls=model_class(config))


def build_meta_model(spec: ModelSpec) -> nn.Module:
    """The target model with parameters on the meta device (no memory) and real non-persistent buffers."""
    from ..model.meta import build_meta_model as build_meta

    return build_meta(spec.config, cls=spec.cls, generation_from=spec.folder)


@dataclass
class Targets:
    """What the output must contain: HF names in save order, plus names that may be left out."""

    entries: dict[str, Entry]
    tied: dict[str, str]          # state-dict name -> the written name it is tied to
    buffers: set[str]             # non-persistent buffers (never in a checkpoint)


def model_targets(model: nn.Module) -> Targets:
    from ..checkpoint.hf_stream import model_tensors

    entries = {name: Entry(tuple(t.shape), t.dtype) for name, t in model_tensors(model)}
    owner = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in entries:
            owner.setdefault(id(p), name)
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in entries:
            tied[name] = owner.get(id(p), "")
    persistent = set(model.state_dict().keys())
    for name in persistent - set(entries) - set(tied):
        tied[name] = ""
    buffers = {n for n, _ in model.named_buffers() if n not in persistent}
    return Targets(entries=entries, tied=tied, buffers=buffers)


def dominant_dtype(dtypes_bytes: dict[torch.dtype, int]) -> torch.dtype:
    floats = {d: n for d, n in dtypes_bytes.items() if d.is_floating_point}
    pool = floats or dtypes_bytes
    return max(pool, key=pool.get) if pool else torch.float32
