"""The map-style dataset the loaders index, and the collators that turn rows into tensors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ..batches import CAUSAL_PADDING, IGNORE_INDEX
from ..config.errors import ShardtuneError
from .packing import varlen_lengths


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id; Llama 3 tokenizers have none, so fall back to EOS as llama-recipes
    does (pads are masked out of attention and loss either way)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


class Rows(Dataset):
    """Samples indexed by the batch sampler; a negative index -1-i is a filler copy of sample i.

    ``lengths``/``attended`` (token slots, non-pad tokens per sample) let ``pad_fraction`` count
    pads from indices alone when ``slots_known`` (a built-in collator pads to the batch's longest).
    """

    def __init__(self, samples: Sequence[Any], lengths: Sequence[int], attended: Sequence[int],
                 slots_known: bool) -> None:
        self.samples, self.lengths, self.attended = samples, list(lengths), list(attended)
        self.slots_known = slots_known

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[Any, bool]:
        return (self.samples[-1 - idx], True) if idx < 0 else (self.samples[idx], False)


class PaddingCollator:
    """Right-pads a micro-batch to its longest sample: pads get labels -100, attention 0.

    When every sample attends to all its own tokens (no zeros in a row's own ``attention_mask``),
    the batch is marked ``CAUSAL_PADDING``: the loss then runs without the mask (the pads sit after
    every real token, so the causal mask alone keeps them out of every labelled position's view).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        fully_attended = True
        for r in rows:
            n_pad = width - len(r["input_ids"])
            mask = r.get("attention_mask") or [1] * len(r["input_ids"])
            fully_attended = fully_attended and all(mask)
            out["input_ids"].append(list(r["input_ids"]) + [self.pad_id] * n_pad)
            out["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * n_pad)
            out["attention_mask"].append(list(mask) + [0] * n_pad)
        batch: dict[str, Any] = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        batch[CAUSAL_PADDING] = fully_attended
        return batch


class PackedCollator:
    """Stacks packed chunks; no attention_mask, so the model masks per document from position_ids.

    ``varlen``: also send the documents' cumulative lengths (flash-attn, which takes no mask and
    would otherwise attend across documents in a batch of several rows; see model/attention.py).
    """

    def __init__(self, varlen: bool = False) -> None:
        self.varlen = varlen

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {k: torch.tensor([r[k] for r in rows], dtype=torch.long)
                                 for k in ("input_ids", "labels", "position_ids")}
        if self.varlen:
            batch.update(varlen_lengths(batch["position_ids"]))
        return batch


# What every batch must carry for the loop (train/loop.py): the model's input and the loss's targets.
BATCH_TENSORS = ("input_ids", "labels")


def plain_batch(batch: Any, collator: str) -> dict[str, Any]:
    """``batch`` as a plain dict, after checking it is a mapping with ``BATCH_TENSORS`` tensors.

    A collator may return any mapping: ``processor(...)`` and ``tokenizer(..., return_tensors="pt")``
    return a ``BatchFeature`` / ``BatchEncoding`` (``UserDict``s, not ``dict``s), and cookbook-style
    collators return those unchanged. The loop, the loss and the FLOP counts then see one type.
    ``collator`` names the collator in the error (e.g. the custom dataset file it came from).
    """
    needs = ("a mapping (a dict, or the BatchFeature / BatchEncoding a processor or tokenizer returns) "
             f"with {' and '.join(BATCH_TENSORS)} tensors of shape [batch, sequence] (labels -100 where "
             "no loss is wanted), plus attention_mask and, for a vision model, the processor's image "
             "tensors")
    if not isinstance(batch, Mapping):
        raise ShardtuneError(f"{collator} returned a {type(batch).__name__}; a data collator must return "
                             f"{needs}.")
    missing = [k for k in BATCH_TENSORS if not torch.is_tensor(batch.get(k))]
    if missing:
        have = ", ".join(map(str, batch)) or "nothing"
        raise ShardtuneError(f"{collator} returned a batch without {' or '.join(missing)} tensors (it has "
                             f"{have}); a data collator must return {needs}.")
    return dict(batch)


class MaskFillers:
    """Runs ``inner`` on the rows, then sets the labels of filler rows to -100 so they add no loss
    and no label tokens (they exist only to keep ranks in step).

    ``required``: keys every batch must carry (a vision model's ``pixel_values``: Mllama skips its
    vision tower and cross-attention layers for a batch without images, so under FSDP ranks would
    run different collectives, and a text-only dataset would silently train only the text side)."""

    def __init__(self, inner: Callable[[list], Any], required: Sequence[str] = ()) -> None:
        self.inner = inner
        self.required = tuple(required)

    def __call__(self, items: list[tuple[Any, bool]]) -> Any:
        batch = self.inner([row for row, _ in items])
        if isinstance(batch, Mapping) and not isinstance(batch, dict):  # a BatchFeature / BatchEncoding
            batch = dict(batch)
        missing = [k for k in self.required if not isinstance(batch, dict) or batch.get(k) is None]
        if missing:
            raise ShardtuneError(
                f"A batch has no {', '.join(missing)}, which every batch for this vision model needs: "
                "without images the model skips its vision tower and cross-attention layers (under FSDP "
                "the ranks would then disagree). Give every row an image (a custom dataset's "
                "get_data_collator must run the processor on the images), or drop the text-only rows.")
        fill = [j for j, (_, is_filler) in enumerate(items) if is_filler]
        if fill:
            labels: Optional[torch.Tensor] = batch.get("labels") if isinstance(batch, dict) else None
            if not torch.is_tensor(labels):
                raise ShardtuneError(
                    "The custom data collator's batches have no 'labels' tensor, which is needed to mask "
                    "the filler samples that keep ranks in step on the last eval batch. Return labels "
                    "from the collator or use drop_last.")
            batch["labels"] = labels.clone()
            batch["labels"][fill] = IGNORE_INDEX
        return batch
