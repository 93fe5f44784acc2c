"""Grammar correction (JFLEG/C4 style): CSV files with ``input`` and ``target`` columns."""

from __future__ import annotations

from functools import partial
from typing import Any

from ..config.configs import grammar_dataset, train_config
from .encoding import prompt_answer
from .files import read_records, require_columns
from .prompts import GRAMMAR_PROMPT
from .rows import RawSplit, text_field


def encode(row: Any, tokenizer) -> dict[str, list[int]]:
    source = text_field(row, "input")
    target = text_field(row, "target")
    return prompt_answer(tokenizer, GRAMMAR_PROMPT.format(input=source), target)


def load(config: grammar_dataset, tokenizer, split: str, train: train_config) -> RawSplit:
    field = "train_split" if split == "train" else "test_split"
    path, flag = getattr(config, field), f"--grammar_dataset.{field}"
    rows, where = read_records(path, flag=flag)
    require_columns(rows, ("input", "target"), path, flag)
    return RawSplit(source=str(path), rows=rows, encode=partial(encode, tokenizer=tokenizer), where=where)
