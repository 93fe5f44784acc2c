"""What ``load_split`` hands the recipe: tokenised samples plus a report of what was filtered."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class DataReport:
    """Counts for one split, so silent data loss never goes unnoticed."""

    source: str
    split: str
    context_length: int
    rows_read: int = 0
    samples: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    bad_examples: list[str] = field(default_factory=list)  # first few skip reasons, for the user
    images_checked: int = 0  # images this rank decoded at load time to check them (its share: image_checks.py)

    def summary(self) -> str:
        line = (f"{self.source} [{self.split}]: {self.rows_read} rows read -> {self.samples} samples; "
                f"{self.skipped_bad} bad rows skipped, {self.truncated} truncated and "
                f"{self.dropped_overlong} dropped as longer than {self.context_length} tokens")
        if self.bad_examples:
            line += f" (first skipped: {self.bad_examples[0]})"
        return line


@dataclass
class TokenizedSplit:
    """``samples`` are dicts of ``input_ids``/``labels``/``attention_mask`` lists (rows of a custom
    dataset that brings its own collator are passed through as returned)."""

    samples: list[dict[str, Any]]
    report: DataReport
    collate_fn: Optional[Callable] = None
    source: str = ""
    # samples[k] came from the source's row positions[k]; where(position) names it ("line 7")
    positions: list[int] = field(default_factory=list)
    where: Optional[Callable[[int], str]] = None
