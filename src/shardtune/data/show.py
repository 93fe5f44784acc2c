"""What training trains on: each sample's tokens with its trained spans, as text or JSON lines.

A sample's tokens are what the training loader yields for that sample alone (before padding to a
batch or packing): its own ``input_ids`` / ``labels`` when no collator is involved, else the
dataset's collator run on that one row (a custom dataset's ``get_data_collator``, the vision
collator). A token is *trained* when the loss uses its label: not -100, and never the first token
(the loss shifts labels by one), as ``rows.trained_positions`` defines it. ``shardtune data``
(``data/cli.py``) prints these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .collate import plain_batch
from .images import VisionCollator
from .rows import trained_positions
from .split import TokenizedSplit

# How trained text is marked: ANSI colour on a terminal, these brackets anywhere else.
OPEN, CLOSE = "[[", "]]"
COLOUR, RESET = "\x1b[1;32m", "\x1b[0m"  # bold green


@dataclass
class SampleTokens:
    """One sample as the loss sees it."""

    input_ids: list[int]
    labels: list[int]
    attention_mask: list[int]
    images: Optional[int] = None  # image tokens in the text (vision models); None for a text model

    @property
    def tokens(self) -> int:
        """Tokens the model attends to (a collator may pad even a single row)."""
        return sum(1 for m in self.attention_mask if m)

    @property
    def trained(self) -> list[int]:
        return list(trained_positions(self.labels))

    def unlike_input(self) -> int:
        """Trained labels that differ from the token at their own position: labels shifted by
        hand (the model shifts them itself) or a collator's mistake."""
        return sum(1 for i in trained_positions(self.labels) if self.labels[i] != self.input_ids[i])

    def to_json(self) -> str:
        row: dict[str, Any] = {"input_ids": self.input_ids, "labels": self.labels}
        if self.images is not None:
            row["images"] = self.images
        return json.dumps(row, separators=(",", ":"))


def sample_tokens(split: TokenizedSplit, k: int, image_token: Optional[int] = None, *,
                  collate: bool = True) -> SampleTokens:
    """Sample ``k`` of ``split``. ``collate=False`` reads a vision sample's own tokens instead of
    running shardtune's vision collator (which only pads them and opens the images); a custom
    collator always runs. ``image_token``: the id that stands for an image (vision models)."""
    sample = split.samples[k]
    fn = split.collate_fn
    if fn is None or (not collate and isinstance(fn, VisionCollator)):
        ids, labels = list(sample["input_ids"]), list(sample["labels"])
        mask = list(sample.get("attention_mask") or [1] * len(ids))
    else:
        batch = plain_batch(fn([sample]), f"The data collator of {split.source}")
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        mask = batch["attention_mask"][0].tolist() if torch.is_tensor(batch.get("attention_mask")) else [1] * len(ids)
    images = None if image_token is None else sum(1 for t in ids if t == image_token)
    return SampleTokens(ids, labels, mask, images)


@dataclass
class Counts:
    tokens: int = 0
    trained: int = 0
    longest: int = 0
    unlike_input: int = 0  # trained labels unlike their own position's token, over all samples
    samples_unlike: int = 0


def count(split: TokenizedSplit, image_token: Optional[int] = None) -> Counts:
    """Tokens and trained tokens over every sample of ``split`` (a custom collator runs on each)."""
    out = Counts()
    for k in range(len(split.samples)):
        s = sample_tokens(split, k, image_token, collate=False)
        out.tokens += s.tokens
        out.trained += len(s.trained)
        out.longest = max(out.longest, s.tokens)
        unlike = s.unlike_input()
        out.unlike_input += unlike
        out.samples_unlike += unlike > 0
    return out


