"""Images left where they are stored until a batch needs them: a cell of a parquet file, a row of a
``datasets`` dataset (from the hub or ``save_to_disk``).

Such sources embed each image's encoded bytes in the rows. Keeping those bytes in the samples put
every image of the split in every rank and every DataLoader worker (OCR-VQA's ~165k rows: several
GB per process). A sample holds a :class:`StoredImage` instead — the file, row group and row (or
the memory-mapped dataset and its row) — and the collator reads the bytes of the batch it builds.
Rows are read one row group / one row at a time, and each image of the rank's share
(``image_checks.py``) is checked while its bytes are at hand; what the check found is kept in the
reference and reported for its row when the row is encoded, as a failure of an image held in
memory would be.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class StoredImage:
    """Where an encoded image is; ``problem``: why it failed the load-time check ("" if it passed,
    None if this rank did not check it: another rank's share). Not part of the reference's
    identity: the ranks' samples compare equal."""

    nbytes: int
    problem: Optional[str] = dataclasses.field(default=None, compare=False)

    def load(self) -> Optional[bytes]:  # pragma: no cover - every kind of store defines it
        raise NotImplementedError

    def where(self) -> str:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class ParquetImage(StoredImage):
    path: str = ""
    row_group: int = 0
    row: int = 0        # in the row group
    k: int = 0          # the image's place in the row's ``images``; -1: ``images`` is one image

    def load(self) -> Optional[bytes]:
        value = _row_group_images(self.path, self.row_group)[self.row].as_py()
        return encoded_bytes(value if self.k < 0 else value[self.k])

    def where(self) -> str:
        return f"{self.path}, row group {self.row_group}, row {self.row} of the group"


@dataclass(frozen=True)
class DatasetImage(StoredImage):
    dataset: Any = None  # a memory-mapped ``datasets.Dataset`` in arrow format (it pickles as its files' paths)
    row: int = 0
    k: int = 0

    def load(self) -> Optional[bytes]:
        value = self.dataset[self.row].column("images")[0].as_py()
        return encoded_bytes(value if self.k < 0 else value[self.k])

    def where(self) -> str:
        files = [f.get("filename") for f in getattr(self.dataset, "cache_files", None) or []]
        return f"row {self.row} of the dataset" + (f" in {files[0]}" if files else "")


@functools.lru_cache(maxsize=4)  # a batch's images often share row groups; a few groups at most
def _row_group_images(path: str, row_group: int):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=["images"]).column("images")


def encoded_bytes(value: Any) -> Optional[bytes]:
    """The encoded image a stored value holds (raw bytes, or an HF ``Image`` feature's
    ``{"bytes": ..., "path": ...}`` with bytes), or None where it holds none (a path, nothing)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    return None


def store_images(row: Any, make: Callable[[int, int], StoredImage],
                 check: Optional[Callable[[bytes, int, StoredImage], str]]) -> Any:
    """``row`` with each embedded image of its ``images`` replaced by ``make(k, nbytes)`` (``k`` -1
    where ``images`` is a single image), which keeps what ``check(data, k, ref)`` says is wrong with
    the image ("" if nothing; ``check`` None: unchecked). Values without bytes (paths, empty or
    malformed ones) stay as they are, for ``image_ref`` to resolve or refuse as before."""
    if not isinstance(row, dict):
        return row
    images = row.get("images")
    single = not isinstance(images, (list, tuple))
    values = [images] if single else list(images)
    out = []
    for k, value in enumerate(values):
        data = encoded_bytes(value)
        if data is None:
            out.append(value)
            continue
        ref = make(-1 if single else k, len(data))
        out.append(ref if check is None else dataclasses.replace(ref, problem=check(data, k, ref)))
    return {**row, "images": out[0] if single else out}
