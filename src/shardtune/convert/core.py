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
from pathlib import Path
from typing import Callable, Optional

from ..checkpoint.hf_export import MODEL_FILE_PATTERNS
from ..checkpoint.hf_stream import write_safetensors
from ..checkpoint.progress import Progress
from ..checkpoint.sizes import human_size, parse_size
from ..config.errors import ShardtuneError
from ..outputs import ownership
from ..outputs.atomic import fsync_path, temp_path
from ..outputs.digests import digest_files, files_of
from .conversion import Conversion, prepare, read_refs, specs_of, stream, tokenizer_folder
from .plan import refuse_tied_merge

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


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
    fsync_path(dst.parent)


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
    tmp = temp_path(dst)  # beside it: the final rename stays on one file system
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
            from .verify import verify_output  # loads transformers' model code: only when asked

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


