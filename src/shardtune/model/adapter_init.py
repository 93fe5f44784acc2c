"""Initial values of new adapter weights (LoRA, LLaMA-Adapter), drawn from (seed, parameter name) alone.

peft initialises ``lora_A`` from the global RNG, module by module, on whatever tensor the layer
holds. That is fine for a whole model in one process, but under ``--low_cpu_fsdp`` each rank
holds only its rows of a sharded ``lora_A`` and every rank's RNG is seeded alike, so every
rank drew the same rows: with 8 ranks the adapter started with rank r/8. Here every new LoRA
weight gets the full tensor peft would draw (same distribution), from a generator seeded by the
run's seed and the parameter's name, so the value does not depend on how the model is loaded,
sharded or ordered; each rank then keeps its own rows. Both loading paths use it, so the
adapter at step 0 is the same with and without ``--low_cpu_fsdp``. LLaMA-Adapter (peft's
AdaptionPrompt) gets the same treatment: its prompt standard-normal, its gate zero, as peft.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator

import torch
import torch.nn as nn

from ..config.errors import ShardtuneError


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _value(shape: torch.Size, kind: str, seed: int, name: str, r: int) -> torch.Tensor:
    """A float32 CPU tensor of ``shape`` drawn the way peft's ``reset_lora_parameters`` does."""
    out = torch.empty(tuple(shape), dtype=torch.float32)
    if kind == "zeros":
        return out.zero_()
    g = _generator(seed, name)
    if kind == "kaiming":  # nn.Linear's default, as peft uses for lora_A
        return nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=g)
    if kind == "gaussian":  # init_lora_weights="gaussian"
        return nn.init.normal_(out, std=1 / r, generator=g)
    if kind == "normal":  # lora_embedding_B, LLaMA-Adapter's prompt
        return nn.init.normal_(out, generator=g)
    raise AssertionError(kind)  # pragma: no cover


def adapter_initial_values(model: nn.Module, seed: int) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """(parameter name, parameter, full initial value) for every new adapter weight of ``model``."""
    from peft.tuners.adaption_prompt.layer import AdaptedAttention
    from peft.tuners.lora import LoraLayer

    configs = getattr(model, "peft_config", {})
    for mod_name, module in model.named_modules():
        if isinstance(module, AdaptedAttention):
            prompt, gate = f"{mod_name}.adaption_prompt", f"{mod_name}.adaption_gate"
            yield prompt, module.adaption_prompt, _value(module.adaption_prompt.shape, "normal", seed, prompt, 0)
            yield gate, module.adaption_gate, _value(module.adaption_gate.shape, "zeros", seed, gate, 0)
            continue
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            init = getattr(configs.get(adapter), "init_lora_weights", True)
            if init is True:
                a_kind = "kaiming"
            elif isinstance(init, str) and init.lower() == "gaussian":
                a_kind = "gaussian"
            else:
                raise ShardtuneError(
                    f"LoRA init_lora_weights={init!r} is not supported by shardtune's sharded "
                    "initialisation (True and 'gaussian' are). Use one of those.")
            a = module.lora_A[adapter].weight
            name = f"{mod_name}.lora_A.{adapter}.weight"
            yield name, a, _value(a.shape, a_kind, seed, name, module.r[adapter])
            for leaf, p in module.lora_B[adapter].named_parameters():
                yield f"{mod_name}.lora_B.{adapter}.{leaf}", p, _value(p.shape, "zeros", seed, "", 0)
        for adapter in module.lora_embedding_A:
            a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
            a_name = f"{mod_name}.lora_embedding_A.{adapter}"
            b_name = f"{mod_name}.lora_embedding_B.{adapter}"
            yield a_name, a, _value(a.shape, "zeros", seed, a_name, 0)
            yield b_name, b, _value(b.shape, "normal", seed, b_name, 0)


@torch.no_grad()
def initialise_adapter(model: nn.Module, seed: int) -> None:
    """Set every new adapter weight of an unsharded, materialised model to its initial value."""
    for name, param, value in adapter_initial_values(model, seed):
        if param.is_meta:
            raise ShardtuneError(f"{name} is on the meta device; initialise it after loading.")
        param.copy_(value.to(param.dtype))
