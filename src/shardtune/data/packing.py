"""Pack tokenised samples into fixed-length chunks that keep document boundaries.

Documents are placed once, longest first, each into the open chunk with the least room that
still fits it, or a new chunk when none does (best fit decreasing); no document is split (each is
at most ``context_length`` long after ``load_split``), and a chunk keeps its documents in dataset
order. On alpaca-style rows with the real Llama 3 tokenizer (benchmarks/packing_waste.py,
docs/benchmarks.md) 1.7-3.3% of the slots are pads at 256 tokens and 0.5-1.8% at 1024, where best
fit in dataset order left 4.1-4.9% and 1.2-1.8%, and next fit 16-23% and 4-7%; at 4096 a small
dataset's last, part-filled chunks dominate (0.2-5.3%, the same in any order).
Chunks are shuffled per epoch anyway, so which documents share a chunk does not matter.

``position_ids`` restart at 0 for every document, which is how transformers 5 (masking_utils.
find_packed_sequence_indices) knows to build a block-diagonal causal mask when no attention_mask
is passed: tokens never attend across documents. The first label of each document is -100, so no
document is trained to predict the next one's first token. A chunk's unused tail is pad tokens
with labels -100 and positions 0, 1, ... as a document of its own.

flash-attn receives no mask, so for it ``varlen_lengths`` turns the ``position_ids`` into the
cumulative document lengths over the flattened batch that its varlen kernel takes.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from ..batches import IGNORE_INDEX
from ..config.errors import ShardtuneError


def assign(lengths: Sequence[int], context_length: int) -> list[list[int]]:
    """Best-fit-decreasing assignment of document indices to chunks; each chunk lists its
    documents in dataset order."""
    for i, n in enumerate(lengths):
        if n > context_length:
            raise ShardtuneError(
                f"Sample {i} has {n} tokens, more than --context_length {context_length}, so it cannot "
                f"be packed; load data with load_split (which truncates or drops such samples per "
                f"--overlong) or raise --context_length.")
    chunks: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free slots, chunk id)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):  # longest first, ties in order
        n = lengths[i]
        if n == 0:
            continue
        j = bisect.bisect_left(room, (n, -1))
        if j < len(room):
            free, cid = room.pop(j)
        else:
            free, cid = context_length, len(chunks)
            chunks.append([])
        chunks[cid].append(i)
        bisect.insort(room, (free - n, cid))
    return [sorted(docs) for docs in chunks]


def pack(samples: Sequence[dict], context_length: int, pad_id: int) -> tuple[list[dict], list[int]]:
    """-> (chunks with input_ids/labels/position_ids of exactly context_length, pad slots per chunk)."""
    chunks, pads = [], []
    for docs in assign([len(s["input_ids"]) for s in samples], context_length):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in docs:
            doc = list(samples[i]["input_ids"])
            ids += doc
            labels += [IGNORE_INDEX] + list(samples[i]["labels"][1:])
            positions += range(len(doc))
        n_pad = context_length - len(ids)
        chunks.append({"input_ids": ids + [pad_id] * n_pad, "labels": labels + [IGNORE_INDEX] * n_pad,
                       "position_ids": positions + list(range(n_pad))})
        pads.append(n_pad)
    return chunks, pads


def varlen_lengths(position_ids: torch.Tensor) -> dict:
    """flash-attn varlen inputs for a packed batch: ``cu_seq_lens_q/k`` (int32 offsets of every
    document in the batch flattened row after row, ending with the total) and ``max_length_q/k``.

    A document starts wherever its position is 0, so every row starts one too (a row's pad tail
    is a document of its own, with labels -100, as in ``pack``).
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if flat.numel() and (starts.numel() == 0 or bool((position_ids[:, 0] != 0).any())):
        raise ShardtuneError("Packed position_ids must start every row with a document at position 0.")
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int(cu.diff().max()) if cu.numel() > 1 else 0
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(), "max_length_q": longest, "max_length_k": longest}
