"""``config.json`` and ``generation_config.json`` of a written model: the base model's own files,
changed only where training changed the model.

Why not ``config.save_pretrained``: transformers 5 re-serialises a config in its own format
(``rope_parameters``, ``dtype``; no top-level ``rope_theta`` / ``rope_scaling``), and transformers
4.x reads such a Llama 3.x config with ``rope_theta = 10000`` and no llama3 scaling: a silently
different model (TRAPS.md). GGUF converters and serving engines read the keys directly too. So the
base's file is kept, key by key and in its order, and only these change:

- the dtype the weights are written in, under the base's own key (``torch_dtype`` as Meta and
  transformers 4.x write it, ``dtype`` as transformers 5 does; ``torch_dtype``, which every version
  reads, when the base has neither), in each section that records one;
- what training changed in the config itself (:data:`TRAINED_KEYS`: a vocabulary grown to the
  tokenizer's, the tie of the head to the embeddings, ``architectures`` where the base had none),
  found by comparing the model's config with transformers' reading of the base file.

A model with no base ``config.json`` (built in memory), or whose base is another model type, is
written by transformers (``save_pretrained``) as before.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
# Config values a fine-tune can change (model/loading.match_vocab resizes the embeddings; convert
# names the class when the base config does not). Anything else stays as the base wrote it.
TRAINED_KEYS = ("vocab_size", "tie_word_embeddings", "architectures")
DTYPE_KEYS = ("torch_dtype", "dtype")   # transformers 4.x (and Meta) / transformers 5 spelling
# Sub-configs of a composite model (Mllama) that hold their own keys.
SECTIONS = ("text_config", "vision_config")
_MISSING = object()


def base_config_file(base: Optional[str | Path]) -> Optional[Path]:
    """The ``config.json`` of ``base``: a model folder, a config.json file, or a hub id already in
    the local cache (never downloaded). None when there is none."""
    if not base:
        return None
    path = Path(base)
    if path.is_file():
        return path
    if path.is_dir():
        return path / CONFIG_FILE if (path / CONFIG_FILE).is_file() else None
    from transformers.utils import cached_file

    with contextlib.suppress(Exception):  # not a hub id, or not cached: no base file
        found = cached_file(str(base), CONFIG_FILE, local_files_only=True,
                            _raise_exceptions_for_missing_entries=False)
        return Path(found) if found else None
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sections(data: dict, config, base_config) -> list[tuple[dict, Any, Any]]:
    """(the file's section, the model's config section, transformers' reading of the base's)."""
    out = [(data, config, base_config)]
    for name in SECTIONS:
        sub = data.get(name)
        live, was = getattr(config, name, None), getattr(base_config, name, None)
        if isinstance(sub, dict) and live is not None and was is not None:
            out.append((sub, live, was))
    return out


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def updated_config(original: dict, config, dtype: torch.dtype, base_config) -> dict:
    """``original`` (the base's config.json, parsed) with only what training changed: the written
    ``dtype`` and the :data:`TRAINED_KEYS` where ``config`` (the trained model's) differs from
    ``base_config`` (transformers' reading of ``original``)."""
    data = json.loads(json.dumps(original))  # a copy (key order kept): the base's dict stays as read
    name = dtype_name(dtype)
    sections = _sections(data, config, base_config)
    for section, _, _ in sections:
        for key in DTYPE_KEYS:
            if key in section:
                section[key] = name
    for key in TRAINED_KEYS:
        changed = [(section, value) for section, live, was in sections
                   if (value := getattr(live, key, _MISSING)) is not _MISSING
                   and value != getattr(was, key, _MISSING)]
        # where the file has the key (Mllama: vocab_size in text_config); else at the top level
        placed = [(section, value) for section, value in changed if key in section]
        for section, value in placed or [c for c in changed if c[0] is data]:
            section[key] = _jsonable(value)
    if not any(key in data for key in DTYPE_KEYS):
        data["torch_dtype"] = name  # the base records no dtype: the spelling every version reads
    return data


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _transformers_config(config, out: Path, dtype: torch.dtype) -> None:
    """No base file to keep: transformers' own serialisation, recording the written dtype."""
    config.save_pretrained(out)
    path = out / CONFIG_FILE
    data = json.loads(path.read_text())
    keys = [key for key in DTYPE_KEYS if key in data] or ["dtype"]  # a config built without one
    for key in keys:
        data[key] = dtype_name(dtype)
    _write_json(path, data)


def write_model_config(out: str | Path, config, dtype: torch.dtype, *, base: Optional[str | Path],
                       generation_config=None) -> None:
    """Write ``out/config.json`` (and ``generation_config.json``) for weights written in ``dtype``
    by a model with ``config``, keeping ``base``'s own files (see the module doc)."""
    out = Path(out)
    source = base_config_file(base)
    original = None
    if source is not None:
        with contextlib.suppress(OSError, ValueError):
            original = json.loads(source.read_text())
    base_config = None
    if isinstance(original, dict) and original.get("model_type") == getattr(config, "model_type", None):
        # transformers' reading of the base file; from a copy, as transformers 5 edits the dict it is
        # given (it adds rope_theta into rope_scaling). A file it cannot read is not kept.
        with contextlib.suppress(Exception):
            base_config = type(config).from_dict(json.loads(json.dumps(original)))
    if base_config is None:
        _transformers_config(config, out, dtype)
        source = None  # not this model's files: its generation config is not ours either
    else:
        data = updated_config(original, config, dtype, base_config)
        if data == original:
            shutil.copyfile(source, out / CONFIG_FILE)  # byte for byte, as the base wrote it
        else:
            _write_json(out / CONFIG_FILE, data)
    generation_file = source.parent / GENERATION_FILE if source is not None else None
    if generation_file is not None and generation_file.is_file():
        shutil.copyfile(generation_file, out / GENERATION_FILE)  # training changes no generation setting
    elif generation_config is not None:
        generation_config.save_pretrained(out)
