"""Step time and memory of preference tuning (``--use_dpo``) against fine-tuning on the same data,
one process, on the throughput benchmark's model (hidden 512, 11 layers, 8 heads, intermediate
1376, vocab 512: 35.3M parameters), fp32, the default chunked loss.

What it runs
------------
Each variant runs in a fresh process (``--worker``), so its memory peak is its own: a random-
initialised ``LlamaForCausalLM`` (seed 0, SDPA attention) in train mode, and ``--pairs`` preference
pairs of ``--seq`` tokens each side (a 48-token prompt without labels, then the response) —

* ``sft chosen``: fine-tuning on the chosen responses only (``--pairs`` rows, ``train.loop.loss_sum``);
* ``sft both``: fine-tuning on all ``2 x --pairs`` rows (the same tokens a DPO step sees);
* ``dpo full``: ``train.dpo.PreferenceObjective`` with a frozen copy of the model as the reference
  (``FrozenReference``), what a full-parameter ``--use_dpo`` run does;
* ``sft lora`` / ``dpo lora``: the same with a LoRA (r 8 on q_proj, v_proj), the DPO reference being
  the model with its adapter disabled (``AdapterOffReference``);
* ``trl dpo full`` / ``trl dpo lora``: TRL 1.16's ``DPOTrainer`` on the same model and the same pair
  tensors (``compute_loss``, the backward and its own AdamW; full: a deep copy as ``ref_model``; LoRA: the same
  LoRA through ``peft_config``, the adapter disabled as the reference), from ``--trl`` (a
  ``pip install --no-deps --target`` folder, as tests/conftest.py builds it; skipped without it).

Each timed step is forward + backward (+ the reference's forward for DPO) and ``AdamW.step()``.

What it measures
----------------
* s/step: the median of ``--steps`` timed steps after one warm-up step;
* peak added: the RSS high-water mark (VmHWM) of the timed steps minus the RSS before the first step
  (activations, logits, gradients, optimizer state and temporaries on top of the model);
* reference copy: the bytes of the frozen reference model (held before the first step, so not in
  "peak added");
* other cores: CPU used by other processes meanwhile (common.ForeignLoad); figures taken while it
  is well above 0 are unreliable. ``--repeats`` runs every variant again.

    python -m benchmarks.dpo                  # ~5 min on 2 idle cores
    python -m benchmarks.dpo --pairs 4 --seq 512 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

from . import common

MODEL = dict(hidden_size=512, num_hidden_layers=11, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1376)
PROMPT = 48
VARIANTS = [dict(name="sft chosen"), dict(name="sft both"), dict(name="dpo full"),
            dict(name="sft lora"), dict(name="dpo lora"), dict(name="trl dpo full"), dict(name="trl dpo lora")]
LORA = dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
# TRL alone (pip --target; its dependencies are this environment's), as tests/conftest.py installs it
TRL_DEFAULT = Path.home() / ".cache" / "shardtune-trl" / "trl-1.16.0"


def pair_batch(pairs: int, seq: int, vocab: int) -> dict:
    """``pairs`` chosen rows then ``pairs`` rejected rows, one shared prompt per pair."""
    import torch

    g = torch.Generator().manual_seed(0)
    chosen = torch.randint(4, vocab, (pairs, seq), generator=g)
    rejected = torch.randint(4, vocab, (pairs, seq), generator=g)
    rejected[:, :PROMPT] = chosen[:, :PROMPT]
    ids = torch.cat([chosen, rejected])
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "causal_padding": True}


def worker(spec_path: str, out_path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    name = spec["variant"]["name"]
    config = LlamaConfig(vocab_size=512, max_position_embeddings=spec["seq"], **MODEL, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    data = pair_batch(spec["pairs"], spec["seq"], config.vocab_size)
    if name.startswith("trl"):
        step, reference_bytes = trl_step(model, data, lora="lora" in name, workdir=Path(spec_path).parent)
    else:
        step, reference_bytes = ours_step(model, data, name)
    r = common.timed_steps(step, spec["steps"])  # the warm-up creates the optimizer state
    tokens = data["input_ids"].numel() // (2 if name == "sft chosen" else 1)
    Path(out_path).write_text(json.dumps({"variant": name, **r, "reference_bytes": reference_bytes, "tokens": tokens}))


def ours_step(model, data: dict, name: str):
    """shardtune's step of ``name`` and the bytes of its frozen reference copy (0 if none)."""
    import torch

    from shardtune.config.configs import dpo_config
    from shardtune.train.dpo import AdapterOffReference, FrozenReference, PreferenceObjective
    from shardtune.train.loop import loss_sum

    reference_bytes = 0
    if "lora" in name:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA))
    if name.startswith("dpo"):
        if "lora" in name:
            reference = AdapterOffReference()
        else:
            frozen = copy.deepcopy(model)
            reference_bytes = sum(p.numel() * p.element_size() for p in frozen.parameters())
            reference = FrozenReference(frozen)
        objective = PreferenceObjective(dpo_config(), reference, chunk_tokens=1024)
        loss = lambda: objective(model, data)  # noqa: E731
    else:
        pairs = data["input_ids"].shape[0] // 2
        rows = {k: v[:pairs] if torch.is_tensor(v) else v for k, v in data.items()} if name == "sft chosen" else data
        loss = lambda: loss_sum(model, rows, chunk_tokens=1024)  # noqa: E731
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, reference_bytes


