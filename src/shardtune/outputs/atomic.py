"""One way to replace a file so that a reader never sees half of it, and a crash leaves either the
old file or the new one: write a temporary file in the same folder (a rename is atomic only
within one file system), flush and fsync it, rename it over the target, then fsync the folder so
the rename itself is on disk.

Every temporary name shardtune uses in a folder it writes is ``.saving-<name>.<pid>`` (a file
here, or a folder for the HF export and ``shardtune convert``): ``ownership`` knows that one
pattern as shardtune's in-progress writes, and the process id keeps two writers apart.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator

TEMP_PREFIX = ".saving-"
TEMP_PATTERN = TEMP_PREFIX + "*"  # for fnmatch: every temporary name of temp_path()


def temp_path(final: str | Path) -> Path:
    """The temporary name of a write that becomes ``final``: beside it, hidden, this process's."""
    final = Path(final)
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{os.getpid()}")


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries (after renames), to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file to be renamed to ``path`` when the block ends without an error (else
    removed, and ``path`` is untouched). ``mode`` "w" (text) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a whole file: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) atomically and durably."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
