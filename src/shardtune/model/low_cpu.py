"""Low-CPU-memory loading (``--low_cpu_fsdp``): host RAM does not grow with the number of ranks.

Every rank builds the model on the meta device (no memory), wraps it with PEFT and FSDP2 there,
then allocates only its own shards and fills them by reading *only its own rows* of each tensor
from the safetensors files (``safe_open(...).get_slice``). Summed over ranks, host RAM holds
about one copy of the model instead of one copy per rank, and no rank ever holds the whole
model (llama-recipes loads the full model on rank 0 and broadcasts it).

Tied weights (``tie_word_embeddings``) are re-tied on the meta model before sharding; FSDP2 then
manages the one shared parameter, which ``to_empty`` keeps shared. A parameter FSDP leaves whole
(a LoRA run's frozen tied embedding, ``parallel/fsdp.py``) is a plain meta tensor, which
``to_empty`` replaces by a new parameter in each module that holds it: the aliases are tied again
afterwards.

Non-persistent buffers (the rotary ``inv_freq``) are in no checkpoint and ``to_empty`` would
leave them as garbage, so they are built for real at meta-init time (accelerate's
``init_empty_weights(include_buffers=False)``) and copied back after allocation.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from torch.distributed.tensor import DTensor, Shard

from ..config.errors import ShardtuneError
from .adapter_init import adapter_initial_values
from .loading import load_config
from .meta import build_meta_model as build_meta
from .names import Renamer, checkpoint_key
from .quantization import is_quantized_layer, quantize_on_meta, quantized_weight


def build_meta_model(name: str, *, dtype: torch.dtype, attn: str, quantization=None) -> nn.Module:
    """The model of ``name`` (its family's class) with parameters on the meta device; with a
    bitsandbytes ``quantization`` config, its Linear layers are 4-bit layers (QLoRA)."""
    model = build_meta(load_config(name), dtype=dtype, attn=attn, generation_from=name)
    model.name_or_path = name
    model.config.name_or_path = name
    if quantization is not None:
        quantize_on_meta(model, quantization)
    return model


@contextlib.contextmanager
def _open_weights(path: Path):
    """``safe_open`` with a damaged (truncated, corrupt) file as a clear error naming it."""
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors' own error type
        raise ShardtuneError(f"The weight file {path} is damaged ({str(exc)[:160]}): it is truncated or "
                             "corrupt. Copy or download it again.") from None
    with handle as f:
        yield f


def safetensors_index(name: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it, for a local HF model directory."""
    root = Path(name)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: root / file for key, file in weight_map.items()}
    single = root / "model.safetensors"
    if single.is_file():
        with _open_weights(single) as f:
            return {key: single for key in f.keys()}
    raise ShardtuneError(
        f"--low_cpu_fsdp reads weights slice by slice from safetensors files, but {name!r} has "
        "no model.safetensors or model.safetensors.index.json (a local HF directory is needed; "
        "convert .bin weights with transformers' save_pretrained, or drop --low_cpu_fsdp).")


def _by_model_name(model: nn.Module, index: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """The files' tensor names (``save_pretrained``'s, or an older transformers' layout) keyed by
    the base model's parameter names: model name -> (file, name in the file)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    known = {checkpoint_key(n) for n, _ in model.named_parameters()} | {n for n, _ in base.named_buffers()}
    rename = Renamer(base, known)
    return {(rename(key) or key): (path, key) for key, path in index.items()}


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's piece of ``param`` and the first global row it holds (dim-0 sharding)."""
    if not isinstance(param, DTensor):
        return param, 0
    local = param.to_local()
    start = 0
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ShardtuneError(f"unexpected FSDP placement {placement} for a parameter")
            size = param.device_mesh.size(mesh_dim)
            start = param.device_mesh.get_local_rank(mesh_dim) * math.ceil(param.shape[0] / size)
    return local, start


def _init_new_adapter_weights(model: nn.Module, names: list[str], seed: int) -> list[str]:
    """Give new adapter weights their seeded initial values (each rank its own rows); returns the
    names of missing weights that are not new adapter weights."""
    values = {name: (param, value) for name, param, value in adapter_initial_values(model, seed)}
    unknown = []
    for name in names:
        if name not in values:
            unknown.append(name)
            continue
        param, value = values[name]
        local, start = _local_rows(param)
        if local.numel():
            rows = value[start:start + local.shape[0]] if local.dim() > 0 else value
            local.copy_(rows.to(local.dtype))
    return unknown


def _copy_quantized_rows(param: torch.Tensor, layer: nn.Module, path: Path, key: str, source: str,
                         device: torch.device, dtype: torch.dtype, config) -> None:
    """Fill this rank's rows of a 4-bit layer's packed weight: the whole checkpoint tensor is
    read and quantized (one tensor at a time, the layer keeps its quant state), then this rank
    keeps its rows of the packed bytes."""
    with _open_weights(path) as f:
        weight = f.get_tensor(key)
    try:
        packed = quantized_weight(layer, weight, config, device=device, dtype=dtype)
    except ValueError as exc:
        raise ShardtuneError(f"{source!r}: tensor {key} in {path.name} does not fit the model built from the "
                             f"config ({exc}); the weights and the model do not belong together.") from None
    local, start = _local_rows(param)
    if local.numel():
        local.copy_(packed[start:start + local.shape[0]])


def _copy_rows(param: torch.Tensor, path: Path, key: str, source: str) -> None:
    """Fill this rank's rows of ``param`` from tensor ``key`` of the safetensors file ``path``."""
    local, start = _local_rows(param)
    if local.numel() == 0:
        return
    # One open per tensor: safetensors maps the file, and the pages a rank touched stay in its
    # RSS while the file is open. Closing after each tensor keeps each rank's footprint to its
    # own rows (measured: 2.3x -> 1.05x of one model summed over 2 ranks).
    with _open_weights(path) as f:
        piece = f.get_slice(key)
        shape = tuple(piece.get_shape())
        if shape != tuple(param.shape):
            raise ShardtuneError(
                f"{source!r}: tensor {key} has shape {shape} in {path.name} but {tuple(param.shape)} in the "
                "model built from the config; the weights and the model do not belong together.")
        rows = piece[start:start + local.shape[0]] if local.dim() > 0 else piece[:]
        local.copy_(rows.to(local.dtype))


def _load_saved_adapter(model: nn.Module, params: dict, missing: list[str], adapter_dir: Path) -> list[str]:
    """Fill the adapter weights ``--from_peft_checkpoint`` names from its adapter_model.safetensors
    (peft saves them without the adapter's name); returns what is still missing. An adapter
    weight the file lacks is an error: a continued adapter must never restart from scratch."""
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        raise ShardtuneError(
            f"--from_peft_checkpoint {str(adapter_dir)!r} has no adapter_model.safetensors (an older .bin "
            "adapter?), which --low_cpu_fsdp reads slice by slice. Load and re-save it with peft, or drop "
            "--low_cpu_fsdp.")
    with _open_weights(file) as f:
        saved = set(f.keys())
    adapter = getattr(model, "active_adapter", "default")
    still = []
    for param_name in missing:
        key = param_name.replace(f".{adapter}", "")
        if key in saved:
            _copy_rows(params[param_name], file, key, str(adapter_dir))
        elif ".lora_" in param_name or ".adaption_" in param_name:
            raise ShardtuneError(
                f"--from_peft_checkpoint {str(adapter_dir)!r}: its adapter_model.safetensors has no {key}, "
                "which this run's adapter has. The adapter was saved with other options (target modules, "
                "layers); pass the lora_config / llama_adapter_config it was trained with.")
        else:
            still.append(param_name)
    return still


def _aliases(model: nn.Module) -> list[tuple[str, str]]:
    """(alias, first name) of every parameter registered under more than one name (tied weights)."""
    first: dict[int, str] = {}
    aliases = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.append((name, first[id(param)]))
        else:
            first[id(param)] = name
    return aliases


def _tie_again(model: nn.Module, aliases: list[tuple[str, str]]) -> None:
    for alias, source in aliases:
        owner_name, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner_name), leaf, model.get_parameter(source))


