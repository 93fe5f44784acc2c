"""A checkpoint as a model in memory, through the same plan as ``shardtune convert``.

``generate``, ``chat`` and ``eval`` load a shardtune step checkpoint, a llama-recipes ``.distcp``
folder or its ``.pt`` file without writing a converted copy first: the source is detected, the
model resolved and every tensor mapped exactly as ``shardtune convert`` does (so the key-name
errors are the same clear ones), then the model is built on the meta device and each tensor is
read and put in place one at a time. Peak host memory is the model plus one tensor.

A LoRA checkpoint (adapter only, or a full model with LoRA weights) gives the base model with
the adapter applied by peft, unmerged: the model the run trained.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..checkpoint.progress import Progress
from ..config.errors import ShardtuneError
from .conversion import Conversion, prepare, read_refs


def open_checkpoint(path: str, *, model: Optional[str] = None,
                    log: Callable[[str], None] = lambda line: None) -> Conversion:
    """Detect and plan ``path`` (nothing read yet); ``model`` names the architecture when the
    checkpoint does not (llama-recipes' files). The base model of a LoRA checkpoint is opened too."""
    return prepare(path, model=model, dtype="keep", merge=True, log=log)


def _lora_config(conv: Conversion):
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in conv.lora.config.items() if k in fields and k != "peft_type"})


def apply_adapter(conv: Conversion, model: nn.Module,
                  prepare_tensor: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> nn.Module:
    """``model`` with the checkpoint's LoRA adapter applied by peft (unmerged)."""
    from peft import get_peft_model, set_peft_model_state_dict

    refs = dict(conv.plan.adapter)
    loaded = read_refs(conv, list(refs.values()))
    state = {name: prepare_tensor(loaded[ref]) for name, ref in refs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, _lora_config(conv))
        result = set_peft_model_state_dict(peft_model, state)
    bad = list(getattr(result, "unexpected_keys", []) or [])
    if bad:
        raise ShardtuneError(f"{conv.sources[-1].path}: peft did not accept the adapter weights {bad[:5]}; the "
                             "checkpoint's lora_config does not match its tensors.")
    return peft_model


def build_model(conv: Conversion, *, dtype: Optional[torch.dtype] = None,
                device: torch.device | str = "cpu", log: Callable[[str], None] = lambda line: None) -> nn.Module:
    """The checkpoint's model in eval mode on ``device``, floating-point weights in ``dtype``
    (default: as stored), read and placed one tensor at a time (progress through ``log``, or a
    bar on a terminal)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    applied = {ref.key for ref in conv.plan.adapter.values()}  # peft applies these, tied or not
    dropped = [c for c in conv.plan.tied_changes if c[1] not in applied]
    if dropped:  # e.g. a modules_to_save copy of a tied head: refused rather than silently left out
        path, raw, target, other = dropped[0]
        raise ShardtuneError(
            f"{path}: {raw} changes {target}, which this model ties to {other} (tie_word_embeddings); loading it in "
            "memory would drop that change. Write the adapter folder first (`shardtune convert CHECKPOINT DIR`) "
            "and generate from DIR, where peft applies it.")
    with init_empty_weights(include_buffers=False):  # the rotary buffers are built for real
        model = conv.spec.cls(conv.spec.config)
    progress = Progress(f"loading {conv.sources[-1].path.name}", sum(i.entry.nbytes for i in conv.plan.items),
                        len(conv.plan.items), log)
    try:
        for item in conv.plan.items:
            tensor = read_refs(conv, [item.ref])[item.ref]
            if tensor.is_floating_point():
                tensor = tensor.to(dtype or tensor.dtype)
            set_module_tensor_to_device(model, item.name, device, value=tensor)
            progress.tensor_done(item.entry.nbytes)
    finally:
        progress.close(summary=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ShardtuneError(f"{conv.sources[-1].path}: the checkpoint does not fill {len(left)} weights of "
                             f"{conv.spec.describe} ({', '.join(left[:3])}); pass the model it was trained from "
                             "with --model.")
    for buf in model.buffers():  # non-persistent buffers were built on the host
        if buf.device != torch.device(device):
            model.to(device)
            break
    if conv.plan.adapter:
        model = apply_adapter(conv, model, lambda t: t.to(dtype or t.dtype) if t.is_floating_point() else t)
        model.to(device)
    return model.eval()
