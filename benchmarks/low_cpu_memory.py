"""Peak host RAM of FSDP model set-up, summed over ranks: normal loading vs ``--low_cpu_fsdp``.

What it measures
----------------
A random-initialised Llama (default 155.2M parameters: hidden 1024, 12 layers, 16 heads,
intermediate 2816, vocab 512; 592 MiB as fp32 safetensors, 296 MiB with
``--checkpoint_dtype bf16``) is written once to a work folder and read once so that it sits in
the page cache. Then three separate ``torchrun --nproc_per_node R`` launches (default R = 2,
gloo, CPU, 1 thread per rank) each start fresh processes, so every process's memory high-water
mark belongs to one mode only:

* ``baseline``: the rank imports torch, transformers (and the Llama modeling code), accelerate
  and shardtune, starts the process group and loads the tokenizer, but builds no model;
* ``normal``: the same, then the recipe's ``setup_model`` with ``--enable_fsdp`` (every rank
  loads the whole model with ``from_pretrained``, then FSDP2 shards it);
* ``low_cpu``: ``setup_model`` with ``--enable_fsdp --low_cpu_fsdp`` (meta-device model, FSDP2
  sharding on meta, then each rank allocates its shards and reads only its rows from the
  safetensors files).

No training step runs: the figures are what model set-up and sharding cost. Per rank it records

* peak RSS: the kernel's exact high-water mark (``VmHWM`` = ``ru_maxrss``) over the process's
  whole life (imports included);
* sampled peaks (every 5 ms, from /proc/self/status and smaps_rollup, during ``setup_model``) of
  RssAnon ("private": tensors, malloc heaps; memory that exists only because this process
  allocated it), RssFile ("file-mapped": file pages mapped into the process, i.e. shared
  libraries and the pages of mmap-ed safetensors it touched; clean page-cache pages the kernel
  can drop and re-read) and PSS (pages shared by several processes split among them);
* RSS after set-up, the bytes of the rank's parameter shards, and a checksum of the weights
  (summed over ranks; normal and low_cpu must agree, which shows both loaded the same model).

"beyond baseline" = sum over ranks of (mode's peak - baseline launch's peak of the same rank);
it removes what every process pays for the Python/torch/transformers runtime (~350 MiB of RSS
per rank here, mostly shared-library pages) and leaves what the model costs. It is divided by
one copy of the model as the recipe holds it: parameters x 4 bytes (fp32, the recipe's CPU
training dtype; the same as the safetensors bytes for an fp32 checkpoint). Goal (issue):
low_cpu <= 1.3 x model beyond the baseline, normal ~= ranks x model.

safetensors hands out zero-copy views of its mmap, so the pages of the file a rank reads are
counted in that rank's RSS until the file is closed: peak RSS = private memory + the touched
part of the checkpoint. The table therefore shows private and file-mapped peaks separately;
docs/benchmarks.md discusses what that means for the goal.

    python -m benchmarks.low_cpu_memory                          # 155M params, 2 ranks (< 1 min)
    python -m benchmarks.low_cpu_memory --checkpoint_dtype bf16  # as Llama checkpoints ship
    python -m benchmarks.low_cpu_memory --hidden 768 --layers 8 --json out.json

(from the repository root; ``python -m benchmarks list`` names the declared scenarios).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from . import common

MODES = ("baseline", "normal", "low_cpu")


# --------------------------------------------------------------------------- worker (per rank)


def worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import torch.distributed as dist
    import accelerate  # noqa: F401  - the low-CPU path imports it; count it in every mode
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    from shardtune.config import parse_args
    from shardtune.finetuning import setup_model
    from shardtune.model.loading import load_tokenizer
    from shardtune.parallel.distributed import init_distributed, shutdown

    env = init_distributed("cpu", need_group=True)
    torch.set_num_threads(spec["threads"])
    tokenizer = load_tokenizer(spec["model_dir"])
    cfg = parse_args(spec["args"]).config
    gc.collect()
    dist.barrier()
    before = common.memory_now()
    model = None
    t0 = time.perf_counter()
    with common.PeakSampler(pss=True) as sampler:  # not timed: PSS's cost does not matter
        if spec["mode"] != "baseline":
            model = setup_model(cfg, env, tokenizer)
        dist.barrier()
    seconds = time.perf_counter() - t0
    gc.collect()
    after = common.memory_now()
    shard_bytes, checksum = 0, 0.0
    if model is not None:
        with torch.no_grad():
            for p in model.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                shard_bytes += local.numel() * local.element_size()
                checksum += float(local.double().sum())
    record = {"rank": env.rank, "before": before, "after": after, "peak_sampled": sampler.peak,
              "hwm": after["hwm"], "seconds": seconds, "shard_bytes": shard_bytes,
              "checksum": checksum}
    common.write_gathered(env, record, out_path)
    shutdown()


# --------------------------------------------------------------------------- driver




def recipe_args(model_dir: Path, mode: str) -> list[str]:
    args = ["--model_name", str(model_dir), "--enable_fsdp", "--device", "cpu",
            "--dataset", "alpaca_dataset", "--save_model", "False", "--run_validation", "False"]
    if mode == "low_cpu":
        args.append("--low_cpu_fsdp")
    return args


def warm_page_cache(model_dir: Path) -> None:
    """Read the weights once so that every mode finds them in the page cache (equal I/O)."""
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run_mode(mode: str, model_dir: Path, work: Path, args) -> list[dict]:
    spec = {"mode": mode, "model_dir": str(model_dir), "threads": args.threads,
            "args": recipe_args(model_dir, mode)}
    spec_path, out_path = work / f"spec_{mode}.json", work / f"out_{mode}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    warning = common.torchrun(__spec__.name, args.ranks, ["--worker", str(spec_path), str(out_path)],
                              threads=args.threads, log_path=work / f"log_{mode}.txt",
                              result=out_path)
    if warning:
        print(f"  warning ({mode}): {warning}", flush=True)
    return json.loads(out_path.read_text())


def summarise(results: dict[str, list[dict]], model_bytes: int) -> tuple[list, dict]:
    """Sum each figure over ranks; "beyond" subtracts the baseline launch's figure rank by rank."""
    base = {r["rank"]: r for r in results["baseline"]}

    def total(recs, get):
        return sum(get(r) for r in recs)

    def beyond(recs, get):
        return sum(get(r) - get(base[r["rank"]]) for r in recs)

    rows, summary = [], {}
    for mode in MODES:
        recs = results[mode]
        s = {
            "peak_rss_sum": total(recs, lambda r: r["hwm"]),
            "peak_rss_beyond_baseline": beyond(recs, lambda r: r["hwm"]),
            "peak_anon_beyond_baseline": beyond(recs, lambda r: r["peak_sampled"]["anon"]),
            "peak_file_beyond_baseline": beyond(recs, lambda r: r["peak_sampled"]["file"]),
            "peak_pss_beyond_baseline": beyond(recs, lambda r: r["peak_sampled"]["pss"]),
            "rss_after_beyond_baseline": beyond(recs, lambda r: r["after"]["rss"]),
            "anon_after_beyond_baseline": beyond(recs, lambda r: r["after"]["anon"]),
            "per_rank_peak_rss": [r["hwm"] for r in recs],
            "shard_bytes_sum": total(recs, lambda r: r["shard_bytes"]),
            "checksum": total(recs, lambda r: r["checksum"]),
            "setup_seconds": max(r["seconds"] for r in recs),
        }
        summary[mode] = s
        m = model_bytes
        rows.append([
            mode, common.mib(s["peak_rss_sum"]), common.mib(s["peak_rss_beyond_baseline"]),
            f"{s['peak_rss_beyond_baseline'] / m:.2f}", common.mib(s["peak_anon_beyond_baseline"]),
            f"{s['peak_anon_beyond_baseline'] / m:.2f}", common.mib(s["peak_file_beyond_baseline"]),
            common.mib(s["peak_pss_beyond_baseline"]), f"{s['peak_pss_beyond_baseline'] / m:.2f}",
            common.mib(s["rss_after_beyond_baseline"]), common.mib(s["shard_bytes_sum"]),
            f"{s['setup_seconds']:.1f}"])
    return rows, summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.low_cpu_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Results and their interpretation: docs/benchmarks.md.")
    common.add_llama_args(p, layers=12)
    p.add_argument("--checkpoint_dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the weights on disk (default fp32). The recipe trains in fp32 "
                        "on CPU either way; bf16 (as Llama checkpoints ship) makes loading convert")
    common.add_run_args(p)
    return p


