"""Read local record files (json, jsonl, csv, parquet) into lists of dicts, with clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

from ..config.errors import ShardtuneError
from .rows import row_name

FORMATS = (".json", ".jsonl", ".csv", ".parquet")


def require_file(path: str | Path, *, flag: str) -> Path:
    """``path`` as a Path, or the error that it is missing or a folder (checked by the launcher's
    preflight as well as when the data loads)."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder, expected a file" if p.is_dir() else "does not exist"
        raise ShardtuneError(f"Data file {p} {what}. Point {flag} at a {'/'.join(FORMATS)} file.")
    return p


def read_records(path: str | Path, *, flag: str) -> tuple[list[Any], Callable[[int], str]]:
    """Records of ``path`` and a function naming record i's place in the file (for messages).

    ``flag`` is the option that set the path, so a missing file can say what to change.
    """
    p = require_file(path, flag=flag)
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            return _read_json(p)
        if suffix == ".jsonl":
            return _with_lines(*_read_jsonl(p))
        if suffix == ".csv":
            return _with_lines(*_read_csv(p))
    except UnicodeDecodeError:
        raise ShardtuneError(_not_utf8(p)) from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist(), row_name
    raise ShardtuneError(f"Data file {p} has an unknown format {suffix!r}; {flag} accepts "
                         f"{', '.join(FORMATS)} files.")


def _not_utf8(p: Path) -> str:
    """Where the first byte that is not UTF-8 is (line, column and byte offset), for the message."""
    raw = p.read_bytes()
    try:
        raw.decode("utf-8")
        return f"{p} could not be read as UTF-8 text."  # pragma: no cover - the reader said otherwise
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return (f"{p} is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, column {column} (byte "
                f"offset {e.start} in the file) is not valid UTF-8. Save the file as UTF-8 (for example "
                "`iconv -f latin1 -t utf-8`), or fix that line.")


def _read_json(p: Path) -> tuple[list[Any], Callable[[int], str]]:
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: a JSON-lines file named .json
            return _with_lines(*_read_jsonl(p))
        raise ShardtuneError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). "
                             f"Fix the file; it must hold a JSON list of objects.") from None
    if not isinstance(data, list):
        raise ShardtuneError(f"{p} holds a JSON {type(data).__name__}; it must hold a JSON list of "
                             f"objects (one per example).")
    return data, row_name


def _with_lines(rows: list[Any], lines: list[int]) -> tuple[list[Any], Callable[[int], str]]:
    return rows, lambda i: f"{row_name(i)}, line {lines[i]}"


def _read_jsonl(p: Path) -> tuple[list[Any], list[int]]:
    """Records and the line each starts on (blank lines are skipped, so they differ from i + 1)."""
    rows, lines = [], []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ShardtuneError(f"{p}, line {n} is not valid JSON ({e.msg}). Fix the line; a "
                                     f"JSON-lines file holds one JSON object per line.") from None
            lines.append(n)
    return rows, lines


def _read_csv(p: Path) -> tuple[list[dict], list[int]]:
    """Records and the line each starts on (a quoted field may span lines; blank lines are skipped)."""
    rows, lines = [], []
    with p.open(encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a BOM from spreadsheets
        reader = csv.DictReader(f)
        for row in reader:
            values = [v for v in row.values() if isinstance(v, str)]
            span = 1 + sum(v.count("\n") for v in values)  # physical lines this record took
            rows.append(row)
            lines.append(reader.line_num - span + 1)
    return rows, lines


def require_columns(rows: list[Any], columns: tuple[str, ...], source: Path | str, flag: str) -> None:
    """Tabular files name their columns once: a missing column is a file error, not N row errors."""
    if rows and isinstance(rows[0], dict) and str(source).lower().endswith((".csv", ".parquet")):
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise ShardtuneError(
                f"{source} has no column(s) {missing} (it has {list(rows[0])}). The file at {flag} "
                f"needs the columns {list(columns)}.")
