"""Training throughput and model-FLOPs utilisation (MFU) of the recipe: 1 vs 2 ranks, padding vs packing.

What it runs
------------
* A random-initialised Llama written by ``shardtune.demo.tiny.build_tiny_llama`` (its byte-level
  BPE tokenizer, vocab 512). ``--size 35m`` (default, CPU): hidden 512, 11 layers, 8 heads
  (8 kv heads), intermediate 1376 -> 35.3M parameters (8 layers would give only 25.8M).
  ``--size 1b`` (GPU): hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192 ->
  0.98B parameters, written in bf16 (the recipe loads fp32 master weights). build_tiny_llama takes
  the vocabulary from its tokenizer, so the 1b model keeps vocab 512 instead of Llama 3's 128256:
  it has the decoder blocks of Llama-3.2-1B but not its 2 x 263M embedding/LM-head parameters,
  and its LM-head matmul and softmax are negligible (with 128k tokens they are ~20% of the FLOPs).
* Generated alpaca-style data (``instruction`` / optional ``input`` / ``output`` of random
  English words, log-normal output lengths; >= 1000 rows, 49-512 tokens per sample, the alpaca
  prompt template alone being ~48; median ~130, p90 ~260, ~1.5% truncated to the context length),
  read through the recipe's ``alpaca_dataset``.
* The real recipe, ``shardtune.finetuning.setup`` + ``train``, inside ``torchrun --standalone
  --nproc_per_node R`` with ``--enable_fsdp --fsdp_config.sharding_strategy FULL_SHARD`` for
  R = 1 and R = 2 (gloo on CPU, NCCL on GPU), for each ``--batching_strategy`` (padding:
  length-grouped batches padded to their longest sample; packing: best-fit chunks of exactly
  ``--context_length`` tokens with per-document attention). ``--batch_size_training`` is per
  rank, so 2 ranks process a twice larger global batch per step. Activation checkpointing is off
  (``--activation_checkpointing`` turns it on: it recomputes the forward in the backward, which
  costs ~1/3 more compute that MFU, by definition, does not credit). fp32 on CPU;
  ``--dtype bf16`` (GPU) keeps fp32 master weights and computes in bf16 through FSDP's
  mixed-precision policy (the recipe's default on GPU).

What it measures (per run; steps 1..``--warmup`` are excluded)
--------------------------------------------------------------
* wall time: from the end of the last warm-up step to the end of the last step, taken in the
  recipe's per-step hooks (a ``StepClock`` passed to ``train(..., extra_hooks=[...])`` stamps
  the end of each step). It covers
  everything in those steps, data loading and collation included.
* tokens: non-pad tokens (attention-mask ones for padding, non-pad ids for packing) and
  processed tokens (every slot of the ``[batch, seq]`` tensors, pads included), summed over
  ranks, counted by a thin wrapper around the recipe's DataLoader. pad fraction = 1 - non-pad /
  processed. tok/s = tokens / wall time.
* model FLOPs per step (PaLM's MFU convention, Chowdhery et al. 2022, appendix B), computed by
  ``shardtune.train.flops.model_flops``, the formula behind the recipe's live MFU:
  ``6 * N * T + 12 * L * d * sum_docs(len^2)`` where N = the weights of the matmuls every token
  goes through (the decoder's projections and the LM head, from the model's config), T = non-pad
  tokens, L = layers, d = query heads x head dim (= hidden size here) and the sum runs over the
  documents in the step (each sample for padding; each packed document, whose attention is
  block-diagonal, for packing), counted per micro-batch by ``flops.batch_token_stats`` as the
  recipe counts them. The second term is QK^T and AV, forward + backward, without discounting the
  causal mask. Pads, recomputation and the optimizer step are not credited.
* GEMM peak: every rank times an ``n x n x n`` matmul in the training dtype (fp32 on CPU with the
  same thread count as training, bf16 on GPU), all ranks at the same time (after a barrier),
  before the first and after the last run of the launch; a rank's peak is its best rate over
  both probes, and the launch's peak is the sum over ranks. MFU = model FLOP/s / that sum.
* peak memory: GPU, the recipe's per-step ``torch.cuda.max_memory_allocated`` (it resets the
  peak at every step start), max over the run's steps and ranks; CPU, the run's peak private
  (anonymous) RSS sampled every 5 ms, max over ranks.
* other cores: CPU time used by *other* processes on the machine during the run (set-up and
  training; all non-idle time in /proc/stat minus the CPU time of the ranks), in cores. A run
  with a noticeable value shared the cores with something else and its figures are low (a
  2-thread rank loses far more than its share: its threads wait for each other).

    python -m benchmarks.throughput                          # CPU, 35M model, ~4 min on 2 idle cores
    python -m benchmarks.throughput --ranks 1 --strategies packing --timed_steps 2
    python -m benchmarks.throughput --device cuda --dtype bf16 --size 1b --ranks 1   # one GPU
    python -m benchmarks.throughput --device cuda --dtype bf16 --size 1b --ranks 1 --compile both
    python -m benchmarks.throughput --device cuda --dtype bf16 --size 1b --ranks 1,2 # two GPUs

(from the repository root; ``python -m benchmarks list`` names the declared scenarios).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import time
from pathlib import Path

from . import common

SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176),  # smoke runs
    "35m": dict(hidden_size=512, num_layers=11, num_heads=8, num_kv_heads=8, intermediate_size=1376),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192),
}
# Per size: per-rank batch, GEMM probe size.
DEFAULTS = {"tiny": dict(batch_size=2, gemm_n=256), "35m": dict(batch_size=4, gemm_n=2048),
            "1b": dict(batch_size=8, gemm_n=8192)}


# --------------------------------------------------------------------------- data


_WORDS = (
    "the a an of to and in is that for it as with was on be by this are or from at which have not "
    "but had they you were their one all we can her has there been if more when will would who so "
    "no she other its time people into only new some could these two may first then do any like my "
    "now over such our man me even most made after also did many before must through back years "
    "where much your way well down should because each just those how too little state good very "
    "make world still own see men work long get here between both life being under never day same "
    "another know while last might us great old year off come since against go came right used take "
    "three summarize dialog correct english write response instruction task input request describe "
    "explain list reverse sort count add copy quick brown fox jumps lazy dog hello today lovely "
    "cookies school every water energy function number example question answer story poem recipe "
    "computer language model science history music family friend city country market health").split()


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(max(1, n_words))]
    words[0] = words[0].capitalize()
    text, out = [], []
    for i, w in enumerate(words):
        out.append(w)
        if len(out) >= rng.randint(6, 18) or i == len(words) - 1:
            text.append(" ".join(out) + rng.choice(".!?."))
            out = []
            if i + 1 < len(words):
                words[i + 1] = words[i + 1].capitalize()
    return " ".join(text)


def alpaca_row(rng: random.Random, output_median_words: float = 14) -> dict:
    """One alpaca-style row: short instruction, optional input (40%), log-normal output length."""
    out_words = int(min(200, max(1, rng.lognormvariate(math.log(output_median_words), 1.0))))
    has_input = rng.random() < 0.4
    return {"instruction": _sentence(rng, rng.randint(4, 16)),
            "input": _sentence(rng, int(rng.lognormvariate(math.log(8), 0.8))) if has_input else "",
            "output": _sentence(rng, out_words)}


def write_data(path: Path, tokenizer, *, context_length: int, need_samples: int, need_chunks: int,
               seed: int, eval_fraction: float = 0.05, min_rows: int = 1000) -> dict:
    """Write enough rows for ``need_samples`` padded and ``need_chunks`` packed micro-batch rows."""
    from shardtune.data.alpaca import encode
    from shardtune.data.packing import assign

    rng = random.Random(seed)
    rows, lengths = [], []
    while True:
        for _ in range(200):
            row = alpaca_row(rng)
            rows.append(row)
            lengths.append(min(len(encode(row, tokenizer)["input_ids"]), context_length))
        n_train = len(rows) - max(1, int(len(rows) * eval_fraction))
        train = lengths[-n_train:]
        if (len(rows) >= min_rows and n_train >= 1.2 * need_samples
                and len(assign(train, context_length)) >= 1.2 * need_chunks):
            break
    path.write_text(json.dumps(rows))
    s = sorted(lengths)
    return {"rows": len(rows), "min": s[0], "median": s[len(s) // 2], "mean": sum(s) / len(s),
            "p90": s[int(0.9 * len(s))], "max": s[-1],
            "truncated": sum(1 for n in lengths if n >= context_length)}


# --------------------------------------------------------------------------- worker (per rank)


def batch_stats(batch: dict) -> tuple[int, int, int]:
    """A micro-batch's non-pad tokens, slots and sum(len^2), counted as the recipe counts them
    (a packed pad tail is no document)."""
    from shardtune.train.flops import batch_token_stats

    nonpad, sq = batch_token_stats(batch)
    return nonpad, batch["input_ids"].numel(), sq


class StepClock:
    """A step hook handed to the recipe's train(): a wall-clock stamp at the end of every step."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens_per_s: list[float] = []  # the recipe's own per-step figures
        self.mfu: list[float] = []  # against the recipe's peak (not this script's GEMM probe)
        self.gpu_max_allocated: list[float] = []  # bytes, the step's peak (reset per step)

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, r) -> None:
        self.ends.append(time.perf_counter())
        self.tokens_per_s.append(r.tokens_per_s)
        if r.perf is not None:
            self.mfu.append(r.perf.mfu)
            self.gpu_max_allocated.append((r.perf.gpu_max_allocated_gib or 0.0) * 2**30)


