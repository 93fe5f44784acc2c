"""Checkpoint I/O on CPU: time and peak host RAM per rank of a sharded (DCP) save and load, the
streaming Hugging Face export, and a naive full-state-dict gather, for a ~1 GB model.

What it measures
----------------
A random-initialised Llama (default hidden 1024, 20 layers, intermediate 2816, vocab 512:
~258M parameters = ~1.0 GB in fp32) is written once to a work folder. Then one
``torchrun --nproc_per_node 2`` launch (gloo, CPU, 1 torch thread per rank) per method starts
fresh processes that each go through the recipe's own set-up: ``shardtune.finetuning.setup_model``
with ``--enable_fsdp --device cpu --low_cpu_fsdp`` (FSDP2-sharded over the 2 ranks), the recipe's
AdamW (``build_optimizer``) and scheduler, and ONE training step (forward/backward on a random
batch, ``optimizer.step()``, ``zero_grad``) so that the AdamW state exists. Then the method:

* ``sharded``: ``shardtune.checkpoint.sharded.save_checkpoint`` (DCP: every rank writes its own
  shard of model + AdamW state, ``fsync``-ed by DCP), then, in the same processes, after the
  weights and AdamW state were zeroed in place, ``load_checkpoint`` twice: once with the files
  still in the page cache ("warm") and once after evicting them (``fsync`` +
  ``posix_fadvise(DONTNEED)``, "cold"; only the checkpoint's own pages are dropped). The share of
  the checkpoint that is in the page cache just before each load is measured with ``fincore``
  (a VM may reclaim page cache by itself, so "warm" can be only partly warm). Each load is
  verified: the checksum of every rank's parameters and optimizer state must equal the one taken
  before the save.
* ``hf``: ``shardtune.checkpoint.hf_export.save_hf_model(..., max_shard_size="200MB")`` (every
  rank all-gathers one tensor at a time; rank 0 appends it to the current output shard and writes
  the shard when it is full).
* ``naive``: what llama-recipes' FULL_STATE_DICT path amounts to: ``get_model_state_dict(model,
  options=StateDictOptions(full_state_dict=True, cpu_offload=True))`` on every rank (rank 0 ends
  up holding the whole model; with ``cpu_offload`` the other ranks keep nothing), then rank 0
  ``safetensors.torch.save_file`` of it as one file.

Every method runs in its own launch (fresh processes with the same history: set-up + one step),
so no method inherits the freed-but-still-mapped heap, the page cache or the allocator state of
another one, and the order of the methods does not matter.

Per rank and per operation it records

* wall time of the call (``time.perf_counter`` around it; the shardtune calls end with a barrier,
  so the ranks' times agree; the table shows the slower rank). The HF export and the naive save
  do not ``fsync`` (DCP does), so the time rank 0 then needs to ``fsync`` the files it wrote is
  measured separately and shown as "+fsync";
* peak RSS growth = peak RSS during the call - RSS just before it. Before each call the process
  runs ``gc.collect()`` and glibc ``malloc_trim(0)`` (so that memory freed earlier, e.g. by the
  training step, is given back and cannot hide a new allocation). The peak is taken two ways: a
  background thread sampling ``psutil`` RSS every 10 ms, and the kernel's exact high-water mark
  (``VmHWM``, reset just before the call by writing 5 to ``/proc/self/clear_refs``). The table
  shows the exact one (the sampled one where the reset is not allowed); both are in ``--json``;
* the size on disk of what was written (sum of the sizes of the files in the output folder).

The growth includes memory that glibc keeps after ``free`` (gathered tensors of a few MB land
below its dynamic mmap threshold and stay in the heap or a thread arena). The environment passes
through to the ranks, so ``MALLOC_MMAP_THRESHOLD_=1048576 python -m benchmarks.checkpoint_io``
shows the figures without that retention (every tensor >= 1 MiB is mmap-ed and returned at free).

The naive path is also split into its two phases (gather, then ``save_file``). At the end the
driver checks that the HF export and the naive file hold bit-identical tensors (both launches
start from the same seed and take the same step on one thread per rank).

    python -m benchmarks.checkpoint_io                       # ~258M params (~1 GB), 2 ranks, ~2 min
    python -m benchmarks.checkpoint_io --layers 8 --json out.json --workdir /tmp/ckio

(from the repository root; ``python -m benchmarks list`` names the declared scenarios).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from . import common

METHODS = ("sharded", "hf", "naive")


# --------------------------------------------------------------------------- memory probes


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class RssSampler:
    """Max of psutil RSS sampled every ``interval`` seconds in a background thread."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def measured(name: str, fn, records: list, barrier) -> object:
    """Run ``fn()`` and append {op, seconds, rss_before, peak growth (sampled and exact)}."""
    gc.collect()
    malloc_trim()
    barrier()
    exact = reset_hwm()
    before = rss()
    anon_before = common.memory_now()["anon"]
    t0 = time.perf_counter()
    with RssSampler() as sampler:
        result = fn()
    seconds = time.perf_counter() - t0
    hwm = _vm_hwm() if exact else None
    records.append({"op": name, "seconds": seconds, "rss_before": before,
                    "anon_before": anon_before,
                    "growth_sampled": sampler.peak - before,
                    "growth_exact": (hwm - before) if hwm is not None else None,
                    "rss_after": rss()})
    barrier()
    return result


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def cached_fraction(path: Path):
    """Fraction of the folder's file bytes in the page cache now (util-linux ``fincore``), or None."""
    files = [str(f) for f in sorted(Path(path).rglob("*")) if f.is_file()]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *files],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    res = size = 0
    for line in out.splitlines():
        r, s = line.split()
        res, size = res + int(r), size + int(s)
    return res / size if size else None


