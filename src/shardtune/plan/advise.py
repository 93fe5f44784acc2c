"""What to change when a run does not fit: the planner tries the recipe's own options one at a
time (the least disruptive first), then cumulatively, and reports the flags that make it fit.

Every candidate is the user's configuration with a few fields changed, checked by the recipe's
own validation (``config/validate.py``), so a suggestion is never a combination the recipe
refuses (QLoRA with ``--low_cpu_fsdp``, ...).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import Config, ShardingStrategy, ShardtuneError
from ..config.configs import GradientSync, defers_gradient_sync
from .estimate import Estimate, Hardware, estimate, layout_for
from .shapes import ModelShapes, build_shapes


@dataclass(frozen=True)
class Run:
    """A configuration plus the launch: what one estimate is of."""

    cfg: Config
    nnodes: int
    nproc_per_node: int


@dataclass(frozen=True)
class Suggestion:
    flags: str  # what to add to the command line
    why: str
    estimate: Estimate  # of the run with the change
    fixes: str  # "GPU memory" | "host RAM"

    @property
    def total(self) -> int:
        return self.estimate.gpu.total


class Planner:
    """Estimates runs of one model on one kind of hardware, building each distinct parameter
    layout (PEFT, precision, quantization change it) once."""

    def __init__(self, model_config, hw: Hardware) -> None:
        self.model_config = model_config
        self.hw = hw
        self._shapes: dict[tuple, ModelShapes] = {}

    def shapes(self, cfg: Config) -> ModelShapes:
        t, q = cfg.train, cfg.quantization
        key = (t.use_peft, t.peft_method, repr(cfg.lora), repr(cfg.llama_adapter), t.from_peft_checkpoint,
               cfg.fsdp.pure_bf16, t.quantization, repr(q), t.freeze_layers, t.num_freeze_layers)
        if key not in self._shapes:
            self._shapes[key] = build_shapes(self.model_config, cfg)
        return self._shapes[key]

    def estimate(self, run: Run, rank: int = 0) -> Estimate:
        layout = layout_for(run.cfg, run.nnodes, run.nproc_per_node)
        return estimate(self.shapes(run.cfg), run.cfg, layout, self.hw, rank=rank)


# A candidate change: (run) -> (changed run, flags, why), or None where it does not apply.
Change = Callable[[Run], Optional[tuple[Run, str, str]]]


def _edit(run: Run, nnodes: Optional[int] = None, **fields) -> Run:
    cfg = copy.deepcopy(run.cfg)
    for key, value in fields.items():
        section, _, name = key.partition("__")
        setattr(getattr(cfg, section), name, value)
    return Run(cfg, nnodes or run.nnodes, run.nproc_per_node)


def _full_shard(run: Run):
    f = run.cfg.fsdp
    if not run.cfg.train.enable_fsdp or f.sharding_strategy == ShardingStrategy.FULL_SHARD:
        return None
    if f.sharding_strategy == ShardingStrategy.HYBRID_SHARD and run.nnodes * run.nproc_per_node <= (
            f.sharding_group_size or run.nproc_per_node):
        return None
    why = {ShardingStrategy.NO_SHARD: "every GPU holds a full copy of the weights, gradients and optimizer state",
           ShardingStrategy.SHARD_GRAD_OP: "every block's parameters stay gathered from its forward to its backward",
           ShardingStrategy.HYBRID_SHARD: "shards over every GPU of every node instead of one node's"}[f.sharding_strategy]
    return (_edit(run, fsdp__sharding_strategy=ShardingStrategy.FULL_SHARD, fsdp__hsdp=False,
                  fsdp__sharding_group_size=0, fsdp__replica_group_size=0),
            "--fsdp_config.sharding_strategy FULL_SHARD", why)


def _checkpointing(run: Run):
    if not run.cfg.train.enable_fsdp or run.cfg.fsdp.fsdp_activation_checkpointing:
        return None
    return (_edit(run, fsdp__fsdp_activation_checkpointing=True), "--fsdp_config.fsdp_activation_checkpointing true",
            "recompute each decoder layer in backward instead of keeping its activations")


def _sync_every_micro_batch(run: Run):
    t, f = run.cfg.train, run.cfg.fsdp
    if (not t.enable_fsdp or t.gradient_accumulation_steps == 1
            or not defers_gradient_sync(t, f)):
        return None
    return (_edit(run, fsdp__gradient_sync=GradientSync.every_micro_batch),
            "--fsdp_config.gradient_sync every_micro_batch",
            "reduce-scatter gradients after every accumulated micro-batch instead of holding unsharded fp32 "
            "ones until the step ends (same global batch, more collectives)")


def _pure_bf16(run: Run):
    f = run.cfg.fsdp
    if f.pure_bf16 or run.cfg.train.use_fp16 or f.use_fp16 or run.cfg.train.quantization:
        return None
    return (_edit(run, fsdp__pure_bf16=True, fsdp__optimizer="anyprecision"),
            "--fsdp_config.pure_bf16 --fsdp_config.optimizer anyprecision",
            "bf16 weights with bf16 AdamW state and Kahan compensation: 8 instead of 16 bytes per parameter")


def _lora(run: Run):
    if run.cfg.train.use_peft or run.cfg.train.freeze_layers:
        return None
    return (_edit(run, train__use_peft=True), "--use_peft --peft_method lora",
            "train a LoRA adapter: no gradients or optimizer state for the base weights")


def _qlora(run: Run):
    t, f = run.cfg.train, run.cfg.fsdp
    if not t.use_peft or t.quantization or t.peft_method.value != "lora" or f.fsdp_cpu_offload:
        return None
    # under FSDP the 4-bit weights must be stored in the compute dtype (model/quantization.py)
    storage = "bfloat16" if t.mixed_precision and f.mixed_precision else "float32"
    flags = "--quantization 4bit" + (f" --quantization_config.quant_storage {storage}" if t.enable_fsdp else "")
    changes = dict(train__quantization="4bit", train__low_cpu_fsdp=False, fsdp__pure_bf16=False,
                   fsdp__optimizer="AdamW", quantization__quant_storage=storage)
    if t.low_cpu_fsdp:
        flags += " (without --low_cpu_fsdp)"
    return _edit(run, **changes), flags, "a 4-bit base: about 0.5 byte per frozen parameter"


def _offload(run: Run):
    t = run.cfg.train
    if not t.enable_fsdp or run.cfg.fsdp.fsdp_cpu_offload or t.quantization:
        return None
    return (_edit(run, fsdp__fsdp_cpu_offload=True), "--fsdp_config.fsdp_cpu_offload",
            "sharded weights, gradients and optimizer state in host memory (slower steps)")


def _more_nodes(factor: int) -> Change:
    def change(run: Run):
        t, f = run.cfg.train, run.cfg.fsdp
        if not t.enable_fsdp or f.sharding_strategy not in (ShardingStrategy.FULL_SHARD,):
            return None
        nodes = run.nnodes * factor
        return (_edit(run, nnodes=nodes), f"--nnodes {nodes}",
                f"shard over {nodes * run.nproc_per_node} GPUs")
    return change


def _smaller(field: str, flag: str, floor: int) -> Change:
    def change(run: Run):
        value = getattr(run.cfg.train, field)
        if value // 2 < floor:
            return None
        return (_edit(run, **{f"train__{field}": value // 2}), f"--{flag} {value // 2}",
                "fewer activations per step")
    return change


def _fsdp(run: Run):
    t = run.cfg.train
    if t.enable_fsdp:
        return None
    return (Run(_edit(run, train__enable_fsdp=True).cfg, 1, 8), "--enable_fsdp --nproc_per_node 8",
            "shard over the 8 GPUs of one node")


def _low_cpu(run: Run):
    t = run.cfg.train
    if not t.enable_fsdp or t.low_cpu_fsdp or t.quantization:
        return None
    return (_edit(run, train__low_cpu_fsdp=True), "--low_cpu_fsdp",
            "each rank reads only its own rows of the weights instead of loading the whole model")


# In the order they are tried: the cheapest changes to what is trained first.
GPU_CHANGES: tuple[Change, ...] = (_full_shard, _checkpointing, _sync_every_micro_batch, _fsdp, _more_nodes(2),
                                   _pure_bf16, _lora, _qlora, _offload, _more_nodes(4),
                                   _smaller("batch_size_training", "batch_size_training", 1),
                                   _smaller("context_length", "context_length", 512))
HOST_CHANGES: tuple[Change, ...] = (_low_cpu,)


def _valid(run: Run) -> bool:
    from ..config.validate import validate

    try:
        validate(run.cfg)
        layout_for(run.cfg, run.nnodes, run.nproc_per_node)
    except ShardtuneError:
        return False
    return True


def suggest(planner: Planner, run: Run, est: Estimate, limit: int = 4) -> list[Suggestion]:
    """Changes that make ``run`` fit, for each resource that does not: single flags first (the
    least disruptive first, up to ``limit``); where no single flag does, one cumulative set."""
    found: list[Suggestion] = []
    host_ok = lambda e: e.host.fits is not False  # noqa: E731
    gpu_ok = lambda e: e.gpu.fits is not False  # noqa: E731
    for problem, changes, ok, other in (("host RAM", HOST_CHANGES, host_ok, gpu_ok),
                                        ("GPU memory", GPU_CHANGES, gpu_ok, host_ok)):
        if ok(est):
            continue
        singles = []
        for change in changes:
            made = change(run)
            if made is None or not _valid(made[0]):
                continue
            new = planner.estimate(made[0])
            # a fix for one resource must not break the other (CPU offload can overflow the host)
            breaks_other = other(est) and not other(new)
            if ok(new) and not breaks_other:
                singles.append(Suggestion(made[1], made[2], new, problem))
            if len(singles) >= limit:
                break
        found += singles or _cumulative(planner, run, est, changes, ok, problem)
    return found


def _cumulative(planner: Planner, run: Run, est: Estimate, changes, ok, problem: str) -> list[Suggestion]:
    """Apply changes in order, keeping each that lowers the per-GPU total (or the host peak),
    until ``ok``; returns the set as one suggestion, or none if even all of them do not do it."""
    flags, whys = [], []
    current, best = run, est
    for change in changes:
        made = change(current)
        if made is None or not _valid(made[0]):
            continue
        new = planner.estimate(made[0])
        if (new.gpu.total, new.host.peak) < (best.gpu.total, best.host.peak):
            current, best = made[0], new
            flags.append(made[1])
            whys.append(made[2])
        if ok(best):
            return [Suggestion(" ".join(flags), "; ".join(whys), best, problem)]
    return []
