"""Peak host memory and wall time of turning a sharded DCP checkpoint into a Hugging Face folder.

    python -m benchmarks.convert [--optimizer] [--work DIR] [--layers 24] [--hidden 1024] [--json out.json]

What it measures
----------------
A random Llama (default: hidden 1024, 24 layers, 16 heads, intermediate 2816, vocab 32000:
374M parameters, 1.50 GB in fp32) is sharded with FSDP2 over 2 gloo ranks (each rank holds only
its shards) and saved as a shardtune run saves its model state: ``dcp.save({"model":
get_model_state_dict(model)})`` -> ``__0_0.distcp``, ``__1_0.distcp``, ``.metadata``, plus a
``train_params.yaml`` naming the model folder (config.json + tokenizer). With ``--optimizer`` the
checkpoint also holds ``"optim"`` (AdamW state, 2x the model), as a step checkpoint does. Each
method then runs in a fresh process:

* ``shardtune convert``: ``python -m shardtune.convert CKPT OUT`` (default ``--max_shard_size
  5GB``, i.e. one output shard holding the whole model here), and again with ``--max_shard_size
  500MB``;
* ``dcp_to_torch_save + save_pretrained``: ``torch.distributed.checkpoint.format_utils.
  dcp_to_torch_save(CKPT, full.pt)``, ``torch.load(full.pt)``, a model built from the config on
  the meta device, ``load_state_dict(assign=True)`` (no random init, no copy), ``save_pretrained``;
* ``cp -r``: copying the checkpoint folder (the page-cache floor; not a conversion), and ``cp -r``
  followed by ``sync`` of the copy (the disk floor for a writer that fsyncs, as the converter does);
* ``python -c 'import torch, transformers'``: the start-up every Python conversion pays.

A sampling thread reads the process tree's RSS and RssAnon (private memory: tensors, heaps) from
/proc every 10 ms; peak RSS also counts file pages the process maps (shared libraries). Wall time
is the process's whole life, imports included. The checkpoint was just written, so reads come
from the page cache for every method. The outputs of the two conversions are compared tensor by
tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import common


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; peak RSS / RssAnon of its process tree (sampled every 10 ms) and wall time."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"rss": 0, "anon": 0}
    done = threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not done.is_set():
            try:
                pids = [root.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.Error:
                pids = [proc.pid]
            peaks["rss"] = max(peaks["rss"], sum(_status_kib(p, "VmRSS") for p in pids))
            peaks["anon"] = max(peaks["anon"], sum(_status_kib(p, "RssAnon") for p in pids))
            done.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peaks["rss"] / 1024, 1),
            "peak_anon_mib": round(peaks["anon"] / 1024, 1), "log_tail": out[-600:]}


# --------------------------------------------------------------------------- the checkpoint


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def _save_rank(rank: int, world: int, model_dir: str, ckpt: str, port: int, optimizer: bool) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(1000 + rank)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(0.0, 0.02, generator=gen)
    state = {"model": get_model_state_dict(model)}
    if optimizer:  # AdamW state (exp_avg, exp_avg_sq: 2x the model), as a step checkpoint holds
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optim.step()
        state["optim"] = get_optimizer_state_dict(model, optim)
    dcp.save(state, checkpoint_id=ckpt)
    dist.barrier()
    dist.destroy_process_group()


def make_checkpoint(args, work: Path) -> tuple[Path, Path, int]:
    import torch.multiprocessing as mp
    import yaml

    from shardtune.demo.tiny import build_tokenizer

    model_dir, ckpt = work / "model", work / "ckpt" / "step-000100"
    model_dir.mkdir(parents=True)
    config = _config(args)
    config.save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    ckpt.parent.mkdir(parents=True)
    mp.start_processes(_save_rank, args=(2, str(model_dir), str(ckpt), args.port, args.optimizer), nprocs=2,
                       start_method="spawn")
    (ckpt / "train_params.yaml").write_text(yaml.safe_dump({"train_config": {"model_name": str(model_dir)}}))
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    return model_dir, ckpt, size


BASELINE = r"""
import sys, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM
ckpt, model_dir, work, out = sys.argv[1:5]
dcp_to_torch_save(ckpt, f"{work}/full.pt")
state = torch.load(f"{work}/full.pt", weights_only=True)["model"]
with init_empty_weights(include_buffers=False):
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
model.load_state_dict(state, assign=True)
model.tie_weights()
model.save_pretrained(out)
"""


def same_outputs(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict:
        where = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as h:
                where.update({k: f for k in h.keys()})
        return where

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    for key in ia:
        with safe_open(str(ia[key]), framework="pt") as ha, safe_open(str(ib[key]), framework="pt") as hb:
            if not torch.equal(ha.get_tensor(key), hb.get_tensor(key)):
                return False
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--port", type=int, default=29641)
    ap.add_argument("--optimizer", action="store_true",
                    help="also save AdamW state in the checkpoint (3x the model's bytes in all)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # The conversions inherit this process's environment: the same shardtune (installed, or PYTHONPATH).
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    try:
        t0 = time.perf_counter()
        model_dir, ckpt, size = make_checkpoint(args, work)
        print(f"checkpoint: {ckpt} ({size / 1e9:.2f} GB, {len(list(ckpt.glob('*.distcp')))} shard files), "
              f"written in {time.perf_counter() - t0:.0f} s", flush=True)
        py = sys.executable
        methods = {
            "shardtune convert (5GB shards)": [py, "-m", "shardtune.convert", str(ckpt), str(work / "out-st")],
            "shardtune convert (500MB shards)": [py, "-m", "shardtune.convert", str(ckpt), str(work / "out-st500"),
                                                 "--max_shard_size", "500MB"],
            "dcp_to_torch_save + save_pretrained": [py, "-c", BASELINE, str(ckpt), str(model_dir), str(work),
                                                    str(work / "out-dcp")],
            "cp -r": ["cp", "-r", str(ckpt), str(work / "copy")],
            # the converter fsyncs what it writes (a finished conversion survives a power loss);
            # the fair disk floor for it is a copy that is also flushed to disk
            "cp -r + sync": ["sh", "-c", f'cp -r "{ckpt}" "{work / "copy-sync"}" && sync "{work / "copy-sync"}"/*'],
            # what any Python conversion pays before reading a byte: interpreter, torch, transformers
            "python -c 'import torch, transformers'": [py, "-c", "import torch, transformers"],
        }
        for old in ("out-st", "out-st500", "out-dcp", "copy", "copy-sync", "full.pt"):  # a reused --work
            shutil.rmtree(work / old, ignore_errors=True) if (work / old).is_dir() else (work / old).unlink(missing_ok=True)
        results = {}
        for name, cmd in methods.items():
            results[name] = measure(cmd, env)
            r = results[name]
            print(f"{name:<40} wall {r['wall_s']:>6.1f} s   peak RSS {r['peak_rss_mib']:>7.0f} MiB   "
                  f"peak RssAnon {r['peak_anon_mib']:>7.0f} MiB", flush=True)
        same = same_outputs(work / "out-st", work / "out-dcp") and same_outputs(work / "out-st500", work / "out-dcp")
        print(f"outputs identical (shardtune vs dcp_to_torch_save + save_pretrained): {same}")
        report = {"checkpoint_bytes": size, "model": vars(args), "results": results, "outputs_identical": same,
                  "machine": common.machine_info()}
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    common.entry(main)
