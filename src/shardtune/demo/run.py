"""``shardtune demo``: a tiny Llama fine-tuned end to end on CPU, shown to have learned.

1. build a random-initialised tiny Llama and a locally trained tokenizer (no downloads);
2. generate a synthetic instruction task in alpaca format: put a shuffled capital letter, even
   digit, small letter and odd digit into that order (``"7,k,B,4"`` -> ``"B4k7"``), with
   held-out rows whose inputs are never trained on (see ``shardtune.demo.task``);
3. score the untrained model on the held-out rows (greedy exact match);
4. fine-tune with the real recipe (``shardtune.finetuning``) on ``alpaca_dataset``, on 2 FSDP ranks
   launched with torchrun by default (``--nproc_per_node 1``: in this process);
5. load the saved Hugging Face directory back with plain ``transformers`` and score it again;
6. convert the run's sharded (DCP) checkpoint into a second Hugging Face directory with
   ``shardtune convert`` and check that it gives the same logits as the model of step 5 (with
   ``--nproc_per_node 1`` there is no sharded checkpoint, and this step is skipped).

Exits with status 1 if the fine-tuned model did not learn the task or the converted checkpoint
differs from it.

``--vision`` runs the same six steps for a tiny Llama 3.2 Vision model on an image task
(``shardtune.demo.vision``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config.errors import ShardtuneError
from .accuracy import show_examples, task_accuracy
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
TRAIN_FLAGS = [
    "--batching_strategy", "padding", "--keep_last_n", "1",
    "--context_length", "256", "--num_epochs", "8", "--lr", "3e-3", "--scheduler", "cosine",
    "--warmup_steps", "20", "--weight_decay", "0.0", "--num_workers_dataloader", "0",
]
# "learned": held-out exact match at least this, and at least 0.5 above the untrained model's.
LEARNED_ACCURACY = 0.8
# The converted checkpoint and the recipe's HF output hold the same fp32 weights.
CONVERT_TOLERANCE = 1e-5
# One intra-op thread: at this size a second thread saves only ~30% of a step on an idle machine,
# and on a busy shared one (other work on the cores) two threads were 2-4x *slower* per step.
NUM_THREADS = 1


def finetune_args(model_dir: Path, data: Path, out: Path, seed: int, nproc: int = 1) -> list[str]:
    per_rank = str(GLOBAL_BATCH // nproc)
    fsdp = ["--enable_fsdp"] if nproc > 1 else []
    return ["--model_name", str(model_dir), "--dataset", "alpaca_dataset",
            "--alpaca_dataset.data_path", str(data), "--output_dir", str(out),
            "--save_metrics", "--seed", str(seed), "--device", "cpu", *fsdp,
            "--batch_size_training", per_rank, "--val_batch_size", per_rank, *TRAIN_FLAGS]


def run_finetune(args: list[str], nproc: int, out: Path) -> dict:
    """The real recipe: in this process, or on ``nproc`` FSDP ranks launched with torchrun."""
    if nproc == 1:
        from ..finetuning import main as finetune

        return finetune(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "shardtune.finetuning", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(NUM_THREADS)}
    if subprocess.run(cmd, env=env).returncode != 0:
        raise ShardtuneError(f"the {nproc}-rank fine-tune failed (its error is printed above).")
    metrics = json.loads((out / "metrics.json").read_text())
    val = metrics.get("val_epoch_loss") or []
    return {"best_eval_loss": min(val) if val else None, "steps": len(metrics["train_step_loss"])}


def convert_checkpoint(ft_args: list[str], dst: Path, reference, tokenizer, rows: list[dict]) -> float:
    """Convert the run's newest sharded checkpoint to ``dst`` (``shardtune convert``) and return the
    largest logit difference to ``reference`` (the recipe's own HF output) on ``rows``' prompts."""
    from transformers import AutoModelForCausalLM

    from ..checkpoint.layout import latest_checkpoint
    from ..config import parse_args
    from ..convert.core import convert
    from ..data.prompts import alpaca_prompt
    from ..finetuning import checkpoint_run_dir

    run = checkpoint_run_dir(parse_args(ft_args).config)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise ShardtuneError(f"the fine-tune left no complete sharded checkpoint under {run}.")
    print(f"[6/6] converting the sharded checkpoint {ckpt} (DCP, one file per rank) to {dst}")
    convert(ckpt, dst, overwrite=True, log=lambda line: print("     ", line))
    converted = AutoModelForCausalLM.from_pretrained(dst).eval()
    ids = tokenizer([alpaca_prompt(r) for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = converted(**ids).logits
        b = reference.eval()(**ids).logits
    return float((a - b).abs().max())


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="shardtune demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision", action="store_true",
                    help="the vision demo: a tiny Llama 3.2 Vision model learns to name a shape's colour")
    ap.add_argument("--output_dir", help="where everything is written (default: demo_out, or "
                                         "demo_vision_out with --vision)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc_per_node", type=int, default=2,
                    help="FSDP ranks to train with (default 2, on gloo); 1 trains in this process")
    args = ap.parse_args(argv)
    if args.vision:
        from .vision import run_vision_demo

        return run_vision_demo(args.output_dir or "demo_vision_out", args.seed, args.nproc_per_node)
    if not 1 <= args.nproc_per_node <= GLOBAL_BATCH or GLOBAL_BATCH % args.nproc_per_node:
        ap.error(f"--nproc_per_node must divide the global batch of {GLOBAL_BATCH}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(NUM_THREADS)
    root = Path(args.output_dir or "demo_out")
    base_dir, model_out = root / "base-model", root / "model"
    started = time.perf_counter()
    print(f"[1/6] building a tiny random Llama in {base_dir}")
    build_tiny_llama(base_dir, seed=args.seed, max_positions=256, **MODEL_SIZE)
    print(f"[2/6] writing the task data ({N_TRAIN} train / {N_EVAL} held-out rows) to {root / 'data'}")
    train_json, eval_json = write_task_data(root / "data", N_TRAIN, N_EVAL, args.seed)
    eval_rows = json.loads(Path(eval_json).read_text())

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    before_model = AutoModelForCausalLM.from_pretrained(base_dir)
    before = task_accuracy(before_model, tokenizer, eval_rows)
    print(f"[3/6] accuracy before fine-tuning: {before:.1%}")
    del before_model

    ft_args = finetune_args(base_dir, train_json, model_out, args.seed, args.nproc_per_node)
    where = f"{args.nproc_per_node} FSDP ranks (torchrun, gloo)" if args.nproc_per_node > 1 else "one process"
    print(f"[4/6] fine-tuning on {where}: shardtune.finetuning " + " ".join(ft_args))
    results = run_finetune(ft_args, args.nproc_per_node, model_out)

    print(f"[5/6] loading {model_out} with plain transformers")
    after_model = AutoModelForCausalLM.from_pretrained(model_out)
    after_tok = AutoTokenizer.from_pretrained(model_out)
    after = task_accuracy(after_model, after_tok, eval_rows)
    learned = after >= LEARNED_ACCURACY and after >= before + 0.5
    print()
    print("examples (input -> expected | generated):")
    for line in show_examples(after_model, after_tok, eval_rows[:3]):
        print("   ", line)
    print()
    print(f"task accuracy on {len(eval_rows)} held-out rows: before {before:.1%}  ->  after {after:.1%}"
          f"   ({'learned' if learned else 'DID NOT LEARN'})")
    best_eval = results.get("best_eval_loss")
    best_eval = "n/a" if best_eval is None else f"{best_eval:.4f}"
    print(f"best eval loss {best_eval}, {results['steps']} optimizer steps, "
          f"{time.perf_counter() - started:.0f}s in all")
    print(f"model (Hugging Face format): {model_out}")
    print(f"metrics: {model_out / 'metrics.json'}   loss plot: {model_out / 'loss.png'}")
    if not learned:
        raise SystemExit(1)

    print()
    if args.nproc_per_node == 1:  # one process without FSDP writes no sharded checkpoint
        print("[6/6] skipped: one process without FSDP writes no sharded checkpoint to convert "
              "(the default, 2 FSDP ranks, does)")
        return {"before": before, "after": after, "results": results}
    converted_dir = root / "converted"
    diff = convert_checkpoint(ft_args, converted_dir, after_model, after_tok, eval_rows[:8])
    same = diff <= CONVERT_TOLERANCE
    print(f"converted checkpoint vs saved model: max |logit difference| {diff:.2e} "
          f"({'the same model' if same else 'DIFFERENT'}); from_pretrained({str(converted_dir)!r}) loads it")
    if not same:
        raise SystemExit(1)
    return {"before": before, "after": after, "results": results, "convert_max_diff": diff}
