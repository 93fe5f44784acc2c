"""``convert``: any FSDP checkpoint -> a Hugging Face model folder, streamed one tensor at a time.

Memory: each tensor is read when the writer wants it and written straight to its place in its
output file (:func:`shardtune.checkpoint.hf_stream.write_safetensors`, whose files' headers are
written first from the plan's names, shapes and dtypes); peak host memory is about one tensor
(two while ``--dtype`` converts or a merge adds its delta) whatever ``--max_shard_size`` is, never
an output shard, the model or its optimizer state. The destination is written into a temporary folder next to it
and renamed into place only when complete (and verified, with ``--verify``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .. import ownership
from ..checkpoint.digests import digest_files, files_of
from ..checkpoint.hf_export import MODEL_FILE_PATTERNS
from ..checkpoint.hf_stream import DTYPES, write_safetensors
from ..checkpoint.progress import Progress
from ..checkpoint.safetensors_stream import TensorSpec
from ..checkpoint.sizes import human_size, parse_size
from ..config.errors import ShardtuneError
from .model import ModelSpec, build_meta_model, dominant_dtype, model_targets, resolve_model
from ..model.names import saved_names
from .plan import LoraSpec, Plan, Ref, build_plan, refuse_tied_merge
from .sources import Source, open_hf_model, open_source, verify_source

DTYPE_CHOICES = ("keep", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


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


# ---------------------------------------------------------------- destination


def check_destination(dst: Path, src: Path, overwrite: bool, protected: Optional[dict] = None) -> None:
    """Refuse a file, a folder holding the source or another input (``protected``: flag -> path),
    and a non-empty folder without --overwrite."""
    if dst.exists() and not dst.is_dir():
        raise ShardtuneError(f"The destination {dst} is a file; pass a folder (it is created if missing).")
    if ownership.is_inside(src, dst):
        raise ShardtuneError(f"The destination {dst} is (or contains) the source {src}; choose another folder.")
    if ownership.is_inside(dst, src) and not _owned_by_source(dst, src):
        raise ShardtuneError(
            f"The destination {dst} is inside the source {src}. A converted model there would be mixed "
            "into the source's files and deleted with them (a run's --keep_last_n prunes a step "
            "checkpoint's folder whole). Choose a folder outside the source.")
    # --merge_lora reads its tokenizer from the output folder that also holds merged/ (recorded there)
    inputs = {flag: other for flag, other in (protected or {}).items()
              if not (other and ownership.is_inside(dst, Path(other)) and _owned_by_source(dst, Path(other)))}
    ownership.check_not_an_input(dst, "DST", inputs)
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ShardtuneError(
            f"The destination {dst} is not empty. Pass --overwrite to replace what an earlier conversion "
            "wrote there (files shardtune did not write are left in place), or choose an empty or new folder.")


def _owned_by_source(dst: Path, src: Path) -> bool:
    """``dst`` is a folder that the shardtune output ``src`` records as its own (the recipe's
    ``--merge_lora`` writes ``<output_dir>/merged`` from the adapter in ``<output_dir>``)."""
    if not (src.is_dir() and ownership.is_inside(dst, src)):
        return False
    entry = dst.resolve().relative_to(src.resolve()).parts
    return bool(entry) and entry[0] + "/" in ownership.owned(src)


def _temp_dir(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.converting-{os.getpid()}"


def publish(tmp: Path, dst: Path, log: Callable[[str], None] = print) -> None:
    """Move the finished folder into place: a new or empty ``dst`` in one rename. Into a non-empty
    one (``--overwrite``) the new files are moved; the model files an earlier shardtune write left
    there are replaced or removed, and everything else (other files, a run's checkpoints) stays."""
    ownership.record(tmp, added=[p.name + ("/" if p.is_dir() else "") for p in tmp.iterdir()],
                     digests=digest_files(tmp, files_of(tmp, skip=[ownership.MARKER])))
    if dst.is_dir() and any(dst.iterdir()):
        foreign = ownership.foreign_entries(dst)
        ownership.commit_files(tmp, dst, stale_patterns=MODEL_FILE_PATTERNS)
        if foreign:
            log(f"note: {len(foreign)} entries shardtune did not write stay in {dst}: {', '.join(foreign[:8])}")
        return
    if dst.is_dir():
        dst.rmdir()
    os.replace(tmp, dst)


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


# ---------------------------------------------------------------- streaming


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


# ---------------------------------------------------------------- writing


def _write_model_files(conv: Conversion, tmp: Path) -> None:
    from ..checkpoint.hf_export import write_config

    config = conv.meta.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(conv.meta).__name__]
    with contextlib.suppress(Exception):
        config.dtype = conv.config_dtype
    write_config(conv.meta, tmp, conv.config_dtype, base=conv.spec.name)  # the base's own config.json, kept


