"""Stream a (possibly FSDP-sharded) model into Hugging Face safetensors, one tensor at a time.

Every rank takes part in gathering each tensor (``DTensor.full_tensor``, one at a time); rank 0
appends it to the current output shard and writes the shard to disk once it reaches
``max_shard_size``. Peak host memory on rank 0 is one output shard plus one tensor — never the
whole model — which is what lets a 70B FSDP run write its HF directory without running out of
memory. The files are ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(or a single ``model.safetensors``), the layout ``from_pretrained`` reads.

``merged_lora_tensors`` yields the weights of a LoRA model with the adapter folded in
(W + scaling * B @ A), under the base model's names, for ``--merge_lora``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..model.names import checkpoint_key
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


def merged_lora_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A PEFT LoRA model's weights with the adapters merged in, under the base model's names.

    Linear layers get ``W + scaling * B @ A`` (transposed for ``fan_in_fan_out``), embeddings
    ``W + scaling * (B @ A)^T`` (peft's ``lora_embedding_A/B``), and ``modules_to_save`` copies
    replace the weights they were copied from. A LoRA variant this cannot merge (DoRA, LoRA bias,
    a LoRA on a weight tied to another) is an error, never a silently dropped layer.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    saved = {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    check_mergeable(model)
    for name, tensor in model_tensors(model):
        if ".lora_" in name or ".original_module." in name:
            continue  # adapter factors are folded in below; original_module is replaced by its copy
        if ".modules_to_save." in name:
            owner, _, rest = name.partition(".modules_to_save.")
            adapter, _, leaf = rest.partition(".")
            if adapter in saved[owner].active_adapters:
                yield checkpoint_key(f"{owner}.{leaf}"), tensor
            continue
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        layer = lora_layers.get(owner) if owner else None
        if layer is not None and name.endswith(".base_layer.weight"):
            weight = _full(tensor).float()
            for adapter in layer.active_adapters:
                weight = weight + _lora_delta(layer, adapter)
            yield checkpoint_key(name), weight.to(tensor.dtype)
        else:
            yield checkpoint_key(name), tensor


def _lora_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    if adapter in layer.lora_A:
        a = _full(layer.lora_A[adapter].weight).float()
        b = _full(layer.lora_B[adapter].weight).float()
        delta = (b @ a) * layer.scaling[adapter]
        return delta.T if getattr(layer, "fan_in_fan_out", False) else delta
    if adapter in layer.lora_embedding_A:
        a = _full(layer.lora_embedding_A[adapter]).float()
        b = _full(layer.lora_embedding_B[adapter]).float()
        return (b @ a).T * layer.scaling[adapter]
    return torch.zeros(())  # this layer has no weights for that adapter


def check_mergeable(model: nn.Module) -> None:
    """Refuse (before training, and again before writing) a LoRA model ``merged_lora_tensors``
    cannot merge exactly."""
    from peft.tuners.lora import LoraLayer

    from ..config.errors import ShardtuneError

    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    tied = _tied_groups(model)
    for name, layer in lora_layers.items():
        kinds = []
        if len(getattr(layer, "lora_magnitude_vector", None) or {}):
            kinds.append("DoRA (use_dora)")
        if any(getattr(layer, "lora_bias", {}).values()):
            kinds.append("a LoRA bias (lora_bias)")
        if f"{name}.base_layer.weight" in tied:
            kinds.append("a weight tied to another (tie_word_embeddings)")
        if kinds:
            raise ShardtuneError(
                f"--merge_lora cannot merge the LoRA layer {checkpoint_key(name)} ({', '.join(kinds)}); "
                "the merged model would differ from the trained one. Save the adapter without "
                "--merge_lora and load it with PeftModel.from_pretrained.")
    from peft.utils import ModulesToSaveWrapper

    for name, wrapper in model.named_modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and any(
                f"{name}.original_module.{leaf}" in tied for leaf, _ in wrapper.original_module.named_parameters()):
            raise ShardtuneError(
                f"--merge_lora cannot write the trained copy of {checkpoint_key(name)} (modules_to_save): "
                "its weight is tied to another (tie_word_embeddings), and a merged model would tie the "
                "trained copy to the untrained one again. Save the adapter without --merge_lora and load "
                "it with PeftModel.from_pretrained.")


def _tied_groups(model: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another parameter."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}


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
