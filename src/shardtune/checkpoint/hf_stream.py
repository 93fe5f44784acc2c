"""Stream a (possibly FSDP-sharded) model into Hugging Face safetensors, one tensor at a time.

Every rank takes part in gathering each tensor (``DTensor.full_tensor``, one at a time); rank 0
appends it to the current output shard and writes the shard to disk once it reaches
``max_shard_size``. Peak host memory on rank 0 is one output shard plus one tensor — never the
whole model — which is what lets a 70B FSDP run write its HF directory without running out of
memory. The files are ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(or a single ``model.safetensors``), the layout ``from_pretrained`` reads. ``shardtune convert``
(and with it ``--merge_lora``'s merged model) writes through the same ``write_safetensors``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .layout import fsync_path

INDEX = "model.safetensors.index.json"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``1000`` -> bytes (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a size from {text!r}; write e.g. 5GB or 500MB")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


def human_size(n: float) -> str:
    """Bytes -> ``"1.5 GB"`` (decimal units, the inverse of :func:`parse_size`)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters (tied ones once, as HF saves them) and persistent buffers, under HF names."""
    seen: set[int] = set()
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    for name, param in model.named_parameters():
        if id(param) in seen or name in tied and getattr(model.config, "tie_word_embeddings", False):
            continue
        seen.add(id(param))
        yield name, param
    persistent = set(model.state_dict().keys())
    for name, buf in model.named_buffers():
        if name in persistent:
            yield name, buf


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, *, is_main: bool,
                      dtype: Optional[torch.dtype] = None, max_shard_size: str | int = "5GB") -> dict:
    """Gather and write ``tensors`` (on every rank; rank 0 writes). Returns the weight map on rank 0."""
    limit = parse_size(max_shard_size)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    written: list[tuple[Path, list[str]]] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        path = out_dir / f".part-{len(written):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        fsync_path(path)  # on disk before it is renamed into place (power loss, not just a kill)
        written.append((path, list(shard)))
        shard, shard_bytes = {}, 0

    total = 0
    for name, tensor in tensors:
        full = _full(tensor.detach())  # a collective on sharded tensors: every rank calls it
        if not is_main:
            del full
            continue
        full = full.to("cpu", dtype=dtype or full.dtype).contiguous()
        size = full.numel() * full.element_size()
        if shard and shard_bytes + size > limit:
            flush()
        shard[name] = full.clone() if full.untyped_storage().size() > size else full
        shard_bytes += size
        total += size
    if not is_main:
        return {}
    if shard or not written:
        flush()
    weight_map: dict[str, str] = {}
    n = len(written)
    for k, (path, names) in enumerate(written, start=1):
        final = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        path.rename(out_dir / final)
        weight_map.update({name: final for name in names})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
