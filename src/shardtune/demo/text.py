"""The text demo's task: a tiny Llama learns a string-correction task (demo/task.py) in alpaca
format. Shared by the fine-tuning demo (run.py) and the preference demo (preference.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ..data.prompts import alpaca_prompt
from .accuracy import show_examples, task_accuracy
from .driver import DemoTask, Rows
from .task import write_task_data
from .tiny import build_tiny_llama

# Tuned with benchmarks/demo_tuning.py (src/shardtune/demo/task.py says why this task). At this
# size the plain loop reached 100% held-out exact match by optimizer step 150-250 for seeds 0-4;
# 8 epochs (472 steps) leave a margin. hidden_size 128 (0.5M parameters) learned as fast on one
# seed and stalled at 0% after 354 steps on another; 64 learned on every seed tried, at ~0.05 s a
# step on one core (the whole demo: 32-40 s on this 2-core machine with other work running).
MODEL_SIZE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192)
N_TRAIN, N_EVAL = 2000, 200
GLOBAL_BATCH = 32  # samples per optimizer step, split over the ranks
TRAIN_FLAGS = (
    "--batching_strategy", "padding", "--context_length", "256", "--num_epochs", "8",
    "--lr", "3e-3", "--scheduler", "cosine", "--warmup_steps", "20", "--weight_decay", "0.0",
)


def _build_base(path: Path, seed: int) -> None:
    build_tiny_llama(path, seed=seed, max_positions=256, **MODEL_SIZE)


def _write_data(directory: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Rows]:
    train_json, eval_json = write_task_data(directory, n_train, n_eval, seed)
    return train_json, json.loads(Path(eval_json).read_text())


def _prompt_batch(tokenizer: Any, rows: Rows) -> Mapping[str, torch.Tensor]:
    """The rows' alpaca prompts, right-padded: what the logit comparison feeds both models."""
    return tokenizer([alpaca_prompt(r) for r in rows], return_tensors="pt", padding=True)


TEXT_DEMO = DemoTask(
    model_label="Llama", data_label="task data (alpaca JSON)", row_noun="rows",
    example_format="input -> expected | generated",
    build_base=_build_base, write_data=_write_data, n_train=N_TRAIN, n_eval=N_EVAL,
    model_class="AutoModelForCausalLM", processor_class="AutoTokenizer",
    accuracy=task_accuracy, show_examples=show_examples,
    dataset="alpaca_dataset", train_flags=TRAIN_FLAGS, global_batch=GLOBAL_BATCH,
    logit_inputs=_prompt_batch,
)
