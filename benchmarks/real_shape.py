"""The seed PEFT command, ``generate`` and ``convert --merge`` on a model of Llama-3.2-1B's width.

What it measures
----------------
A model with Meta's Llama-3.2-1B config (hidden 2048, MLP 8192, 32 heads / 8 KV heads of 64,
vocab 128256, tied embeddings, llama3 RoPE scaling; random weights saved as bf16 safetensors, as
Meta ships them) is written once to a work folder, with ``--layers`` of its 16 decoder layers
(default 4: 0.75B parameters). Its tokenizer is the demo's tiny one (512 ids, which fit the
vocabulary; only the token ids matter to speed and memory). Then, as a user would run them:

* ``finetune``: the seed 001 PEFT command, llama-recipes' line ``torchrun --nnodes 1
  --nproc_per_node 2 -m shardtune.finetuning --enable_fsdp --low_cpu_fsdp --use_peft
  --peft_method lora --dataset alpaca_dataset --max_train_step 4 ...`` (CPU, gloo, fp32 training
  as the recipe does on a CPU) on a generated alpaca-format file; it saves the adapter;
* ``generate``: ``shardtune generate`` on that adapter directory (16 new tokens);
* ``convert``: ``shardtune convert ADAPTER OUT --merge --model MODEL`` (a merged bf16 model).

For each it records wall time, user and kernel (sys) CPU time and minor page faults of the whole
process tree (``wait4``), and the peak RSS of every process that does the work: each training rank
runs the recipe's module in a child of a small wrapper (``--worker``) that reports that child's
``wait4`` figures, so every rank has its own user/sys/faults/peak RSS. Next to them it prints
``shardtune plan``'s estimate of the same command (host RAM per rank and per host).

``--malloc_tuning on`` sets ``SHARDTUNE_MALLOC_TUNING=1`` for every process (shardtune's opt-in
glibc malloc tuning, src/shardtune/host_malloc.py); the default ``off`` sets it to ``0``.

    python -m benchmarks.real_shape                         # 4 layers, 2 ranks (a few minutes alone)
    python -m benchmarks.real_shape --malloc_tuning on      # the same with the malloc tuning
    python -m benchmarks.real_shape --layers 16 --json out.json

(from the repository root; ``python -m benchmarks list`` names the declared scenarios).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common

MAX_NEW_TOKENS = 16
# Llama 3.2's RoPE scaling (config.json of meta-llama/Llama-3.2-1B); the planner's size table leaves
# it out because it changes neither memory nor FLOPs, but the model here is Meta's config entire.
LLAMA32_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# --------------------------------------------------------------------------- worker (per rank)


def worker(spec_path: str, out_path: str) -> None:
    """Run the recipe's module as this rank's child and write the child's own resource use.

    The wrapper imports nothing heavy, so the child is the rank exactly as ``torchrun -m`` would
    start it (same environment, same arguments)."""
    spec = json.loads(Path(spec_path).read_text())
    rank = os.environ["RANK"]
    figures = run_measured([sys.executable, "-m", "shardtune.finetuning", *spec["args"]],
                           log_path=Path(f"{out_path}.rank{rank}.log"))
    figures["rank"] = int(rank)
    Path(f"{out_path}.rank{rank}.json").write_text(json.dumps(figures))
    if figures["returncode"]:
        sys.exit(figures["returncode"])


# --------------------------------------------------------------------------- measuring


def run_measured(cmd: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; its wall time, and from ``wait4`` the CPU time, minor/major page faults and
    peak RSS of it and its descendants (the peak is the largest single process's)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return {"returncode": proc.returncode, "wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "minor_faults": ru.ru_minflt, "major_faults": ru.ru_majflt, "peak_rss": ru.ru_maxrss * 1024}


def sys_share(f: dict) -> float:
    return f["sys_s"] / max(f["user_s"] + f["sys_s"], 1e-9)


# --------------------------------------------------------------------------- model and data


def build_model(root: Path, layers: int, seed: int) -> Path:
    """Meta's Llama-3.2-1B config with ``layers`` decoder layers, random bf16 weights, and the
    demo tokenizer; written once under ``root``."""
    path = root / f"llama32_1b_width_l{layers}_s{seed}_bf16"
    if (path / "config.json").is_file():
        return path
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    from shardtune.demo.tiny import build_tokenizer
    from shardtune.plan.shapes import size_config

    print(f"building the model in {path} ...", flush=True)
    config = size_config("1b")  # the published shape, from the planner's table (defined once)
    config.num_hidden_layers = layers
    config.rope_parameters = dict(LLAMA32_ROPE)
    config.dtype = torch.bfloat16
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16: no fp32 copy of 1B weights
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    build_tokenizer().save_pretrained(tmp)
    tmp.rename(path)
    return path


WORDS = ("the model reads a short list of numbers and writes their sum then it names the colour of "
         "each item in the box and says which one is the largest while a cat sleeps near the door").split()


def write_alpaca(path: Path, rows: int, seed: int) -> Path:
    """``rows`` alpaca-format rows (instruction, input, output) of 6-25 words each."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    data = [{"instruction": text(3, 8), "input": text(0, 5) if i % 2 else "", "output": text(3, 12)}
            for i in range(rows)]
    path.write_text(json.dumps(data, indent=1))
    return path