def measure_modes(work: Path, args) -> dict:
    """Build the model, warm the page cache, one launch per mode; -> figures and the table rows."""
    model_dir = common.build_llama(work, args, args.checkpoint_dtype)
    counts = common.param_count(model_dir)
    file_bytes = common.safetensors_bytes(model_dir)
    model_bytes = counts["total"] * 4  # one copy as the recipe holds it on CPU: fp32
    print(f"model: {counts['total'] / 1e6:.1f}M parameters (hidden {args.hidden}, "
          f"{args.layers} layers, intermediate {args.intermediate}, vocab 512); one fp32 copy = "
          f"{common.mib(model_bytes)} MiB; safetensors on disk ({args.checkpoint_dtype}) = "
          f"{common.mib(file_bytes)} MiB; {args.ranks} ranks, {args.threads} thread(s) each",
          flush=True)
    warm_page_cache(model_dir)
    results = {}
    for mode in MODES:
        t0 = time.perf_counter()
        results[mode] = run_mode(mode, model_dir, work, args)
        print(f"  {mode}: launch done in {time.perf_counter() - t0:.0f} s", flush=True)
    rows, summary = summarise(results, model_bytes)
    return {"counts": counts, "file_bytes": file_bytes, "model_bytes": model_bytes, "results": results,
            "rows": rows, "summary": summary}


