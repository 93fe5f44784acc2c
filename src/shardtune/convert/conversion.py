"""The conversion core: a checkpoint detected, its model resolved and every tensor mapped
(:func:`prepare` -> :class:`Conversion`), then read one tensor at a time (:func:`stream`, LoRA
merged on the way). ``core.convert`` writes it into a folder, ``verify`` checks what was written
against it, ``in_memory`` builds a model from it: all three sit above this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..checkpoint.hf_stream import DTYPES
from ..checkpoint.safetensors_stream import TensorSpec
from ..config.errors import ShardtuneError
from ..model.names import saved_names
from .model import ModelSpec, build_meta_model, dominant_dtype, model_targets, resolve_model
from .plan import LoraSpec, Plan, Ref, build_plan
from .sources import Source, open_hf_model, open_source, verify_source

DTYPE_CHOICES = ("keep", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32")

@dataclass
class Conversion:
    """Everything needed to write (and verify) one conversion."""

    sources: list[Source]
    spec: ModelSpec
    meta: torch.nn.Module
    plan: Plan
    lora: Optional[LoraSpec]
    out_dtype: Optional[torch.dtype]     # None: keep every tensor's dtype
    log: Callable[[str], None] = print
    save_names: dict[str, str] = field(default_factory=dict)   # model name -> name written on disk

    def dtype_of(self, src_dtype: torch.dtype) -> torch.dtype:
        if self.out_dtype is None or not src_dtype.is_floating_point:
            return src_dtype
        return self.out_dtype

    @property
    def config_dtype(self) -> torch.dtype:
        if self.out_dtype is not None:
            return self.out_dtype
        sizes: dict[torch.dtype, int] = {}
        for item in self.plan.items:
            sizes[item.src_dtype] = sizes.get(item.src_dtype, 0) + item.entry.nbytes
        for ref in self.plan.adapter.values():
            e = self.sources[ref.src].entries[ref.key]
            sizes[e.dtype] = sizes.get(e.dtype, 0) + e.nbytes
        return dominant_dtype(sizes)


def parse_dtype(text: Optional[str]) -> Optional[torch.dtype]:
    if text in (None, "", "keep"):
        return None
    if text not in DTYPES:
        raise ShardtuneError(f"--dtype {text!r} is not one of {', '.join(DTYPE_CHOICES)}.")
    return DTYPES[text]


# ---------------------------------------------------------------- planning


def _lora_from_params(source: Source) -> Optional[LoraSpec]:
    params = source.info.get("train_params") or {}
    train = params.get("train_config") if isinstance(params.get("train_config"), dict) else params
    lora_section = params.get("lora_config")
    if str(train.get("use_peft")).lower() in ("true", "1") and str(train.get("peft_method", "lora")) == "lora" \
            and isinstance(lora_section, dict):
        return LoraSpec.from_dict({**lora_section, "peft_type": "LORA"})
    return None


def prepare(src: str | Path, *, model: Optional[str] = None, dtype: Optional[str] = "keep",
            merge: bool = False, log: Callable[[str], None] = print) -> Conversion:
    """Detect the source, resolve the model, and map every tensor (no tensor is read yet)."""
    source = open_source(src)
    log(f"found: {source.title} at {source.path}" + (f" ({source.note})" if source.note else ""))
    verify_source(source, log)  # recorded digests checked before any tensor is trusted
    out_dtype = parse_dtype(dtype)
    if source.kind == "peft":
        if not merge:
            raise ShardtuneError(
                f"{source.path} is a PEFT adapter, which transformers and peft already load "
                "(PeftModel.from_pretrained). Pass --merge to fold it into its base model and write a "
                "full Hugging Face model (the base comes from --model or the adapter's "
                "base_model_name_or_path).")
        lora = LoraSpec.from_dict(source.info["adapter_config"])
        spec = resolve_model(source, model, base=True)
        base = _open_base(spec, log)
        sources = [base, source]
    else:
        spec = resolve_model(source, model)
        lora = _lora_from_params(source)
        sources = [source]
    log(f"model: {spec.describe}")
    meta = build_meta_model(spec)
    targets = model_targets(meta)
    # an adapter-only checkpoint is planned as an adapter first; --merge then adds its base model
    plan = build_plan(sources, targets, meta, lora=lora, merge=merge and len(sources) > 1, model_desc=spec.describe)
    if plan.adapter_only and merge and len(sources) == 1:
        sources = [_open_base(spec, log), source]
        plan = build_plan(sources, targets, meta, lora=lora, merge=True, model_desc=spec.describe)
    conv = Conversion(sources=sources, spec=spec, meta=meta, plan=plan, lora=lora, out_dtype=out_dtype, log=log,
                      save_names=saved_names(meta, [item.name for item in plan.items]))
    renamed = sum(k != v for k, v in conv.save_names.items())
    if renamed:
        log(f"{renamed} weights are written under the names save_pretrained uses for {type(meta).__name__} "
            "(transformers' checkpoint conversion mapping, reversed)")
    if plan.adapter_only and not merge:
        log(f"the checkpoint holds a LoRA adapter only ({len(plan.adapter)} tensors): writing a PEFT adapter "
            "folder (pass --merge for a full model with the adapter folded in)")
    elif plan.merged_modules:
        log(f"merging LoRA into {plan.merged_modules} weights (W + scaling * B @ A)")
    elif merge:
        log("--merge: the checkpoint holds no LoRA weights; there is nothing to merge")
    for line in plan.dropped_summary():
        log(line)
    return conv


def _open_base(spec: ModelSpec, log: Callable[[str], None]) -> Source:
    if spec.folder is None:
        raise ShardtuneError(
            f"Merging needs the base model's weights, but {spec.name!r} ({spec.origin}) is not a local "
            "folder. Pass --model with the local Hugging Face model folder.")
    base = open_hf_model(spec.folder)
    verify_source(base, log)
    return base


def read_refs(conv: Conversion, refs: list[Ref]) -> dict[Ref, torch.Tensor]:
    """The tensors behind ``refs``, read source by source (each source reads its keys together)."""
    by_src: dict[int, dict[str, None]] = {}
    for ref in refs:
        by_src.setdefault(ref.src, {})[ref.key] = None
    out: dict[Ref, torch.Tensor] = {}
    for i, keys in by_src.items():
        out.update({Ref(i, k): t for k, t in conv.sources[i].read(list(keys)).items()})
    return out


def _materialise(conv: Conversion, item, loaded: dict[Ref, torch.Tensor]) -> torch.Tensor:
    base = loaded.pop(item.ref)
    target = conv.dtype_of(item.src_dtype)
    if not item.deltas:
        return base if base.dtype == target else base.to(target)
    weight = base.float()
    for d in item.deltas:
        delta = loaded.pop(d.b).float() @ loaded.pop(d.a).float()
        weight += d.scaling * (delta.T if d.transpose else delta)
    return weight.to(target)


def _refs(items) -> list[Ref]:
    return [r for item in items for r in (item.ref, *[x for d in item.deltas for x in (d.a, d.b)])]


def specs_of(conv: Conversion) -> list[TensorSpec]:
    """What each output tensor will be (saved name, shape, dtype), in save order, before any is read."""
    return [TensorSpec(conv.save_names.get(item.name, item.name), tuple(item.entry.shape),
                       conv.dtype_of(item.src_dtype)) for item in conv.plan.items]


def stream(conv: Conversion) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) in save order, each read (and merged) only when it is wanted: with the
    streaming writer, peak memory is about one tensor (two while a merge adds its delta)."""
    for item in conv.plan.items:
        loaded = read_refs(conv, _refs([item]))
        yield conv.save_names.get(item.name, item.name), _materialise(conv, item, loaded)
        del loaded


def tokenizer_folder(conv: Conversion, tokenizer: Optional[str] = None) -> Optional[Path | str]:
    """Where the checkpoint's tokenizer is: ``tokenizer`` if given, else the one the checkpoint
    names (its run's ``--tokenizer_name`` / ``--model_name``), else the model's folder or hub id."""
    for candidate in (tokenizer, *(s.tokenizer_hint for s in conv.sources), conv.spec.folder):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    if conv.spec.folder is None:
        return conv.spec.name  # a hub id: the tokenizer may be in the local cache
    return None
