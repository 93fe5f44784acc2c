"""Per-document SDPA for packed batches, without a ``[seq, seq]`` mask per row.

For a packed batch transformers builds a block-diagonal causal mask from the ``position_ids`` and
SDPA's masked kernel computes every score of each row, masking most of them: a row of 512 tokens
holding four documents of 128 pays for 512² scores where 4 x 128² are needed (TRAPS.md). Here the
documents of the flattened batch (the cumulative lengths ``cu_seq_lens_q`` the collator sends, as
for flash-attn's varlen kernel) are attended with ``is_causal=True`` only, in a few calls:

* documents are grouped by length, rounded up to a multiple of :data:`BUCKET` tokens; each group
  is one SDPA call on ``[documents, heads, bucket length, dim]``;
* the slots past a document's end inside its bucket read any token (the document's first): with a
  causal kernel a real query only sees keys at or before itself, so those slots change nothing,
  and their outputs are dropped (their gradients are exactly zero);
* one gather builds every group's input and one gather puts the outputs back in token order, so
  the backward pass scatters into one gradient per tensor, not one per group (measured: one
  gradient buffer per group cost as much as the attention it saved).

Cost follows Σ bucket_len² instead of rows × seq²; no token can attend across documents because
no group holds two documents in one sequence. Measured on this CPU at [8 rows, 8 heads, 512, 64],
fp32, forward + backward: 70-84 ms against 118-128 ms for the masked kernel (docs/benchmarks.md).

Batches without document lengths (padded batches, evaluation, generation) go to transformers' own
SDPA function with transformers' own SDPA mask, so they behave exactly as ``sdpa``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

PACKED_SDPA = "shardtune_packed_sdpa"
BUCKET = 64  # documents are grouped by length rounded up to this many tokens


@dataclass(frozen=True)
class DocumentGroups:
    """How the flattened tokens of a packed batch are laid out for bucketed attention."""

    shapes: tuple[tuple[int, int], ...]  # (documents, bucket length) per group
    gather: torch.Tensor  # [Σ documents x bucket length] flat token read by every group slot
    scatter: torch.Tensor  # [tokens] the group slot holding each token's output


@functools.lru_cache(maxsize=4)  # every layer (and a checkpointed layer's recompute) asks for the same batch
def group_documents(bounds: tuple[int, ...], bucket: int = BUCKET,
                    device: torch.device = torch.device("cpu")) -> DocumentGroups:
    """Groups for the documents whose cumulative lengths are ``bounds`` (``cu_seq_lens_q``)."""
    cu = torch.tensor(bounds, dtype=torch.long)
    starts, lengths = cu[:-1], cu.diff()
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    rounded = (lengths + bucket - 1) // bucket * bucket
    shapes, gathers = [], []
    scatter = torch.empty(bounds[-1], dtype=torch.long)
    offset = 0
    for size in sorted(set(rounded.tolist())):
        docs = (rounded == size).nonzero().flatten()
        steps = torch.arange(size)
        real = steps[None, :] < lengths[docs, None]
        tokens = starts[docs, None] + steps[None, :]
        slots = offset + torch.arange(tokens.numel()).view_as(tokens)
        scatter[tokens[real]] = slots[real]
        gathers.append(torch.where(real, tokens, starts[docs, None]).flatten())
        shapes.append((len(docs), size))
        offset += tokens.numel()
    return DocumentGroups(tuple(shapes), torch.cat(gathers).to(device), scatter.to(device))


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``[batch, heads, seq, dim]``, ``key``
    and ``value`` ``[batch, kv_heads, seq, dim]``; returns ``[batch, seq, heads, dim]``."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # not a packed batch: exactly transformers' SDPA
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    b, h, n, d = query.shape
    kv_heads = key.shape[1]
    bounds = tuple(cu.tolist())
    if key.shape[2] != n or bounds[-1] != b * n:
        raise ValueError(f"packed attention: the document lengths cover {bounds[-1]} tokens but the batch "
                         f"has {b} x {n} queries and {key.shape[2]} keys per row; packed batches are "
                         "for training forward passes without a KV cache")
    groups = group_documents(bounds, BUCKET, query.device)
    sizes = [docs * size for docs, size in groups.shapes]
    # [batch, heads, seq, dim] -> [tokens, heads, dim], then every group's slots in one gather
    q, k, v = (t.transpose(1, 2).reshape(b * n, t.shape[1], d).index_select(0, groups.gather).split(sizes)
               for t in (query, key, value))
    p = dropout if module.training else 0.0
    outputs = []
    for (docs, size), qg, kg, vg in zip(groups.shapes, q, k, v):
        qg, kg, vg = (t.view(docs, size, t.shape[1], d).transpose(1, 2) for t in (qg, kg, vg))
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, dropout_p=p, scale=scaling,
                                             enable_gqa=kv_heads != h)
        outputs.append(out.transpose(1, 2).reshape(docs * size, h, d))
    out = torch.cat(outputs).index_select(0, groups.scatter)
    return out.view(b, n, h, d), None


def register_packed_attention() -> str:
    """Make :data:`PACKED_SDPA` a valid ``attn_implementation`` in this process (idempotent).

    Its mask function is SDPA's, so batches without document lengths get SDPA's own mask.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    # Not traced by torch.compile (--compile): the groups depend on the batch's document lengths, so a
    # traced version would recompile for nearly every batch. The compiled layer runs it eagerly between
    # two graphs (before and after attention) whose shapes do not change. Wrapped here, not with a
    # decorator: torch.compiler.disable imports torch._dynamo (~2.5 s CPU), which every process that
    # imports this module (the launcher's preflight, DataLoader workers) would otherwise pay.
    AttentionInterface.register(PACKED_SDPA, torch.compiler.disable(packed_sdpa_attention))
    AttentionMaskInterface.register(PACKED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return PACKED_SDPA
