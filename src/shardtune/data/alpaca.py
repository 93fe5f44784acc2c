"""Alpaca: a JSON list of {instruction, input?, output}, tokenised as llama-recipes does.

Eval split = the first ``eval_fraction`` of the rows (at least one), train = the rest; the split is
made on raw rows, so a bad row never shifts which rows land in which split.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ..batches import IGNORE_INDEX
from ..config.configs import alpaca_dataset, train_config
from .files import read_records, require_file
from .prompts import alpaca_prompt
from .rows import RawSplit, split_off_eval, text_field

FLAG = "--alpaca_dataset.data_path"


def encode(row: Any, tokenizer) -> dict[str, list[int]]:
    """llama-recipes: ids = encode(prompt + output) + [eos]; the first len(encode(prompt)) labels
    are -100 (both encodes add BOS)."""
    instruction = text_field(row, "instruction")
    inp = text_field(row, "input", optional=True)
    output = text_field(row, "output")
    prompt = alpaca_prompt({"instruction": instruction, "input": inp})
    n_prompt = len(tokenizer.encode(prompt))
    ids = tokenizer.encode(prompt + output) + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * min(n_prompt, len(ids)) + ids[n_prompt:]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def check_source(config: alpaca_dataset) -> None:
    """Refuse, before any work, a data file that is not there."""
    require_file(config.data_path, flag=FLAG)


def load(config: alpaca_dataset, tokenizer, split: str, train: train_config) -> RawSplit:
    rows, where = read_records(config.data_path, flag=FLAG)
    part, offset = split_off_eval(rows, split, train.eval_fraction, str(config.data_path))
    return RawSplit(source=str(config.data_path), rows=part, encode=partial(encode, tokenizer=tokenizer),
                    where=lambda i: where(i + offset))
