"""Helpers shared by the benchmarks: the prelude every driver runs (options, worker dispatch,
machine facts, work folder, entry point), launching torchrun, memory probes, CPU-contention
accounting and plain-text tables.

Nothing here is part of the shardtune package. Module level imports only the standard library:
the peer runners (``benchmarks.peer_runners``) import this module in the peer virtual
environment too. Formulas and constants come from ``shardtune`` (model FLOPs, GPU peaks, the
GEMM probe, ``IGNORE_INDEX``), imported where they are used.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# --------------------------------------------------------------------------- the prelude


def add_run_args(p) -> None:
    """The options every benchmark script shares: work folder, JSON output, worker entry."""
    import argparse

    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the model, outputs and rank logs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write all figures as JSON here")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)


def add_llama_args(p, *, layers: int) -> None:
    """The launch options of a torchrun benchmark on a random Llama (ranks, threads) and that
    Llama's sizes and seed, which ``build_llama`` reads."""
    p.add_argument("--ranks", type=int, default=2, help="ranks per launch (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--seed", type=int, default=0)


def parse_or_work(p, argv: Optional[Sequence[str]], worker: Callable[[str, str], None]):
    """Parse ``argv``; in a worker process (``--worker SPEC OUT``, how the driver launches its
    ranks) run ``worker`` and return None, else return the parsed options."""
    args = p.parse_args(argv)
    if getattr(args, "worker", None):
        worker(*args.worker)
        return None
    return args


def announce_machine(device: str = "cpu", busy_note: str = "note: other processes are using the CPU") -> dict:
    """Print the machine facts and, when other processes are busy now, ``busy_note`` with them."""
    info = machine_info(device)
    print_machine(info)
    busy = other_processes_busy()
    if busy:
        print(f"{busy_note}:\n  " + "\n  ".join(busy), flush=True)
    return info


def save_json(path: Optional[Path], out: dict) -> dict:
    """``--json``: all figures as JSON at ``path`` (if given); returns ``out``."""
    if path:
        Path(path).write_text(json.dumps(out, indent=2))
    return out


@contextmanager
def work_folder(workdir: Optional[Path], prefix: str) -> Iterator[Path]:
    """``workdir`` (created if needed, kept) or a temporary folder removed at the end."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)
    else:
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir


def entry(main: Callable[[Optional[list]], object], argv: Optional[list] = None) -> None:
    """Run a benchmark's ``main`` as a command (``python -m benchmarks.<name>``, the runner, and
    the torchrun ranks a driver launches): a shardtune user error is one paragraph and exit 2, a
    rank that started a process group ends without interpreter teardown
    (``shardtune.exits.run_with_clean_errors``), and an ``int`` that ``main`` returns is the exit
    status."""
    from shardtune.exits import run_with_clean_errors

    status: list = []
    run_with_clean_errors(lambda: status.append(main(argv)))
    if status and isinstance(status[0], int) and not isinstance(status[0], bool) and status[0]:
        sys.exit(status[0])


# --------------------------------------------------------------------------- launching


def write_gathered(env, record, out_path: str) -> None:
    """Gather every rank's ``record``; rank 0 writes the list as JSON to ``out_path``."""
    import torch.distributed as dist

    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, record)
    if env.is_main:
        Path(out_path).write_text(json.dumps(gathered))


def build_llama(root: Path, args, dtype_name: str = "fp32") -> Path:
    """A random Llama of ``args``' sizes (hidden, layers, heads, kv_heads, intermediate, seed),
    written once under ``root`` and reused by later runs."""
    import torch

    from shardtune.demo.tiny import build_tiny_llama

    path = root / f"llama_h{args.hidden}_l{args.layers}_i{args.intermediate}_s{args.seed}_{dtype_name}"
    if not (path / "config.json").is_file():
        print(f"building the model in {path} ...", flush=True)
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
        build_tiny_llama(path, seed=args.seed, dtype=dtype, hidden_size=args.hidden,
                         num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                         intermediate_size=args.intermediate, max_positions=512)
    return path


