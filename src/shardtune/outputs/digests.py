"""File digests: every file shardtune writes is recorded with its size and SHA-256, and readers
check them before they trust the files.

Why SHA-256: it is in Python's standard library (no dependency), CPUs hash it in hardware
(SHA-NI on x86 since Ice Lake / Zen, the ARMv8 crypto extensions; measured here: 1.0 GB/s on one
core, faster than blake2b's 0.47 and md5's 0.44), and a user can check a file by hand with
``sha256sum``. A non-cryptographic checksum (crc32, 2.4 GB/s here) would catch bit rot as well
but not prove that a copy is the file that was written. Ranks hash their share of a
checkpoint's files in parallel, so a step checkpoint costs each rank about one read of its own
share.

Where the digests are recorded (always written last, after the files they describe):

* a step checkpoint: its ``COMPLETE`` marker (JSON), checked by ``--resume``, ``shardtune
  convert``, ``generate``/``chat``/``eval`` and ``shardtune checkpoints --verify``;
* an HF model, adapter or conversion output: the ownership marker ``.shardtune-files.json``
  (``ownership.py``), checked by the same readers. Weight files must match; a changed
  ``config.json`` or tokenizer file (which users edit) is reported but not an error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

from ..config.errors import ShardtuneError

ALGORITHM = "sha256"
_CHUNK = 8 << 20
# Files whose change alters the model's numbers: a mismatch is an error. Other recorded files
# (config, tokenizer, README) may be edited by hand: a mismatch is reported only.
WEIGHT_SUFFIXES = (".safetensors", ".distcp", ".bin", ".pt", ".pth", ".metadata")


class DamagedFiles(ShardtuneError):
    """Files whose bytes are not the ones shardtune wrote."""

    def __init__(self, folder: Path, problems: list[str], advice: str):
        self.folder, self.problems = folder, problems
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        super().__init__(f"{folder} is damaged: {shown}. These files are not the bytes shardtune wrote "
                         f"(damaged on disk or in a copy). {advice}")


def digest_file(path: Path) -> dict:
    """``{"bytes": size, "sha256": hex}`` of one file, read in 8 MiB chunks."""
    h = hashlib.new(ALGORITHM)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, ALGORITHM: h.hexdigest()}


def digest_files(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    return {name: digest_file(folder / name) for name in names}


def files_of(folder: Path, skip: Iterable[str] = ()) -> list[str]:
    """The regular files directly in ``folder`` (sorted), less ``skip``."""
    skipped = set(skip)
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in skipped)


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def problems_of(folder: Path, recorded: dict[str, dict], names: Optional[Iterable[str]] = None) -> list[str]:
    """What differs from the record, one phrase per file: missing, other size, other digest.
    ``names`` limits the check (default: every recorded file)."""
    problems = []
    for name in sorted(recorded if names is None else names):
        want = recorded[name]
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want.get("bytes"):
            problems.append(f"{name} has {size} bytes, {want.get('bytes')} were written")
            continue
        if digest_file(path)[ALGORITHM] != want.get(ALGORITHM):
            problems.append(f"{name} does not match its recorded {ALGORITHM}")
    return problems


def balanced_shares(folder: Path, names: list[str], parts: int) -> list[list[str]]:
    """``names`` split into ``parts`` lists of about equal bytes (largest first, each to the
    lightest share): the same split on every rank, which all see the same files."""
    sizes = sorted(((folder / n).stat().st_size if (folder / n).is_file() else 0, n) for n in names)
    shares: list[list[str]] = [[] for _ in range(parts)]
    load = [0] * parts
    for size, name in reversed(sizes):
        i = load.index(min(load))
        shares[i].append(name)
        load[i] += size
    return shares
