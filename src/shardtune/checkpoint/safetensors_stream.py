"""safetensors files written by streaming: the header first, from the names, shapes and dtypes
known before any tensor is read, then each tensor's bytes as it arrives.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once, so writing a 5 GB
output shard held 5 GB. Here a file's header (JSON: dtype, shape and byte range of each tensor)
is computed from :class:`TensorSpec` s, written, and each tensor is then written at its offset
and released: peak memory is about one tensor whatever the shard size, and the bytes go to disk
once. The files are plain safetensors (read by ``safetensors`` and ``from_pretrained``).

Layout as ``save_file`` lays it out: tensors sorted by item size (largest first) then name, so
each starts at a multiple of its item size (the header is padded to 8 bytes), and the byte
ranges cover the data without gaps, which readers check.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..outputs.atomic import fsync_path
from .progress import Progress

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, before it is read: its name in the file, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def _layout(specs: list[TensorSpec]) -> list[TensorSpec]:
    return sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))


class StreamingSafetensorsFile:
    """One safetensors file: ``write`` each spec's tensor (any order), then ``close``."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: Optional[dict[str, str]] = None):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tensor names in {path.name}")
        for s in specs:
            if s.dtype not in _DTYPE_NAMES:
                raise ValueError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors")
        self.path, self.specs = path, {s.name: s for s in specs}
        header: dict = {"__metadata__": metadata} if metadata else {}
        self.offsets: dict[str, int] = {}
        offset = 0
        for s in _layout(specs):
            header[s.name] = {"dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            self.offsets[s.name] = offset
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as save_file writes it
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        self.pending = set(self.specs)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self.size)  # the full length now: a crash leaves an obviously incomplete temp file

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None or name not in self.pending:
            raise ValueError(f"{self.path.name}: {name} is not expected here (or was written already)")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the header says {spec.shape} {spec.dtype}")
        self.pending.discard(name)
        if spec.nbytes == 0:
            return
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.seek(self.data_start + self.offsets[name])
        self._file.write(memoryview(flat.numpy()))

    def abort(self) -> None:
        """Close after a failure (the caller's temporary folder is removed with the partial file)."""
        self._file.close()

    def close(self) -> None:
        """Flush and fsync; every announced tensor must have been written."""
        if self.pending:
            missing = sorted(self.pending)
            self._file.close()
            raise ValueError(f"{self.path.name}: {len(missing)} tensors were never written ({missing[:3]})")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        fsync_path(self.path)


def plan_shards(specs: list[TensorSpec], limit: int) -> list[list[TensorSpec]]:
    """Specs cut into files of at most ``limit`` bytes (a larger tensor gets a file of its own),
    keeping their order."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for s in specs:
        if current and size + s.nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(s)
        size += s.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_shards(shards: list[list[TensorSpec]], tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path,
                 names: list[str], metadata: Optional[dict[str, str]] = None,
                 progress: Optional[Progress] = None) -> None:
    """Write ``shards[k]`` to ``out_dir / names[k]``, taking ``tensors`` in the shards' order."""
    it = iter(tensors)
    for shard, file_name in zip(shards, names):
        f = StreamingSafetensorsFile(out_dir / file_name, shard, metadata)
        try:
            for spec in shard:
                name, tensor = next(it)
                if name != spec.name:
                    raise ValueError(f"expected {spec.name}, got {name}: tensors must come in the order announced")
                f.write(name, tensor)
                del tensor
                if progress is not None:
                    progress.tensor_done(spec.nbytes)
        except BaseException:
            f.abort()
            raise
        f.close()
        if progress is not None:
            progress.file_done(file_name, f.size)