def _write_adapter(conv: Conversion, tmp: Path) -> None:
    import dataclasses

    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = read_refs(conv, list(conv.plan.adapter.values()))
    out = {name: tensors[ref].to(conv.dtype_of(tensors[ref].dtype)).contiguous()
           for name, ref in conv.plan.adapter.items()}
    save_file(out, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    cfg = {k: v for k, v in conv.lora.config.items() if k in fields and k != "peft_type"}
    cfg["base_model_name_or_path"] = conv.spec.name
    LoraConfig(**cfg).save_pretrained(str(tmp))


def tokenizer_folder(conv: Conversion, tokenizer: Optional[str] = None) -> Optional[Path | str]:
    """Where the checkpoint's tokenizer is: ``tokenizer`` if given, else the one the checkpoint
    names (its run's ``--tokenizer_name`` / ``--model_name``), else the model's folder or hub id."""
    for candidate in (tokenizer, *(s.tokenizer_hint for s in conv.sources), conv.spec.folder):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    if conv.spec.folder is None:
        return conv.spec.name  # a hub id: the tokenizer may be in the local cache
    return None


def copy_tokenizer(conv: Conversion, tmp: Path, tokenizer: Optional[str] = None) -> Optional[str]:
    """Tokenizer (via save_tokenizer, loadable by transformers 4 and 5) and processor files."""
    from transformers import AutoTokenizer

    from ..checkpoint.hf_export import save_tokenizer

    folder = tokenizer_folder(conv, tokenizer)
    if folder is None:
        conv.log("note: no local tokenizer folder is known; the output has no tokenizer files")
        return None
    try:
        save_tokenizer(AutoTokenizer.from_pretrained(folder), tmp)
    except Exception as exc:  # noqa: BLE001 - a model without a tokenizer is still a model
        conv.log(f"note: no tokenizer copied from {folder} ({type(exc).__name__}: {str(exc)[:120]})")
    for name in PROCESSOR_FILES if isinstance(folder, Path) else ():
        if (folder / name).is_file() and not (tmp / name).exists():
            shutil.copy2(folder / name, tmp / name)
    return str(folder)


def convert(src: str | Path, dst: str | Path, *, model: Optional[str] = None, dtype: Optional[str] = "keep",
            max_shard_size: str | int = "5GB", verify: bool = False, overwrite: bool = False,
            merge: bool = False, tokenizer: Optional[str] = None,
            log: Callable[[str], None] = print) -> dict:
    """Convert ``src`` into a Hugging Face folder ``dst``; returns a summary. See the module doc."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    try:
        limit = parse_size(max_shard_size)
    except ValueError as exc:
        raise ShardtuneError(f"--max_shard_size: {exc}") from None
    if limit <= 0:
        raise ShardtuneError("--max_shard_size must be positive.")
    check_destination(dst, src, overwrite, protected={"--model": model, "--tokenizer": tokenizer})
    conv = prepare(src, model=model, dtype=dtype, merge=merge, log=log)
    tmp = _temp_dir(dst)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if conv.plan.adapter_only and not merge:
            _write_adapter(conv, tmp)
            files, count = ["adapter_model.safetensors"], len(conv.plan.adapter)
        else:
            refuse_tied_merge(conv.plan)  # merged weights: none of them may be tied to an adapted one
            specs = specs_of(conv)
            progress = Progress("convert", sum(sp.nbytes for sp in specs), len(specs), log)
            try:
                weight_map = write_safetensors(stream(conv), specs, tmp, is_main=True, max_shard_size=limit,
                                               progress=progress)
            finally:
                progress.close()
            _write_model_files(conv, tmp)
            files, count = sorted(set(weight_map.values())), len(weight_map)
        copy_tokenizer(conv, tmp, tokenizer)
        summary = {"kind": conv.sources[-1].kind, "source": str(conv.sources[-1].path), "destination": str(dst),
                   "model": conv.spec.describe, "tensors": count, "files": files,
                   "bytes": sum((tmp / f).stat().st_size for f in files),
                   "dtype": str(conv.config_dtype).removeprefix("torch."),
                   "dropped": {k: len(v) for k, v in conv.plan.dropped.items()},
                   "adapter": conv.plan.adapter_only and not merge}
        if verify:
            from .verify import verify_output

            summary["verify"] = verify_output(conv, tmp)
        publish(tmp, dst, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for s in conv.sources:
            s.close()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    what = "PEFT adapter" if summary["adapter"] else "Hugging Face model"
    log(f"wrote {what} to {dst}: {count} tensors in {len(files)} file(s), {human_size(summary['bytes'])}, "
        f"{summary['dtype']} ({summary['seconds']:.1f} s)")
    return summary


