"""Where ``shardtune eval`` writes its JSON, and the rule that keeps it from replacing your files.

A results file carries ``"written_by": "shardtune eval"``; an existing file is replaced only when
it carries that mark, so a file of yours at the ``--output`` path is never overwritten. The
directories the command reads a model from are not written into unless they are a shardtune
output directory (one with an ownership marker, see :mod:`shardtune.outputs.ownership`); in such a
directory the file is recorded in the marker, so that a later run into it sees it as its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

from ..config.errors import ShardtuneError
from ..outputs import ownership
from ..outputs.atomic import atomic_write

WRITTEN_BY = "shardtune eval"
DEFAULT_DIR = "eval_out"


def default_output(model_path: str, kind: str) -> Path:
    """``eval_out/<the model path's last two parts>-<kind>.json`` in the working directory."""
    parts = [p for p in Path(model_path).expanduser().resolve().parts[-2:] if p not in ("/", "")]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)) or "model"
    return Path(DEFAULT_DIR) / f"{name}-{kind}.json"


def _ours(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("written_by") == WRITTEN_BY


def check_output(path: Path, read_from: Iterable[Optional[str]] = ()) -> None:
    """Refuse, before any work, an ``--output`` that would replace a file shardtune did not write
    or write into a model directory that is not shardtune's."""
    if path.is_dir():
        raise ShardtuneError(f"--output {str(path)!r} is a directory; pass a file name such as "
                             f"{path / 'results.json'}.")
    if path.exists() and not _ours(path):
        raise ShardtuneError(f"--output {str(path)!r} exists and was not written by shardtune eval, so it "
                             "is left alone. Choose another --output, or move the file.")
    for source in read_from:
        src = Path(source) if source else None
        if src is None or not src.is_dir() or not ownership.is_inside(path.parent, src):
            continue
        if not (src / ownership.MARKER).is_file():
            raise ShardtuneError(f"--output {str(path)!r} is inside {source}, a model directory shardtune "
                                 "did not write; it is only read. Write the results elsewhere (the "
                                 f"default is {DEFAULT_DIR}/).")


def write_results(path: Path, results: dict) -> Path:
    """Write ``results`` (marked as shardtune eval's) to ``path`` atomically; in a shardtune output
    directory the file is recorded in its marker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"written_by": WRITTEN_BY, **results}, indent=2) + "\n")
    if (path.parent / ownership.MARKER).is_file():
        ownership.record(path.parent, added=[path.name])
    return path