def _wrapped_attention(model: nn.Module) -> list[str]:
    """Module names of attention blocks LLaMA-Adapter wrapped: the original block sits at
    ``<name>.model`` inside peft's ``AdaptedAttention``."""
    if "peft" not in sys.modules:  # no adapter without peft; a full fine-tune never imports it (~2.3 s CPU)
        return []
    from peft.tuners.adaption_prompt.layer import AdaptedAttention

    return [name for name, m in model.named_modules() if isinstance(m, AdaptedAttention)]


def _unwrap(param_name: str, wrapped: list[str]) -> str:
    for prefix in wrapped:
        if param_name.startswith(prefix + ".model."):
            return prefix + "." + param_name[len(prefix) + len(".model."):]
    return param_name


def _quantized_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> its 4-bit layer, for the quantized weights of a QLoRA model."""
    if getattr(model.config, "quantization_config", None) is None:
        return {}
    return {f"{name}.weight": module for name, module in model.named_modules() if is_quantized_layer(module)}


@torch.no_grad()
def materialize_and_load(model: nn.Module, name: str, device: torch.device, *, seed: int,
                         param_device: Optional[torch.device] = None,
                         adapter_dir: Optional[str] = None,
                         weights_dtype: torch.dtype = torch.float32) -> None:
    """Allocate this rank's shards and fill them from ``name``'s safetensors.

    Parameters go to ``param_device`` (host memory under FSDP CPU offload; default ``device``),
    buffers to ``device``, where the forward runs. The adapter of ``adapter_dir``
    (``--from_peft_checkpoint``) is read from its file the same way; new adapter weights (in no
    file) get the values ``model.adapter_init`` draws from ``seed``, as the normal loading path does.
    The 4-bit layers of a QLoRA model are quantized from the checkpoint's tensors in
    ``weights_dtype`` (the dtype the model was built in), as ``from_pretrained`` does.
    """
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    index = _by_model_name(model, safetensors_index(name))
    aliases = _aliases(model)
    model.to_empty(device=param_device or device)
    _tie_again(model, aliases)  # to_empty unties plain (unsharded) tied parameters
    for buf_name, value in buffers.items():
        owner_name, _, leaf = buf_name.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, leaf, value.to(device))  # replaces the uninitialised buffer to_empty made
    missing: list[str] = []
    wrapped = _wrapped_attention(model)
    params = dict(model.named_parameters())
    quantized = _quantized_weights(model)
    for param_name, param in params.items():
        found = index.get(checkpoint_key(_unwrap(param_name, wrapped)))
        if found is None:
            missing.append(param_name)
            continue
        path, file_key = found
        if param_name in quantized:
            _copy_quantized_rows(param, quantized[param_name], path, file_key, name, device, weights_dtype,
                                 model.config.quantization_config)
        else:
            _copy_rows(param, path, file_key, name)
    if adapter_dir is not None and missing:
        missing = _load_saved_adapter(model, params, missing, Path(adapter_dir))
    unknown = _init_new_adapter_weights(model, missing, seed) if missing else []
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ShardtuneError(
            f"--low_cpu_fsdp: {len(unknown)} model weights are not in the safetensors files of "
            f"{name!r} ({shown}). The files do not match the model's config.json, or these adapter "
            "weights cannot be initialised on the meta device (DoRA and modules_to_save need the "
            "normal loading path: drop --low_cpu_fsdp).")