def fsync_tree(path: Path, evict: bool = False) -> None:
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                if evict:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --------------------------------------------------------------------------- worker (per rank)


def _state_checksum(model, optimizer) -> float:
    import torch

    total = 0.0
    with torch.no_grad():
        for p in model.parameters():
            total += float((p.to_local() if hasattr(p, "to_local") else p).double().sum())
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    total += float((v.to_local() if hasattr(v, "to_local") else v).double().sum())
    return total


def _zero_state(model, optimizer) -> None:
    """Overwrite weights and AdamW state in place, so a load has to restore them."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if hasattr(p, "to_local") else p).zero_()
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    (v.to_local() if hasattr(v, "to_local") else v).zero_()


class Rank:
    """One rank's state after the recipe's set-up and one training step."""

    def __init__(self, spec: dict) -> None:
        import torch

        from shardtune.config import parse_args
        from shardtune.finetuning import setup_model
        from shardtune.model.loading import load_tokenizer
        from shardtune.parallel.distributed import init_distributed
        from shardtune.train.optim import build_optimizer, build_scheduler

        self.env = env = init_distributed("cpu", need_group=True)
        torch.set_num_threads(spec["threads"])
        cfg = parse_args(spec["args"]).config
        self.tokenizer = load_tokenizer(spec["model_dir"])
        torch.manual_seed(0)
        t_setup = time.perf_counter()
        self.model = model = setup_model(cfg, env, self.tokenizer)
        self.optimizer = optimizer = build_optimizer(model.parameters(), cfg.train, cfg.fsdp)
        self.scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch=1, total_steps=1)
        gen = torch.Generator().manual_seed(1000 + env.rank)
        ids = torch.randint(0, model.config.vocab_size, (1, spec["seq_len"]), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        del loss, ids
        self.setup_seconds = time.perf_counter() - t_setup

    def sizes(self) -> dict:
        import torch

        return {"param_bytes": sum((p.to_local() if hasattr(p, "to_local") else p).nbytes
                                   for p in self.model.parameters()),
                "optim_bytes": sum((v.to_local() if hasattr(v, "to_local") else v).nbytes
                                   for s in self.optimizer.state.values() for v in s.values()
                                   if isinstance(v, torch.Tensor)),
                "setup_seconds": self.setup_seconds}

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def fsync_seconds(self, target: Path) -> float:
        t0 = time.perf_counter()
        if self.env.is_main:
            fsync_tree(target)
        return time.perf_counter() - t0

    def disk_bytes(self, target: Path) -> int:
        return du(target) if self.env.is_main else 0


def sharded(rank: Rank, out_dir: Path, spec: dict, records: list) -> dict:
    """DCP save, then two loads (warm and cold page cache) into zeroed state, each verified."""
    from shardtune.checkpoint import layout
    from shardtune.checkpoint.sharded import load_checkpoint, save_checkpoint

    model, optimizer, scheduler, env = rank.model, rank.optimizer, rank.scheduler, rank.env
    run = out_dir / "run"
    checksum = _state_checksum(model, optimizer)
    measured("sharded save", lambda: save_checkpoint(
        run, 1, model=model, optimizer=optimizer, scheduler=scheduler,
        position={"epoch": 0, "step": 1}, config_dict={"benchmark": "checkpoint_io"}, env=env),
        records, rank.barrier)
    path = run / layout.step_dir_name(1)
    extra = {"disk_bytes": rank.disk_bytes(path), "fsync_seconds": rank.fsync_seconds(path)}  # DCP fsync-ed: ~0
    for label, evict in (("sharded load (warm cache)", False), ("sharded load (cold cache)", True)):
        _zero_state(model, optimizer)
        if evict and env.is_main:
            fsync_tree(path, evict=True)
        cached = cached_fraction(path) if env.is_main else None
        measured(label, lambda: load_checkpoint(path, model=model, optimizer=optimizer,
                                                scheduler=scheduler, env=env),
                 records, rank.barrier)
        records[-1]["cached_before"] = cached
        records[-1]["restored"] = abs(_state_checksum(model, optimizer) - checksum) <= 1e-9 * max(
            1.0, abs(checksum))
    return extra


def hf(rank: Rank, out_dir: Path, spec: dict, records: list) -> dict:
    """The streaming Hugging Face export."""
    from shardtune.checkpoint.hf_export import save_hf_model

    target = out_dir / "hf"
    measured(f"HF streaming export ({spec['max_shard_size']} shards)",
             lambda: save_hf_model(rank.model, rank.tokenizer, target, env=rank.env,
                                   max_shard_size=spec["max_shard_size"]),
             records, rank.barrier)
    return {"fsync_seconds": rank.fsync_seconds(target), "disk_bytes": rank.disk_bytes(target),
            "files": sorted(f.name for f in target.glob("*.safetensors")) if rank.env.is_main else []}


def naive(rank: Rank, out_dir: Path, spec: dict, records: list) -> dict:
    """A full state dict gathered on every rank (rank 0 holds it all), saved as one file."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    target = out_dir / "naive"
    if rank.env.is_main:
        target.mkdir(parents=True, exist_ok=True)
    phases: dict = {}

    def gather_and_save() -> None:
        t0 = time.perf_counter()
        sd = get_model_state_dict(rank.model, options=StateDictOptions(full_state_dict=True,
                                                                        cpu_offload=True))
        phases["gather_seconds"] = time.perf_counter() - t0
        phases["rss_after_gather"] = rss()
        phases["held_bytes"] = sum(t.nbytes for t in sd.values() if isinstance(t, torch.Tensor))
        if rank.env.is_main:
            t1 = time.perf_counter()
            save_file(sd, str(target / "model.safetensors"), metadata={"format": "pt"})
            phases["write_seconds"] = time.perf_counter() - t1
        del sd

    measured("naive full-state-dict gather + save_file", gather_and_save, records, rank.barrier)
    return {**phases, "gather_growth": phases["rss_after_gather"] - records[-1]["rss_before"],
            "fsync_seconds": rank.fsync_seconds(target), "disk_bytes": rank.disk_bytes(target)}


