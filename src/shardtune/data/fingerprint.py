"""A digest of the training rows the batch sampler indexes: a resumed run compares it with the one
its checkpoint recorded to know whether sample ``i`` still means the same sample (the data file,
dataset options, tokenizer, context length or batching strategy may have changed)."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping
from typing import Any, Sequence

import torch

from .rows import PAIR, is_pair


def rows_fingerprint(samples: Sequence[Any]) -> str:
    """SHA-1 (16 hex digits) over every row's token fields, in order. Values that are not tokens
    or text (images of a vision row) count by their type only: their text still tells rows apart."""
    h = hashlib.sha1()
    h.update(str(len(samples)).encode())
    for sample in samples:
        h.update(b"\x00row")
        if is_pair(sample):  # a preference pair: both responses' token fields (not a precomputed reference_logp)
            items = sorted((f"{k}.{name}", v) for k in PAIR for name, v in sample[k].items()
                           if name != "reference_logp")
        else:
            items = sorted(sample.items()) if isinstance(sample, Mapping) else [("", sample)]
        for key, value in items:
            h.update(f"\x00{key}=".encode())
            h.update(_bytes(value))
    return h.hexdigest()[:16]


def _bytes(value: Any) -> bytes:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if isinstance(value, (list, tuple)):
        try:  # token ids: one C-level conversion
            return array("q", value).tobytes()
        except (TypeError, OverflowError):
            return b"[" + b",".join(_bytes(v) for v in value) + b"]"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return repr(value).encode()
    return type(value).__name__.encode()