def torchrun(module: str, nproc: int, args: Sequence[str], *, threads: Optional[int] = None,
             log_path: Optional[Path] = None, result: Optional[Path] = None) -> Optional[str]:
    """Run ``python -m module args`` under ``torch.distributed.run --standalone`` with ``nproc``
    ranks (``module``: a benchmark's ``__name__``, e.g. ``benchmarks.throughput``). The ranks
    inherit the driver's working folder and environment, so ``benchmarks`` imports in them as it
    did in the driver.

    ``threads`` sets OMP_NUM_THREADS for every rank (torchrun would otherwise force 1 thread
    per rank whenever nproc > 1). Output goes to ``log_path``. A failed launch raises, unless
    ``result`` (written by rank 0 after all ranks finished their work) appeared during this
    launch: then a rank died while exiting, the figures are complete, and a warning is returned.
    """
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", module, *args]
    log_path = Path(log_path or os.devnull)
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode == 0:
        return None
    tail = log_path.read_text()[-6000:] if log_path != Path(os.devnull) else ""
    if result is not None and result.is_file() and result.stat().st_mtime >= started:
        first = next((ln for ln in tail.splitlines() if "terminate" in ln or "exitcode" in ln), "")
        return (f"torchrun exited with {proc.returncode} after rank 0 had written the results "
                f"(a rank died while shutting down: {first.strip()!r}; log: {log_path})")
    raise RuntimeError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


# --------------------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": cpu_model(),
            "cpu_cores": os.cpu_count(), "ram_gib": round(_mem_total_kib() / 2**20, 1)}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def _mem_total_kib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def print_machine(info: dict) -> None:
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))


# --------------------------------------------------------------------------- CPU contention


def _busy_jiffies() -> Optional[int]:
    """Non-idle CPU time of the whole machine (all cores), in clock ticks, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def reset_peak() -> None:
    """Restart the kernel's RSS high-water mark (VmHWM) from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def timed_steps(step: Callable[[], object], steps: int) -> dict:
    """One warm-up ``step()`` (optimizer state, compilation: timed apart as ``first_s``), then
    ``steps`` timed ones: ``step_s`` (their median), ``steps_s``, ``peak_added`` (the RSS high-water
    mark of the timed steps minus the RSS before the warm-up: what the steps add on top of the
    model) and ``other_cores`` (ForeignLoad over all of it)."""
    import statistics

    before = memory_now()["rss"]
    load = ForeignLoad().start()
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    reset_peak()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    other = load.stop()
    return {"first_s": first, "step_s": statistics.median(times), "steps_s": times, "other_cores": other,
            "peak_added": memory_now()["hwm"] - before}


