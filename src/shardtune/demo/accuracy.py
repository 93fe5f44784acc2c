"""Task accuracy: exact match of greedy generations against the expected alpaca answers.

The model sees exactly what the ``alpaca_dataset`` loader trains it on: ``alpaca_prompt(row)``
encoded with the tokenizer's BOS; the answer it was trained to produce is ``row["output"]``
followed by EOS. Generation is greedy, batched with left padding, and each answer is cut at its
first EOS. The generation and scoring rules live in :mod:`shardtune.eval.answers`, which
``shardtune eval`` and the example lm-eval task share.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from ..data.prompts import alpaca_prompt
from ..eval.answers import default_max_new_tokens, eval_mode, generate_from_ids, left_padding, score

def generate_answers(model, tokenizer, rows: Sequence[Mapping[str, str]],
                     max_new_tokens: Optional[int] = None, batch_size: int = 32) -> list[str]:
    """Greedy answers to ``alpaca_prompt(row)`` for each row, decoded up to the first EOS."""
    rows = list(rows)
    if not rows:
        return []
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(
            [len(tokenizer.encode(r["output"], add_special_tokens=False)) for r in rows])
    prompts = [tokenizer(alpaca_prompt(r))["input_ids"] for r in rows]
    return generate_from_ids(model, tokenizer, prompts, max_new_tokens, batch_size)


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


# --- vision: image + question rows (the_cauldron format, see shardtune.demo.vision_task) --------

def first_word(answer: str) -> str:
    """An answer reduced to its first word, lower-cased, without punctuation around it."""
    words = answer.strip().split()
    return words[0].strip(".,!?;:\"'").lower() if words else ""


def vision_answers(model, processor, rows: Sequence[Mapping], max_new_tokens: int = 8,
                   batch_size: int = 32) -> list[str]:
    """Greedy answers to each row's first question about its first image, asked as the
    ``ocrvqa_dataset`` loader trains (a user turn with the image at its start), cut at the end of
    the assistant's turn. ``rows[i]["images"][0]`` is a path the process can open."""
    from PIL import Image

    from ..infer.generate import chat_stop_ids, vision_prompt

    rows = list(rows)
    tokenizer = processor.tokenizer
    stop = chat_stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    answers: list[str] = []
    with left_padding(tokenizer), eval_mode(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [vision_prompt(processor, r["texts"][0]["user"], with_image=True) for r in chunk]
            images = []
            for r in chunk:
                with Image.open(r["images"][0]) as img:
                    images.append([img.convert("RGB")])
            batch = processor(images=images, text=[text for text, _ in prompts], padding=True,
                              add_special_tokens=prompts[0][1], return_tensors="pt")
            batch = batch.to(device, dtype=model.dtype)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
            for seq in out[:, batch["input_ids"].shape[1]:].tolist():
                cut = next((i for i, t in enumerate(seq) if t in stop), len(seq))
                answers.append(tokenizer.decode(seq[:cut], skip_special_tokens=True))
    return answers


def vision_task_accuracy(model, processor, rows: Sequence[Mapping], batch_size: int = 32) -> float:
    """Fraction of ``rows`` whose greedy answer's first word is the expected answer's."""
    rows = list(rows)
    if not rows:
        return 0.0
    answers = vision_answers(model, processor, rows, batch_size=batch_size)
    return sum(first_word(r["texts"][0]["assistant"]) == first_word(a) for r, a in zip(rows, answers)) / len(rows)


def show_vision_examples(model, processor, rows: Sequence[Mapping]) -> list[str]:
    """One line per row: ``image: question -> expected | got  [ok]`` (or ``[wrong]``), for printing."""
    rows = list(rows)
    lines = []
    for r, a in zip(rows, vision_answers(model, processor, rows)):
        expected = r["texts"][0]["assistant"]
        mark = "ok" if first_word(expected) == first_word(a) else "wrong"
        name = r["images"][0].rsplit("/", 1)[-1]
        lines.append(f"{name}: {r['texts'][0]['user']!r} -> {expected!r} | {a.strip()!r}  [{mark}]")
    return lines