def run_case(case: dict, env) -> dict:
    """One case in this rank: the recipe's ``setup`` + ``train``, timed per step; its figures
    summed (tokens) or maxed (memory) over ranks."""
    import torch
    import torch.distributed as dist

    import shardtune.finetuning as recipe
    from shardtune.config import parse_args

    cuda = env.device.type == "cuda"
    cfg = parse_args(case["args"]).config
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    mark0 = common.cpu_marks()
    with common.PeakSampler(interval=0.005) as mem:
        c = recipe.setup(cfg, env)
        meter = common.RecordingLoader(c.train_loader, batch_stats)
        c.train_loader = meter
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        log = StepClock()
        results = recipe.train(cfg, env, c, extra_hooks=[log])
    mark1 = common.cpu_marks()
    own = torch.tensor([mark1[2] - mark0[2]], dtype=torch.float64, device=env.device)
    dist.all_reduce(own)  # CPU seconds of all ranks during this run
    other = common.other_cores(mark0, mark1, float(own))
    steps = len(log.ends)
    # Collectives on env.device: NCCL (GPU) only reduces CUDA tensors.
    k = cfg.train.gradient_accumulation_steps  # micro-batches per step: a step's figures are their sums
    per_batch = torch.tensor(meter.records[:steps * k], dtype=torch.float64).reshape(steps, k, 3)
    stats = per_batch.sum(dim=1).to(env.device)
    dist.all_reduce(stats)  # sum over ranks
    peak_mem = torch.tensor([max(log.gpu_max_allocated, default=0.0) if cuda
                             else float(mem.peak.get("anon", 0))], dtype=torch.float64,
                            device=env.device)
    dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
    stats, peak_mem = stats.cpu(), peak_mem.cpu()
    return {"name": case["name"], "ranks": env.world_size, "strategy": case["strategy"],
            "compile": case["compile"], "step_ends": log.ends,
            "stats": stats.tolist(), "losses": results["train_step_loss"],
            "peak_mem": float(peak_mem), "recipe_tokens_per_s": log.tokens_per_s,
            "recipe_mfu": log.mfu, "other_cores": other}


def worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import torch.distributed as dist

    from shardtune.parallel.distributed import init_distributed, shutdown
    from shardtune.train.peak import gemm_rate

    env = init_distributed(spec["device"], need_group=True)
    if env.device.type != "cuda":
        torch.set_num_threads(spec["threads"])
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32

    def probe() -> list[float]:
        r = gemm_rate(env.device, dtype, spec["gemm_n"], reps=spec["gemm_reps"], barrier=dist.barrier)
        return [r.best, r.median]

    probes = [probe()]
    runs = []
    for case in spec["cases"]:
        runs.append(run_case(case, env))
        gc.collect()
    probes.append(probe())
    rates = torch.tensor(probes, dtype=torch.float64)  # [probe, (best, median)]
    peak = torch.tensor([float(rates[:, 0].max()), float(rates[:, 1].max())], dtype=torch.float64)
    per_rank = [None] * env.world_size
    dist.all_gather_object(per_rank, peak.tolist())
    if env.is_main:
        Path(out_path).write_text(json.dumps({"runs": runs, "gemm_per_rank": per_rank,
                                              "threads": torch.get_num_threads()}))
    shutdown()


# --------------------------------------------------------------------------- driver


def recipe_args(args, model_dir: Path, data: Path, strategy: str, compiled: bool = False) -> list[str]:
    a = ["--model_name", str(model_dir), "--dataset", "alpaca_dataset",
         "--alpaca_dataset.data_path", str(data), "--enable_fsdp",
         "--fsdp_config.sharding_strategy", "FULL_SHARD", "--batching_strategy", strategy,
         "--context_length", str(args.context_length), "--batch_size_training", str(args.batch_size),
         "--gradient_accumulation_steps", str(args.gradient_accumulation_steps), "--num_epochs", "1",
         "--max_train_step", str(args.warmup + args.timed_steps), "--device", args.device,
         "--save_model", "False", "--run_validation", "False", "--num_workers_dataloader", "0",
         "--fsdp_config.fsdp_activation_checkpointing", str(args.activation_checkpointing),
         "--lr", "1e-4", "--seed", str(args.seed)]
    if args.dtype == "fp32":
        a += ["--mixed_precision", "False", "--fsdp_config.mixed_precision", "False"]
    if compiled:  # compiled before the first step: compile time is not in the timed steps
        a += ["--compile"]
    if args.gradient_sync != "auto":
        a += ["--fsdp_config.gradient_sync", args.gradient_sync]
    return a


