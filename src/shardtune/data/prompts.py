"""Prompt templates, exactly as llama-recipes writes them (so fine-tunes stay comparable)."""

from __future__ import annotations

from typing import Mapping

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
GRAMMAR_PROMPT = "Correct this to standard English: {input}\n---\nCorrected: "
SAMSUM_PROMPT = "Summarize this dialog:\n{dialog}\n---\nSummary:\n"


def alpaca_prompt(row: Mapping[str, str]) -> str:
    """The alpaca prompt for a row with ``instruction`` and optional ``input``."""
    if row.get("input", "") == "":
        return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])
    return ALPACA_PROMPT_INPUT.format(instruction=row["instruction"], input=row["input"])
