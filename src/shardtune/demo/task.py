"""A synthetic instruction task that a tiny Llama learns in well under a minute on a CPU.

The input is one capital letter, one even digit, one small letter and one odd digit, shuffled
and separated by commas; the output is the same four items run together in the fixed order
capital, even digit, small letter, odd digit::

    {"instruction": "Correct the input to standard.", "input": "7,k,B,4", "output": "B4k7"}

Why this task. Every item is one token: the byte-level pre-tokenizer splits letters from digits
and from punctuation, so ``"7,k,B,4"`` is ``7 , k , B , 4`` and the answer, which alternates
letters and digits, is ``B 4 k 7`` whatever merges the BPE tokenizer learned. Each answer token
is then fetched by *content*, driven by the token just written: after ``:`` copy the capital,
after a capital the even digit, after an even digit the small letter, after a small letter the
odd digit, after an odd digit stop. A two-layer model learns that as a kind lookup (which of the
62 tokens are capitals, even digits, small letters, odd digits: learned from the data) feeding an
attention head that selects by kind and copies, in 150-250 optimizer steps. The instruction is
made of whole-word tokens of the demo tokenizer, so no bare letter in the prompt looks like an
item (``"Make a code"`` would be ``M ak e Ġa Ġc o d e``).

Designs that make the model line answer tokens up with input *positions*, or remember what it
wrote two tokens back, learned far more slowly (2 layers, hidden 128; benchmarks/demo_tuning.py):
reversing 3-6 letters (an induction circuit) stayed at 0% exact match after 354 steps;
capitalising five comma-separated letters (a fixed-offset copy) was under 20% after 590; sorting
a digit, capital, vowel and consonant with commas between the answer's items (the comma hides
which kind was just written) copied only the first item and was at 0-1% after 1180.

The task measures generalisation: there are 26 * 5 * 26 * 5 * 4! = 405,600 possible inputs, the
demo trains on 2,000, and the held-out rows' inputs never occur in training, so getting them
right needs the rule, not memorisation. The untrained model scores 0.

Rows are a pure function of the seed. :func:`write_task_data` writes ``train.json`` (what the
``alpaca_dataset`` loader reads) and ``eval.json`` (held-out rows, for scoring accuracy), whose
inputs never occur in ``train.json``.
"""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path
from typing import Sequence, Union

# (name, members) in answer order. Every member is a single token, belongs to exactly one kind,
# and letters alternate with digits, so the joined answer splits into one token per item.
KINDS: tuple[tuple[str, str], ...] = (
    ("capital", string.ascii_uppercase),
    ("even digit", "02468"),
    ("small letter", string.ascii_lowercase),
    ("odd digit", "13579"),
)
SEP = ","


INSTRUCTION = "Correct the input to standard."


def kind_of(item: str, kinds: Sequence[tuple[str, str]] = KINDS) -> int:
    """Index into ``kinds`` of the kind ``item`` belongs to."""
    for i, (_, members) in enumerate(kinds):
        if item in members:
            return i
    raise ValueError(f"{item!r} is none of the kinds {[name for name, _ in kinds]}")


def make_code(text: str, kinds: Sequence[tuple[str, str]] = KINDS, sep: str = SEP) -> str:
    """The correct answer for an input such as ``"7,k,B,4"`` (-> ``"B4k7"``)."""
    items = text.split(sep)
    if sorted(kind_of(item, kinds) for item in items) != list(range(len(kinds))):
        raise ValueError(f"{text!r} must hold exactly one item of each kind")
    return "".join(sorted(items, key=lambda item: kind_of(item, kinds)))


def _unique_inputs(n: int, seed: int, kinds: Sequence[tuple[str, str]], sep: str) -> list[str]:
    """``n`` distinct inputs (one item of each kind, shuffled), in a seed-determined order."""
    possible = math.factorial(len(kinds)) * math.prod(len(members) for _, members in kinds)
    if n > possible:
        raise ValueError(f"only {possible} distinct inputs exist, asked for {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        items = [rng.choice(members) for _, members in kinds]
        rng.shuffle(items)
        text = sep.join(items)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def make_examples(n: int, seed: int, *, kinds: Sequence[tuple[str, str]] = KINDS,
                  sep: str = SEP) -> list[dict]:
    """``n`` alpaca rows (``instruction``, ``input``, ``output``) with distinct inputs."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [{"instruction": INSTRUCTION, "input": text, "output": make_code(text, kinds, sep)}
            for text in _unique_inputs(n, seed, kinds, sep)]


def write_task_data(out_dir: Union[str, Path], n_train: int, n_eval: int, seed: int, *,
                    kinds: Sequence[tuple[str, str]] = KINDS, sep: str = SEP) -> tuple[Path, Path]:
    """Write ``train.json`` and ``eval.json`` (alpaca JSON lists) to ``out_dir``.

    All ``n_train + n_eval`` inputs are distinct, so no held-out row is ever trained on.
    Returns ``(train_path, eval_path)``.
    """
    rows = make_examples(n_train + n_eval, seed, kinds=kinds, sep=sep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out / "train.json", out / "eval.json"
    train_path.write_text(json.dumps(rows[n_eval:], indent=1) + "\n")
    eval_path.write_text(json.dumps(rows[:n_eval], indent=1) + "\n")
    return train_path, eval_path
