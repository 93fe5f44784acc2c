"""Stream a (possibly FSDP-sharded) model into Hugging Face safetensors, one tensor at a time.

Every rank takes part in gathering each tensor (``DTensor.full_tensor``, one at a time); rank 0
writes it straight to its place in its output file (``safetensors_stream.py``: the files' headers
are written first, from the names, shapes and dtypes known up front) and lets it go. Peak host
memory on rank 0 is about one tensor whatever ``max_shard_size`` is — never the whole model nor a
whole output shard — which is what lets a 70B FSDP run write its HF directory without running
out of memory. The files are ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(or a single ``model.safetensors``), the layout ``from_pretrained`` reads. ``shardtune convert``
(and with it ``--merge_lora``'s merged model) writes through the same ``write_safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

from .progress import Progress
from .safetensors_stream import TensorSpec, plan_shards, write_shards
from .sizes import parse_size

INDEX = "model.safetensors.index.json"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
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


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], specs: list[TensorSpec], out_dir: Path, *,
                      is_main: bool, max_shard_size: str | int = "5GB",
                      progress: Optional[Progress] = None) -> dict:
    """Write ``tensors`` (announced by ``specs``, in the same order) as HF safetensors shards in
    ``out_dir``, streaming each tensor to its file. Every rank iterates ``tensors`` (a sharded
    tensor is gathered by all ranks, one at a time); rank 0 converts each to its spec's dtype and
    writes it. Returns the weight map on rank 0."""
    if not is_main:
        for _, tensor in tensors:
            full_tensor(tensor.detach())  # this rank's part of the gather
        return {}
    shards = plan_shards(specs, parse_size(max_shard_size))
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    flat = [s for shard in shards for s in shard]

    def host_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for (name, tensor), spec in zip(tensors, flat):
            yield name, full_tensor(tensor.detach()).to("cpu", dtype=spec.dtype)

    write_shards(shards, host_tensors(), out_dir, files, metadata={"format": "pt"}, progress=progress)
    weight_map = {s.name: file for shard, file in zip(shards, files) for s in shard}
    if n > 1:
        total = sum(s.nbytes for s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