def report(m: dict, args) -> None:
    summary, model_bytes = m["summary"], m["model_bytes"]
    base = summary["baseline"]
    print()
    print("Per-rank baseline (imports + process group + tokenizer, no model): peak RSS "
          + ", ".join(common.mib(x) + " MiB" for x in base["per_rank_peak_rss"])
          + f" (sum {common.mib(base['peak_rss_sum'])} MiB). One model copy = "
          f"{common.mib(model_bytes)} MiB. '/ model' = beyond baseline / one model copy.")
    print()
    print(common.table(
        ["mode", "peak RSS, sum MiB", "beyond baseline MiB", "/ model",
         "private (anon) peak MiB", "/ model", "file-mapped peak MiB", "PSS peak MiB",
         "/ model", "RSS after set-up MiB", "param shards MiB", "set-up s"], m["rows"]))
    print("(all columns after the second are beyond the baseline launch, summed over ranks; "
          "anon/file/PSS peaks are sampled every 5 ms)")
    print()
    n, lc = summary["normal"], summary["low_cpu"]
    for name, s, goal in (("normal ", n, f"~{args.ranks}"), ("low_cpu", lc, "<= 1.3")):
        print(f"{name}: peak RSS beyond baseline = {s['peak_rss_beyond_baseline'] / model_bytes:.2f} x "
              f"model (goal {goal}); private (anon) = {s['peak_anon_beyond_baseline'] / model_bytes:.2f} x; "
              f"file-mapped = {s['peak_file_beyond_baseline'] / model_bytes:.2f} x")
    same = abs(n["checksum"] - lc["checksum"]) <= 1e-6 * max(1.0, abs(n["checksum"]))
    print(f"weights checksum normal {n['checksum']:.6f} vs low_cpu {lc['checksum']:.6f}: "
          f"{'same' if same else 'DIFFERENT'}")


def main(argv=None) -> dict:
    p = parser()
    args = common.parse_or_work(p, argv, worker)
    if args is None:
        return {}
    info = common.announce_machine("cpu", "note: other processes are using the CPU (affects the set-up seconds only)")
    with common.work_folder(args.workdir, "shardtune_lowcpu_") as work:
        m = measure_modes(work, args)
    report(m, args)
    out = {"machine": info, "params": m["counts"], "model_bytes": m["model_bytes"], "file_bytes": m["file_bytes"],
           "checkpoint_dtype": args.checkpoint_dtype, "ranks": args.ranks, "threads": args.threads,
           "summary": m["summary"], "raw": m["results"]}
    return common.save_json(args.json, out)


if __name__ == "__main__":
    common.entry(main)  # a rank ends without interpreter teardown (see shardtune.exits)
