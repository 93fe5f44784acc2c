"""``shardtune plan``: will this run fit, and how long will a step take?

    shardtune plan --size 70b --enable_fsdp --nnodes 2 --nproc_per_node 8 [training flags] [--json]
    shardtune plan --model_name /models/Llama-3.1-8B --use_peft --nproc_per_node 8 --enable_fsdp

The training flags are the recipe's own (parsed and validated by ``shardtune.config.parse_args``,
so names, types and refusals are those of ``shardtune finetune``); torchrun's launch options are
accepted, and ``--nnodes`` / ``--nproc_per_node`` set the layout. Planner options:

  --size 1b|3b|8b|70b|405b   a Llama 3.x shape instead of --model_name (only config.json is read)
  --gpu NAME                 h100 (default), h100-pcie, h200, a100, a100-40gb, l40s, l4, v100, mi300x
  --gpu_memory SIZE          memory per GPU: 80 (GiB), 80GiB, 80GB (10^9 bytes); default: the --gpu's
  --host_memory SIZE         RAM per host, to judge loading and CPU offload (not judged if absent)
  --peak_tflops X            dense peak TFLOP/s per GPU in the compute dtype; default: the --gpu's
  --mfu X                    assumed model-FLOPs utilisation for the step time (default 0.4)
  --json                     print the estimate as JSON (sizes in bytes)
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from ..config import ConfigError, parse_args
from .advise import Planner, Run, suggest
from .estimate import GiB, Hardware, dtypes_for
from .hardware import gpu_named, parse_size
from .report import render_text, to_json
from .shapes import model_config, size_config

_VALUED = ("size", "gpu", "gpu_memory", "host_memory", "peak_tflops", "mfu")
_DEFAULT_MODEL = "PATH/to/Model"  # train_config's default: --model_name was not given


def split_planner_args(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """Pull the planner's own options out of ``argv``; the rest are training and launch flags."""
    opts: dict = {"json": False}
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        tok = args[i]
        name, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        if name == "json":
            opts["json"] = True
        elif name in _VALUED:
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError(f"--{name} needs a value (for example --{name} VALUE).")
                value = args[i + 1]
                i += 1
            opts[name] = value
        else:
            rest.append(tok)
        i += 1
    return opts, rest


def _launch_sizes(launch: list[str]) -> tuple[int, int]:
    sizes = {"nnodes": 1, "nproc_per_node": 1}
    for i, tok in enumerate(launch):
        name, eq, value = tok[2:].partition("=")
        if name in sizes:
            value = value if eq else launch[i + 1]
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--{name} must be a whole number of at least 1 for shardtune plan; got {value!r} "
                                  "(a range such as 1:4 is an elastic launch, plan one size of it).")
            sizes[name] = int(value)
    return sizes["nnodes"], sizes["nproc_per_node"]


def _number(text: Optional[str], flag: str, default: float, low: float, high: float) -> float:
    if text is None:
        return default
    raw = str(text).strip()
    scale = 0.01 if raw.endswith("%") else 1.0
    try:
        value = float(raw.rstrip("%")) * scale
    except ValueError:
        value = float("nan")
    if not low < value <= high:
        raise ConfigError(f"{flag} must be a number in ({low:g}, {high:g}]; got {text!r}.")
    return value


def hardware_for(opts: dict, cfg, nproc_per_node: int) -> Hardware:
    device = "cpu" if cfg.train.device.value == "cpu" else "cuda"
    mfu = _number(opts.get("mfu"), "--mfu", 0.4, 0.0, 1.0)
    host = parse_size(opts["host_memory"], "--host_memory") if opts.get("host_memory") else None
    # train_config may carry the same figure (a YAML written for the recipe's live MFU)
    given = opts.get("peak_tflops") or getattr(cfg.train, "peak_tflops", None)
    peak = _number(given, "--peak_tflops", 0.0, 0.0, 1e6) * 1e12
    if device == "cpu":
        per_rank = parse_size(opts["gpu_memory"], "--gpu_memory") if opts.get("gpu_memory") else (
            host // nproc_per_node if host else None)
        return Hardware("CPU", "cpu", per_rank, host, peak, "--peak_tflops", mfu, bf16=False)
    gpu = gpu_named(opts.get("gpu"))
    memory = parse_size(opts["gpu_memory"], "--gpu_memory") if opts.get("gpu_memory") else int(gpu.memory_gib * GiB)
    compute = dtypes_for(cfg, "cuda", gpu.bf16).compute
    half = compute.itemsize == 2
    source = "--peak_tflops" if peak else f"{gpu.name} dense {'bf16/fp16' if half else 'fp32'} peak"
    peak = peak or (gpu.bf16_tflops if half else gpu.fp32_tflops) * 1e12
    return Hardware(gpu.name, "cuda", memory, host, peak, source, mfu, bf16=gpu.bf16)


def main(argv: Sequence[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    from ..parallel.launch import split_launch_args

    opts, rest = split_planner_args(argv)
    launch, rest = split_launch_args(rest)
    nnodes, nproc = _launch_sizes(launch)
    cfg = parse_args(rest).config
    named = cfg.train.model_name != _DEFAULT_MODEL
    if opts.get("size") and named:
        raise ConfigError("Give the model once: --size (a Llama 3.x shape) or --model_name (a model directory or "
                          "hub id), not both.")
    if not opts.get("size") and not named:
        raise ConfigError("shardtune plan needs a model: --size 1b|3b|8b|70b|405b (the Llama 3.x shapes) or "
                          "--model_name with an HF model directory or hub id (only its config.json is read).")
    config = size_config(opts["size"]) if opts.get("size") else model_config(cfg.train.model_name)
    planner = Planner(config, hardware_for(opts, cfg, nproc))
    run = Run(cfg, nnodes, nproc)
    est = planner.estimate(run)
    suggestions = suggest(planner, run, est)
    if opts["json"]:
        print(json.dumps(to_json(est, cfg, suggestions), indent=2))
    else:
        print(render_text(est, cfg, suggestions))
