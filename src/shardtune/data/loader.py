"""``build_dataloader`` (padding or packing over the global-batch sampler) and ``pad_fraction``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..config.configs import BatchingStrategy
from ..config.errors import ShardtuneError
from .collate import MaskFillers, PackedCollator, PaddingCollator, Rows, pad_token_id
from .packing import pack
from .rows import PAIR, is_pair
from .sampler import GlobalBatchSampler
from .workers import worker_options


def build_dataloader(samples: list[dict], *, tokenizer, strategy: BatchingStrategy, batch_size: int,
                     context_length: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                     drop_last: bool = True, num_workers: int = 0,
                     collate_fn: Optional[Callable] = None, packed_varlen: bool = False,
                     required_keys: Sequence[str] = ()) -> DataLoader:
    """A loader of this rank's micro-batches; call ``loader.batch_sampler.set_epoch(e)`` each epoch.

    padding: length-grouped batches right-padded to their longest sample (input_ids, labels,
    attention_mask). packing: chunks of exactly ``context_length`` tokens (input_ids, labels,
    position_ids; no attention_mask; with ``packed_varlen`` also the documents' cumulative lengths
    that flash-attn needs). ``collate_fn`` (a custom dataset's collator, or a vision dataset's)
    replaces the padding collator; packing is refused with one. ``tokenizer`` may be a processor.
    ``required_keys``: what every batch must carry (a vision model's ``pixel_values``).
    """
    strategy = BatchingStrategy(strategy)
    pad_id = pad_token_id(getattr(tokenizer, "tokenizer", tokenizer))  # a processor holds its tokenizer
    if strategy is BatchingStrategy.packing:
        if getattr(collate_fn, "packable", True) is False or (
                collate_fn is not None and getattr(tokenizer, "image_processor", None) is not None):
            raise ShardtuneError(
                "Vision datasets cannot be packed: each sample carries its images, and a packed chunk "
                "would mix the images and cross-attention of several samples. Use --batching_strategy "
                "padding.")
        if collate_fn is not None:
            raise ShardtuneError(
                "This custom dataset brings its own data collator (get_data_collator), which cannot "
                "be combined with --batching_strategy packing. Use --batching_strategy padding, or "
                "remove get_data_collator to let shardtune pack the tokenised rows.")
        chunks, pads = pack(samples, context_length, pad_id)
        rows = Rows(chunks, [context_length] * len(chunks), [context_length - p for p in pads], True)
        inner: Callable = PackedCollator(varlen=packed_varlen)
    else:
        lengths = [_length(s) for s in samples]
        attended = [_attended(s) for s in samples]
        # A collator that pads to the batch's longest sample (attribute ``pads_to_longest``, e.g.
        # VisionCollator) lets pad_fraction count from the lengths instead of building batches.
        slots_known = collate_fn is None or getattr(collate_fn, "pads_to_longest", False) is True
        rows = Rows(samples, lengths, attended, slots_known=slots_known)
        inner = collate_fn or PaddingCollator(pad_id)
    sampler = GlobalBatchSampler(
        rows.lengths, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
        group_by_length=strategy is BatchingStrategy.padding, rank=rank, world_size=world_size)
    # Its own generator: creating an epoch's iterator draws a worker base seed, which would
    # otherwise consume the global RNG that dropout uses and break exact resume.
    generator = torch.Generator().manual_seed(seed)
    collate = MaskFillers(inner, required=required_keys)
    return DataLoader(rows, batch_sampler=sampler, collate_fn=collate, generator=generator,
                      **worker_options(num_workers, rows.samples, collate))


def _length(sample: Any) -> int:
    if is_pair(sample):  # a preference pair's rows are padded to the longer response
        return max(_length(sample[k]) for k in PAIR)
    ids = sample.get("input_ids") if isinstance(sample, Mapping) else None
    return len(ids) if ids is not None else 0  # raw rows for a custom collator: no grouping


def _attended(sample: Any) -> float:
    if is_pair(sample):  # per row slot: the pair fills two rows of _length(sample) slots
        return sum(_attended(sample[k]) for k in PAIR) / len(PAIR)
    mask = sample.get("attention_mask") if isinstance(sample, Mapping) else None
    return int(sum(mask)) if mask is not None else _length(sample)


def pad_fraction(loader: DataLoader) -> float:
    """Share of token slots in one pass (the sampler's current epoch) that are padding.

    Counted from indices for shardtune's own loaders; otherwise by iterating the loader and
    counting ``attention_mask == 0`` (0 when batches have no attention_mask).
    """
    rows, sampler = loader.dataset, loader.batch_sampler
    pad = total = 0
    if isinstance(rows, Rows) and rows.slots_known and isinstance(sampler, GlobalBatchSampler):
        for batch in sampler:
            real = [-1 - i if i < 0 else i for i in batch]
            slots = max(rows.lengths[i] for i in real) * len(real)
            total += slots
            pad += slots - sum(rows.attended[i] for i in real)
    else:
        for batch in loader:
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            if mask is not None:
                total += mask.numel()
                pad += int((mask == 0).sum())
            elif isinstance(batch, Mapping) and "input_ids" in batch:
                total += batch["input_ids"].numel()
    return pad / total if total else 0.0
