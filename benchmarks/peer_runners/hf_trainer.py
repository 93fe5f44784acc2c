"""Hugging Face Trainer's rows of the peer benchmark (runs in the peer virtual environment).

``transformers.Trainer`` as a user runs it for causal-LM fine-tuning: the model from
``AutoModelForCausalLM.from_pretrained`` (fp32 weights; ``bf16=True`` autocast on a GPU), AdamW
(``optim="adamw_torch"``), constant LR, no clipping, no checkpoints. Padded mode collates with
``DataCollatorForSeq2Seq`` (pad to the longest row, labels padded with shardtune's
``IGNORE_INDEX``, -100, from the spec; attention mask);
packed mode stacks the plan's chunks with ``default_data_collator`` and passes ``position_ids``
without an attention mask, which transformers turns into a per-document causal mask (Trainer
sets ``model.config.use_cache = False``, without which the packed rows would attend across
documents). ``train_sampling_strategy="sequential"`` replays the plan's batches in order.

    PEER_PY -m benchmarks.peer_runners.hf_trainer SPEC.json      (from the repository root)
"""

from __future__ import annotations

from pathlib import Path

from . import _runner


class ListDataset:
    """A map-style dataset over the plan's rows (Trainer needs ``__len__`` and ``__getitem__``)."""

    def __init__(self, rows: list[dict], keys: tuple[str, ...]) -> None:
        self.rows = [{k: r[k] for k in keys} for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class RecordingCollator:
    """The framework's own collator, plus a token checksum of every batch it builds."""

    def __init__(self, collate, pad_id: int) -> None:
        self.collate, self.pad_id = collate, pad_id
        self.checksums: list[int] = []

    def __call__(self, features):
        batch = self.collate(features)
        self.checksums.append(_runner.checksum(batch["input_ids"], self.pad_id))
        return batch


def training_arguments(spec: dict, output_dir: Path, **extra) -> dict:
    """TrainingArguments shared by HF Trainer and TRL's SFTTrainer (SFTConfig subclasses it)."""
    return dict(
        output_dir=str(output_dir), per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=spec["lr"],
        adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1], adam_epsilon=spec["eps"],
        weight_decay=spec["weight_decay"], optim="adamw_torch", lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0,  # 0 turns clipping off, as in every framework here
        logging_steps=spec["steps"],  # losses are recorded without a per-step .item()
        save_strategy="no", report_to="none", seed=spec["seed"], use_cpu=spec["device"] == "cpu",
        bf16=spec["dtype"] == "bf16", dataloader_num_workers=0, dataloader_drop_last=True,
        dataloader_pin_memory=spec["device"] == "cuda", train_sampling_strategy="sequential",
        disable_tqdm=True, **extra)


def recording_trainer(base):
    """``base`` (Trainer or SFTTrainer) keeping each step's loss as a tensor (no sync)."""

    class Recording(base):
        step_losses: list

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            self.step_losses.append(loss.detach().float())
            return out

    return Recording


def clock_callback(clock: _runner.StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after optimizer.step + zero_grad
            clock.stamp()

    return Clock()


def load_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    # fp32 master weights also on a GPU: bf16=True is autocast, as shardtune's default there.
    return AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                attn_implementation="sdpa")


def run(spec: dict, mode: str) -> dict:
    from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments,
                              default_data_collator)

    plan = _runner.load_plan(spec["plans"][mode])
    packed = mode == "packed"
    keys = ("input_ids", "labels", "position_ids") if packed else ("input_ids", "labels")
    dataset = ListDataset(_runner.plan_rows(plan), keys)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    clock = _runner.StepClock(spec["device"])
    with _runner.MemoryProbe(spec["device"]) as mem:
        model = load_model(spec)
        collate = default_data_collator if packed else DataCollatorForSeq2Seq(
            tokenizer, padding="longest", label_pad_token_id=spec["ignore_index"])
        collator = RecordingCollator(collate, plan["pad_id"])
        args = TrainingArguments(**training_arguments(spec, Path(spec["workdir"]) / f"hf_{mode}_out"))
        trainer = recording_trainer(Trainer)(model=model, args=args, train_dataset=dataset,
                                             data_collator=collator, callbacks=[clock_callback(clock)])
        trainer.step_losses = []
        if packed and model.config.use_cache:
            raise SystemExit("hf: use_cache is on, so packed rows would attend across documents")
        trainer.train()
    _runner.check_first_batches(collator.checksums, plan, "hf")
    return {"framework": "hf", "mode": mode, "step_ends": clock.ends,
            "losses": [float(x) for x in trainer.step_losses], "memory": mem.result(),
            "versions": _runner.versions("accelerate")}


if __name__ == "__main__":
    _runner.run_modes(run)
