"""Next-token cross-entropy summed over the label tokens: ``plain`` or ``chunked``.

``plain`` is what transformers' ``ForCausalLM`` loss computes: the full ``[batch, seq, vocab]``
logits, cast to fp32, then cross-entropy with the labels shifted by one (``IGNORE_INDEX`` skipped).
For Llama 3's 128,256-token vocabulary the fp32 logits of one 8 x 2048 batch alone are 8.4 GB,
and ``log_softmax`` keeps another copy of that size for the backward.

``chunked`` gives the same sum and the same gradients without ever holding those logits:

1. the model's own forward runs with ``logits_to_keep`` selecting no position (its head computes
   a ``[batch, 0, vocab]`` tensor), and a forward hook on its decoder takes the final normed
   hidden states. Going through the model's forward, not calling ``model.model``, keeps FSDP2's
   root hooks (they gather the embeddings, final norm and head, and reduce their gradients after
   the backward; the root is never resharded between forward and backward, so the head can run
   after the forward) and peft's wrappers in the path;
2. only the positions that have a label are kept (prompt and pad tokens never reach the head);
3. the head and the loss run on ``chunk_tokens`` of those positions at a time, each chunk under
   ``torch.utils.checkpoint``: a chunk's logits are freed as soon as its loss is summed, and the
   backward recomputes them, one chunk at a time (one extra head matmul per token).

The head is called as a module (``get_output_embeddings()``), so a LoRA on ``lm_head``, peft's
``modules_to_save`` copy of it and tied embeddings all work; under autocast (or FSDP's
mixed-precision policy) the head computes in the same dtype as in the plain loss and the logits
are cast to fp32 before the loss, as there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..batches import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 1024


def chunk_tokens_of(train_cfg) -> Optional[int]:
    """``--loss chunked``: its ``--loss_chunk_tokens``; ``--loss plain``: None."""
    return train_cfg.loss_chunk_tokens if train_cfg.loss.value == "chunked" else None


def next_token_loss_sum(model: nn.Module, inputs: dict, labels: torch.Tensor,
                        chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over ``labels``' tokens, in fp32.
    ``chunk_tokens`` None: the plain loss; a number: the chunked one with chunks of that many
    label tokens."""
    if chunk_tokens is None:
        return plain_loss_sum(model, inputs, labels)
    return chunked_loss_sum(model, inputs, labels, chunk_tokens)


def plain_loss_sum(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs, use_cache=False).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss_sum(model: nn.Module, inputs: dict, labels: torch.Tensor,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings() is None); "
                         "the chunked loss needs one")
    hidden = final_hidden_states(model, inputs)
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    states = hidden[:, :-1][keep]  # [label tokens, hidden]
    targets = shift_labels[keep]
    if targets.numel() == 0:
        # Nothing to predict, but the backward must still reach every weight, the head's included:
        # FSDP ranks reduce the same gradients (a rank without a head gradient would desynchronise).
        return head(hidden[:, :1]).float().sum() * 0.0
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.numel(), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_head_loss_sum, head, states[start:end], targets[start:end],
                                   use_reentrant=False)
    return total


def _head_loss_sum(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, reduction="sum")


def final_hidden_states(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The decoder's output (after its final norm) from the model's own forward, whose head runs on
    no position. A forward hook on the decoder (``get_decoder()``) takes it; transformers' own
    ``output_hidden_states`` would hook every decoder layer, and those hooks break torch.compile's
    graphs of the layers."""
    captured: list[torch.Tensor] = []

    def take(module: nn.Module, args, output) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = model.get_decoder().register_forward_hook(take)
    try:
        no_position = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**inputs, use_cache=False, logits_to_keep=no_position)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"{type(model).__name__}: its decoder (get_decoder()) ran {len(captured)} times in one "
                         "forward; the chunked loss needs exactly one final hidden state (use --loss plain)")
    return captured[0]