def analyse(run: dict, gemm_sum: float, warmup: int, shape) -> dict:
    from shardtune.train.flops import mfu, model_flops

    ends, stats = run["step_ends"], run["stats"]
    timed = stats[warmup:]
    wall = ends[-1] - ends[warmup - 1] if warmup > 0 else None
    if wall is None or not timed:
        raise SystemExit("need --warmup >= 1 and --timed_steps >= 1")
    nonpad = sum(s[0] for s in timed)
    slots = sum(s[1] for s in timed)
    sq = sum(s[2] for s in timed)
    flops = model_flops(shape, nonpad, sq)
    attention = flops - model_flops(shape, nonpad, 0)
    return {"timed_steps": len(timed), "wall_s": wall, "s_per_step": wall / len(timed),
            "nonpad_tokens": nonpad, "slots": slots, "pad_fraction": 1 - nonpad / slots,
            "nonpad_tok_s": nonpad / wall, "slot_tok_s": slots / wall,
            "model_flops": flops, "attention_share": attention / flops,
            "model_flop_s": flops / wall, "gemm_peak_sum": gemm_sum, "mfu": mfu(flops, wall, gemm_sum),
            "final_loss": run["losses"][-1], "peak_mem": run["peak_mem"],
            # the recipe's live MFU of the timed steps, against its own peak (train/peak.py)
            "recipe_mfu": run["recipe_mfu"][warmup:]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Results and their interpretation: docs/benchmarks.md.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="compute dtype: fp32 (CPU default) or bf16 (GPU default; GPU only)")
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="35m (CPU default) or 1b (GPU default); see the docstring. tiny: a smoke run")
    p.add_argument("--ranks", default=None,
                   help="comma-separated world sizes (default: 1,2 on CPU, 1 on GPU)")
    p.add_argument("--strategies", default="padding,packing")
    p.add_argument("--batch_size", type=int, default=None, help="per rank (default 4 / 8 for 1b)")
    p.add_argument("--context_length", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from timing (default 2)")
    p.add_argument("--timed_steps", type=int, default=4, help="steps timed after warm-up (default 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU torch threads per rank (default: cores // ranks)")
    p.add_argument("--gemm_n", type=int, default=None, help="GEMM probe size (2048 / 8192 for 1b)")
    p.add_argument("--gemm_reps", type=int, default=None, help="GEMM probe repetitions (6 CPU, 20 GPU)")
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step (default 1); a step's tokens are all of them")
    p.add_argument("--gradient_sync", choices=("auto", "every_micro_batch", "last_micro_batch"), default="auto",
                   help="--fsdp_config.gradient_sync, with --gradient_accumulation_steps > 1")
    p.add_argument("--compile", choices=("off", "on", "both"), default="off",
                   help="--compile (torch.compile of the decoder layers) off, on, or both (eager and compiled rows)")
    p.add_argument("--wait_quiet", type=float, default=0, metavar="SECONDS",
                   help="before each launch wait up to SECONDS for other processes to use < 0.25 "
                        "cores (a shared machine); default 0: do not wait")
    p.add_argument("--seed", type=int, default=0)
    common.add_run_args(p)
    return p


def resolve(p: argparse.ArgumentParser, args) -> tuple[list[int], list[str], list[bool]]:
    """Fill in the size's and device's defaults (in ``args``); -> (world sizes, batching
    strategies, compile settings) to run."""
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.size = args.size or ("1b" if gpu else "35m")
    if args.gradient_sync != "auto" and args.gradient_accumulation_steps < 2:
        p.error("--gradient_sync needs --gradient_accumulation_steps > 1")
    if args.dtype == "bf16" and not gpu:
        p.error("--dtype bf16 needs --device cuda: on CPU the recipe trains in fp32 "
                "(shardtune.runtime.autocast_dtype)")
    d = DEFAULTS[args.size]
    args.batch_size = args.batch_size or d["batch_size"]
    args.gemm_n = args.gemm_n or d["gemm_n"]
    args.gemm_reps = args.gemm_reps or (20 if gpu else 6)
    ranks = [int(r) for r in (args.ranks or ("1" if gpu else "1,2")).split(",")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda but no CUDA GPU is visible")
        if max(ranks) > torch.cuda.device_count():
            p.error(f"{max(ranks)} ranks need {max(ranks)} GPUs; {torch.cuda.device_count()} visible")
    strategies = [s.strip() for s in args.strategies.split(",")]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return ranks, strategies, compiles


def prepare(work: Path, args, max_ranks: int) -> dict:
    """The model and the data under ``work`` (reused when there); prints what they are."""
    import torch
    from transformers import AutoConfig

    from shardtune.demo.tiny import build_tiny_llama
    from shardtune.model.loading import load_tokenizer
    from shardtune.train.flops import ModelShape

    cfg = SIZES[args.size]
    model_dir = work / f"llama_{args.size}_s{args.seed}"
    if not (model_dir / "config.json").is_file():
        print(f"building the {args.size} model in {model_dir} ...", flush=True)
        build_tiny_llama(model_dir, seed=args.seed,
                         dtype=torch.bfloat16 if args.size == "1b" else torch.float32,
                         max_positions=max(512, args.context_length), **cfg)
    counts = common.param_count(model_dir)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    tokenizer = load_tokenizer(str(model_dir))
    steps = args.warmup + args.timed_steps
    need = steps * args.gradient_accumulation_steps * args.batch_size * max_ranks
    data = work / f"alpaca_{args.seed}.json"
    lens = write_data(data, tokenizer, context_length=args.context_length, need_samples=need,
                      need_chunks=need, seed=args.seed)
    print(f"model: {counts['total'] / 1e6:.1f}M parameters ({shape.matmul_params / 1e6:.1f}M in matmuls), "
          f"hidden {shape.attention_width}, {shape.layers} layers, {cfg['num_heads']} heads / "
          f"{cfg['num_kv_heads']} kv heads, intermediate {cfg['intermediate_size']}, vocab {len(tokenizer)}; "
          f"{args.device} {args.dtype}")
    print(f"data: {lens['rows']} alpaca-style rows; tokens per sample min {lens['min']}, median "
          f"{lens['median']}, mean {lens['mean']:.0f}, p90 {lens['p90']}, max {lens['max']} "
          f"({lens['truncated']} truncated to {args.context_length})")
    print(f"per rank: batch {args.batch_size}, context {args.context_length}; {args.warmup} warm-up "
          f"+ {args.timed_steps} timed steps of {args.gradient_accumulation_steps} micro-batch(es), gradient "
          f"sync {args.gradient_sync}; activation checkpointing "
          f"{'on' if args.activation_checkpointing else 'off'}", flush=True)
    return {"model_dir": model_dir, "data": data, "shape": shape, "counts": counts, "lens": lens}


def launch(r: int, strategies: list[str], compiles: list[bool], prepared: dict, work: Path,
           args) -> tuple[dict, list[dict]]:
    """One torchrun launch of ``r`` ranks running every (strategy, compile) case; -> (the
    launch's figures, one analysed result per case)."""
    gpu = args.device == "cuda"
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // r)
    if not gpu and r * threads > cores:
        print(f"note: {r} ranks x {threads} threads > {cores} cores (oversubscribed)")
    cases = [{"name": f"{r}x{s}{'+compile' if c else ''}", "strategy": s, "compile": c,
              "args": recipe_args(args, prepared["model_dir"], prepared["data"], s, c)}
             for s in strategies for c in compiles]
    spec = {"device": args.device, "dtype": args.dtype, "threads": threads,
            "gemm_n": args.gemm_n, "gemm_reps": args.gemm_reps, "cases": cases}
    spec_path, out_path = work / f"spec_{r}.json", work / f"out_{r}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    if args.wait_quiet > 0:
        common.wait_for_quiet(args.wait_quiet)
    load = common.ForeignLoad().start()
    t0 = time.perf_counter()
    warning = common.torchrun(__spec__.name, r, ["--worker", str(spec_path), str(out_path)],  # this module
                              threads=None if gpu else threads,
                              log_path=work / f"log_{r}.txt", result=out_path)
    if warning:
        print(f"  warning: {warning}", flush=True)
    other = load.stop()
    out = json.loads(out_path.read_text())
    gemm = out["gemm_per_rank"]
    gemm_sum = sum(g[0] for g in gemm)
    figures = {"ranks": r, "threads": None if gpu else threads, "seconds": time.perf_counter() - t0,
               "other_cores": other, "gemm_per_rank": gemm, "warning": warning}
    results = []
    for run in out["runs"]:
        a = analyse(run, gemm_sum, args.warmup, prepared["shape"])
        a.update(ranks=r, threads=None if gpu else threads, strategy=run["strategy"], compile=run["compile"],
                 losses=run["losses"], other_cores=run["other_cores"])
        results.append(a)
    print(f"  {r} rank(s): done in {time.perf_counter() - t0:.0f} s"
          + (f", other processes used {other:.2f} cores meanwhile" if other is not None else ""),
          flush=True)
    return figures, results


def report(results: list[dict], launches: list[dict], shape, args) -> None:
    """The table of every run, then each launch's GEMM peak and the formula."""
    gpu = args.device == "cuda"
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    mem_name = "peak GPU mem GiB" if gpu else "peak anon RSS GiB"
    rows = []
    for a in results:
        rows.append([
            a["ranks"], "-" if a["threads"] is None else a["threads"], a["strategy"],
            "yes" if a["compile"] else "no", a["timed_steps"],
            f"{a['nonpad_tokens']:,.0f}", f"{a['nonpad_tok_s']:,.0f}", f"{a['slot_tok_s']:,.0f}",
            f"{a['pad_fraction']:.1%}", f"{a['s_per_step']:.2f}", f"{a['model_flop_s'] / scale:,.1f}",
            f"{a['attention_share']:.0%}", f"{a['gemm_peak_sum'] / scale:,.1f}", f"{a['mfu']:.1%}",
            f"{a['peak_mem'] / 2**30:.2f}", f"{a['final_loss']:.3f}",
            "?" if a["other_cores"] is None else f"{a['other_cores']:.2f}"])
    print()
    print(common.table(
        ["ranks", "threads/rank", "batching", "compile", "timed steps", "non-pad tokens", "non-pad tok/s",
         "processed tok/s", "pad fraction", "s/step", f"model {unit}", "attn share",
         f"GEMM peak {unit}", "MFU", mem_name, "last loss", "other cores"], rows,
        align="rrllrrrrrrrrrrrrr"))
    print()
    for ln in launches:
        per = ", ".join(f"{g[0] / scale:,.1f}" for g in ln["gemm_per_rank"])
        print(f"{ln['ranks']} rank(s): GEMM peak per rank {per} {unit} (n={args.gemm_n}, "
              f"{args.dtype}, best of {args.gemm_reps} x 2 probes, ranks concurrent); other "
              f"processes used {ln['other_cores'] if ln['other_cores'] is not None else float('nan'):.2f} "
              f"cores during the launch")
    print("model FLOPs per step = 6*N*T + 12*L*d*sum(doc_len^2) (shardtune.train.flops); N = matmul "
          f"weights (projections + LM head) = {shape.matmul_params:,}, L = {shape.layers}, "
          f"d = {shape.attention_width}; MFU = model FLOP/s / summed GEMM peak")


def main(argv=None) -> dict:
    p = parser()
    args = common.parse_or_work(p, argv, worker)
    if args is None:
        return {}
    ranks, strategies, compiles = resolve(p, args)
    info = common.announce_machine(
        args.device, "WARNING: other processes are using the CPU now; throughput figures will be low")
    results, launches = [], []
    with common.work_folder(args.workdir, "shardtune_tput_") as work:
        prepared = prepare(work, args, max(ranks))
        for r in ranks:
            figures, analysed = launch(r, strategies, compiles, prepared, work, args)
            launches.append(figures)
            results += analysed
    report(results, launches, prepared["shape"], args)
    out = {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                     for k, v in vars(args).items()},
           "params": prepared["counts"], "data": prepared["lens"], "launches": launches, "results": results}
    return common.save_json(args.json, out)


if __name__ == "__main__":
    common.entry(main)  # a rank ends without interpreter teardown (see shardtune.exits)
