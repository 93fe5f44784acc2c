"""Which tokens of a rendered conversation are trained, found from the chat template's own
renderings, so that the masks are right for any template (no hard-coded ids or markers).

For an assistant message ``k`` the template renders ``messages[:k]`` with the generation prompt
(what the model sees before it answers) and ``messages[:k+1]`` (the answer appended). The second
must be a prefix of the whole conversation's rendering; the answer's span starts where the two
part (the generation prompt itself is not trained, even where a template's prompt differs from the
header it writes for a finished turn) and ends where the second ends, less trailing whitespace (a
ChatML template's newline after ``<|im_end|>``, which the model never generates). The span so
covers the answer's text (or its tool call) and the end-of-turn token that closes it.

A token is trained when it overlaps a span, the rule transformers' ``return_assistant_tokens_mask``
applies to a template's ``{% generation %}`` blocks (and so TRL's ``assistant_only_loss``).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from ..batches import IGNORE_INDEX
from .rows import BadRow

Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) -> text; raises BadRow
Span = tuple[int, int]


class NotIncremental(BadRow):
    """The template renders a conversation's start differently once more messages follow."""


def turn_spans(render: Render, messages: list[dict], full: str, turns: Sequence[int]) -> list[Span]:
    """Character spans ``[start, end)`` in ``full`` (the rendering of ``messages``) of the
    assistant messages ``turns`` (indices into ``messages``, increasing)."""
    spans: list[Span] = []
    for k in turns:
        after = full if k == len(messages) - 1 else render(messages[:k + 1], False)
        if not full.startswith(after):
            raise NotIncremental(
                f"cannot be masked: the chat template renders the conversation up to message {k} "
                "differently from the start of the whole conversation (templates that drop earlier "
                "reasoning do; Llama 3.2 Vision's drops its system header when a later message has an "
                "image, so put images in the first user message), so the assistant turns cannot be "
                "located in it. Use --chat_dataset.train_on last or all, or a template that renders "
                "each turn the same wherever it stands")
        before = render(messages[:k], True)
        start = len(before) if after.startswith(before) else len(os.path.commonprefix([before, after]))
        end = len(after.rstrip())
        if end <= start or (spans and start < spans[-1][1]):
            raise NotIncremental(f"cannot be masked: the chat template's rendering of assistant message {k} "
                                 "is empty or overlaps the turn before it")
        spans.append((start, end))
    return spans


def span_labels(ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[Span],
                shift: int = 0) -> list[int]:
    """Labels: ``ids[i]`` where token i (characters ``offsets[i]``) overlaps a span (spans are in
    the rendered text; ``shift`` is how far the tokenised text moved them, e.g. a BOS a processor
    added), -100 elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    j = 0
    for i, (start, end) in enumerate(offsets):
        while j < len(spans) and start >= spans[j][1] + shift:
            j += 1
        if j == len(spans):
            break
        if end > spans[j][0] + shift and end > start:
            labels[i] = ids[i]
    return labels
