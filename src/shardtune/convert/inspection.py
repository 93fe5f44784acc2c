"""``shardtune inspect PATH``: what a checkpoint is, from its metadata alone (no tensor is read).

Kind, model type, step/epoch (shardtune), dtypes, tensor count, total size, whether optimizer
state is present, LoRA/adapter contents. DCP: ``.metadata``; safetensors: file headers;
``torch.save`` files: the pickle, memory-mapped, so tensor data is not paged in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..checkpoint.sizes import human_size
from ..config.errors import ShardtuneError
from .plan import _classify
from .sources import open_source


def inspect_path(path: str | Path, model: Optional[str] = None) -> dict:
    src = open_source(path)
    groups: dict[str, list] = {"model": [], "optimizer": [], "extra": []}
    lora = 0
    for raw, entry in src.entries.items():
        k = _classify(raw, 1 if src.kind in ("shardtune", "llama-recipes", "dcp") else 0, src.container)
        group = {"optimizer": "optimizer", "extra": "extra"}.get(k.kind, "model")
        groups[group].append(entry)
        lora += k.kind == "lora"
    dtypes: dict[str, int] = {}
    for entry in groups["model"]:
        name = str(entry.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    report = {
        "path": str(src.path), "kind": src.kind, "kind_title": src.title, "note": src.note,
        "tensors": len(src.entries), "bytes": sum(e.nbytes for e in src.entries.values()),
        "model_tensors": len(groups["model"]), "model_bytes": sum(e.nbytes for e in groups["model"]),
        "model_dtypes": dtypes,
        "optimizer_state": bool(groups["optimizer"]), "optimizer_tensors": len(groups["optimizer"]),
        "optimizer_bytes": sum(e.nbytes for e in groups["optimizer"]),
        "other_tensors": len(groups["extra"]), "non_tensor_entries": len(src.others),
        "lora_tensors": lora, "adapter_only": bool(lora) and lora == len(groups["model"]),
    }
    for key in ("step", "epoch", "batch", "world_size", "has_optimizer"):
        if src.info.get(key) is not None:
            report[key] = src.info[key]
    if "adapter_config" in src.info:
        cfg = src.info["adapter_config"]
        report["adapter"] = {k: cfg.get(k) for k in ("peft_type", "r", "lora_alpha", "use_rslora",
                                                       "target_modules", "base_model_name_or_path")}
    name = model or src.model_hint
    report["model_source"] = name
    if name:
        from .model import load_model_config

        try:
            config, _ = load_model_config(name, "--model" if model else "model_name")
            report["model_type"] = getattr(config, "model_type", None)
            report["architectures"] = getattr(config, "architectures", None)
        except ShardtuneError as exc:
            report["model_type"] = None
            report["model_error"] = str(exc)
    src.close()
    return report


def format_report(r: dict) -> str:
    lines = [f"{r['path']}", f"  kind:            {r['kind_title']}"]
    if r.get("note"):
        lines.append(f"  note:            {r['note']}")
    if r.get("model_type") or r.get("model_source"):
        arch = ", ".join(r.get("architectures") or []) or "?"
        lines.append(f"  model:           {r.get('model_type') or '?'} ({arch}) from {r.get('model_source')}")
        if r.get("model_error"):
            lines.append(f"                   (config not readable: {r['model_error'][:160]})")
    else:
        lines.append("  model:           not recorded (pass --model to convert)")
    if "step" in r:
        epoch = r.get("epoch")
        lines.append(f"  step:            {r['step']}" + (f"  (epoch {epoch + 1}, {r.get('batch', 0)} batches into it)"
                                                        if isinstance(epoch, int) else ""))
    if "world_size" in r:
        lines.append(f"  written by:      {r['world_size']} ranks")
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(r["model_dtypes"].items())) or "-"
    lines.append(f"  model tensors:   {r['model_tensors']} ({human_size(r['model_bytes'])}; {dtypes})")
    if r["lora_tensors"]:
        lines.append(f"  LoRA tensors:    {r['lora_tensors']}" + ("  (adapter only: the base model is not in it)"
                                                               if r["adapter_only"] else ""))
    opt = (f"yes, {r['optimizer_tensors']} tensors ({human_size(r['optimizer_bytes'])})" if r["optimizer_state"] else "no")
    lines.append(f"  optimizer state: {opt}")
    if r["other_tensors"] or r["non_tensor_entries"]:
        lines.append(f"  other entries:   {r['other_tensors']} tensors, {r['non_tensor_entries']} non-tensor values")
    if "adapter" in r:
        a = r["adapter"]
        lines.append(f"  adapter:         {a.get('peft_type')} r={a.get('r')} alpha={a.get('lora_alpha')} "
                     f"targets={a.get('target_modules')} base={a.get('base_model_name_or_path')}")
    lines.append(f"  total:           {r['tensors']} tensors, {human_size(r['bytes'])}")
    return "\n".join(lines)
