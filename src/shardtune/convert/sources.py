"""Checkpoint readers: what a path holds (kind, tensor names, shapes, dtypes) and reading chosen tensors.

Every reader learns names, shapes and dtypes from metadata alone (DCP ``.metadata``, safetensors
headers, the pickle of a ``torch.save`` file opened with ``mmap=True``) and reads only the tensors
it is asked for, so a caller can stream a checkpoint one output shard at a time.

Kinds recognised by :func:`open_source`:

- ``shardtune``: a ``step-N`` folder (``.metadata`` + ``train_state.json``), or a run folder
  (``latest`` / ``step-N`` children; the checkpoint ``latest`` names is taken);
- ``llama-recipes``: a DCP folder (``.metadata`` + ``__r_0.distcp``) without ``train_state.json``,
  usually with a flat ``train_params.yaml`` naming ``model_name``;
- ``torch``: a ``torch.save`` file (FULL_STATE_DICT ``.pt``, ``pytorch_model.bin``, a dict holding
  a ``model``/``state_dict`` entry), or a folder with exactly one such file or a ``.bin`` index;
- ``peft``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``);
- ``hf``: a Hugging Face model folder (``config.json`` + safetensors), also used for merge bases.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from ..checkpoint import layout
from ..config.errors import ShardtuneError

TRAIN_PARAMS = "train_params.yaml"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
KIND_TITLES = {
    "shardtune": "shardtune sharded checkpoint (DCP)",
    "llama-recipes": "llama-recipes sharded checkpoint (DCP, SHARDED_STATE_DICT)",
    "dcp": "torch.distributed.checkpoint folder",
    "torch": "torch.save state dict (FULL_STATE_DICT .pt / .bin)",
    "peft": "PEFT adapter",
    "hf": "Hugging Face model (safetensors)",
}


@dataclass(frozen=True)
class Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Source:
    """A checkpoint's tensors by raw key, readable in groups."""

    kind: str
    path: Path                    # the checkpoint itself (step folder, file, adapter folder)
    entries: dict[str, Entry]
    others: list[str] = field(default_factory=list)   # non-tensor entries (e.g. optimizer lr)
    container: bool = False       # keys carry a top-level dict key ("model.", "optim.")
    model_hint: Optional[str] = None   # model dir/name from train_params.yaml / adapter config
    tokenizer_hint: Optional[str] = None
    hint_origin: str = ""
    info: dict = field(default_factory=dict)   # step, epoch, ranks, train params ...
    note: str = ""                # e.g. "run folder: took latest -> step-000004"

    @property
    def title(self) -> str:
        return KIND_TITLES.get(self.kind, self.kind)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- DCP


