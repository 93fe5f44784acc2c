"""Generated answers and their exact match: greedy decoding from prompt tokens, scored the way
the example lm-eval task (examples/eval_tasks/shardtune_demo) scores them.

The rules, shared with that task so that both give the same number on the same rows:

* the prompt is a list of token ids (an alpaca prompt encoded with the tokenizer's BOS, or the
  unlabelled prefix of a tokenised sample); a batch is left-padded with an attention mask;
* decoding is greedy, at most ``max_new_tokens`` new tokens, and an answer ends at the first
  *stop id*: the tokenizer's EOS or one of the model's generation-config EOS ids (lm-eval's
  Hugging Face model stops at the latter and cuts at the former);
* the answer is decoded without special tokens, and it matches when it equals the reference
  after stripping surrounding whitespace from both.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

# Room for a few tokens past the longest reference, so that an answer that runs on is seen
# running on (and scored wrong) rather than cut to look right.
OVERRUN_TOKENS = 4


def score(expected: str, generated: str) -> bool:
    """Exact match, ignoring surrounding whitespace."""
    return expected.strip() == generated.strip()


@contextlib.contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Pad on the left for generation, restoring the tokenizer's side afterwards."""
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode without gradients, restoring the model's training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS, then the model's generation-config EOS
    ids (a Llama 3 Instruct model also ends a turn with ``<|eot_id|>``)."""
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids += list(configured) if isinstance(configured, (list, tuple)) else [configured]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """``ids`` up to (without) the first stop id."""
    stop_set = set(stops)
    return list(next((ids[:i] for i, t in enumerate(ids) if t in stop_set), ids))


def default_max_new_tokens(reference_lengths: Sequence[int]) -> int:
    """Room for the longest reference (in tokens), its EOS and a few tokens of overrun."""
    return max(reference_lengths, default=0) + OVERRUN_TOKENS


def generate_from_ids(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      batch_size: int = 32, stops: Optional[Sequence[int]] = None) -> list[str]:
    """Greedy answers to token-id prompts, each cut at its first stop id and decoded without
    special tokens. Batches are left-padded, with an attention mask."""
    if not prompts:
        return []
    stops = list(stops) if stops is not None else stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    answers: list[str] = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start:start + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=pad)
            for seq in out[:, width:].tolist():
                answers.append(tokenizer.decode(cut_at_stop(seq, stops), skip_special_tokens=True))
    return answers
