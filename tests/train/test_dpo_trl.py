"""Peer check: our preference loss and its gradients equal TRL's ``DPOTrainer`` (TRL 1.16, its real
trainer object, ``compute_loss`` and its own optimizer; tests/train/trl_dpo_peer.py in a subprocess)
on the same tiny model and the same tokenized pairs, for sigmoid, sigmoid with label smoothing and
IPO, full-parameter (a separate frozen reference) and LoRA (the reference is the adapters disabled;
TRL: ``ref_model=None`` with a peft model). The policy is perturbed first, so ``h != 0`` and the
loss is not the trivial ln 2; the loss and gradients are compared at that first step and again after
one AdamW step on each side (fp32: losses to 1e-5 relative, gradients to 1e-5 and, after the step,
5e-5 relative per tensor; measured: at most 2e-6, and 2.1e-5 after the step).

TRL 1.16's ``sigmoid`` ignores ``label_smoothing`` (its label smoothing belongs to ``robust`` and
``exo_pair``); our cDPO ``-(1-e) log σ(βh) - e log σ(-βh)`` is TRL's weighted sum
``2(1-e) · sigmoid - (1-2e) · robust`` (``loss_type=[sigmoid, robust]``, ``loss_weights``), so that
is what the smoothed case compares with.

A peer check (``@pytest.mark.peer``): SHARDTUNE_PEER_SMOKE=1 runs it (tests/conftest.py); importing
TRL alone takes 15-20 s on the shared 2-core test machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardtune.config.configs import PreferenceLoss, dpo_config, fsdp_config, train_config
from shardtune.data.preference import PreferenceCollator, encode
from shardtune.train.dpo import AdapterOffReference, FrozenReference, PreferenceObjective
from shardtune.train.optim import build_optimizer

BETA, SMOOTHING, LR = 0.2, 0.1, 1e-3
# per-tensor relative gradient difference. At the first step ours and TRL's differ by 3e-7..2e-6 (the
# order of fp32 sums). AdamW's first update is about lr * sign(g) per element, so an element whose
# tiny gradient differs in sign between the two float orders moves by 2 lr: after the step the
# gradients differ by up to 2e-5 here (the IPO case; its loss still agrees to 1e-6).
TOLERANCE = (1e-5, 5e-5)
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
ROWS = [{"prompt": f"Q{i}: add {i} and {i}.", "chosen": f"It is {2 * i}." + " Yes." * i, "rejected": "No, it is not."}
        for i in range(3)]
# name: (model kind, our dpo_config, TRL's DPOConfig loss fields, our chunk_tokens)
CASES = {
    "full-sigmoid": ("full", dict(), dict(loss_type=["sigmoid"]), None),
    "full-sigmoid-smoothed": ("full", dict(label_smoothing=SMOOTHING),
                              dict(loss_type=["sigmoid", "robust"], label_smoothing=SMOOTHING,
                                   loss_weights=[2 * (1 - SMOOTHING), -(1 - 2 * SMOOTHING)]), 7),
    "full-ipo": ("full", dict(loss_type=PreferenceLoss.ipo), dict(loss_type=["ipo"]), None),
    "lora-sigmoid": ("lora", dict(), dict(loss_type=["sigmoid"]), 7),
    "lora-ipo": ("lora", dict(loss_type=PreferenceLoss.ipo), dict(loss_type=["ipo"]), None),
}


def _policies(tiny_model_dir: Path, root: Path) -> dict:
    """A full policy (the tiny model with every weight perturbed) and a LoRA adapter with non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    full.save_pretrained(root / "policy")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                          LoraConfig(**LORA))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora.save_pretrained(root / "adapter")
    return {"full": root / "policy", "lora": root / "adapter"}


def _ours(kind: str, paths: dict, tiny_model_dir: Path, config: dpo_config, chunk, batch: dict) -> list:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if kind == "lora":
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                           str(paths["lora"]), is_trainable=True)
        reference = AdapterOffReference()
    else:
        policy = AutoModelForCausalLM.from_pretrained(paths["full"], dtype=torch.float32)
        reference = FrozenReference(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    policy.train()
    objective = PreferenceObjective(config, reference, chunk_tokens=chunk)
    optimizer = build_optimizer(policy.parameters(), train_config(lr=LR), fsdp_config())
    steps = []
    for _ in range(2):  # as train/loop.py: the summed pair losses over the number of pairs
        optimizer.zero_grad()
        loss = objective(policy, batch) / PreferenceObjective.count(batch)
        loss.backward()
        steps.append({"loss": float(loss), "grads": {n: p.grad.detach().clone() for n, p in policy.named_parameters()
                                                     if p.requires_grad}})
        optimizer.step()
    return steps


@pytest.mark.peer
@pytest.mark.slow  # TRL's import alone: 15-20 s here
def test_loss_and_gradients_equal_trls_dpo_trainer(tiny_model_dir, trl_path, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = PreferenceCollator(tok.pad_token_id)([encode(row, tok) for row in ROWS])
    tokens = (batch["labels"][:, 1:] != -100).sum(1)
    assert tokens[:3].tolist() != tokens[3:].tolist()  # unequal lengths: IPO's per-token average matters
    paths = _policies(tiny_model_dir, tmp_path)
    jobs = [{"name": name, "model": str(tiny_model_dir), "ref": str(tiny_model_dir), "tokenizer": str(tiny_model_dir),
             **({"adapter": str(paths["lora"]), "lora": LORA} if kind == "lora" else {"model": str(paths["full"])}),
             "beta": BETA, "lr": LR, "out": str(tmp_path / f"{name}.pt"), **trl}
            for name, (kind, _, trl, _) in CASES.items()]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    torch.save({"batch": {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, "rows": ROWS},
               tmp_path / "batch.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(trl_path), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "trl_dpo_peer.py"), str(tmp_path / "jobs.json"),
                           str(tmp_path / "batch.pt"), str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for (name, (kind, ours_cfg, _, chunk)), job in zip(CASES.items(), jobs):
        theirs = torch.load(job["out"])
        ours = _ours(kind, paths, tiny_model_dir, dpo_config(beta=BETA, **ours_cfg), chunk, batch)
        first = ours[0]["loss"]
        assert not math.isclose(first, math.log(2), rel_tol=1e-3) and not math.isclose(first, 1 / (4 * BETA ** 2),
                                                                                          rel_tol=1e-3), name
        assert not math.isclose(ours[1]["loss"], first, rel_tol=1e-4), name  # the step moved the policy
        for step, (a, b) in enumerate(zip(ours, theirs)):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (name, step, a["loss"], b["loss"])
            assert a["grads"].keys() == b["grads"].keys() and a["grads"], (name, step)
            for n, g in a["grads"].items():
                rel = float((g - b["grads"][n]).norm() / b["grads"][n].norm().clamp(min=1e-30))
                assert rel < TOLERANCE[step], (name, step, n, rel)
