"""Speed and memory of the model-side options: --loss plain|chunked, the activation-checkpointing
policies, --compile and the AdamW implementations, one process, on the throughput benchmark's
model (``benchmarks.throughput --size 35m``: hidden 512, 11 layers, 8 heads, intermediate 1376, vocab 512)
and, for the loss, the same model with Llama 3's vocabulary of 128,256 tokens.

What it runs
------------
Each variant runs in a fresh process (``--worker``), so its memory peak is its own: a random-
initialised ``LlamaForCausalLM`` built from its config (fp32, seed 0, SDPA attention), in train mode,
and ``--batch`` rows of ``--seq`` tokens holding alpaca-like documents of 130, 90, 200 and 92
tokens (repeated) whose first 48 tokens are a prompt without labels (37% of the tokens).

* ``loss``: forward + backward through ``shardtune.train.loop.loss_sum`` with ``chunk_tokens``
  None (plain) or 1024 (chunked), for both vocabularies;
* ``checkpointing``: forward + backward (plain loss) with no checkpointing, ``full``, ``every_k``
  (k = 2) and ``ops`` (``parallel.activation_checkpointing.enable_activation_checkpointing``);
* ``compile``: forward + backward, eager and with every decoder layer compiled
  (``parallel.compile.compile_decoder_layers``; the first step, which compiles, is timed apart),
  with the plain and the chunked loss;
* ``optimizer``: ``AdamW.step()`` over all 35.3M parameters with random gradients, for the
  ``for_loop``, ``foreach`` and ``fused`` implementations (``train.optim.build_optimizer``), and
  with bf16 weights (``--fsdp_config.pure_bf16``) torch's ``fused`` against ``anyprecision``.

What it measures
----------------
* s/step: the median of ``--steps`` timed steps after one warm-up step (for ``compile`` the
  warm-up step is the compile, reported as ``first step s``);
* peak memory: the process's RSS high-water mark (``VmHWM``, exact, kept by the kernel) minus its
  RSS just before the first step, i.e. what the steps added on top of the model (and, for the
  optimizer, its state) — activations, logits, gradients, temporaries;
* other cores: CPU used by other processes during the variant (see common.ForeignLoad); figures
  taken while it is well above 0 are unreliable. ``--repeats`` runs every variant again, in the
  same order, and the table shows each run.

    python -m benchmarks.model_options                       # everything, ~20 min on 2 idle cores
    python -m benchmarks.model_options --what loss --repeats 1

(from the repository root; ``python -m benchmarks list`` names the declared scenarios).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from . import common

MODEL = dict(hidden_size=512, num_hidden_layers=11, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1376)
DOCS, PROMPT = (130, 90, 200, 92), 48
VARIANTS = {
    "loss": [dict(vocab=512, loss="plain"), dict(vocab=512, loss="chunked"),
             dict(vocab=128256, loss="plain"), dict(vocab=128256, loss="chunked")],
    "checkpointing": [dict(checkpointing="none"), dict(checkpointing="full"),
                      dict(checkpointing="every_k"), dict(checkpointing="ops")],
    "compile": [dict(compile=False), dict(compile=True), dict(compile=False, loss="chunked"),
                dict(compile=True, loss="chunked")],
    "optimizer": [dict(optimizer="for_loop"), dict(optimizer="foreach"), dict(optimizer="fused"),
                  # --fsdp_config.pure_bf16: bf16 weights, with torch's fused AdamW (bf16 state) or
                  # --fsdp_config.optimizer anyprecision (bf16 state + a Kahan compensation buffer)
                  dict(optimizer="fused", dtype="bf16"), dict(optimizer="anyprecision", dtype="bf16")],
}


def batch(rows: int, seq: int, vocab: int):
    import torch

    from shardtune.batches import IGNORE_INDEX

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    for r in range(rows):
        start, i = 0, r
        while start < seq:
            labels[r, start:start + PROMPT] = IGNORE_INDEX
            start += DOCS[i % len(DOCS)]
            i += 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def worker(spec_path: str, out_path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.config import fsdp_config, train_config
    from shardtune.config.configs import CheckpointingPolicy, OptimizerImpl
    from shardtune.parallel.activation_checkpointing import enable_activation_checkpointing
    from shardtune.parallel.compile import compile_decoder_layers
    from shardtune.train.loop import loss_sum
    from shardtune.train.optim import build_optimizer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    v = spec["variant"]
    config = LlamaConfig(vocab_size=v.get("vocab", 512), max_position_embeddings=spec["seq"], **MODEL,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    data = batch(spec["batch"], spec["seq"], config.vocab_size)
    if v.get("checkpointing", "none") != "none":
        enable_activation_checkpointing(model, CheckpointingPolicy(v["checkpointing"]), every_k=2)
    if v.get("compile"):
        compile_decoder_layers(model)
    chunk = 1024 if v.get("loss") == "chunked" else None

    if v.get("dtype") == "bf16":
        model.to(torch.bfloat16)
    if "optimizer" in v:
        anyprecision = v["optimizer"] == "anyprecision"
        opt = build_optimizer(model.parameters(),
                              train_config(optimizer_impl=OptimizerImpl("auto" if anyprecision else v["optimizer"])),
                              fsdp_config(optimizer="anyprecision" if anyprecision else "AdamW"))
        for p in model.parameters():
            p.grad = torch.randn_like(p)

        def step() -> None:
            opt.step()
    else:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            loss_sum(model, data, chunk_tokens=chunk).backward()

    # warm-up: with --compile the compilation, for the optimizer the creation of its state
    r = common.timed_steps(step, spec["steps"])
    Path(out_path).write_text(json.dumps({"variant": v, **r, "params": sum(p.numel() for p in model.parameters())}))


def label(v: dict) -> str:
    return ", ".join(f"{k} {val}" for k, val in v.items())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_options", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_args(p)
    p.add_argument("--what", default="loss,checkpointing,compile,optimizer")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait_quiet", type=float, default=0.0,
                   help="before each variant, wait up to this many seconds for other processes to use < 0.25 cores")
    args = common.parse_or_work(p, argv, worker)
    if args is None:
        return
    info = common.machine_info()
    common.print_machine(info)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="model-options-"))
    work.mkdir(parents=True, exist_ok=True)
    records = []
    for what in args.what.split(","):
        rows = []
        for repeat in range(args.repeats):
            for i, variant in enumerate(VARIANTS[what]):
                if args.wait_quiet:
                    common.wait_for_quiet(args.wait_quiet)
                spec, out = work / f"{what}-{i}-{repeat}.json", work / f"{what}-{i}-{repeat}.out.json"
                spec.write_text(json.dumps({"variant": variant, "batch": args.batch, "seq": args.seq,
                                            "steps": args.steps, "threads": args.threads}))
                proc = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", str(spec), str(out)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{what} {label(variant)} failed:\n{proc.stderr[-4000:]}")
                r = json.loads(out.read_text())
                r["what"], r["repeat"] = what, repeat
                records.append(r)
                rows.append([label(variant), repeat + 1, f"{r['step_s']:.2f}", f"{r['first_s']:.1f}",
                             common.mib(r["peak_added"]), f"{r['other_cores']:.2f}"])
                print(f"  {what}: {label(variant)}: {r['step_s']:.2f} s/step, peak +{common.mib(r['peak_added'])}, "
                      f"other cores {r['other_cores']:.2f}", flush=True)
        print(f"\n{what} (batch {args.batch} x {args.seq} tokens, {args.threads} threads, median of {args.steps} steps)")
        print(common.table(["variant", "run", "s/step", "first step s", "peak added", "other cores"], rows,
                           align="lrrrrr"))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "records": records}, indent=1))


if __name__ == "__main__":
    common.entry(main)