def render(sample: SampleTokens, tokenizer, colour: bool) -> str:
    """The sample's text (special tokens included) with its trained runs coloured or bracketed."""
    flags = [False] * len(sample.input_ids)
    for i in sample.trained:
        flags[i] = True
    runs: list[tuple[int, int, bool]] = []
    for i, flag in enumerate(flags):
        if runs and runs[-1][2] == flag:
            runs[-1] = (runs[-1][0], i + 1, flag)
        else:
            runs.append((i, i + 1, flag))
    out, before = [], ""
    for start, end, flag in runs:
        piece, before = _piece(tokenizer, sample.input_ids, start, end, before)
        if flag:
            piece = f"{COLOUR}{piece}{RESET}" if colour else f"{OPEN}{piece}{CLOSE}"
        out.append(piece)
    return "".join(out)


def _piece(tokenizer, ids: Sequence[int], start: int, end: int, before: str) -> tuple[str, str]:
    """The text of ``ids[start:end]`` as it reads inside the whole (decoding the prefix keeps the
    spaces a tokenizer attaches to word starts), and the decoded prefix up to ``end``."""
    prefix = _decode(tokenizer, ids[:end])
    if prefix.startswith(before):
        return prefix[len(before):], prefix
    return _decode(tokenizer, ids[start:end]), prefix  # a character split across the two runs


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def header(k: int, where: str, sample: SampleTokens) -> str:
    parts = [f"{sample.tokens} tokens", f"{len(sample.trained)} trained"]
    if sample.tokens != len(sample.input_ids):
        parts.append(f"{len(sample.input_ids) - sample.tokens} padding")
    if sample.images is not None:
        parts.append(f"{sample.images} image{'s' if sample.images != 1 else ''}")
    unlike = sample.unlike_input()
    if unlike:
        parts.append(f"{unlike} trained labels differ from their own token")
    return f"=== sample {k} ({where}): {', '.join(parts)} ==="


def summary(split: TokenizedSplit, counts: Counts, *, dataset: str, tokenizer_source: str,
            batching: str, colour: Optional[bool], other_split: Optional[str] = None) -> list[str]:
    """The split's report and counts, one ``name  value`` line each (``other_split``: the report of
    the other split training loads)."""
    r = split.report
    share = f" ({counts.trained / counts.tokens:.1%} of tokens)" if counts.tokens else ""
    lines = [
        ("dataset", f"{dataset}: {split.source} ({r.split} split)"),
        ("tokenizer", tokenizer_source),
        ("rows read", f"{r.rows_read:,}"),
        ("samples", f"{r.samples:,}"),
        ("bad rows", f"{r.skipped_bad:,} skipped" + (f" (first: {'; '.join(r.bad_examples)})" if r.bad_examples
                                                      else "")),
        ("dropped", f"{r.dropped_overlong:,} (longer than --context_length {r.context_length})"),
        ("truncated", f"{r.truncated:,} (cut to --context_length {r.context_length})"),
        ("tokens", f"{counts.tokens:,} (longest sample {counts.longest:,})"),
        ("trained tokens", f"{counts.trained:,}{share}"),
        ("batching", batching),
    ]
    if other_split:
        lines.append(("other split", other_split))
    if counts.unlike_input:
        lines.append(("warning", f"{counts.unlike_input:,} trained labels in {counts.samples_unlike:,} samples differ "
                                 "from the token at their own position. Labels are the input_ids themselves: the "
                                 "model shifts them by one, so labels shifted by hand train the wrong tokens."))
    if colour is not None:  # None: no text follows (--json)
        mark = "in green" if colour else f"between {OPEN} and {CLOSE}"
        lines.append(("marked", f"trained text is {mark} (the first token of a sample is never trained: the loss "
                                "shifts labels by one)"))
    return [f"{name:<15} {value}" for name, value in lines]


def where(split: TokenizedSplit, k: int) -> str:
    """The source row that sample ``k`` came from ("row 12", "line 4")."""
    if k < len(split.positions) and split.where is not None:
        return split.where(split.positions[k])
    return "source position unknown"