class ForeignLoad:
    """How busy the machine was with *other* processes between ``start()`` and ``stop()``.

    other cores = (all non-idle CPU time on the machine - CPU time of this process and the
    children it waited for) / wall time. On a quiet machine it is ~0; 1.0 means another job kept
    one core busy the whole time, and throughput figures taken meanwhile are not trustworthy.
    """

    def __init__(self) -> None:
        self.other_cores: Optional[float] = None

    def start(self) -> "ForeignLoad":
        self._t, self._busy, self._own = time.perf_counter(), _busy_jiffies(), _own_cpu_seconds()
        return self

    def stop(self) -> Optional[float]:
        busy = _busy_jiffies()
        if busy is None or self._busy is None:
            return None
        wall = time.perf_counter() - self._t
        total = (busy - self._busy) / os.sysconf("SC_CLK_TCK")
        own = _own_cpu_seconds() - self._own
        self.other_cores = max(0.0, total - own) / max(wall, 1e-9)
        return self.other_cores


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25, window_s: float = 5.0) -> float:
    """Wait (up to ``max_wait_s``) until other processes use < ``threshold`` cores over a
    ``window_s`` window; returns the last measured load (in cores)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = ForeignLoad().start()
        time.sleep(window_s)
        other = load.stop() or 0.0
        if other < threshold or time.monotonic() >= deadline:
            return other
        print(f"  waiting for a quiet machine: other processes use {other:.2f} cores", flush=True)


def cpu_marks() -> tuple[Optional[int], float, float]:
    """(machine busy ticks, wall time, this process's CPU seconds), for ``other_cores``."""
    return _busy_jiffies(), time.perf_counter(), _own_cpu_seconds()


def other_cores(start: tuple, end: tuple, own_cpu_s: float) -> Optional[float]:
    """Cores used by other processes between two ``cpu_marks`` when the benchmark's own
    processes used ``own_cpu_s`` CPU seconds in total meanwhile."""
    if start[0] is None or end[0] is None:
        return None
    busy = (end[0] - start[0]) / os.sysconf("SC_CLK_TCK")
    return max(0.0, busy - own_cpu_s) / max(end[1] - start[1], 1e-9)


def other_processes_busy(threshold: float = 20.0) -> list[str]:
    """Other processes using > ``threshold`` % CPU right now (one short psutil sample)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the venv
        return []
    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct > threshold:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])[:100]
            busy.append(f"pid {p.pid} {pct:.0f}% {cmd}")
    return busy


# --------------------------------------------------------------------------- memory


def _status_kib(*keys: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            out[name] = int(rest.split()[0])
    return out


def _rollup_kib(*keys: str) -> dict[str, int]:
    out = {}
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        if name in keys:
            out[name] = int(rest.split()[0])
    return out


def memory_now(pss: bool = True) -> dict[str, int]:
    """This process's memory in bytes: rss, anon (RssAnon), file (RssFile), hwm (peak rss) and,
    with ``pss``, pss.

    ``hwm`` is the kernel's high-water mark of RSS (VmHWM, the same as ru_maxrss on Linux).
    RSS counts file pages mapped into the process (shared libraries, mmap-ed safetensors) as
    well as its private anonymous memory; PSS splits pages shared by several processes among them.
    PSS comes from smaps_rollup, which walks every page table: 39 ms of kernel time for a 2.4 GB
    process here, against 0.04 ms for /proc/self/status.
    """
    s = _status_kib("VmRSS", "RssAnon", "RssFile", "VmHWM")
    kib = {"rss": s.get("VmRSS", 0), "anon": s.get("RssAnon", 0), "file": s.get("RssFile", 0),
           "hwm": s.get("VmHWM", 0)}
    if pss:
        kib["pss"] = _rollup_kib("Pss").get("Pss", 0)
    if not kib["hwm"]:  # not Linux /proc: ru_maxrss (KiB on Linux, bytes on macOS)
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib["hwm"] = ru // 1024 if sys.platform == "darwin" else ru
    return {k: v * 1024 for k, v in kib.items()}


class PeakSampler:
    """Samples ``memory_now()`` in a background thread; keeps the peak of each field.

    The kernel keeps an exact peak only for total RSS (``hwm``); the peaks of anon, file and PSS
    are sampled every ``interval`` seconds, so a spike shorter than that can be missed.

    ``pss`` off (the default) samples /proc/self/status only. Sampling PSS every 5 ms during
    training kept one of the 2 cores busy in the kernel (smaps_rollup, 39 ms a read at 2.4 GB)
    and made the timed steps ~2x slower: use it only around phases that are not timed.
    """

    def __init__(self, interval: float = 0.005, pss: bool = False) -> None:
        self.interval = interval
        self.pss = pss
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for k, v in memory_now(self.pss).items():
            if v > self.peak.get(k, -1):
                self.peak[k] = v

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# --------------------------------------------------------------------------- data loader


class RecordingLoader:
    """Wraps a recipe's DataLoader (length and attributes pass through) and appends
    ``measure(batch)`` to ``records`` for every micro-batch as the recipe consumes it."""

    def __init__(self, loader, measure: Callable[[dict], Any]) -> None:
        self._loader, self._measure = loader, measure
        self.records: list = []

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        for batch in self._loader:
            self.records.append(self._measure(batch))
            yield batch


# --------------------------------------------------------------------------- models and tables


def param_count(model_dir: Path) -> dict[str, int]:
    """Parameter counts read from the safetensors headers (no tensors are loaded)."""
    from safetensors import safe_open

    total = embed = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
                if key.endswith("embed_tokens.weight"):
                    embed += n
    return {"total": total, "input_embedding": embed}


def safetensors_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def read_model_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def table(headers: Sequence[str], rows: Iterable[Sequence], align: str = "") -> str:
    """A GitHub-markdown table (also readable as plain text). ``align``: 'l'/'r' per column."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(cells, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([fmt(headers), sep, *(fmt(r) for r in rows)])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"
