"""TRL's side of tests/train/test_dpo_trl.py, in a subprocess with TRL first on its PYTHONPATH.

For each job: TRL's real ``DPOTrainer`` on the given policy (a full model with a separate reference
model, or the base with ``peft_config`` and ``ref_model=None``: its reference is the adapters
disabled; the adapter then gets the given trained weights), its own
optimizer (``create_optimizer``), and ``compute_loss`` on the given tokenized pairs (rows 0..B-1
chosen, B..2B-1 rejected; TRL's completion mask = our labels != -100). Two steps: the loss and the
trainable parameters' gradients, an optimizer step, the loss and gradients again -> job["out"].

usage: trl_dpo_peer.py JOBS.json BATCH.pt WORKDIR
"""

from __future__ import annotations

import json
import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def run(job: dict, batch: dict, rows: list, work: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    ref, peft_config = None, None
    if job.get("adapter"):  # TRL adds a new adapter (its reference: the adapters disabled), then we load ours
        from peft import LoraConfig

        peft_config = LoraConfig(**job["lora"])
    else:
        ref = AutoModelForCausalLM.from_pretrained(job["ref"], dtype=torch.float32)
    args = DPOConfig(output_dir=f"{work}/{job['name']}", beta=job["beta"], loss_type=job["loss_type"],
                     loss_weights=job.get("loss_weights"), label_smoothing=job.get("label_smoothing", 0.0),
                     learning_rate=job["lr"], weight_decay=0.0, optim="adamw_torch_fused", bf16=False,
                     gradient_checkpointing=False, use_cpu=True, report_to="none", max_length=None,
                     per_device_train_batch_size=len(rows), save_strategy="no", disable_tqdm=True)
    tok = AutoTokenizer.from_pretrained(job["tokenizer"])
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft_config)
    model = trainer.model
    if job.get("adapter"):
        # A PeftModel passed in would make TRL copy its adapter as the reference ("ref"); a new adapter
        # given our trained weights keeps TRL's adapters-disabled reference, as ours.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(model, load_file(f"{job['adapter']}/adapter_model.safetensors"))
        assert not result.unexpected_keys, result.unexpected_keys
    model.train()
    optimizer = trainer.create_optimizer()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    steps = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        steps.append({"loss": float(loss), "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                                     if p.requires_grad}})
        optimizer.step()
    torch.save(steps, job["out"])


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    payload = torch.load(sys.argv[2])
    for job in jobs:
        run(job, payload["batch"], payload["rows"], sys.argv[3])


if __name__ == "__main__":
    main()