class DcpSource(Source):
    """A torch.distributed.checkpoint folder, read key by key with ``no_dist=True``."""

    def __init__(self, path: Path, kind: str, **kw):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta_file = path / ".metadata"
        try:
            metadata = FileSystemReader(str(path)).read_metadata()
        except Exception as exc:  # unpickling errors of every kind
            raise ShardtuneError(
                f"{meta_file} cannot be read ({type(exc).__name__}: {str(exc)[:200]}): the DCP index "
                "is truncated or corrupt, so the checkpoint's tensors cannot be located. Copy the "
                "folder again from where it was written, or use an earlier checkpoint.") from None
        entries, others = {}, []
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                entries[key] = Entry(tuple(md.size), md.properties.dtype)
            else:
                others.append(key)
        super().__init__(kind=kind, path=path, entries=entries, others=others, container=True, **kw)
        self._metadata = metadata
        self._files: dict[str, set[str]] = {}   # key -> storage files holding it
        for index, info in (metadata.storage_data or {}).items():
            self._files.setdefault(index.fqn, set()).add(info.relative_path)
        self._check_files()

    def _check_files(self) -> None:
        """Every shard file the index points at exists and is long enough (names the bad one)."""
        need: dict[str, int] = {}
        for info in (self._metadata.storage_data or {}).values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(need.items()):
            file = self.path / name
            if not file.is_file():
                raise ShardtuneError(
                    f"{file} is missing: {self.path / '.metadata'} says it holds part of the checkpoint "
                    "(one file per rank). Copy every __<rank>_0.distcp file of the checkpoint, or use "
                    "an earlier one.")
            size = file.stat().st_size
            if size < end:
                raise ShardtuneError(
                    f"{file} is truncated: it has {size:,} bytes but the checkpoint index needs "
                    f"{end:,}. The save or a copy was interrupted; copy it again or use an earlier "
                    "checkpoint.")

    def files_of(self, keys: list[str]) -> list[str]:
        return sorted({f for k in keys for f in self._files.get(k, ())})

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.api import CheckpointException

        state = {k: torch.empty(self.entries[k].shape, dtype=self.entries[k].dtype) for k in keys}
        if not state:
            return state
        metadata = self._metadata

        class _Reader(FileSystemReader):
            def read_metadata(self, *args, **kwargs):  # parsed once, not once per output shard
                return metadata

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
                dcp.load(state, storage_reader=_Reader(str(self.path)), no_dist=True)
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            text = str(exc).strip()
            first = text.splitlines()[-1] if text else type(exc).__name__
            files = ", ".join(str(self.path / f) for f in self.files_of(keys)) or str(self.path)
            raise ShardtuneError(
                f"Could not read tensors from {files}: the shard is corrupt ({first[:300]}). "
                "Nothing was written; copy the checkpoint again or use an earlier one.") from None
        return state


# ---------------------------------------------------------------- torch.save


def _flatten(obj: Any, prefix: str, tensors: dict, others: list) -> None:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors, others)
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict)) for v in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}" if prefix else str(i), tensors, others)
    else:
        others.append(prefix)


