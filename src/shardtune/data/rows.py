"""Row validation and the context-length policy, shared by every dataset.

A dataset module turns its source into a :class:`RawSplit` (rows + an ``encode`` function that
raises :class:`BadRow`); :func:`finalize` runs the common pipeline: encode, skip-or-fail on bad
rows, truncate or drop overlong samples, count everything in a :class:`DataReport`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from ..batches import IGNORE_INDEX
from ..config.configs import OverlongPolicy
from ..config.errors import ShardtuneError
from .split import DataReport, TokenizedSplit

# A preference sample (data/preference.py) is a pair of samples under these keys.
PAIR = ("chosen", "rejected")
_KEYS = ("input_ids", "labels", "attention_mask")
_MAX_REASONS = 3
_ENCODING_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


class BadRow(Exception):
    """A row that cannot become a training example; the message says why (without the where)."""


class Overlong(Exception):
    """Raised by an ``encode`` that applies its own context-length policy (a chat row cut at a turn
    boundary) when nothing of the row fits: counted as dropped, as an overlong row."""


@dataclass
class Cut:
    """Returned by an ``encode`` that cut its row to fit the context length itself: counted as truncated."""

    sample: dict


def row_name(i: int) -> str:
    return f"row {i}"


@dataclass
class RawSplit:
    """One split of a source before tokenisation."""

    source: str                      # file path or hub name, for messages and the report
    rows: Sequence[Any]
    encode: Callable[[Any], Any]     # raw row -> sample dict; raises BadRow
    where: Callable[[int], str] = row_name  # position of rows[i] in the source, for messages
    collate_fn: Optional[Callable] = None
    tokenized: bool = True           # False: rows go to a custom collator as they are
    # A vision split's: row -> its image references (BadRow as ``encode`` raises it before its
    # images); its ``encode`` then takes ``check``, the agreed check of the row's images (image_checks.py).
    image_refs: Optional[Callable[[Any], list]] = None


def text_field(row: Any, name: str, *, optional: bool = False) -> str:
    """``row[name]`` as a string; empty is only allowed for optional fields (None counts as empty)."""
    if not isinstance(row, Mapping):
        raise BadRow(f"is a {type(row).__name__}, expected an object with named fields")
    value = row.get(name)
    if value is None:
        if optional:
            return ""
        if name in row:
            raise BadRow(f"field {name!r} is null, expected a string")
        raise BadRow(f"has no field {name!r} (fields: {sorted(map(str, row))})")
    if not isinstance(value, str):
        raise BadRow(f"field {name!r} is a {type(value).__name__}, expected a string")
    if not optional and not value.strip():
        raise BadRow(f"field {name!r} is empty")
    return value


def _int_list(row: Mapping, key: str) -> list[int]:
    value = row[key]
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise BadRow(f"{key!r} must be a list of ints, got {type(value).__name__}")
    bad = [v for v in value if not isinstance(v, numbers.Integral) or isinstance(v, bool)]
    if bad:
        first, hint = bad[0], ""
        if isinstance(first, str) and first in _ENCODING_KEYS:
            # llama-cookbook's chat datasets iterate tokenizer.apply_chat_template(dialog): a list
            # of ids in transformers 4, a BatchEncoding (its keys when iterated) in transformers 5.
            hint = (" (the keys of a BatchEncoding: transformers 5's tokenizer.apply_chat_template returns "
                    "one by default; call it with return_dict=False for the list of token ids, or take "
                    "its ['input_ids'])")
        raise BadRow(f"{key!r} must be a list of ints, but it holds a {type(first).__name__} ({first!r}){hint}")
    return [int(v) for v in value]


def check_tokenized(row: Any) -> dict[str, list[int]]:
    """A pre-tokenised row (custom datasets) -> a sample dict, or BadRow."""
    if not isinstance(row, Mapping):
        raise BadRow(f"is a {type(row).__name__}, expected a dict with input_ids and labels")
    for key in ("input_ids", "labels"):
        if key not in row:
            raise BadRow(f"has no {key!r} (keys: {sorted(map(str, row))})")
    sample = {"input_ids": _int_list(row, "input_ids"), "labels": _int_list(row, "labels")}
    n = len(sample["input_ids"])
    if n == 0:
        raise BadRow("has empty 'input_ids'")
    sample["attention_mask"] = _int_list(row, "attention_mask") if "attention_mask" in row else [1] * n
    for key in ("labels", "attention_mask"):
        if len(sample[key]) != n:
            raise BadRow(f"{key!r} has {len(sample[key])} entries but 'input_ids' has {n}")
    if not _has_trained_label(sample["labels"]):
        raise BadRow("has no trained label (every label after the first is -100)")
    return sample


def _has_trained_label(labels: list[int]) -> bool:
    return next(trained_positions(labels), None) is not None


def trained_positions(labels: Sequence[int]) -> Iterator[int]:
    """Positions whose label the loss uses: not -100, and never position 0 (the loss shifts by one,
    so the first token is never predicted)."""
    return (i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX)


def eval_count(n: int, fraction: float, source: str) -> int:
    """Rows held out for eval from a source without a test split: floor(n * fraction), at least 1
    (llama-recipes' alpaca uses n // 20, i.e. fraction 0.05)."""
    if not 0.0 < fraction < 1.0:
        raise ShardtuneError(
            f"--eval_fraction must be between 0 and 1 (exclusive), got {fraction}; it is the share "
            f"of {source} held out as the eval split.")
    return max(1, math.floor(n * fraction + 1e-9))  # +eps: 60 * 0.05 must give 3, not 2


def split_off_eval(rows: Sequence[Any], split: str, fraction: float, source: str) -> tuple[Sequence[Any], int]:
    """The rows of ``split`` from a source without a test split, and the position of its first row:
    the first ``eval_count`` rows are the eval split, the rest train (llama-recipes' alpaca)."""
    n_eval = eval_count(len(rows), fraction, source)
    if split != "train":
        return rows[:n_eval], 0
    if len(rows) <= n_eval:
        raise ShardtuneError(
            f"{source} has {len(rows)} row{'s' if len(rows) != 1 else ''} and the first {n_eval} "
            f"{'is' if n_eval == 1 else 'are'} held out as the eval split (--eval_fraction {fraction}, at "
            "least one row, with or without --run_validation), which leaves none to train on. Add rows "
            f"to the file (with {n_eval + 1} rows, one trains).")
    return rows[n_eval:], n_eval


def finalize(raw: RawSplit, *, split: str, context_length: int, overlong: OverlongPolicy,
             skip_bad_rows: bool, image_check: Optional[Callable[[int], Callable]] = None) -> TokenizedSplit:
    """Encode every row and apply the bad-row and overlong policies; counts go into the report.
    ``image_check(i)``: the check of row ``i``'s images to encode it with (a vision split's)."""
    overlong = OverlongPolicy(overlong)
    report = DataReport(source=raw.source, split=split, context_length=context_length)
    samples, positions = [], []
    for i, row in enumerate(raw.rows):
        report.rows_read += 1
        try:
            sample = raw.encode(row) if image_check is None else raw.encode(row, check=image_check(i))
        except Overlong:
            report.dropped_overlong += 1
            continue
        except BadRow as e:
            if not skip_bad_rows:
                raise ShardtuneError(
                    f"{raw.source}, {raw.where(i)} ({split} split; rows count from 0): the row "
                    f"{e}. Fix or remove the row, or pass --skip_bad_rows to skip malformed rows "
                    f"(they are counted in the data report).") from None
            report.skipped_bad += 1
            if len(report.bad_examples) < _MAX_REASONS:
                report.bad_examples.append(f"{raw.where(i)}: {e}")
            continue
        if isinstance(sample, Cut):
            report.truncated += 1
            sample = sample.sample
        if raw.tokenized or (isinstance(sample, Mapping) and "input_ids" in sample):
            sample = _fit(sample, context_length, overlong, report)
        elif is_pair(sample):
            sample = _fit_pair(sample, context_length, overlong, report)
        if sample is not None:
            samples.append(sample)
            positions.append(i)
    report.samples = len(samples)
    if not samples:
        if report.dropped_overlong and overlong is OverlongPolicy.drop:
            hint = "Raise --context_length, or use --overlong truncate."
        elif report.dropped_overlong:  # truncated, only the prompt was left: nothing to learn from
            hint = ("Raise --context_length: cut to it, those rows kept only their prompt and no "
                    "answer token to learn from.")
        else:
            hint = "Check the data source."
        raise ShardtuneError(
            f"{raw.source} ({split} split) gives no usable examples: {report.rows_read} rows read, "
            f"{report.skipped_bad} bad rows skipped, {report.dropped_overlong} dropped as longer than "
            f"--context_length {context_length}. {hint}")
    return TokenizedSplit(samples=samples, report=report, collate_fn=raw.collate_fn, source=raw.source,
                          positions=positions, where=raw.where)


def is_pair(sample: Any) -> bool:
    return isinstance(sample, Mapping) and all(isinstance(sample.get(k), Mapping) for k in PAIR)


def _fit_pair(pair: dict, context_length: int, overlong: OverlongPolicy, report: DataReport) -> Optional[dict]:
    """Both responses fitted as one example: the pair is dropped (or counted truncated) once."""
    scratch = DataReport(source=report.source, split=report.split, context_length=context_length)
    fitted = {k: _fit(pair[k], context_length, overlong, scratch) for k in PAIR}
    if any(v is None for v in fitted.values()):
        report.dropped_overlong += 1
        return None
    report.truncated += bool(scratch.truncated)
    return fitted


def _fit(sample: dict, context_length: int, overlong: OverlongPolicy, report: DataReport) -> Optional[dict]:
    n = len(sample["input_ids"])
    if n <= context_length:
        return sample
    if overlong is OverlongPolicy.drop:
        report.dropped_overlong += 1
        return None
    cut = dict(sample)
    for key in _KEYS:
        if key in cut:
            cut[key] = cut[key][:context_length]
    if "labels" in cut and not _has_trained_label(cut["labels"]):
        report.dropped_overlong += 1  # only the prompt survived: nothing left to learn from
        return None
    report.truncated += 1
    return cut