def trl_step(model, data: dict, *, lora: bool, workdir: Path):  # noqa: D401
    """TRL 1.16's ``DPOTrainer`` on the same model and pairs: its ``compute_loss`` (with its fused,
    chunked log-probabilities) and its accelerator's backward, then its own AdamW (``optim
    adamw_torch``, lr 1e-5: torch's AdamW as ours). Full: a deep copy as ``ref_model``; LoRA: the same
    LoRA through ``peft_config``, its reference the adapter disabled."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ref, peft_config, reference_bytes = None, None, 0
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(**LORA)  # TRL wraps the model itself
    else:
        ref = copy.deepcopy(model)
        reference_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    pairs = data["input_ids"].shape[0] // 2
    args = DPOConfig(output_dir=str(workdir / "trl"), beta=0.1, learning_rate=1e-5, optim="adamw_torch",
                     weight_decay=0.0, bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
                     max_length=None, per_device_train_batch_size=pairs, save_strategy="no", disable_tqdm=True)
    # TRL tokenizes its dataset at start-up; the steps run on ``data`` (the same tensors as ours)
    from shardtune.demo.tiny import build_tokenizer  # 512 ids, as the model's vocabulary

    rows = [{"prompt": "Which?", "chosen": "This one.", "rejected": "That one."}] * pairs
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=build_tokenizer(), peft_config=peft_config)
    opt = trainer.create_optimizer()
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"],
              "completion_mask": (data["labels"] != -100).long()}

    def step() -> None:
        trainer.accelerator.backward(trainer.compute_loss(trainer.model, inputs))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, reference_bytes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_args(p)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(v["name"] for v in VARIANTS),
                   help="comma-separated variant names (default: all)")
    p.add_argument("--trl", type=Path, default=TRL_DEFAULT,
                   help="a folder holding TRL 1.16 alone (pip install --no-deps --target DIR trl==1.16.0), put "
                        "first on the TRL variants' PYTHONPATH; without it they are skipped")
    args = common.parse_or_work(p, argv, worker)
    if args is None:
        return
    info = common.announce_machine("cpu")
    with common.work_folder(args.workdir, "dpo-bench-") as work:
        records = run_variants(args, work)
    common.save_json(args.json, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                 "records": records})


def run_variants(args, work: Path) -> list[dict]:
    """Every variant, ``--repeats`` times, each in a fresh process; prints a line each and the table."""
    records, rows = [], []
    wanted = args.variants.split(",")
    unknown = set(wanted) - {v["name"] for v in VARIANTS}
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; the variants are {[v['name'] for v in VARIANTS]}")
    has_trl = (args.trl / "trl").is_dir()
    if not has_trl and any(w.startswith("trl") for w in wanted):
        print(f"note: no TRL in {args.trl} (--trl): the TRL variants are skipped", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.trl), os.environ.get("PYTHONPATH")]))}
    for repeat in range(args.repeats):
        for i, variant in enumerate(VARIANTS):
            if variant["name"] not in wanted or (variant["name"].startswith("trl") and not has_trl):
                continue
            spec, out = work / f"{i}-{repeat}.json", work / f"{i}-{repeat}.out.json"
            spec.write_text(json.dumps({"variant": variant, "pairs": args.pairs, "seq": args.seq,
                                        "steps": args.steps, "threads": args.threads}))
            proc = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", str(spec), str(out)],
                                  capture_output=True, text=True, cwd=common.REPO,
                                  env=env if variant["name"].startswith("trl") else None)
            if proc.returncode != 0:
                raise SystemExit(f"{variant['name']} failed:\n{proc.stderr[-4000:]}")
            r = json.loads(out.read_text())
            r["repeat"] = repeat
            records.append(r)
            rows.append([r["variant"], repeat + 1, r["tokens"], f"{r['step_s']:.2f}", common.mib(r["peak_added"]),
                         common.mib(r["reference_bytes"]) if r["reference_bytes"] else "-",
                         f"{r['other_cores']:.2f}"])
            print(f"  {r['variant']}: {r['step_s']:.2f} s/step, peak +{common.mib(r['peak_added'])}, "
                  f"other cores {r['other_cores']:.2f}", flush=True)
    print(f"\n{args.pairs} pairs x {args.seq} tokens a side, {args.threads} threads, median of {args.steps} steps")
    print(common.table(["variant", "run", "tokens", "s/step", "peak added", "reference copy", "other cores"], rows,
                       align="lrrrrrr"))
    return records


if __name__ == "__main__":
    common.entry(main)