RUNS = {"sharded": sharded, "hf": hf, "naive": naive}  # METHODS' measurements


def worker(spec_path: str, out_path: str) -> None:
    from shardtune.parallel.distributed import shutdown

    spec = json.loads(Path(spec_path).read_text())
    method = spec["method"]
    if method not in RUNS:
        raise ValueError(method)
    rank = Rank(spec)
    records: list[dict] = []
    extra = {**rank.sizes(), **RUNS[method](rank, Path(spec["out_dir"]), spec, records)}
    record = {"rank": rank.env.rank, "method": method, "ops": records, **extra}
    common.write_gathered(rank.env, record, out_path)
    shutdown()


# --------------------------------------------------------------------------- driver




def recipe_args(model_dir: Path) -> list[str]:
    return ["--model_name", str(model_dir), "--enable_fsdp", "--low_cpu_fsdp", "--device", "cpu",
            "--dataset", "alpaca_dataset", "--save_model", "False", "--run_validation", "False"]


def run_method(method: str, model_dir: Path, work: Path, args) -> list[dict]:
    out_dir = work / f"out_{method}"
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    out_dir.mkdir(parents=True)
    spec = {"method": method, "model_dir": str(model_dir), "threads": args.threads,
            "seq_len": args.seq_len, "max_shard_size": args.max_shard_size, "out_dir": str(out_dir),
            "args": recipe_args(model_dir)}
    spec_path, out_path = work / f"spec_{method}.json", work / f"result_{method}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    common.torchrun(__spec__.name, args.ranks, ["--worker", str(spec_path), str(out_path)],  # this module
                    threads=args.threads, log_path=work / f"log_{method}.txt")
    return json.loads(out_path.read_text())


