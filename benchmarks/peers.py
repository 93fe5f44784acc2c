"""shardtune beside Hugging Face Trainer, TRL's SFTTrainer and torchtune: the same model, data,
batches, optimizer and steps, one table.

    python -m benchmarks.peers --setup                       # create the peer venv only
    python -m benchmarks.peers                               # CPU: 31.6M Llama, padded + packed
    python -m benchmarks.peers --size tiny                   # a 1-2 minute smoke run
    python -m benchmarks.peers --device cuda                 # GPU: a 1.2B Llama-3.2-1B-shaped model, bf16

(from the repository root; ``python -m benchmarks list`` names the declared scenarios).

The peer frameworks
-------------------
They run in their own virtual environment, ``.bench-venv/peers`` (``--venv``), created on first
use (or by ``--setup``) with ``torchtune==0.6.1``, ``torchao==0.14.1`` (the oldest torchao whose
``nf4tensor`` import path torchtune 0.6.1 still finds; 0.15+ moved it, 0.12 is refused by
torchtune) and ``trl==1.16.0``, from the package index. That venv is layered on shardtune's
``.venv`` (a ``.pth`` file puts ``.venv``'s site-packages after its own), so every framework runs
the same torch build (the CPU wheel here, the image's CUDA build on a GPU machine) and the same
transformers, accelerate and datasets; only what the peers add lives in it, and ``.venv`` is never
written to. A stamp file records what was installed; the venv is rebuilt when the package list
or ``.venv``'s location changes (``--rebuild_venv`` forces it).

What every framework trains (sameness)
--------------------------------------
* One random-initialised Llama, written once as a Hugging Face directory (``--size``): tiny
  (hidden 128, 2 layers, vocab 1024), small (hidden 512, 8 layers, 8 heads / 4 kv heads,
  intermediate 1376, vocab 8192: 31.6M parameters, fp32) or 1b (Llama-3.2-1B's shape: hidden
  2048, 16 layers, 32 / 8 heads, intermediate 8192, vocab 128256, tied embeddings, Llama 3's
  scaled RoPE: 1.24B parameters, saved in bf16). torchtune loads the same files through its HF
  checkpointer.
* Documents of random token ids (log-normal lengths, median a quarter of ``--seq_len``, at most
  ``--seq_len``), labels = inputs, written once.
* The same batches in the same order: the driver asks shardtune's recipe for its train loader
  (``setup_data``: its seeded shuffle, length-grouped padding batches, best-fit packing that keeps
  document boundaries) and writes the first ``--steps`` micro-batches as a plan; shardtune's run
  checks that it trains on exactly those, and the peers replay them with sequential samplers
  through their own collators. Padded: rows padded to the batch's longest. Packed: chunks of
  exactly ``--seq_len`` tokens, attention kept within each document by each framework's own
  mechanism (see the ``batch layout`` column).
* AdamW (``torch.optim.AdamW``, lr ``--lr``, betas (0.9, 0.999), eps 1e-8, weight decay 0),
  constant LR, no warm-up, no gradient clipping, no gradient accumulation, no activation
  checkpointing, no compilation, nothing saved. fp32 on CPU. On a GPU, bf16: shardtune, HF and
  TRL autocast with fp32 master weights; torchtune trains in pure bf16 (its way).
* The proof: the loss of step 1 (same weights, same batch) must agree across frameworks within
  ``--loss_tol`` (1e-4 in fp32); the table flags any row that does not, and the command then
  exits with status 3. Later losses drift apart slowly (summation order), so only the last one is
  shown.

What it measures (the same way for every row)
---------------------------------------------
* Each (framework, mode) runs in a fresh process on CPU (a clean memory peak), one process per
  framework on a GPU; each stamps the wall-clock end of every optimizer step (after a CUDA sync).
  tok/s = non-pad tokens of the timed steps / (end of the last step - end of the last warm-up
  step); the first ``--warmup`` steps are not timed.
* MFU = model FLOP/s / peak, with model FLOPs per step = ``6 N T + 12 L d sum(len^2)``
  (``shardtune.train.flops.model_flops``, as in benchmarks.throughput and the recipe's live MFU:
  N = parameters in matmuls, LM head included, T = non-pad tokens, the sum over documents). Peak:
  on CPU a measured fp32 GEMM (``shardtune.train.peak.gemm_rate``, same thread count, best of two
  probes taken before and after the runs); on a GPU the data-sheet dense bf16 peak of the card
  when known (``shardtune.train.peak``'s table: H100 SXM 989.4 TFLOP/s, PCIe 756.5, NVL 835.5),
  else a measured bf16 GEMM.
* Peak memory: CPU, the process's peak private anonymous RSS sampled every 5 ms from before the
  model is loaded (imports included; the level at that start is shown in brackets, as the
  frameworks import different amounts); GPU, ``torch.cuda.max_memory_allocated``.
* other cores: CPU time other processes used during the run; figures taken while it is well
  above 0 are low, and 2-thread runs suffer most (see docs/benchmarks.md).

Results and interpretation: docs/benchmarks.md ("Peers").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import common
from .peer_runners._runner import RESULT_PREFIX

REPO = common.REPO  # the runners start here, so ``benchmarks`` imports in the peer venv too
RUNNERS = f"{__package__}.peer_runners"

# shardtune_plain: shardtune with the peers' loss and optimizer kernels (--loss plain, torch's default
# AdamW implementation for the device), so its row isolates what the rest of the recipe gains.
FRAMEWORKS = ("shardtune", "shardtune_plain", "hf", "trl", "torchtune")
RUNNER_MODULES = {"shardtune": "shardtune_runner", "shardtune_plain": "shardtune_runner",
                  "hf": "hf_trainer", "trl": "trl_runner", "torchtune": "torchtune_runner"}
NAMES = {"shardtune": "shardtune", "shardtune_plain": "shardtune, peers' loss + AdamW kernel",
         "hf": "HF Trainer", "trl": "TRL SFTTrainer", "torchtune": "torchtune"}
SHARDTUNE = ("shardtune", "shardtune_plain")  # run in shardtune's own venv
MODES = ("padded", "packed")
# What each framework feeds the model (identical token content; see the runners' docstrings).
LAYOUT = {
    ("shardtune", "padded"): "pad to longest, causal only",
    ("shardtune_plain", "padded"): "pad to longest, causal only",
    ("hf", "padded"): "pad to longest, attention mask",
    ("trl", "padded"): "pad to longest, attention mask",
    ("torchtune", "padded"): "pad to longest, causal only",
    ("shardtune", "packed"): "[B, S] chunks, per-document SDPA from document lengths",
    ("shardtune_plain", "packed"): "[B, S] chunks, per-document SDPA from document lengths",
    ("hf", "packed"): "[B, S] chunks, position_ids per document",
    ("trl", "packed"): "padding-free [1, B*S], position_ids per document",
    ("torchtune", "packed"): "[B, S] chunks, block-causal mask from seq_lens",
}

PEER_PACKAGES = ("torchtune==0.6.1", "torchao==0.14.1", "trl==1.16.0")
DEFAULT_VENV = REPO / ".bench-venv" / "peers"
VENV_MARKER = ".shardtune-peers-venv"  # only a folder carrying it is ever deleted by --rebuild_venv
VENV_STAMP = ".peers-installed.json"

SIZES = {
    "tiny": dict(model=dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=352, vocab_size=1024),
                 batch_size=4, seq_len=128, steps=6, warmup=2, gemm_n=1024),
    # tiny with Llama 3.2's tied embeddings and scaled RoPE: the 1b model's torchtune path on a CPU
    "tiny32": dict(model=dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=352, vocab_size=1024, llama32=True),
                   batch_size=4, seq_len=128, steps=6, warmup=2, gemm_n=1024),
    "small": dict(model=dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                             intermediate_size=1376, vocab_size=8192),
                  batch_size=8, seq_len=512, steps=20, warmup=4, gemm_n=2048),  # ~20 min here
    "1b": dict(model=dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                          intermediate_size=8192, vocab_size=128256, llama32=True),
               batch_size=4, seq_len=2048, steps=20, warmup=5, gemm_n=8192),
}


# --------------------------------------------------------------------------- peer venv


def base_site_dirs() -> list[str]:
    """This interpreter's site-packages folders (.venv's, and a parent environment's when .venv
    is layered on one), in import order: the peer venv reads them after its own."""
    return [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))
            and Path(p).is_dir()]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def ensure_peer_venv(venv: Path, rebuild: bool = False) -> dict:
    """Create (or reuse) the peer venv; returns what was done, how long it took and its size."""
    want = {"packages": list(PEER_PACKAGES), "base": base_site_dirs(), "python": sys.version.split()[0]}
    stamp = venv / VENV_STAMP
    py = venv_python(venv)
    if not rebuild and py.exists() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return {"path": str(venv), "created": False, "packages": list(PEER_PACKAGES)}
    if venv.exists():
        if not (venv / VENV_MARKER).is_file() and any(venv.iterdir()):
            raise SystemExit(f"{venv} exists and was not made by this script; choose another --venv")
        shutil.rmtree(venv)
    print(f"creating the peer venv {venv} ({', '.join(PEER_PACKAGES)}) ...", flush=True)
    t0 = time.perf_counter()
    venv.parent.mkdir(parents=True, exist_ok=True)
    # --without-pip: GPU images' system Pythons often lack ensurepip (scripts/setup.sh does the same).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / VENV_MARKER).write_text("created by benchmarks.peers\n")
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Plain path lines: .venv's folders come after the peer venv's own, so what pip installs
    # here wins, and pip counts what .venv has as installed (it never touches .venv).
    (Path(purelib) / "_shardtune_base.pth").write_text("\n".join(want["base"]) + "\n")
    log = venv / "install.log"
    with open(log, "w") as f:
        # pip itself comes from .venv (or its parent) through that path, installing into this venv.
        if subprocess.run([str(py), "-m", "pip", "--version"], stdout=f, stderr=subprocess.STDOUT).returncode:
            subprocess.run([str(py), "-m", "ensurepip"], stdout=f, stderr=subprocess.STDOUT, check=True)
        proc = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check",
                               *PEER_PACKAGES], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"pip install into {venv} failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    check = subprocess.run(
        [str(py), "-c", "import torch, transformers, trl, torchtune, torchao; "
                        f"from {RUNNERS} import torchtune_runner; "
                        "torchtune_runner.load_recipe_class(); "
                        "print('torch', torch.__version__, 'transformers', transformers.__version__, "
                        "'trl', trl.__version__, 'torchtune', torchtune.__version__, 'torchao', torchao.__version__)"],
        capture_output=True, text=True, cwd=REPO)
    if check.returncode != 0:
        raise SystemExit(f"the peer venv {venv} does not import its frameworks:\n{check.stderr[-4000:]}")
    stamp.write_text(json.dumps(want))
    info = {"path": str(venv), "created": True, "seconds": round(time.perf_counter() - t0, 1),
            "bytes": dir_bytes(venv), "packages": list(PEER_PACKAGES),
            "imports": check.stdout.strip().splitlines()[-1]}
    print(f"peer venv ready in {info['seconds']:.0f} s, {info['bytes'] / 2**20:,.0f} MiB on disk: "
          f"{info['imports']}", flush=True)
    return info


# --------------------------------------------------------------------------- model and data


def build_model(path: Path, shape: dict, seq_len: int, seed: int, dtype_name: str, device: str) -> Path:
    """A random-initialised Llama + shardtune's demo tokenizer (only its pad/bos/eos ids matter:
    the data are token ids), written once. Initialised on ``device`` (a 1B model's random init
    takes a while on a CPU)."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.demo.tiny import build_tokenizer

    print(f"building the model in {path} ...", flush=True)
    tok = build_tokenizer(model_max_length=seq_len)
    llama32 = shape.get("llama32", False)
    rope = ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} if llama32
            else {"rope_type": "default", "rope_theta": 10000.0})
    config = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=131072 if llama32 else seq_len, rms_norm_eps=1e-5,
        rope_parameters=rope, tie_word_embeddings=llama32, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if dtype_name == "bf16" else torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(path)
    return path


