"""Read local record files (json, jsonl, csv, parquet) into lists of dicts, with clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

from ..config.errors import ShardtuneError
from .rows import row_name

FORMATS = (".json", ".jsonl", ".csv", ".parquet")


def read_records(path: str | Path, *, flag: str) -> tuple[list[Any], Callable[[int], str]]:
    """Records of ``path`` and a function naming record i's place in the file (for messages).

    ``flag`` is the option that set the path, so a missing file can say what to change.
    """
    p = Path(path)
    if not p.is_file():
        what = "is a folder, expected a file" if p.is_dir() else "does not exist"
        raise ShardtuneError(f"Data file {p} {what}. Point {flag} at a {'/'.join(FORMATS)} file.")
    suffix = p.suffix.lower()
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".jsonl":
        return _read_jsonl(p), lambda i: f"{row_name(i)}, line {i + 1}"
    if suffix == ".csv":
        return _read_csv(p), lambda i: f"{row_name(i)}, line {i + 2}"  # line 1 is the header
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a datasets dependency

        return pq.read_table(p).to_pylist(), row_name
    raise ShardtuneError(f"Data file {p} has an unknown format {suffix!r}; {flag} accepts "
                         f"{', '.join(FORMATS)} files.")


def _read_json(p: Path) -> tuple[list[Any], Callable[[int], str]]:
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: a JSON-lines file named .json
            return _read_jsonl(p), lambda i: f"{row_name(i)}, line {i + 1}"
        raise ShardtuneError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). "
                             f"Fix the file; it must hold a JSON list of objects.") from None
    if not isinstance(data, list):
        raise ShardtuneError(f"{p} holds a JSON {type(data).__name__}; it must hold a JSON list of "
                             f"objects (one per example).")
    return data, row_name


def _read_jsonl(p: Path) -> list[Any]:
    rows = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ShardtuneError(f"{p}, line {n} is not valid JSON ({e.msg}). Fix the line; a "
                                     f"JSON-lines file holds one JSON object per line.") from None
    return rows


def _read_csv(p: Path) -> list[dict]:
    with p.open(encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a BOM from spreadsheets
        return list(csv.DictReader(f))


def require_columns(rows: list[Any], columns: tuple[str, ...], source: Path | str, flag: str) -> None:
    """Tabular files name their columns once: a missing column is a file error, not N row errors."""
    if rows and isinstance(rows[0], dict) and str(source).lower().endswith((".csv", ".parquet")):
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise ShardtuneError(
                f"{source} has no column(s) {missing} (it has {list(rows[0])}). The file at {flag} "
                f"needs the columns {list(columns)}.")