def compare_exports(hf_dir: Path, naive_file: Path) -> str:
    """Bit-compare the tensors of the HF export and of the naive file."""
    import torch
    from safetensors import safe_open

    naive = safe_open(str(naive_file), framework="pt")
    names = set(naive.keys())
    seen, differ = set(), []
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                seen.add(k)
                if k not in names or not torch.equal(st.get_tensor(k), naive.get_tensor(k)):
                    differ.append(k)
    missing = names - seen
    if not differ and not missing:
        return f"identical ({len(seen)} tensors)"
    return f"DIFFERENT: {len(differ)} tensors differ, {len(missing)} missing from the HF export"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_io", description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (and docs/benchmarks.md) for the method.")
    common.add_llama_args(p, layers=20)
    p.add_argument("--seq_len", type=int, default=32, help="tokens of the one training step")
    p.add_argument("--max_shard_size", default="200MB", help="HF export shard size (default 200MB)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    common.add_run_args(p)
    return p


def measure_methods(methods: list[str], work: Path, args) -> dict:
    """Build the model, run each method's launch, compare the two exports."""
    model_dir = common.build_llama(work, args, "fp32")
    counts = common.param_count(model_dir)
    model_bytes = counts["total"] * 4
    print(f"model: {counts['total'] / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} "
          f"layers, intermediate {args.intermediate}, vocab 512); one fp32 copy = "
          f"{common.mib(model_bytes)} MiB; {args.ranks} ranks x {args.threads} thread(s), gloo, "
          "FSDP2 via setup_model --low_cpu_fsdp, one AdamW step before saving", flush=True)
    results: dict[str, list[dict]] = {}
    foreign: dict[str, float] = {}
    for method in methods:
        t0 = time.perf_counter()
        load = common.ForeignLoad().start()
        results[method] = run_method(method, model_dir, work, args)
        foreign[method] = load.stop()
        print(f"  {method}: launch done in {time.perf_counter() - t0:.0f} s (other processes "
              f"used {foreign[method] or 0:.2f} cores meanwhile)", flush=True)
    check = None
    if "hf" in results and "naive" in results:
        check = compare_exports(work / "out_hf" / "hf", work / "out_naive" / "naive" / "model.safetensors")
    return {"counts": counts, "model_bytes": model_bytes, "results": results, "foreign": foreign,
            "check": check}


def table_rows(methods: list[str], results: dict, model_bytes: int) -> tuple[list, list]:
    """(the main table's rows, the per-rank detail rows): one per operation."""
    rows, detail = [], []
    for method in methods:
        recs = sorted(results[method], key=lambda r: r["rank"])
        r0 = recs[0]
        for i, op in enumerate(r0["ops"]):
            per_rank = [r["ops"][i] for r in recs]
            growth = [o["growth_exact"] if o["growth_exact"] is not None else o["growth_sampled"]
                      for o in per_rank]
            seconds = max(o["seconds"] for o in per_rank)
            is_save = "load" not in op["op"]
            fsync = r0.get("fsync_seconds", 0.0) if is_save else None
            rows.append([op["op"], f"{seconds:.1f}", "" if fsync is None else f"{fsync:.1f}",
                         " / ".join(common.mib(g) for g in growth),
                         f"{growth[0] / model_bytes:.2f}",
                         common.mib(r0["disk_bytes"]) if is_save else "(read)"])
            detail.append([op["op"], " / ".join(common.mib(o["rss_before"]) for o in per_rank),
                           " / ".join(common.mib(o["growth_sampled"]) for o in per_rank),
                           " / ".join("n/a" if o["growth_exact"] is None else common.mib(o["growth_exact"])
                                      for o in per_rank),
                           " / ".join(f"{o['seconds']:.1f}" for o in per_rank),
                           str(op.get("restored", "")),
                           "" if op.get("cached_before") is None else f"{op['cached_before']:.0%}"])
    return rows, detail


def report(methods: list[str], m: dict, args) -> None:
    results, model_bytes = m["results"], m["model_bytes"]
    rows, detail = table_rows(methods, results, model_bytes)
    r0 = sorted(next(iter(results.values())), key=lambda r: r["rank"])
    print()
    print("Per rank after set-up + 1 step: param shards "
          + " / ".join(common.mib(r["param_bytes"]) for r in r0) + " MiB, AdamW state "
          + " / ".join(common.mib(r["optim_bytes"]) for r in r0) + f" MiB. One fp32 model copy = "
          f"{common.mib(model_bytes)} MiB.")
    print()
    print(common.table(["method", "time s", "+fsync s", "peak RSS growth r0 / r1 MiB",
                        "r0 growth / model", "on disk MiB"], rows))
    print("(time: slower rank; +fsync: rank 0 fsync-ing the written files afterwards, DCP already "
          "does it; growth: kernel VmHWM - RSS before the call)")
    print()
    print(common.table(["method", "RSS before r0 / r1 MiB", "growth sampled 10 ms r0 / r1",
                        "growth exact (VmHWM) r0 / r1", "seconds r0 / r1", "restored",
                        "in page cache before"], detail))
    if "naive" in results:
        n0 = sorted(results["naive"], key=lambda r: r["rank"])
        print()
        print("naive phases: gather " + " / ".join(f"{r['gather_seconds']:.1f}" for r in n0)
              + f" s (r0 / r1), save_file {n0[0].get('write_seconds', 0):.1f} s; held after gather "
              + " / ".join(common.mib(r["held_bytes"]) for r in n0) + " MiB; RSS growth after gather "
              + " / ".join(common.mib(r["gather_growth"]) for r in n0) + " MiB")
    if "hf" in results:
        h0 = sorted(results["hf"], key=lambda r: r["rank"])[0]
        print(f"HF export wrote {len(h0['files'])} safetensors files ({args.max_shard_size} max each)")
    if m["check"]:
        print(f"HF export vs naive file: {m['check']}")


def main(argv=None) -> dict:
    p = parser()
    args = common.parse_or_work(p, argv, worker)
    if args is None:
        return {}
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods: {sorted(unknown)}")
    info = common.announce_machine("cpu", "note: other processes are using the CPU (affects the times only)")
    with common.work_folder(args.workdir, "shardtune_ckio_") as work:
        m = measure_methods(methods, work, args)
    report(methods, m, args)
    out = {"machine": info, "params": m["counts"], "model_bytes": m["model_bytes"], "ranks": args.ranks,
           "threads": args.threads, "max_shard_size": args.max_shard_size, "results": m["results"],
           "hf_vs_naive": m["check"], "other_processes_cores": m["foreign"]}
    return common.save_json(args.json, out)


if __name__ == "__main__":
    common.entry(main)  # a rank ends without interpreter teardown (see shardtune.exits)
