"""The bos + prompt / answer + eos tokenisation shared by llama-recipes' grammar and samsum."""

from __future__ import annotations

from ..batches import IGNORE_INDEX


def prompt_answer(tokenizer, prompt: str, answer: str) -> dict[str, list[int]]:
    """ids = encode(bos + prompt) + encode(answer + eos), both without added special tokens;
    the prompt's labels are -100, the answer and its EOS are trained."""
    prompt_ids = tokenizer.encode(tokenizer.bos_token + prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer + tokenizer.eos_token, add_special_tokens=False)
    ids = prompt_ids + answer_ids
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
            "attention_mask": [1] * len(ids)}