def write_docs(path: Path, *, vocab: int, seq_len: int, batch_size: int, steps: int, seed: int,
               first_id: int = 4) -> dict:
    """Enough random-token documents for ``steps`` padded batches and ``steps`` packed ones,
    whatever the recipe's shuffle picks. Ids start at ``first_id``: the tokenizer's special ids
    (pad among them) never occur inside a document."""
    rng = random.Random(seed)
    docs, total = [], 0
    need_tokens = 1.25 * steps * batch_size * seq_len  # packing fills ~99% of each chunk
    while total < need_tokens or len(docs) < 2 * steps * batch_size:
        n = int(min(seq_len, max(8, rng.lognormvariate(math.log(seq_len / 4), 0.7))))
        docs.append([rng.randrange(first_id, vocab) for _ in range(n)])
        total += n
    path.write_text(json.dumps({"docs": docs}))
    lens = sorted(len(d) for d in docs)
    return {"docs": len(docs), "tokens": total, "min": lens[0], "median": lens[len(lens) // 2],
            "mean": round(total / len(docs), 1), "max": lens[-1]}


def write_plan(path: Path, spec: dict, mode: str, pad_id: int) -> dict:
    """The recipe's first ``steps`` batches as rows, with per-step token counts and checksums."""
    from .peer_runners.shardtune_runner import plan_batches

    steps, stats, checksums = [], [], []
    for batch in plan_batches(spec, mode):
        ids, labels = batch["input_ids"], batch["labels"]
        rows, sq = [], 0
        for r in range(ids.shape[0]):
            if mode == "packed":
                pos = batch["position_ids"][r].tolist()
                starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
                lens = [b - a for a, b in zip(starts, starts[1:])]
                sq += sum(n * n for a, n in zip(starts, lens) if int(ids[r, a]) != pad_id)
                rows.append({"input_ids": ids[r].tolist(), "labels": labels[r].tolist(),
                             "position_ids": pos, "seq_lens": lens})
            else:
                n = int(batch["attention_mask"][r].sum())
                sq += n * n
                rows.append({"input_ids": ids[r, :n].tolist(), "labels": labels[r, :n].tolist()})
        nonpad = int((ids != pad_id).sum())
        steps.append(rows)
        stats.append({"nonpad": nonpad, "slots": ids.numel(), "sum_sq": sq})
        checksums.append(int(ids[ids != pad_id].sum()))
    path.write_text(json.dumps({"mode": mode, "pad_id": pad_id, "batch_size": spec["batch_size"],
                                "seq_len": spec["seq_len"], "steps": steps, "checksums": checksums,
                                "stats": stats}))
    return {"stats": stats}


# --------------------------------------------------------------------------- runs


def run_one(framework: str, python: Path, spec: dict, modes: list[str], work: Path,
            timeout: float) -> tuple[list[dict], Optional[float], str]:
    """One runner process for ``modes``; -> (results, other cores meanwhile, error or "")."""
    spec = {**spec, "modes": modes, "framework": framework}
    tag = f"{framework}_{'_'.join(modes)}"
    spec_path, log_path = work / f"spec_{tag}.json", work / f"log_{tag}.txt"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", WANDB_DISABLED="true", PYTHONUNBUFFERED="1")
    if spec["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    load = common.ForeignLoad().start()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(python), "-m", f"{RUNNERS}.{RUNNER_MODULES[framework]}", str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
        finally:  # also when this driver is stopped (Ctrl-C, SIGTERM from `timeout`)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    other = load.stop()
    text = log_path.read_text()
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in text.splitlines()
               if line.startswith(RESULT_PREFIX)]
    for r in results:
        r["seconds"] = time.perf_counter() - t0
    error = ""
    if code != 0 or len(results) != len(modes):
        tail = "\n".join(text.splitlines()[-25:])
        error = f"{framework} {'/'.join(modes)} failed (exit {code}; log {log_path}):\n{tail}"
    return results, other, error


def analyse(result: dict, stats: list[dict], warmup: int, shape, peak: float) -> dict:
    """One run's figures; ``shape``: the model's ``shardtune.train.flops.ModelShape``."""
    from shardtune.train.flops import mfu, model_flops

    ends, steps = result["step_ends"], len(stats)
    if len(ends) != steps:
        raise SystemExit(f"{result['framework']} {result['mode']}: {len(ends)} step stamps for {steps} steps")
    timed = stats[warmup:]
    wall = ends[-1] - ends[warmup - 1]
    tokens = sum(s["nonpad"] for s in timed)
    flops = sum(model_flops(shape, s["nonpad"], s["sum_sq"]) for s in timed)
    losses = result["losses"]
    return {"framework": result["framework"], "mode": result["mode"], "timed_steps": len(timed),
            "wall_s": wall, "nonpad_tokens": tokens, "tok_s": tokens / wall,
            "model_flop_s": flops / wall, "mfu": mfu(flops, wall, peak),
            "peak_mem": result["memory"]["peak_bytes"], "memory": result["memory"],
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses": losses, "versions": result.get("versions", {}),
            "command": result.get("command"), "process_seconds": result.get("seconds")}


def _stop_on_sigterm() -> None:
    """SIGTERM (``timeout``, a job scheduler) unwinds like Ctrl-C, so the running runner is killed
    rather than left training on its own."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="small (CPU default), 1b (GPU default), tiny, tiny32 (tiny with the 1b's "
                        "tied embeddings and scaled RoPE)")
    p.add_argument("--modes", default="padded,packed")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--steps", type=int, default=None, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=None, help="steps not timed (at the start)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=None, help="longest document / packed chunk length")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss_tol", type=float, default=None,
                   help="allowed step-1 loss difference (default 1e-4 fp32, 3e-2 bf16)")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the peer virtual environment")
    p.add_argument("--setup", action="store_true", help="create the peer venv and stop")
    p.add_argument("--rebuild_venv", action="store_true")
    p.add_argument("--process_per", choices=("run", "framework"), default=None,
                   help="a fresh process per (framework, mode) run (CPU default: each memory peak is "
                        "the run's own) or one per framework for all modes (GPU default; fewer "
                        "start-ups, but on CPU a later mode's RSS peak includes what the earlier left)")
    p.add_argument("--run_timeout", type=float, default=3600, help="seconds per runner process")
    p.add_argument("--wait_quiet", type=float, default=0, metavar="SECONDS",
                   help="before each runner process wait up to SECONDS for other processes to use "
                        "< 0.25 cores (a shared machine); default 0: do not wait")
    p.add_argument("--workdir", type=Path, default=None, help="keep model, data, plans and logs here")
    p.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    return p


@dataclass
class Settings:
    """The options resolved: the size's defaults filled in, the lists split."""

    frameworks: list[str]
    modes: list[str]
    gpu: bool
    size: str
    dtype: str
    steps: int
    warmup: int
    batch_size: int
    seq_len: int
    tol: float
    threads: int

    @property
    def defaults(self) -> dict:
        return SIZES[self.size]


def settings(p: argparse.ArgumentParser, args) -> Settings:
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [f for f in frameworks if f not in FRAMEWORKS] + [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown {bad}: frameworks are {FRAMEWORKS}, modes {MODES}")
    gpu = args.device == "cuda"
    size = args.size or ("1b" if gpu else "small")
    d = SIZES[size]
    dtype = "bf16" if gpu else "fp32"
    steps, warmup = args.steps or d["steps"], args.warmup if args.warmup is not None else d["warmup"]
    if not 1 <= warmup < steps:
        p.error("need 1 <= --warmup < --steps")
    tol = args.loss_tol if args.loss_tol is not None else (1e-4 if dtype == "fp32" else 3e-2)
    return Settings(frameworks=frameworks, modes=modes, gpu=gpu, size=size, dtype=dtype, steps=steps,
                    warmup=warmup, batch_size=args.batch_size or d["batch_size"],
                    seq_len=args.seq_len or d["seq_len"], tol=tol,
                    threads=args.threads or os.cpu_count() or 1)


def prepare(work: Path, st: Settings, args) -> tuple[dict, dict, dict]:
    """The model, the documents and one batch plan per mode, written under ``work``;
    -> (the runners' spec, the data's figures, per mode the plan's per-step token counts)."""
    shape = st.defaults["model"]
    model_dir = build_model(work / f"llama_{st.size}_s{args.seed}", shape, st.seq_len, args.seed,
                            "bf16" if st.size == "1b" else "fp32", args.device)
    pad_id = json.loads((model_dir / "config.json").read_text())["pad_token_id"]
    docs = work / f"docs_{st.size}_{st.seq_len}_{st.batch_size}_{st.steps}_s{args.seed}.json"
    data = write_docs(docs, vocab=shape["vocab_size"], seq_len=st.seq_len, batch_size=st.batch_size,
                      steps=st.steps, seed=args.seed)
    from shardtune.batches import IGNORE_INDEX

    spec = {"model_dir": str(model_dir), "docs": str(docs), "device": args.device, "dtype": st.dtype,
            "steps": st.steps, "batch_size": st.batch_size, "seq_len": st.seq_len, "lr": args.lr,
            "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "seed": args.seed,
            "threads": st.threads, "pad_id": pad_id, "ignore_index": IGNORE_INDEX, "workdir": str(work),
            "plans": {}}
    n_mm = model_shape(model_dir).matmul_params
    n_total = common.param_count(model_dir)["total"]
    print(f"model: {st.size}, {n_total / 1e6:.1f}M parameters ({n_mm / 1e6:.1f}M in matmuls with the LM head), "
          f"hidden {shape['hidden_size']}, {shape['num_layers']} layers, {shape['num_heads']}/"
          f"{shape['num_kv_heads']} heads, intermediate {shape['intermediate_size']}, vocab "
          f"{shape['vocab_size']}; {args.device} {st.dtype}")
    print(f"data: {data['docs']} documents of random token ids, length min {data['min']} median "
          f"{data['median']} mean {data['mean']} max {data['max']}; batch {st.batch_size}, seq_len "
          f"{st.seq_len}, {st.steps} steps ({st.warmup} warm-up)", flush=True)
    stats = {}
    for mode in st.modes:
        plan = work / f"plan_{mode}.json"
        stats[mode] = write_plan(plan, spec, mode, pad_id)["stats"]
        spec["plans"][mode] = str(plan)
    return spec, data, stats


def model_shape(model_dir: Path):
    """The sizes ``shardtune.train.flops`` counts FLOPs with, from the written model's config."""
    from transformers import AutoConfig

    from shardtune.train.flops import ModelShape

    return ModelShape.from_config(AutoConfig.from_pretrained(model_dir))


def run_frameworks(spec: dict, st: Settings, args, work: Path) -> tuple[list[dict], list[str], dict]:
    """Every framework's runner processes; -> (results, errors, other cores per (framework, mode))."""
    results, errors, loads = [], [], {}
    for fw in st.frameworks:
        python = Path(sys.executable) if fw in SHARDTUNE else venv_python(args.venv.resolve())
        per_run = (args.process_per or ("framework" if st.gpu else "run")) == "run"
        groups = [[m] for m in st.modes] if per_run else [st.modes]
        for group in groups:
            if args.wait_quiet > 0:
                common.wait_for_quiet(args.wait_quiet)
            print(f"running {NAMES[fw]} {'/'.join(group)} ...", flush=True)
            res, other, err = run_one(fw, python, spec, group, work, args.run_timeout)
            for r in res:
                loads[(fw, r["mode"])] = other
            results += res
            if err:
                errors.append(err)
                print(err, flush=True)
    return results, errors, loads


def cpu_peak_probe(st: Settings) -> float:
    """Best FLOP/s of the fp32 GEMM probe, with the runs' thread count."""
    import torch

    from shardtune.train.peak import gemm_rate

    return gemm_rate("cpu", torch.float32, st.defaults["gemm_n"]).best


def mfu_peak(st: Settings, probes: list[float]) -> tuple[float, str]:
    """(FLOP/s, what it is) that MFU divides by: on a GPU the data-sheet figure of a known card
    (``shardtune.train.peak``'s table), else a measured bf16 GEMM; on CPU the best of ``probes``."""
    import torch

    from shardtune.train.peak import gemm_rate, table_peak

    n = st.defaults["gemm_n"]
    if not st.gpu:
        return max(probes), f"measured fp32 GEMM ({n}^3, {st.threads} threads, best of 2 x 6)"
    name = torch.cuda.get_device_name(0)
    known = table_peak(name, torch.bfloat16)
    if known is not None:
        return known.flops, known.source
    return gemm_rate("cuda", torch.bfloat16, n, reps=20).best, f"measured bf16 GEMM ({n}^3) on the {name}"


def measure(work: Path, st: Settings, args) -> dict:
    """Prepare, run every framework, and analyse: everything the report prints."""
    spec, data, stats = prepare(work, st, args)
    probes = [] if st.gpu else [cpu_peak_probe(st)]
    results, errors, loads = run_frameworks(spec, st, args, work)
    if not st.gpu:
        probes.append(cpu_peak_probe(st))
    peak, peak_kind = mfu_peak(st, probes)
    shape = model_shape(Path(spec["model_dir"]))
    rows = [analyse(r, stats[r["mode"]], st.warmup, shape, peak) for r in results]
    for row in rows:
        row["other_cores"] = loads.get((row["framework"], row["mode"]))
        row["layout"] = LAYOUT[(row["framework"], row["mode"])]
    return {"rows": rows, "errors": errors, "data": data, "peak": peak, "peak_kind": peak_kind,
            "matmul_params": shape.matmul_params}


def report(m: dict, st: Settings, args, *, info: dict, venv_info: Optional[dict], seconds: float) -> int:
    """Print the table and the notes, write ``--out``; -> the exit status (1 failed run, 3 a
    step-1 loss that disagrees)."""
    rows, errors, peak = m["rows"], m["errors"], m["peak"]
    mismatch = check_losses(rows, st.modes, st.tol)
    print()
    print(render(rows, st.modes, st.frameworks, st.gpu, st.tol))
    print()
    print(f"peak for MFU: {peak / 1e9:,.1f} GFLOP/s ({m['peak_kind']}); model FLOPs per step = 6*N*T + "
          f"12*L*d*sum(doc_len^2), N = {m['matmul_params']:,}")
    versions = {k: v for r in rows for k, v in r["versions"].items()}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    print(f"whole command: {seconds:.0f} s")
    for problem in mismatch:
        print(f"LOSS MISMATCH: {problem}")
    for e in errors:
        print(f"FAILED: {e.splitlines()[0]}")
    if args.out:
        args.out.write_text(json.dumps({
            "machine": info, "size": st.size, "dtype": st.dtype, "steps": st.steps, "warmup": st.warmup,
            "batch_size": st.batch_size, "seq_len": st.seq_len, "lr": args.lr, "threads": st.threads,
            "data": m["data"], "matmul_params": m["matmul_params"], "peak_flop_s": peak,
            "peak_kind": m["peak_kind"], "peer_venv": venv_info, "loss_tol": st.tol, "mismatch": mismatch,
            "errors": errors, "versions": versions, "rows": rows}, indent=1))
    if errors:
        return 1
    return 3 if mismatch else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    _stop_on_sigterm()
    st = settings(p, args)
    peers = [f for f in st.frameworks if f not in SHARDTUNE]
    venv_info = ensure_peer_venv(args.venv.resolve(), args.rebuild_venv) if peers or args.setup else None
    if args.setup:
        return 0
    import torch

    if st.gpu and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    torch.set_num_threads(st.threads)
    info = common.announce_machine(args.device, "WARNING: other processes are using the CPU now; figures will be low")
    t_start = time.perf_counter()
    with common.work_folder(args.workdir, "shardtune_peers_") as work:
        m = measure(work, st, args)
    return report(m, st, args, info=info, venv_info=venv_info, seconds=time.perf_counter() - t_start)


def check_losses(rows: list[dict], modes: list[str], tol: float) -> list[str]:
    """Step-1 losses per mode against shardtune's (or the first row's); marks each row."""
    problems = []
    for mode in modes:
        group = [r for r in rows if r["mode"] == mode and r["loss_first"] is not None]
        if not group:
            continue
        ref = next((r for r in group if r["framework"] == "shardtune"), group[0])
        for r in group:
            r["loss_first_diff"] = r["loss_first"] - ref["loss_first"]
            r["same_first_loss"] = abs(r["loss_first_diff"]) <= tol
            if not r["same_first_loss"]:
                problems.append(f"{NAMES[r['framework']]} {mode}: step-1 loss {r['loss_first']:.6f} vs "
                                f"{NAMES[ref['framework']]} {ref['loss_first']:.6f} (|diff| > {tol:g})")
    return problems


def render(rows: list[dict], modes: list[str], frameworks: list[str], gpu: bool, tol: float) -> str:
    mem = "peak GPU mem GiB (at start)" if gpu else "peak RSS GiB (at start)"
    out = []
    for mode in modes:
        base = next((r for r in rows if r["mode"] == mode and r["framework"] == "shardtune"), None)
        for fw in frameworks:
            r = next((r for r in rows if r["mode"] == mode and r["framework"] == fw), None)
            if r is None:
                out.append([NAMES[fw], mode, LAYOUT[(fw, mode)], "failed", "", "", "", "", "", "", "", ""])
                continue
            same = "yes" if r.get("same_first_loss") else "**NO**"
            out.append([
                NAMES[fw], mode, r["layout"], f"{r['timed_steps']}", f"{r['tok_s']:,.0f}",
                f"{base['tok_s'] / r['tok_s']:.2f}x" if base else "-", f"{r['mfu']:.1%}",
                f"{r['peak_mem'] / 2**30:.2f} ({r['memory']['start_bytes'] / 2**30:.2f})",
                f"{r['loss_first']:.5f}",
                f"{r['loss_last']:.5f}", f"{r['loss_first_diff']:+.1e} {same}",
                "?" if r["other_cores"] is None else f"{r['other_cores']:.2f}"])
    return common.table(
        ["framework", "mode", "batch layout", "timed steps", "non-pad tok/s", "shardtune speed-up",
         "MFU", mem, "loss step 1", "loss last step", f"step-1 loss vs shardtune (tol {tol:g})",
         "other cores"], out, align="lll" + "r" * 9)


if __name__ == "__main__":
    common.entry(main)
