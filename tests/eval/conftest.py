"""Fixtures for the evaluation tests: the demo's tiny Llama, partly fine-tuned by the real recipe
(so that its accuracy is neither 0 nor 1), and a LoRA adapter on it.

(pytest runs with --import-mode=importlib, so helpers are handed out as fixtures.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO / "examples" / "eval_tasks"
TASK_ROWS = TASKS_DIR / "shardtune_demo" / "test.jsonl"
# The demo's model and flags, with a constant learning rate stopped half-way: at step 165 the
# model gets about a third of the held-out answers right (all of them from about step 200 on).
TRAIN_STEPS = 165
TRAIN_FLAGS = ("--batching_strategy", "padding", "--context_length", "256", "--lr", "3e-3",
               "--scheduler", "constant", "--warmup_steps", "20", "--weight_decay", "0.0",
               "--batch_size_training", "32", "--val_batch_size", "32", "--num_epochs", "100",
               "--num_workers_dataloader", "0", "--device", "cpu", "--seed", "0")


@dataclass
class TrainedRun:
    base: Path  # the tiny random base model
    output: Path  # the recipe's --output_dir (an HF model directory)
    checkpoint: Path  # the resumable step checkpoint of the last step (the same weights)
    train_file: Path
    results: dict  # what shardtune.finetuning.main returned


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """The recipe, in this process, on the demo task for TRAIN_STEPS steps, with --run_eval_after."""
    from shardtune.demo.text import MODEL_SIZE
    from shardtune.demo.task import write_task_data
    from shardtune.demo.tiny import build_tiny_llama
    from shardtune.finetuning import main as finetune

    root = tmp_path_factory.mktemp("eval-run")
    build_tiny_llama(root / "base", seed=0, max_positions=256, **MODEL_SIZE)
    # Seed 0: the example task's rows are this data's held-out rows, never trained on.
    train_file, _ = write_task_data(root / "data", 2000, 200, seed=0)
    results = finetune(["--model_name", str(root / "base"), "--dataset", "alpaca_dataset",
                        "--alpaca_dataset.data_path", str(train_file), "--output_dir", str(root / "out"),
                        "--max_train_step", str(TRAIN_STEPS), "--save_metrics", "--run_eval_after",
                        "--save_every_n_steps", str(TRAIN_STEPS), *TRAIN_FLAGS])  # + a step checkpoint
    checkpoint = root / "out" / "checkpoints" / "fine-tuned" / f"step-{TRAIN_STEPS:06d}"
    return TrainedRun(base=root / "base", output=root / "out", checkpoint=checkpoint, train_file=train_file,
                      results=results)


@pytest.fixture(scope="session")
def task_rows() -> list[dict]:
    return [json.loads(line) for line in TASK_ROWS.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def adapter_dir(trained_run, tmp_path_factory) -> Path:
    """A LoRA adapter on the trained model, saved by peft, with small non-zero weights (peft's
    default init is a no-op adapter), so that it changes some answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained_run.output)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(path)
    return path
