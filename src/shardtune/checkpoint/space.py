"""A save that runs out of disk space ends with one clear error: the disk is full, how much the save
needed and how much is free, and its partial files removed.

The writers' own errors do not say so: ``torch.save`` raises ``RuntimeError: [enforce fail at
inline_container.cc:672] . unexpected pos 704 vs 598``, DCP wraps each rank's error in a
``CheckpointException`` (a ``BaseException``), and a file-size limit (``RLIMIT_FSIZE``, a quota)
gives ``EFBIG`` / ``EDQUOT`` instead of ``ENOSPC``.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..config.errors import ShardtuneError
from .sizes import human_size

OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# What the writers say instead of an errno: torch.save's zip writer, the C library's messages.
_OUT_OF_SPACE_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "unexpected pos")


def is_out_of_space(exc: Optional[BaseException]) -> bool:
    """``exc``, its causes, or (DCP) any rank's wrapped error says the disk or a size limit was hit."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in OUT_OF_SPACE_ERRNOS:
            return True
        if any(text in str(e) for text in _OUT_OF_SPACE_TEXT):
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: rank -> (exception, traceback)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in a nested dict / list (a DTensor counts its global size): what a
    state dict takes on disk, less the small per-file headers."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def free_bytes(folder: Path) -> Optional[int]:
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full(folder: Path, what: str, needed: int, advice: str) -> ShardtuneError:
    """The error for a save of ``what`` (about ``needed`` bytes) into ``folder`` that hit a full
    disk; call it once the partial files are removed, so that the free space it reports is real."""
    free = free_bytes(folder)
    free_text = f"{human_size(free)} is free there" if free is not None else "the free space is unknown"
    return ShardtuneError(
        f"The disk holding {folder} is full (or a file-size limit or quota was reached): {what} needs about "
        f"{human_size(needed)}, and {free_text} with its partial files removed. {advice} Free space on that "
        "disk, or write to a larger one (--output_dir, --dist_checkpoint_root_folder).")
