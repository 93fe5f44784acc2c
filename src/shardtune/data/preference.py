"""Preference pairs for ``--use_dpo``: ``--dataset preference_dataset --preference_dataset.data_path FILE``.

Rows (a JSON list, JSON lines or parquet) are ``{"prompt": str, "chosen": str, "rejected": str}``: each
response becomes a sample BOS + prompt + response + EOS whose labels are the response and its EOS
(``encoding.prompt_answer``, as grammar and samsum). Or conversational rows: ``chosen`` and
``rejected`` are lists of chat messages (``{"role", "content"}``), ``prompt`` a message list, a
string (one user message) or absent (then the messages the two share from the start are the
prompt). A conversation is rendered by the tokenizer's own chat template (``apply_chat_template``):
the prompt with the generation prompt, then prompt + response; the labels are the tokens the
response adds (its end-of-turn token included), so the mask comes from the rendering.

A sample is ``{"chosen": sample, "rejected": sample}`` (``rows.PAIR``); :class:`PreferenceCollator`
puts the B chosen responses and then the B rejected ones in one right-padded batch of 2B rows
(train/dpo.py). The eval split is the first ``--eval_fraction`` of the rows, as for alpaca.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from ..batches import CAUSAL_PADDING, REFERENCE_LOGPS
from ..config.errors import ShardtuneError
from .collate import pad_token_id
from .encoding import prompt_answer
from .files import read_records, require_columns
from ..batches import IGNORE_INDEX
from .rows import PAIR, BadRow, RawSplit, split_off_eval, text_field

FLAG = "--preference_dataset.data_path"


def encode(row: Any, tokenizer) -> dict[str, dict[str, list[int]]]:
    """A row -> ``{"chosen": sample, "rejected": sample}``; raises BadRow."""
    if not isinstance(row, Mapping):
        raise BadRow(f"is a {type(row).__name__}, expected an object with prompt, chosen and rejected")
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = text_field(row, "prompt")
        pair = {"chosen": text_field(row, "chosen"), "rejected": text_field(row, "rejected")}
        if pair["chosen"] == pair["rejected"]:
            raise BadRow("has the same text as 'chosen' and 'rejected' (a pair without a preference)")
        return {k: prompt_answer(tokenizer, prompt, v) for k, v in pair.items()}
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _encode_conversation(row, tokenizer)
    for name in PAIR:
        if name not in row or row[name] is None:
            raise BadRow(f"has no field {name!r} (fields: {sorted(map(str, row))})")
    raise BadRow(f"has 'chosen' as a {type(chosen).__name__} and 'rejected' as a {type(rejected).__name__}; "
                 "both must be strings (with a 'prompt' string) or both lists of chat messages")


def _messages(value: Any, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise BadRow(f"field {name!r} is a {type(value).__name__}, expected a list of chat messages")
    for i, m in enumerate(value):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m):
            raise BadRow(f"field {name!r}, message {i} is not a chat message ({{'role': str, 'content': ...}})")
    return [dict(m) for m in value]


def _encode_conversation(row: Mapping, tokenizer) -> dict[str, dict[str, list[int]]]:
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    prompt = row.get("prompt")
    if prompt is None:  # the shared start of the two conversations is the prompt
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        prompt_msgs, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    elif isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        prompt_msgs = _messages(prompt, "prompt")
    if not prompt_msgs:
        raise BadRow("has no prompt: no 'prompt' field and 'chosen' and 'rejected' share no first message")
    if not chosen or not rejected:
        raise BadRow("has a 'chosen' or 'rejected' conversation with no message after the prompt")
    if chosen == rejected:
        raise BadRow("has the same messages as 'chosen' and 'rejected' (a pair without a preference)")
    prompt_ids = _render(tokenizer, prompt_msgs, add_generation_prompt=True)
    return {"chosen": _response_sample(tokenizer, prompt_ids, prompt_msgs + chosen, "chosen"),
            "rejected": _response_sample(tokenizer, prompt_ids, prompt_msgs + rejected, "rejected")}


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's errors (raise_exception in a template, a bad role order) are the row's
        raise BadRow(f"cannot be rendered by the tokenizer's chat template: {e}") from None
    # the rendered text carries the template's own special tokens (BOS, headers): none added again
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _response_sample(tokenizer, prompt_ids: list[int], messages: list[dict], name: str) -> dict[str, list[int]]:
    ids = _render(tokenizer, messages)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise BadRow(f"renders its {name!r} conversation so that it does not start with the rendered prompt "
                     "(the chat template adds or changes text before the response), so the response tokens "
                     "cannot be told apart")
    if len(ids) == len(prompt_ids):
        raise BadRow(f"has a {name!r} response that renders to no token")
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):],
            "attention_mask": [1] * len(ids)}


def check_chat_template(rows: Sequence[Any], tokenizer, source: str) -> None:
    """Conversational rows need a chat template: a file error, not one error per row."""
    conversational = any(isinstance(r, Mapping) and isinstance(r.get("chosen"), list) for r in rows[:1])
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise ShardtuneError(
            f"{source} holds conversational preference rows (message lists), but the tokenizer has no chat "
            "template to render them. Use the instruct model's tokenizer (--tokenizer_name), or give "
            "'prompt', 'chosen' and 'rejected' as plain strings.")


def load(config, tokenizer, split: str, train) -> RawSplit:
    if not config.data_path:
        raise ShardtuneError(f"--dataset preference_dataset needs its file: {FLAG} FILE (a JSON list, JSON lines or "
                             "parquet file of {\"prompt\", \"chosen\", \"rejected\"} rows; docs/preference.md).")
    rows, where = read_records(config.data_path, flag=FLAG)
    require_columns(rows, ("chosen", "rejected"), config.data_path, FLAG)
    part, offset = split_off_eval(rows, split, train.eval_fraction, str(config.data_path))
    return pair_split(str(config.data_path), part, tokenizer, where=lambda i: where(i + offset))


def attach_reference_logps(samples: list[dict], values: Sequence[Sequence[float]]) -> None:
    """--dpo_config.precompute_reference: pair i's reference log-probabilities (chosen, rejected)
    kept in its samples, for the collator to put in each batch."""
    for sample, pair in zip(samples, values, strict=True):
        for key, value in zip(PAIR, pair, strict=True):
            sample[key]["reference_logp"] = float(value)


def pair_split(source: str, rows: Sequence[Any], tokenizer, where=None) -> RawSplit:
    """Rows of preference pairs from any source (a custom dataset's function under --use_dpo) as a
    split that encodes and collates them as preference_dataset does."""
    check_chat_template(rows, tokenizer, source)
    extra = {"where": where} if where is not None else {}
    return RawSplit(source=source, rows=rows, encode=partial(encode, tokenizer=tokenizer),
                    collate_fn=PreferenceCollator(pad_token_id(tokenizer)), tokenized=False, **extra)


class PreferenceCollator:
    """B pairs -> one right-padded batch of 2B rows: the chosen responses, then the rejected ones
    (labels -100 and attention 0 on pads). Pads to the longest row (``pads_to_longest``: data/loader.pad_fraction counts from the lengths)."""

    pads_to_longest = True
    packable = False

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, pairs: list[dict]) -> dict[str, Any]:
        rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        width = max(len(r["input_ids"]) for r in rows)
        out: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
        for r in rows:
            n_pad = width - len(r["input_ids"])
            out["input_ids"].append(list(r["input_ids"]) + [self.pad_id] * n_pad)
            out["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * n_pad)
            out["attention_mask"].append(list(r["attention_mask"]) + [0] * n_pad)
        batch: dict[str, Any] = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        batch[CAUSAL_PADDING] = all(all(r["attention_mask"]) for r in rows)
        if all("reference_logp" in r for r in rows):  # --dpo_config.precompute_reference (train/dpo.py)
            batch[REFERENCE_LOGPS] = torch.tensor([r["reference_logp"] for r in rows], dtype=torch.float64)
        return batch
