"""Task accuracy: exact match of greedy generations against the expected alpaca answers.

The model sees exactly what the ``alpaca_dataset`` loader trains it on: ``alpaca_prompt(row)``
encoded with the tokenizer's BOS; the answer it was trained to produce is ``row["output"]``
followed by EOS. Generation is greedy, batched with left padding, and each answer is cut at its
first EOS.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional, Sequence

import torch

from ..data.prompts import alpaca_prompt


def score(expected: str, generated: str) -> bool:
    """Exact match, ignoring surrounding whitespace."""
    return expected.strip() == generated.strip()


@contextlib.contextmanager
def _left_padding(tokenizer) -> Iterator[None]:
    """Pad on the left for generation, restoring the tokenizer's side afterwards."""
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _default_max_new_tokens(tokenizer, rows: Sequence[Mapping[str, str]]) -> int:
    """Room for the longest expected answer, its EOS and a few tokens of overrun."""
    longest = max(len(tokenizer.encode(r["output"], add_special_tokens=False)) for r in rows)
    return longest + 4


def generate_answers(model, tokenizer, rows: Sequence[Mapping[str, str]],
                     max_new_tokens: Optional[int] = None, batch_size: int = 32) -> list[str]:
    """Greedy answers to ``alpaca_prompt(row)`` for each row, decoded up to the first EOS."""
    rows = list(rows)
    if not rows:
        return []
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(tokenizer, rows)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    device = next(model.parameters()).device
    answers: list[str] = []
    with _left_padding(tokenizer), _eval_mode(model):
        for start in range(0, len(rows), batch_size):
            prompts = [alpaca_prompt(r) for r in rows[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
            for seq in out[:, batch["input_ids"].shape[1]:].tolist():
                if eos in seq:
                    seq = seq[:seq.index(eos)]
                answers.append(tokenizer.decode(seq, skip_special_tokens=True))
    return answers


def task_accuracy(model, tokenizer, rows: Sequence[Mapping[str, str]],
                  max_new_tokens: Optional[int] = None, batch_size: int = 32) -> float:
    """Fraction of ``rows`` whose greedy answer equals ``row["output"]`` (whitespace-stripped)."""
    rows = list(rows)
    if not rows:
        return 0.0
    answers = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size)
    return sum(score(r["output"], a) for r, a in zip(rows, answers)) / len(rows)


def show_examples(model, tokenizer, rows: Sequence[Mapping[str, str]],
                  max_new_tokens: Optional[int] = None, batch_size: int = 32) -> list[str]:
    """One line per row: ``input -> expected | got  [ok]`` (or ``[wrong]``), for printing."""
    rows = list(rows)
    answers = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size)
    lines = []
    for r, a in zip(rows, answers):
        mark = "ok" if score(r["output"], a) else "wrong"
        lines.append(f"{r.get('input', '')!r} -> {r['output']!r} | {a.strip()!r}  [{mark}]")
    return lines
