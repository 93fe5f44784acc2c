"""``shardtune demo --dpo``: a tiny random Llama learns a preference with ``--use_dpo``, end to end on CPU.

The demo's text task (``demo/task.py``: put four items into a fixed order) as preference pairs:
the prompt is the task's alpaca prompt, the chosen response the right answer (``"B4k7"``), the
rejected one the same answer with its letters' case swapped (``"b4K7"``): the same length and the
same characters apart from case, so the untrained model prefers either about as often. Held-out
preference accuracy is the share of held-out pairs (inputs never trained on) whose chosen response
the model gives a higher log-probability than the rejected one (summed over the response's
tokens, as the DPO loss scores them); it is printed before and after training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.preference import PreferenceCollator, encode
from ..data.prompts import alpaca_prompt
from ..train.dpo import sequence_logps
from .driver import DemoTask, Rows
from .text import GLOBAL_BATCH, _build_base, _prompt_batch
from .task import write_task_data

N_TRAIN, N_EVAL = 1200, 200
TRAIN_FLAGS = (
    "--use_dpo", "--dpo_config.beta", "0.1", "--batching_strategy", "padding", "--context_length", "256",
    "--num_epochs", "1", "--lr", "2e-3", "--scheduler", "cosine", "--warmup_steps", "5",
)


def pair_of(row: dict) -> dict:
    """An alpaca row of the task -> a preference row (its fields kept for the logit comparison)."""
    return {**row, "prompt": alpaca_prompt(row), "chosen": row["output"], "rejected": row["output"].swapcase()}


def _write_data(directory: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Rows]:
    train_json, eval_json = write_task_data(directory, n_train, n_eval, seed)
    pairs = directory / "pairs.json"
    pairs.write_text(json.dumps([pair_of(r) for r in json.loads(Path(train_json).read_text())]))
    return pairs, [pair_of(r) for r in json.loads(Path(eval_json).read_text())]


@torch.no_grad()
def margins(model: Any, tokenizer: Any, rows: Sequence[dict], batch_size: int = 32) -> list[float]:
    """log p(chosen) - log p(rejected) of each row's responses under ``model``."""
    model.eval()
    collate = PreferenceCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = collate([encode(r, tokenizer) for r in rows[start:start + batch_size]])
        logps = sequence_logps(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                               batch["labels"])
        n = logps.shape[0] // 2
        out.extend((logps[:n] - logps[n:]).tolist())
    return out


def preference_accuracy(model: Any, tokenizer: Any, rows: Sequence[dict]) -> float:
    """Share of ``rows`` whose chosen response the model finds strictly more likely."""
    m = margins(model, tokenizer, rows)
    return sum(x > 0 for x in m) / len(m) if m else 0.0


def show_examples(model: Any, tokenizer: Any, rows: Sequence[dict]) -> list[str]:
    return [f"{r['input']} -> {r['chosen']} over {r['rejected']} | log-prob margin {m:+.2f}"
            for r, m in zip(rows, margins(model, tokenizer, rows))]


PREFERENCE_DEMO = DemoTask(
    model_label="Llama", data_label="preference pairs (JSON)", row_noun="pairs",
    example_format="input -> chosen over rejected | log p(chosen) - log p(rejected)",
    build_base=_build_base, write_data=_write_data, n_train=N_TRAIN, n_eval=N_EVAL,
    model_class="AutoModelForCausalLM", processor_class="AutoTokenizer",
    accuracy=preference_accuracy, show_examples=show_examples,
    dataset="preference_dataset", train_flags=TRAIN_FLAGS, global_batch=GLOBAL_BATCH,
    logit_inputs=_prompt_batch, accuracy_label="preference accuracy", min_gain=0.25,
)