def load_torch_file(file: Path) -> Any:
    """``torch.load(weights_only=True, mmap=True)``; clear errors for truncated or unsafe files."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ShardtuneError(
            f"{file} holds Python objects other than tensors, so it is not loaded (weights_only=True "
            f"refuses to run code from a pickle: {str(exc).splitlines()[0][:200]}). Re-save the state "
            "dict alone, e.g. torch.save(model.state_dict(), path).") from None
    except RuntimeError as exc:
        if "mmap" in str(exc) or "zipfile" in str(exc).lower() and "legacy" in str(exc).lower():
            try:  # the legacy (pre-1.6, non-zip) format cannot be memory-mapped
                return torch.load(file, map_location="cpu", weights_only=True)
            except Exception:
                pass
        raise ShardtuneError(
            f"{file} cannot be read as a torch.save file ({str(exc).splitlines()[0][:200]}): it is "
            "truncated or corrupt, or not a PyTorch checkpoint.") from None
    except (EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise ShardtuneError(
            f"{file} cannot be read as a torch.save file ({type(exc).__name__}: {str(exc)[:200]}): "
            "it is truncated or corrupt, or not a PyTorch checkpoint.") from None


class TorchSource(Source):
    """One or more ``torch.save`` files, memory-mapped: tensors are paged in only when read."""

    def __init__(self, path: Path, files: list[Path], **kw):
        tensors: dict[str, torch.Tensor] = {}
        others: list[str] = []
        nested = False
        for file in files:
            obj = load_torch_file(file)
            if not isinstance(obj, dict):
                raise ShardtuneError(
                    f"{file} holds a {type(obj).__name__}, not a state dict (a dict of tensors). "
                    "Save model.state_dict() instead of the module.")
            nested = nested or any(isinstance(v, dict) for v in obj.values())
            _flatten(obj, "", tensors, others)
        if not tensors:
            raise ShardtuneError(f"{path} holds no tensors.")
        entries = {k: Entry(tuple(t.shape), t.dtype) for k, t in tensors.items()}
        super().__init__(kind="torch", path=path, entries=entries, others=others, container=nested, **kw)
        self._tensors = tensors

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        try:
            return {k: self._tensors[k].clone() for k in keys}
        except (RuntimeError, OSError) as exc:  # a page of a truncated mmap'd file
            raise ShardtuneError(f"{self.path} could not be read ({exc}); it is truncated or corrupt.") from None


# ---------------------------------------------------------------- safetensors


class SafetensorsSource(Source):
    """safetensors files (an HF model folder, an adapter); headers only until tensors are read."""

    def __init__(self, path: Path, files: list[Path], kind: str, **kw):
        from safetensors import safe_open

        entries, where = {}, {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        piece = f.get_slice(key)
                        dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                        if dtype is None:
                            raise ShardtuneError(f"{file}: tensor {key} has unsupported dtype {piece.get_dtype()}.")
                        entries[key] = Entry(tuple(piece.get_shape()), dtype)
                        where[key] = file
            except ShardtuneError:
                raise
            except Exception as exc:
                raise ShardtuneError(
                    f"{file} cannot be read as safetensors ({str(exc)[:200]}): it is truncated or "
                    "corrupt.") from None
        super().__init__(kind=kind, path=path, entries=entries, **kw)
        self._where = where

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._where[k], []).append(k)
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for k in names:
                        out[k] = f.get_tensor(k)
            except Exception as exc:
                raise ShardtuneError(f"{file} could not be read ({str(exc)[:200]}); it is truncated or corrupt.") from None
        return out


def _why_chosen(run: Path, chosen: Path) -> str:
    """How ``layout.latest_checkpoint`` picked ``chosen``: what ``latest`` says, or why it was passed over."""
    pointer = run / layout.LATEST
    if not pointer.is_file():
        return " (the newest complete one)"
    named = pointer.read_text().strip()
    if named == chosen.name:
        return " (named by `latest`)"
    return (f" (the newest complete one: `latest` names {named!r}, which is missing or incomplete)")


def hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF model folder (index or single file); [] when there are none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ShardtuneError(f"{index} is not a valid safetensors index ({exc}).") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ShardtuneError(f"{missing[0]} is missing: {index} lists it.")
        return files
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def open_hf_model(folder: Path, what: str = "base model") -> Source:
    files = hf_weight_files(folder)
    if files:
        return SafetensorsSource(folder, files, kind="hf")
    bins = _torch_index_files(folder) or ([folder / "pytorch_model.bin"] if (folder / "pytorch_model.bin").is_file() else [])
    if bins:
        return TorchSource(folder, bins)
    raise ShardtuneError(
        f"The {what} {folder} has no weights (no model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin).")


def _torch_index_files(folder: Path) -> list[Path]:
    index = folder / "pytorch_model.bin.index.json"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise ShardtuneError(f"{index} is not a valid index ({exc}).") from None
    return sorted({folder / f for f in weight_map.values()})


# ---------------------------------------------------------------- detection


def read_train_params(folder: Path) -> dict:
    file = folder / TRAIN_PARAMS
    if not file.is_file():
        return {}
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ShardtuneError(f"{file} cannot be read ({exc}).") from None
    return data if isinstance(data, dict) else {}


def model_name_from_params(params: dict) -> tuple[Optional[str], Optional[str]]:
    """(model_name, tokenizer_name) from shardtune's nested or llama-recipes' flat train_params."""
    section = params.get("train_config") if isinstance(params.get("train_config"), dict) else params
    model = section.get("model_name") or params.get("model_name")
    tok = section.get("tokenizer_name") or params.get("tokenizer_name")
    clean = lambda v: str(v) if v not in (None, "", "None") else None  # noqa: E731
    return clean(model), clean(tok)


def _dcp_source(folder: Path) -> DcpSource:
    params = read_train_params(folder)
    model, tok = model_name_from_params(params)
    state_file = folder / layout.TRAIN_STATE
    info: dict = {}
    if state_file.is_file():
        kind = "shardtune"
        if folder.name.startswith(".tmp-step-") or not (folder / layout.COMPLETE_MARKER).is_file():
            raise ShardtuneError(
                f"{folder} is an incomplete shardtune checkpoint (no {layout.COMPLETE_MARKER} marker): "
                "its save was interrupted. Convert an earlier checkpoint (`shardtune checkpoints "
                f"{folder.parent}` lists them).")
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise ShardtuneError(f"{state_file} cannot be read ({exc}).") from None
        pos = state.get("position") or {}
        info = {"step": state.get("step"), "epoch": pos.get("epoch"), "batch": pos.get("batch"),
                "world_size": state.get("world_size"), "has_optimizer": state.get("has_optimizer"),
                "fingerprint": state.get("fingerprint"), "versions": state.get("versions")}
    elif params:
        kind = "llama-recipes"
    else:
        kind = "dcp"
    info["train_params"] = params
    origin = f"{folder / TRAIN_PARAMS}" if model else ""
    if (folder / "config.json").is_file():  # config (and tokenizer) copied next to the shards
        model, origin = str(folder), f"{folder / 'config.json'} (in the checkpoint folder)"
    return DcpSource(folder, kind, model_hint=model, tokenizer_hint=tok, hint_origin=origin, info=info)


def _peft_source(folder: Path) -> Source:
    cfg_file = folder / "adapter_config.json"
    try:
        adapter_cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ShardtuneError(f"{cfg_file} cannot be read ({exc}).") from None
    st, binf = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    hint = adapter_cfg.get("base_model_name_or_path")
    kw = dict(model_hint=hint, hint_origin=f"{cfg_file} (base_model_name_or_path)" if hint else "",
              info={"adapter_config": adapter_cfg})
    if st.is_file():
        src: Source = SafetensorsSource(folder, [st], kind="peft", **kw)
    elif binf.is_file():
        src = TorchSource(folder, [binf], **kw)
        src.kind = "peft"
    else:
        raise ShardtuneError(
            f"{folder} has adapter_config.json but no adapter_model.safetensors or adapter_model.bin: "
            "the adapter weights are missing (peft >= 0.21 writes an empty adapter from FSDP1-wrapped "
            "models; save the adapter state dict by parameter name).")
    if not src.entries:
        raise ShardtuneError(f"{src.path} holds no tensors: the adapter is empty.")
    return src


def verify_source(src: Source, log: Callable[[str], None] = print) -> None:
    """Check a source's files against the digests shardtune recorded when it wrote them (a
    difference is an error naming the files, before anything is read or written); say once
    when a source records none and what is checked instead."""
    from ..outputs import ownership
    from ..checkpoint.sharded import verify_checkpoint

    if src.kind == "shardtune":
        advice = (f"Nothing was read or written. Use an earlier checkpoint (`shardtune checkpoints {src.path.parent}` "
                  "lists them), or restore the files from a good copy.")
        if not verify_checkpoint(src.path, advice=advice):
            log(f"note: {src.path} was written before shardtune recorded file digests; only its file sizes are "
                "checked against its index")
        return
    if src.kind in ("hf", "peft"):
        ownership.verify_recorded(src.path if src.path.is_dir() else src.path.parent, log)
        return
    if src.kind in ("llama-recipes", "dcp"):
        log(f"note: {src.path} records no file digests (llama-recipes and plain DCP do not write them): its "
            "files were checked against the sizes its index gives; `shardtune checkpoints --verify` also reads "
            "every tensor and checks its values are finite")


def open_source(path: str | Path) -> Source:
    """Recognise what ``path`` is and open it (metadata only)."""
    path = Path(path)
    if not path.exists():
        raise ShardtuneError(f"{path} does not exist.")
    if path.is_file():
        return _file_source(path)
    children = list(path.iterdir())
    names = {c.name for c in children}
    if not children:
        raise ShardtuneError(f"{path} is an empty folder: there is no checkpoint to read.")
    if ".metadata" in names:
        return _dcp_source(path)
    if any(n.endswith(".distcp") for n in names):
        raise ShardtuneError(
            f"{path} has .distcp shard files but no .metadata: the DCP index is missing (the save was "
            "interrupted before rank 0 wrote it, or it was not copied; `ls -a` shows dot files). "
            "Without it the shards cannot be read; use another checkpoint.")
    run_ckpts = layout.complete_checkpoints(path)
    if layout.LATEST in names or run_ckpts or any(n.startswith("step-") for n in names):
        chosen = layout.latest_checkpoint(path)
        if chosen is None:
            raise ShardtuneError(
                f"{path} looks like a shardtune run folder but has no complete checkpoint (every "
                "step-N folder lacks its COMPLETE marker or .metadata).")
        src = _dcp_source(chosen)
        src.note = f"run folder {path}: took {chosen.name}" + _why_chosen(path, chosen)
        return src
    if "adapter_config.json" in names:
        return _peft_source(path)
    if hf_weight_files(path):
        has_cfg = (path / "config.json").is_file()
        return SafetensorsSource(path, hf_weight_files(path), kind="hf", model_hint=str(path) if has_cfg else None,
                                 hint_origin=f"{path / 'config.json'}" if has_cfg else "")
    bins = _torch_index_files(path)
    if bins:
        src = TorchSource(path, bins)
        _hints_from_folder(src, path)
        return src
    torch_files = sorted(c for c in children if c.is_file() and c.suffix in TORCH_SUFFIXES)
    if len(torch_files) == 1:
        return _file_source(torch_files[0])
    if len(torch_files) > 1:
        listed = ", ".join(f.name for f in torch_files[:6])
        raise ShardtuneError(
            f"{path} holds several torch.save files ({listed}); pass the one to convert (e.g. "
            f"{torch_files[-1]}).")
    shown = ", ".join(sorted(names)[:8])
    inner = sorted(c.name for c in children if c.is_dir() and (
        (c / ".metadata").is_file() or (c / layout.LATEST).is_file() or layout.complete_checkpoints(c)))
    if inner:
        raise ShardtuneError(
            f"{path} is not itself a checkpoint, but it holds {', '.join(inner[:4])}: pass "
            f"{path / inner[0]} instead.")
    raise ShardtuneError(
        f"{path} holds no checkpoint shardtune recognises (found: {shown}). Expected a DCP folder "
        "(.metadata + *.distcp), a shardtune run folder (step-N/, latest), a .pt/.bin state dict, a "
        "PEFT adapter folder (adapter_config.json) or a Hugging Face model folder.")


def _file_source(path: Path) -> Source:
    if path.name == ".metadata" or path.suffix == ".distcp":
        raise ShardtuneError(
            f"{path} is one file of a DCP checkpoint; pass the folder that holds it ({path.parent}).")
    if path.name in ("adapter_config.json", "config.json", "train_params.yaml", "train_state.json",
                     layout.LATEST, "model.safetensors.index.json"):
        raise ShardtuneError(f"{path} is a file, but the folder holding it is expected: pass {path.parent}.")
    if path.suffix == ".safetensors":
        src: Source = SafetensorsSource(path, [path], kind="hf")
    else:
        src = TorchSource(path, [path])
    _hints_from_folder(src, path.parent)
    return src


def _hints_from_folder(src: Source, folder: Path) -> None:
    """A config.json (or train_params.yaml) next to a weights file names the model."""
    if (folder / "config.json").is_file():
        src.model_hint, src.hint_origin = str(folder), f"{folder / 'config.json'} (next to the file)"
        return
    params = read_train_params(folder)
    if params:
        src.model_hint, src.tokenizer_hint = model_name_from_params(params)
        src.hint_origin = str(folder / TRAIN_PARAMS) if src.model_hint else ""


@contextlib.contextmanager
def opened(path: str | Path):
    src = open_source(path)
    try:
        yield src
    finally:
        src.close()