# --------------------------------------------------------------------------- phases


def recipe_args(model_dir: Path, data: Path, out: Path, args) -> list[str]:
    """The seed 001 PEFT command's recipe flags (CPU: ``--device cpu``)."""
    return ["--enable_fsdp", "--low_cpu_fsdp", "--model_name", str(model_dir), "--use_peft",
            "--peft_method", "lora", "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data),
            "--output_dir", str(out), "--max_train_step", str(args.steps), "--num_epochs", "1",
            "--batch_size_training", str(args.batch_size), "--context_length", str(args.context_length),
            "--run_validation", "False", "--save_metrics", "--device", "cpu", "--overwrite_output_dir"]


def run_env(tuning: str) -> dict:
    env = dict(os.environ)
    env["SHARDTUNE_MALLOC_TUNING"] = "1" if tuning == "on" else "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def finetune(model_dir: Path, data: Path, work: Path, args) -> dict:
    out = work / "lora"
    spec_path, result = work / "spec_finetune.json", work / "finetune"
    spec_path.write_text(json.dumps({"args": recipe_args(model_dir, data, out, args)}))
    for old in work.glob("finetune.rank*"):
        old.unlink()
    os.environ.update({k: v for k, v in run_env(args.malloc_tuning).items() if k.startswith("SHARDTUNE_")})
    t0 = time.perf_counter()
    before = os.times()
    warning = common.torchrun(__spec__.name, args.ranks, ["--worker", str(spec_path), str(result)],
                              threads=args.threads, log_path=work / "log_finetune.txt")
    after = os.times()
    if warning:
        print(f"  warning: {warning}", flush=True)
    ranks = sorted((json.loads(p.read_text()) for p in work.glob("finetune.rank*.json")),
                   key=lambda r: r["rank"])
    whole = {"wall_s": time.perf_counter() - t0, "user_s": after.children_user - before.children_user,
             "sys_s": after.children_system - before.children_system,
             "minor_faults": sum(r["minor_faults"] for r in ranks)}
    return {"whole": whole, "ranks": ranks, "output": str(out)}


def generate(adapter: Path, work: Path, args) -> dict:
    cmd = [sys.executable, "-m", "shardtune", "generate", str(adapter), "--prompt", "Add 2 and 3.",
           "--max_new_tokens", str(MAX_NEW_TOKENS), "--device", "cpu"]
    return run_measured(cmd, work / "log_generate.txt", env=run_env(args.malloc_tuning))


