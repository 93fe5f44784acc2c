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
  the model with its adapter disabled (``AdapterOffReference``).

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
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import common

MODEL = dict(hidden_size=512, num_hidden_layers=11, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1376)
PROMPT = 48
VARIANTS = [dict(name="sft chosen"), dict(name="sft both"), dict(name="dpo full"),
            dict(name="sft lora"), dict(name="dpo lora")]


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

    from shardtune.config.configs import dpo_config
    from shardtune.train.dpo import AdapterOffReference, FrozenReference, PreferenceObjective
    from shardtune.train.loop import loss_sum

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    name = spec["variant"]["name"]
    config = LlamaConfig(vocab_size=512, max_position_embeddings=spec["seq"], **MODEL, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    reference_bytes = 0
    if "lora" in name:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0))
    data = pair_batch(spec["pairs"], spec["seq"], config.vocab_size)
    chosen_only = {k: v[:spec["pairs"]] if torch.is_tensor(v) else v for k, v in data.items()}
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
        rows = chosen_only if name == "sft chosen" else data
        loss = lambda: loss_sum(model, rows, chunk_tokens=1024)  # noqa: E731
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    before = common.memory_now()["rss"]
    load = common.ForeignLoad().start()
    step()  # warm-up (creates the optimizer state)
    Path("/proc/self/clear_refs").write_text("5")  # the peak of the timed steps, from the RSS now
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    other = load.stop()
    Path(out_path).write_text(json.dumps({
        "variant": name, "step_s": statistics.median(times), "steps_s": times, "other_cores": other,
        "peak_added": common.memory_now()["hwm"] - before, "reference_bytes": reference_bytes,
        "tokens": int(data["input_ids"].numel() if name != "sft chosen" else chosen_only["input_ids"].numel())}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_args(p)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
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
    for repeat in range(args.repeats):
        for i, variant in enumerate(VARIANTS):
            spec, out = work / f"{i}-{repeat}.json", work / f"{i}-{repeat}.out.json"
            spec.write_text(json.dumps({"variant": variant, "pairs": args.pairs, "seq": args.seq,
                                        "steps": args.steps, "threads": args.threads}))
            proc = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", str(spec), str(out)],
                                  capture_output=True, text=True, cwd=common.REPO)
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
