"""Key normalisation and the conversion plan: which source tensor (plus LoRA deltas) fills each weight.

A raw checkpoint key goes through, in order:

1. wrapper parts removed anywhere: ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``,
   ``_orig_mod.`` (FSDP1, activation checkpointing, ``torch.compile``);
2. for container checkpoints (DCP, nested ``torch.save`` dicts) the top-level dict key:
   ``optim.*`` / ``optimizer.*`` are optimizer state and ``lr_scheduler``/``rng``/... training
   state (both dropped and reported); ``model.`` (or ``app.model.``) is stripped — how many
   leading parts to strip is decided once for the whole checkpoint, by which choice matches
   the most model weights;
3. a leading ``module.`` (DDP) and the PEFT prefix ``base_model.model.``; ``.base_layer.`` -> ``.``;
4. LoRA parts (``lora_A``/``lora_B``[``.<adapter>``], ``lora_embedding_A/B``) become merge deltas;
   ``modules_to_save.<adapter>.`` replaces the base weight; ``original_module.`` is dropped;
5. names the model does not have are renamed by ``model/names.Renamer`` (transformers' own
   checkpoint conversion mapping, e.g. Mllama's pre-v5 ``language_model.model.layers...``, or
   the family table's legacy names on transformers versions without it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..checkpoint.sizes import human_size
from ..config.errors import ShardtuneError
from ..model.names import PEFT_PREFIX, Renamer, strip_peft_prefix, unwrap_base_layer
from .model import Targets
from .sources import Entry, Source

WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
OPTIMIZER_HEADS = {"optim", "optimizer", "optimizers", "optimizer_state", "optimizer_state_dict",
                   "optimizer_states", "opt"}
EXTRA_HEADS = {"lr_scheduler", "scheduler", "schedulers", "rng", "rng_state", "rng_states", "extra_state",
               "step", "epoch", "global_step", "args", "train_state", "dataloader", "sampler",
               "metrics", "scaler", "grad_scaler", "loss"}
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_LORA_EMB = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?$")
_SAVED = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>[^.]+)$")
# bitsandbytes' state of a 4/8-bit base weight (a QLoRA step checkpoint holds it beside the adapter)
_QUANT_STATE = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map)$"
                          r"|\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$|\.(SCB|weight_format)$")
_OTHER_PEFT = ("lora_magnitude_vector", "adaption_prompt", "adaption_gate", "prompt_encoder",
               "lora_dropout", "ia3_l", "vera_lambda", "hada_w", "lokr_w", "oft_r", "boft_R")

@dataclass(frozen=True)
class Ref:
    src: int      # index into the sources list
    key: str      # raw key in that source


@dataclass
class Delta:
    a: Ref
    b: Ref
    scaling: float
    transpose: bool   # fan_in_fan_out layers and embeddings store B@A transposed


@dataclass
class Item:
    name: str
    entry: Entry              # target shape (and the model's default dtype)
    ref: Ref
    src_dtype: torch.dtype
    deltas: list[Delta] = field(default_factory=list)


@dataclass
class LoraSpec:
    """What merging needs from a LoRA config (adapter_config.json or shardtune's lora_config)."""

    lora_alpha: float
    use_rslora: bool = False
    alpha_pattern: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False
    config: dict = field(default_factory=dict)   # the full peft config (for adapters and verify)

    @classmethod
    def from_dict(cls, cfg: dict) -> "LoraSpec":
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type not in ("LORA", "PEFTTYPE.LORA"):
            raise ShardtuneError(
                f"Only LoRA adapters can be merged; this adapter is {cfg.get('peft_type')}. Load it with "
                "PeftModel.from_pretrained on the base model instead.")
        if cfg.get("use_dora"):
            raise ShardtuneError("DoRA adapters (use_dora) cannot be merged by shardtune convert; "
                                 "use peft's merge_and_unload.")
        if cfg.get("lora_bias"):  # the base layers have no bias to fold lora_B's bias into
            raise ShardtuneError("An adapter with a LoRA bias (lora_bias) cannot be merged exactly; load it "
                                 "with PeftModel.from_pretrained instead.")
        return cls(lora_alpha=float(cfg.get("lora_alpha", 8)), use_rslora=bool(cfg.get("use_rslora")),
                   alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
                   fan_in_fan_out=bool(cfg.get("fan_in_fan_out")), config=dict(cfg))

    def scaling(self, module: str, rank: int) -> float:
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


@dataclass
class Plan:
    items: list[Item]
    dropped: dict[str, list[tuple[str, int]]]          # category -> [(raw key, bytes)]
    adapter: dict[str, Ref] = field(default_factory=dict)   # peft-saved name -> ref (no merge)
    adapter_only: bool = False
    merged_modules: int = 0
    strip: dict[int, int] = field(default_factory=dict)
    # (source, raw key, weight, the weight tied to it): an adapter's change to a tied weight, which a
    # merged model cannot hold (peft applies it unmerged; see refuse_tied_merge)
    tied_changes: list[tuple[str, str, str, str]] = field(default_factory=list)

    def dropped_summary(self) -> list[str]:
        lines = []
        for category, keys in self.dropped.items():
            size = sum(n for _, n in keys)
            shown = ", ".join(k for k, _ in keys[:3]) + (" ..." if len(keys) > 3 else "")
            lines.append(f"dropped {len(keys)} {category} ({human_size(size)}): {shown}")
        return lines


@dataclass
class _Key:
    raw: str
    kind: str            # "weight" | "lora" | "saved" | "optimizer" | "extra" | "original" | "peft-other"
                         # | "quant-state"
    name: str            # normalised name (weight name, or the LoRA module)
    ab: str = ""
    adapter: Optional[str] = None
    embedding: bool = False


def _classify(raw: str, strip: int, container: bool) -> _Key:
    key = raw
    for part in WRAPPERS:
        key = key.replace(part, "")
    parts = key.split(".")
    if container:
        heads = parts[:2] if parts[0] == "app" else parts[:1]
        if any(h in OPTIMIZER_HEADS for h in heads):
            return _Key(raw, "optimizer", key)
        if any(h in EXTRA_HEADS for h in heads):
            return _Key(raw, "extra", key)
        key = ".".join(parts[strip:])
    while key.startswith("module."):
        key = key[len("module."):]
    key = strip_peft_prefix(key)
    if ".original_module." in key:
        return _Key(raw, "original", key)
    if _QUANT_STATE.search(key):
        return _Key(raw, "quant-state", key)
    m = _SAVED.match(key)
    if m:
        return _Key(raw, "saved", f"{m['module']}.{m['param']}", adapter=m["adapter"])
    m = _LORA.match(key) or _LORA_EMB.match(key)
    if m:
        return _Key(raw, "lora", unwrap_base_layer(m["module"]), ab=m["ab"], adapter=m["adapter"],
                    embedding=".lora_embedding_" in key)
    if any(f".{p}" in f".{key}" for p in _OTHER_PEFT):
        return _Key(raw, "peft-other", key)
    return _Key(raw, "weight", unwrap_base_layer(key))


def _resolve(k: _Key, rename: Renamer) -> Optional[str]:
    if k.kind in ("weight", "saved"):
        return rename(k.name)
    if k.kind == "lora":
        return rename(f"{k.name}.weight")
    return None


def _classify_source(src: Source, rename: Renamer, weights: set[str]) -> tuple[int, list[_Key]]:
    """Classify every key of ``src`` under the strip count that matches the most model weights."""
    options = (1, 0, 2) if src.container else (0,)
    best: Optional[tuple[int, int, list[_Key]]] = None
    for strip in options:
        keys = [_classify(raw, strip, src.container) for raw in src.entries]
        hits = sum(1 for k in keys if _resolve(k, rename) in weights)
        if best is None or hits > best[0]:
            best = (hits, strip, keys)
    return best[1], best[2]


def build_plan(sources: list[Source], targets: Targets, model: torch.nn.Module, *,
               lora: Optional[LoraSpec], merge: bool, model_desc: str) -> Plan:
    """Map every source tensor to a model weight (or a reported drop); errors list what does not fit.

    ``sources``: one checkpoint, or [base model, adapter] when merging an adapter into its base
    (later sources win for the same weight, e.g. an adapter's modules_to_save).
    """
    rename = Renamer(model, set(targets.entries) | set(targets.tied) | set(targets.buffers))
    assigned: dict[str, Ref] = {}
    dropped: dict[str, list[tuple[str, int]]] = {}
    unexpected: list[str] = []
    lora_parts: dict[tuple[str, Optional[str]], dict[str, Ref]] = {}
    embeddings: set[str] = set()
    strips: dict[int, int] = {}
    plain_in_last = 0
    partner = _tied_partners(targets)
    tied_changes: list[tuple[str, str, str, str]] = []

    def entry_of(ref: Ref) -> Entry:
        return sources[ref.src].entries[ref.key]

    def drop(category: str, ref: Ref) -> None:
        dropped.setdefault(category, []).append((ref.key, entry_of(ref).nbytes))

    for i, src in enumerate(sources):
        strip, keys = _classify_source(src, rename, set(targets.entries))
        strips[i] = strip
        for k in keys:
            ref = Ref(i, k.raw)
            if k.kind == "optimizer":
                drop("optimizer state tensors", ref)
            elif k.kind == "extra":
                drop("training-state tensors", ref)
            elif k.kind == "quant-state":
                drop("bitsandbytes quantization-state tensors of a 4/8-bit base (QLoRA)", ref)
            elif k.kind == "original":
                drop("PEFT original_module copies", ref)
            elif k.kind == "peft-other":
                raise ShardtuneError(
                    f"{src.path}: tensor {k.raw} belongs to a PEFT method other than plain LoRA "
                    "(DoRA, LLaMA-Adapter, prompt tuning ...), which shardtune convert cannot merge. Load "
                    "the adapter with PeftModel.from_pretrained instead.")
            elif k.kind == "lora":
                target = _resolve(k, rename)
                if target in partner:
                    tied_changes.append((str(src.path), k.raw, target, partner[target]))
                if target not in targets.entries:
                    unexpected.append(k.raw)
                    continue
                module = target[: -len(".weight")]
                lora_parts.setdefault((module, k.adapter), {})[k.ab] = ref
                if k.embedding:
                    embeddings.add(module)
            else:
                target = _resolve(k, rename)
                copy = k.kind == "saved" or (merge and i == len(sources) - 1)  # a modules_to_save copy
                if copy and target in partner:
                    tied_changes.append((str(src.path), k.raw, target, partner[target]))
                if target in targets.entries:
                    if target in assigned and assigned[target].src == i:
                        raise ShardtuneError(
                            f"{src.path}: tensors {assigned[target].key} and {k.raw} both map to the "
                            f"model weight {target}; the checkpoint holds two copies of it.")
                    if target in assigned:
                        drop("base weights replaced by the adapter's modules_to_save", assigned[target])
                    assigned[target] = ref
                    if i == len(sources) - 1 and k.kind == "weight":
                        plain_in_last += 1
                elif target in targets.tied:
                    drop("tied weights (the same tensor as another weight)", ref)
                elif target in targets.buffers or k.name.endswith(".inv_freq"):
                    drop("non-persistent buffers", ref)
                else:
                    unexpected.append(k.raw)
        for other in src.others:
            dropped.setdefault("non-tensor entries", []).append((other, 0))

    adapters = sorted({a for (_, a) in lora_parts if a is not None})
    if len(adapters) > 1:
        raise ShardtuneError(
            f"The checkpoint holds several LoRA adapters ({', '.join(adapters)}); shardtune convert merges "
            "exactly one. Save the one you want with PeftModel.save_pretrained(..., selected_adapters=[...]).")
    for (module, _), ab in lora_parts.items():
        if set(ab) != {"A", "B"}:
            raise ShardtuneError(f"The LoRA weights of {module} are incomplete (only lora_{''.join(ab)} "
                                 "is in the checkpoint).")
    if lora_parts and lora is None:
        raise ShardtuneError(
            "The checkpoint holds LoRA weights but no LoRA config (lora_alpha) was found: convert the PEFT "
            "adapter folder (with adapter_config.json), or a shardtune checkpoint whose train_params.yaml "
            "records lora_config.")
    adapter_only = bool(lora_parts) and plain_in_last == 0
    writing_adapter = adapter_only and not merge

    shape_errors = []
    for target, ref in assigned.items():
        want = tuple(targets.entries[target].shape)
        if tuple(entry_of(ref).shape) != want:
            shape_errors.append(f"{target}: checkpoint {tuple(entry_of(ref).shape)} vs model {want}")
    deltas: dict[str, list[Delta]] = {}
    adapter_out: dict[str, Ref] = {}
    for (module, _adapter), ab in sorted(lora_parts.items(), key=lambda kv: kv[0][0]):
        a, b = entry_of(ab["A"]), entry_of(ab["B"])
        target = f"{module}.weight"
        want = tuple(targets.entries[target].shape)
        transpose = module in embeddings or lora.fan_in_fan_out
        ok = len(a.shape) == 2 and len(b.shape) == 2 and a.shape[0] == b.shape[1]
        shape = (b.shape[0], a.shape[1]) if ok else None
        if transpose and shape:
            shape = (shape[1], shape[0])
        if shape != want:
            shape_errors.append(f"{module} LoRA: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the "
                                f"weight {want}")
            continue
        deltas.setdefault(target, []).append(Delta(ab["A"], ab["B"], lora.scaling(module, a.shape[0]), transpose))
        kind, suffix = ("lora_embedding_", "") if module in embeddings else ("lora_", ".weight")
        adapter_out[f"{PEFT_PREFIX}{module}.{kind}A{suffix}"] = ab["A"]
        adapter_out[f"{PEFT_PREFIX}{module}.{kind}B{suffix}"] = ab["B"]
    missing = [] if writing_adapter else [t for t in targets.entries if t not in assigned]
    if missing or unexpected or shape_errors:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model weights are not in the checkpoint ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint tensors match no model weight ({_first(unexpected)})")
        tied = [c for c in tied_changes if c[1] in unexpected]
        if tied:  # a LoRA on the head of a model whose head is its embeddings
            parts.append(f"{tied[0][2]} is not a weight of its own here: this model ties it to {tied[0][3]} "
                         "(tie_word_embeddings)")
        if shape_errors:
            parts.append(f"{len(shape_errors)} shapes differ ({_first(shape_errors, 3)})")
        raise ShardtuneError(
            f"The checkpoint {sources[-1].path} does not fit {model_desc}: " + "; ".join(parts) + ". Pass "
            "--model with the model (or config.json) the checkpoint was trained from. Nothing was written.")
    for target, ref in assigned.items():  # an adapter's modules_to_save weights, in peft's saved layout
        if writing_adapter or (len(sources) > 1 and ref.src == len(sources) - 1):
            adapter_out[f"{PEFT_PREFIX}{target}"] = ref
    if writing_adapter:
        return Plan(items=[], dropped=dropped, adapter=adapter_out, adapter_only=True, strip=strips,
                    tied_changes=tied_changes)
    items = [Item(name=t, entry=e, ref=assigned[t], src_dtype=entry_of(assigned[t]).dtype,
                  deltas=deltas.get(t, [])) for t, e in targets.entries.items()]
    return Plan(items=items, dropped=dropped, adapter=adapter_out, adapter_only=adapter_only,
                merged_modules=len(deltas), strip=strips, tied_changes=tied_changes)


def _tied_partners(targets: Targets) -> dict[str, str]:
    """Each weight that shares its tensor with another (``tie_word_embeddings``) -> that other one."""
    partner: dict[str, str] = {}
    for name, owner in targets.tied.items():
        if owner:
            partner[name] = owner
            partner.setdefault(owner, name)
    return partner


def refuse_tied_merge(plan: Plan) -> None:
    """A LoRA or a modules_to_save copy on a tied weight has no exact merge: the merged model holds
    one tensor for both names, so it would change both (or neither). Applied unmerged by peft (an
    adapter folder, ``generate``) it is fine, so this is asked only before writing merged weights."""
    if plan.tied_changes:
        path, raw, target, other = plan.tied_changes[0]
        raise ShardtuneError(
            f"{path}: {raw} changes {target}, which this model ties to {other} (tie_word_embeddings: one "
            "tensor for both), so a merged model would change both weights or neither. Load the adapter "
            "with PeftModel.from_pretrained instead of merging it.")


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