def convert_merge(adapter: Path, model_dir: Path, work: Path, args) -> dict:
    out = work / "merged"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "shardtune", "convert", str(adapter), str(out), "--merge",
           "--model", str(model_dir)]
    return run_measured(cmd, work / "log_convert.txt", env=run_env(args.malloc_tuning))


def plan(model_dir: Path, data: Path, work: Path, args) -> dict:
    cmd = [sys.executable, "-m", "shardtune", "plan", "--nproc_per_node", str(args.ranks),
           *recipe_args(model_dir, data, work / "lora", args), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env(args.malloc_tuning))
    if proc.returncode:
        raise RuntimeError(f"shardtune plan failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------- driver


def figures_row(name: str, f: dict) -> list:
    return [name, f"{f['wall_s']:.1f}", f"{f['user_s']:.1f}", f"{f['sys_s']:.1f}",
            f"{100 * sys_share(f):.0f}%", f"{f['minor_faults'] / 1e6:.2f}",
            common.mib(f["peak_rss"]) if "peak_rss" in f else ""]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_shape", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Results and their interpretation: docs/benchmarks.md.")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 16 (default 4)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--steps", type=int, default=4, help="--max_train_step (default 4)")
    p.add_argument("--batch_size", type=int, default=4, help="--batch_size_training (default 4)")
    p.add_argument("--context_length", type=int, default=256)
    p.add_argument("--rows", type=int, default=200, help="rows of the generated alpaca file")
    p.add_argument("--malloc_tuning", choices=("on", "off"), default="off",
                   help="on: SHARDTUNE_MALLOC_TUNING=1 (opt-in heap reuse); off (default): glibc's defaults")
    p.add_argument("--phases", default="finetune,generate,convert,plan",
                   help="comma-separated subset of finetune,generate,convert,plan")
    p.add_argument("--seed", type=int, default=0)
    common.add_run_args(p)
    args = common.parse_or_work(p, argv, worker)
    if args is None:
        return {}

    info = common.machine_info()
    common.print_machine(info)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="shardtune-real-shape-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(work, args.layers, args.seed)
    data = write_alpaca(work / "alpaca.json", args.rows, args.seed)
    phases = args.phases.split(",")
    results: dict = {"machine": info, "layers": args.layers, "ranks": args.ranks,
                     "malloc_tuning": args.malloc_tuning, "params": common.param_count(model_dir),
                     "recipe_args": recipe_args(model_dir, data, work / "lora", args)}
    print(f"model: {results['params']['total'] / 1e9:.3f}B parameters, {args.layers} layers; "
          f"malloc tuning {args.malloc_tuning}", flush=True)
    rows = []
    adapter = work / "lora"
    if "finetune" in phases:
        ft = results["finetune"] = finetune(model_dir, data, work, args)
        rows.append(figures_row("finetune (all ranks)", ft["whole"]))
        rows += [figures_row(f"  rank {r['rank']}", r) for r in ft["ranks"]]
    if "generate" in phases:
        results["generate"] = generate(adapter, work, args)
        rows.append(figures_row("generate", results["generate"]))
    if "convert" in phases:
        results["convert"] = convert_merge(adapter, model_dir, work, args)
        rows.append(figures_row("convert --merge", results["convert"]))
    print(common.table(["phase", "wall s", "user s", "sys s", "sys share", "minor faults (M)",
                        "peak RSS MiB"], rows))
    failed = [k for k in ("generate", "convert") if results.get(k, {}).get("returncode")]
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {work})", flush=True)
    if "plan" in phases:
        results["plan"] = plan(model_dir, data, work, args)
        host = results["plan"].get("per_host", {})
        gpu = results["plan"].get("per_gpu", {})
        print(f"plan: per rank {common.mib(gpu.get('total_bytes', 0))} MiB; per host "
              + ", ".join(f"{k[:-6]} {common.mib(v)} MiB" for k, v in host.items()
                          if k.endswith("_bytes") and isinstance(v, int)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    common.entry(main)
