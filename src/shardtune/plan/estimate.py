"""Memory and time of one training run, per GPU and per host: pure functions of the model's
parameters (:class:`~shardtune.plan.shapes.ModelShapes`), the run's config, the layout of ranks
and the hardware.

Parameters, gradients, optimizer state (exact)
----------------------------------------------
``parallel/fsdp.py`` applies ``fully_shard`` to every decoder block and then to the root, over
the shard dimension of ``parallel/mesh.py``'s mesh: FULL_SHARD and SHARD_GRAD_OP shard over all
ranks, NO_SHARD over groups of one, HYBRID_SHARD over ``sharding_group_size`` ranks (a node by
default). For a parameter with ``D`` rows on a shard group of ``W`` ranks, FSDP2 gives every rank
``ceil(D / W)`` rows of storage (rank ``k`` uses ``min(ceil(D/W), D - k*ceil(D/W))`` of them, the
rest is padding), so:

* parameters: ``ceil(D/W) * row`` elements per parameter, in the dtype the weights are stored in
  (fp32; bf16 with ``--fsdp_config.pure_bf16``; peft keeps adapters in fp32);
* gradients (trainable parameters only): the same padded size, in the parameter's dtype -- FSDP2
  reduce-scatters into one flat padded buffer per block and casts it back to the parameter dtype;
* optimizer state: ``zeros_like`` of each rank's unpadded local shard -- two moments in the
  parameter's dtype for AdamW, momentum, variance and the Kahan buffer in bf16 for
  ``--fsdp_config.optimizer anyprecision`` -- plus a 4-byte fp32 ``step`` tensor per parameter,
  which both optimizers keep on the CPU (so it counts on the device only for CPU runs).

The root's frozen weights (a LoRA run's embeddings and head) are the exception: when FSDP would
neither cast them for compute nor offload them, every rank keeps them whole
(``parallel/fsdp.py``'s ``keeps_whole``, the rule counted here), and they are not all-gathered.

Without ``--enable_fsdp`` nothing is sharded or padded. With ``--fsdp_config.fsdp_cpu_offload``
the sharded parameters, gradients (unpadded copies) and optimizer state live in host memory.

Activations: ``plan/activations.py``.

Temporary buffers (estimated)
-----------------------------
FSDP2 all-gathers each block's parameters into unsharded buffers in the compute dtype: the root
(embeddings, head) stays gathered through forward and backward; FULL_SHARD and HYBRID_SHARD hold
about two blocks at once (the current one and the prefetched next); SHARD_GRAD_OP and NO_SHARD
keep every block gathered from its forward to its backward. Backward adds one block's unsharded
gradient and its fp32 reduce-scatter input. With ``--gradient_accumulation_steps`` > 1 and
``--fsdp_config.gradient_sync last_micro_batch`` (``auto`` picks it for adapters and NO_SHARD) the
recipe skips the reduce-scatter on all but the last micro-batch, and FSDP2 then keeps *unsharded*
fp32 gradients of every trainable parameter on every rank until the step ends. The optimizer
step's foreach temporaries (about one copy of the local state) come after the activations are
freed. A fixed reserve covers the CUDA context and NCCL.

Step time (estimated)
---------------------
Model FLOPs per step per rank are ``train/flops.py``'s formula (the one the recipe's live MFU
and ``benchmarks/`` use): ``2·N·T`` forward + ``2·N·T`` input gradients + ``2·N_w·T`` weight
gradients + ``12·L·hq·seq²`` per row for attention (``T`` tokens per rank per optimizer step,
rows of ``--context_length`` tokens, one document each -- an upper bound for packed rows).
Activation checkpointing adds one forward. Time = FLOPs / (peak FLOP/s x assumed utilisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Config, ConfigError, ShardingStrategy
from ..config.configs import defers_gradient_sync
from ..parallel.fsdp import keeps_whole
from ..train.loss import chunk_tokens_of
from .activations import Activations, Attention, activation_bytes, attention_for
from .shapes import ModelShapes, ParamSpec

GiB = 1024 ** 3
# CUDA context + NCCL communicators + cuBLAS workspaces, per GPU: not in torch's allocator.
CUDA_RESERVE_BYTES = int(1.5 * GiB)
# Host RAM of one rank before any model is loaded (torch, transformers, CUDA runtime): CPU
# ranks measured 351 MiB here (docs/benchmarks.md); GPU ranks add the CUDA context's host side.
RANK_BASELINE_BYTES = {"cpu": 351 * 1024 ** 2, "cuda": int(2.5 * GiB)}
STEP_BYTES = 4  # each optimizer's fp32 ``step`` scalar per parameter (kept on the CPU)


@dataclass(frozen=True)
class Hardware:
    gpu: str
    device_type: str  # "cuda" | "cpu"
    gpu_memory: Optional[int]  # bytes per GPU (on a CPU: host memory per rank, None if not given)
    host_memory: Optional[int]  # bytes per host, None when not given
    peak_flops: float  # per rank, in the compute dtype
    peak_source: str
    mfu: float
    bf16: bool = True


@dataclass(frozen=True)
class Layout:
    fsdp: bool
    strategy: Optional[ShardingStrategy]
    nnodes: int
    nproc_per_node: int
    replicas: int
    shard: int  # ranks that share one copy of the model (FSDP's shard group)

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc_per_node

    def describe(self, device: str = "GPU") -> str:
        if not self.fsdp:
            return "1 process, no FSDP"
        mesh = f"{self.replicas} replica{'s' if self.replicas > 1 else ''} x {self.shard}-rank shard group"
        return (f"{self.nnodes} node{'s' if self.nnodes > 1 else ''} x {self.nproc_per_node} {device}"
                f"{'s' if self.nproc_per_node > 1 else ''}, {self.strategy.value}: {mesh}")


def layout_for(cfg: Config, nnodes: int, nproc_per_node: int) -> Layout:
    """The (replicas, shard) mesh the recipe would build (``parallel/mesh.py``)."""
    from ..parallel.mesh import mesh_shape

    if nnodes < 1 or nproc_per_node < 1:
        raise ConfigError(f"--nnodes and --nproc_per_node must be at least 1; got {nnodes} and {nproc_per_node}.")
    world = nnodes * nproc_per_node
    if not cfg.train.enable_fsdp:
        if world > 1:
            raise ConfigError(
                f"{world} ranks without --enable_fsdp: every rank would train its own copy (the recipe refuses "
                "this). Add --enable_fsdp, or plan one process (--nnodes 1 --nproc_per_node 1).")
        return Layout(False, None, 1, 1, 1, 1)
    f = cfg.fsdp
    replicas, shard = mesh_shape(f.sharding_strategy, world, nproc_per_node, f.sharding_group_size,
                                 f.replica_group_size)
    return Layout(True, f.sharding_strategy, nnodes, nproc_per_node, replicas, shard)


# ------------------------------------------------------------------------ precision


@dataclass(frozen=True)
class Dtypes:
    weights: torch.dtype  # what the (unquantized) weights are stored in
    compute: torch.dtype  # matmuls and activations
    cast_for_compute: bool  # FSDP's policy / autocast casts weights to ``compute``

    @property
    def a(self) -> int:
        """Bytes per element of activations."""
        return self.compute.itemsize


def dtypes_for(cfg: Config, device_type: str, bf16: bool = True) -> Dtypes:
    """``runtime.training_dtype`` / ``precision.compute_dtype`` for a device that may not be this
    machine's (the planner runs anywhere)."""
    t, f = cfg.train, cfg.fsdp
    weights = torch.bfloat16 if f.pure_bf16 else torch.float32
    fp16 = t.use_fp16 or f.use_fp16
    mixed = t.mixed_precision and (f.mixed_precision if t.enable_fsdp else True)
    if fp16:
        autocast: Optional[torch.dtype] = torch.float16
    elif device_type != "cuda":
        autocast = None
    else:
        autocast = torch.bfloat16 if mixed and bf16 else None
    compute = autocast or weights
    return Dtypes(weights, compute, compute != weights)


# ------------------------------------------------------------------------ exact sharded bytes


def _rows(spec: ParamSpec) -> tuple[int, int]:
    dim0 = spec.shape[0] if spec.shape else 1
    return dim0, spec.numel // max(dim0, 1)


def padded_numel(spec: ParamSpec, shard: int) -> int:
    """Elements of storage each rank allocates for ``spec`` (FSDP2 pads dim 0 to a multiple of ``shard``)."""
    dim0, row = _rows(spec)
    return -(-dim0 // shard) * row


def local_numel(spec: ParamSpec, shard: int, shard_rank: int) -> int:
    """Elements of ``spec`` rank ``shard_rank`` of the shard group actually holds (no padding)."""
    dim0, row = _rows(spec)
    chunk = -(-dim0 // shard)
    return max(0, min(chunk, dim0 - shard_rank * chunk)) * row


@dataclass(frozen=True)
class ShardBytes:
    params: int
    grads: int
    optimizer: int  # on the device (the fp32 ``step`` scalars only when the device is the CPU)
    optimizer_host: int  # the ``step`` scalars on a GPU run
    grads_offloaded: int  # unpadded gradient copies that CPU offload keeps in host memory


def state_bytes_per_element(spec: ParamSpec, optimizer: str) -> int:
    if optimizer.lower() == "anyprecision":
        return 3 * 2  # bf16 momentum, variance and Kahan compensation (parallel/anyprecision_adamw.py)
    return 2 * spec.itemsize  # torch AdamW: exp_avg, exp_avg_sq like the parameter


def kept_whole(spec: ParamSpec, layout: Layout, dtypes: Dtypes, offload: bool) -> bool:
    """Whether FSDP leaves ``spec`` unsharded on every rank (``parallel/fsdp.py``'s rule)."""
    return layout.fsdp and keeps_whole(in_root=spec.unit == 0, trainable=spec.trainable,
                                       quantized=spec.logical_numel != 0,
                                       cast_for_compute=dtypes.cast_for_compute, cpu_offload=offload)


def shard_bytes(shapes: ModelShapes, layout: Layout, optimizer: str, device_type: str, rank: int = 0,
                whole=lambda spec: False) -> ShardBytes:
    """Bytes of parameter, gradient and optimizer-state storage on ``rank`` after a step;
    ``whole(spec)``: the parameter is kept whole on every rank (:func:`kept_whole`)."""
    shard = layout.shard if layout.fsdp else 1
    shard_rank = rank % shard  # init_device_mesh is row-major: (replica, shard)
    params = grads = optim = steps = offloaded = 0
    for spec in shapes.params:
        stored = padded_numel(spec, shard) if layout.fsdp and not whole(spec) else spec.numel
        params += stored * spec.itemsize
        if not spec.trainable:
            continue
        local = local_numel(spec, shard, shard_rank) if layout.fsdp else spec.numel
        grads += stored * spec.itemsize
        offloaded += local * spec.itemsize
        optim += local * state_bytes_per_element(spec, optimizer)
        steps += STEP_BYTES
    on_cpu = device_type == "cpu"
    return ShardBytes(params, grads, optim + (steps if on_cpu else 0), 0 if on_cpu else steps, offloaded)


# ------------------------------------------------------------------------ temporary buffers


def _gathered(shapes: ModelShapes, unit: int, shard: int, dtypes: Dtypes, whole=lambda spec: False) -> int:
    total = 0
    for spec in shapes.unit_params(unit):
        if whole(spec):  # never gathered: held whole, counted with the parameters
            continue
        size = dtypes.a if dtypes.cast_for_compute and spec.logical_numel == 0 else spec.itemsize
        total += padded_numel(spec, shard) * shard * size
    return total


def _unit_trainable(shapes: ModelShapes, unit: int, shard: int) -> int:
    return sum(padded_numel(s, shard) * shard for s in shapes.unit_params(unit) if s.trainable)


@dataclass(frozen=True)
class Temporaries:
    all_gather: int  # during forward and backward: the root plus the blocks gathered at once
    reduce_scatter: int  # during backward: one block's unsharded gradient + its fp32 reduce-scatter input
    head_grad: int  # the root's head gradient, unsharded, from the start of backward to its end
    root_reduce: int  # at the end of backward, when the activations are gone: the root's reduce-scatter
    accumulation: int  # unsharded fp32 gradients kept across micro-batches (FSDP, accumulation > 1)
    autocast: int  # autocast's cached low-precision weight copies (one process on a GPU)
    optimizer_step: int  # after the activations are freed

    @property
    def during_backward(self) -> int:
        return self.all_gather + self.reduce_scatter + self.head_grad + self.autocast


def temporaries(shapes: ModelShapes, cfg: Config, layout: Layout, dtypes: Dtypes, device_type: str,
                local_state: int, whole=lambda spec: False) -> Temporaries:
    t = cfg.train
    # torch AdamW on CUDA runs foreach kernels whose intermediates are about one copy of a state
    step = local_state // 2 if device_type == "cuda" and cfg.fsdp.optimizer.lower() == "adamw" else 0
    blocks = [u for u in shapes.units if u != 0]
    if not layout.fsdp:
        autocast = 0
        if dtypes.cast_for_compute:  # autocast caches casts of trainable fp32 leaf weights for the step
            autocast = sum(s.numel for s in shapes.params if s.trainable) * dtypes.a
        return Temporaries(0, 0, 0, 0, 0, autocast, step)
    shard = layout.shard
    block_bytes = [_gathered(shapes, u, shard, dtypes) for u in blocks] or [0]
    root = _gathered(shapes, 0, shard, dtypes, whole)
    if layout.strategy in (ShardingStrategy.FULL_SHARD, ShardingStrategy.HYBRID_SHARD):
        gather = root + 2 * max(block_bytes)  # the running block and the prefetched (or flat) one
    else:  # SHARD_GRAD_OP and NO_SHARD: every block stays gathered from forward to backward
        gather = root + sum(block_bytes) + max(block_bytes)
    block_trainable = max([_unit_trainable(shapes, u, shard) for u in blocks] or [0])
    reduce = block_trainable * (dtypes.a + 4)  # unsharded gradient + fp32 reduce-scatter input
    # The head's gradient is computed first in backward, but the root (embeddings, norm, head) is
    # reduce-scattered only when its last gradient, the embedding's, is done.
    head = sum(padded_numel(s, shard) * shard for s in shapes.unit_params(0)
               if s.trainable and s.numel > shapes.hidden  # not the final norm
               and (shapes.tied or not s.name.endswith("embed_tokens.weight")))
    root_reduce = root + _unit_trainable(shapes, 0, shard) * (dtypes.a + 4)
    accumulation = 0
    if t.gradient_accumulation_steps > 1 and defers_gradient_sync(t, cfg.fsdp):
        accumulation = 4 * sum(s.numel for s in shapes.params if s.trainable)
    return Temporaries(gather, reduce, head * dtypes.a, root_reduce, accumulation, 0, step)


# ------------------------------------------------------------------------ the estimate


@dataclass(frozen=True)
class GpuMemory:
    params: int
    grads: int
    optimizer: int
    activations: int  # for the run's checkpointing setting
    activations_without_ac: int
    activations_with_ac: int
    temporaries: Temporaries
    quant_state: int
    reserve: int
    capacity: Optional[int]  # None: not judged (a CPU run without --host_memory)
    loading: int = 0  # QLoRA: each rank quantizes the whole base onto its GPU before FSDP shards it
    reference: int = 0  # --use_dpo, full-parameter: the frozen reference copy, sharded like the parameters

    @property
    def persistent(self) -> int:
        return (self.params + self.grads + self.optimizer + self.quant_state + self.temporaries.accumulation
                + self.reference)

    @property
    def phases(self) -> dict[str, int]:
        """What comes on top of the persistent bytes, in each phase of a step; the peak is the largest."""
        temps = self.temporaries
        return {"forward/backward": self.activations + temps.during_backward,
                "end of backward": temps.root_reduce, "optimizer step": temps.optimizer_step}

    @property
    def total(self) -> int:
        return max(self.persistent + max(self.phases.values()), self.loading) + self.reserve

    @property
    def fits(self) -> Optional[bool]:
        return None if self.capacity is None else self.total <= self.capacity


@dataclass(frozen=True)
class HostMemory:
    load_normal: int  # peak while loading, every rank of the host reading the whole model
    load_low_cpu: int  # with --low_cpu_fsdp: each rank its own rows of one tensor at a time
    resident: int  # what stays during training: CPU-offloaded shards, or everything on a CPU run
    baseline: int  # the processes themselves
    low_cpu: bool  # the run uses --low_cpu_fsdp
    capacity: Optional[int]

    @property
    def peak(self) -> int:
        return self.baseline + max(self.load_low_cpu if self.low_cpu else self.load_normal, self.resident)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.capacity is None else self.peak <= self.capacity


@dataclass(frozen=True)
class Checkpoint:
    export_bytes: int  # HF model dir (full fine-tune) or adapter dir
    export_what: str
    sharded_model_bytes: int  # a resumable DCP checkpoint without the optimizer
    sharded_optimizer_bytes: int


@dataclass(frozen=True)
class StepTime:
    model_flops: float  # per rank per optimizer step (PaLM's convention)
    hardware_flops: float  # + activation checkpointing's recomputed forward
    tokens_per_rank: int
    tokens_global: int
    seconds: float
    peak_flops: float
    peak_source: str
    mfu: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_global / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Estimate:
    shapes: ModelShapes
    layout: Layout
    dtypes: Dtypes
    attention: Attention
    checkpointing: bool
    gpu: GpuMemory
    host: HostMemory
    checkpoint: Checkpoint
    step: StepTime
    hardware: Hardware
    offload: bool
    activations: Activations
    shard: ShardBytes
    notes: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        """Nothing judged fails (a figure without a capacity to compare with is not judged)."""
        return self.gpu.fits is not False and self.host.fits is not False


def checkpointing_on(cfg: Config) -> bool:
    """The recipe checkpoints activations only under FSDP (an fsdp_config option, as llama-recipes)."""
    return cfg.train.enable_fsdp and cfg.fsdp.fsdp_activation_checkpointing


def estimate(shapes: ModelShapes, cfg: Config, layout: Layout, hw: Hardware, rank: int = 0) -> Estimate:
    t, f = cfg.train, cfg.fsdp
    device = hw.device_type
    dtypes = dtypes_for(cfg, device, hw.bf16)
    offload = layout.fsdp and f.fsdp_cpu_offload
    whole = lambda spec: kept_whole(spec, layout, dtypes, offload)  # noqa: E731
    sb = shard_bytes(shapes, layout, f.optimizer, device, rank, whole)
    attention = attention_for(cfg, device, dtypes.compute)
    acts = activation_bytes(shapes, batch=t.batch_size_training * rows_per_example(cfg), seq=t.context_length,
                            a=dtypes.a,
                            attention=attention, dropout_mask=1 if device == "cuda" else dtypes.a,
                            loss_chunk_tokens=chunk_tokens_of(t))
    ac = checkpointing_on(cfg)
    temps = temporaries(shapes, cfg, layout, dtypes, device, sb.optimizer, whole)
    on_gpu = (0, 0, 0) if offload else (sb.params, sb.grads, sb.optimizer)
    reference = reference_bytes(cfg, sb)
    gpu = GpuMemory(params=on_gpu[0], grads=on_gpu[1], optimizer=on_gpu[2], activations=acts.for_run(ac),
                    activations_without_ac=acts.without_ac, activations_with_ac=acts.with_ac, temporaries=temps,
                    quant_state=shapes.quant_state_bytes, reserve=CUDA_RESERVE_BYTES if device == "cuda" else 0,
                    capacity=hw.gpu_memory, loading=_qlora_loading(shapes, device),
                    reference=0 if offload else reference)
    host = host_memory(shapes, cfg, layout, hw, sb, gpu, offload, whole)
    return Estimate(shapes, layout, dtypes, attention, ac, gpu, host, checkpoint_sizes(shapes, cfg, dtypes),
                    step_time(shapes, cfg, layout, hw, ac), hw, offload, acts, sb, notes=_notes(shapes, cfg, layout))


def rows_per_example(cfg: Config) -> int:
    """Rows a training example puts in a batch: 2 for a preference pair (chosen and rejected), else 1."""
    return 2 if cfg.train.use_dpo else 1


def reference_bytes(cfg: Config, sb: ShardBytes) -> int:
    """--use_dpo: a full-parameter run holds a frozen copy of the starting model, sharded like its
    parameters (train/dpo.FrozenReference); a PEFT run's reference is the same weights, adapters off,
    and --dpo_config.precompute_reference keeps only the reference's log-probabilities."""
    return sb.params if live_reference(cfg) and not cfg.train.use_peft else 0


def live_reference(cfg: Config) -> bool:
    """--use_dpo runs the reference's forward every step (not when its log-probabilities are precomputed)."""
    return cfg.train.use_dpo and not cfg.dpo.precompute_reference


def _qlora_loading(shapes: ModelShapes, device_type: str) -> int:
    """The recipe loads a QLoRA base onto each rank's GPU, quantizing as it goes, and only then
    shards it: for a moment every GPU holds the whole 4-bit model and its unquantized layers."""
    if not shapes.quantized or device_type != "cuda":
        return 0
    return sum(s.nbytes for s in shapes.params) + shapes.quant_state_bytes


def host_memory(shapes: ModelShapes, cfg: Config, layout: Layout, hw: Hardware, sb: ShardBytes,
                gpu: GpuMemory, offload: bool, whole=lambda spec: False) -> HostMemory:
    t = cfg.train
    ranks = layout.nproc_per_node
    full = sum(s.nbytes for s in shapes.params)
    # Normal loading: every rank builds the whole model in host RAM, then FSDP keeps its shards.
    # QLoRA loads onto the GPU layer by layer, so the host holds about one layer at a time.
    load_normal = ranks * full
    largest = max((s.nbytes for s in shapes.params), default=0)
    if t.quantization and hw.device_type == "cuda":
        load_normal = ranks * largest
    shard = layout.shard if layout.fsdp else 1
    # each rank reads its rows of one tensor at a time (all of a tensor it keeps whole)
    load_low_cpu = ranks * max((s.nbytes if whole(s) else -(-s.nbytes // shard) for s in shapes.params), default=0)
    if hw.device_type == "cpu":  # the "GPU" is host memory: every rank's whole working set is resident
        resident = ranks * gpu.total
    elif offload:  # pinned host copies of the shards, gradients and optimizer state (and a DPO reference's)
        resident = ranks * (sb.params + sb.grads_offloaded + sb.optimizer + sb.optimizer_host
                            + reference_bytes(cfg, sb))
    else:
        resident = ranks * sb.optimizer_host
    return HostMemory(load_normal, load_low_cpu, resident, ranks * RANK_BASELINE_BYTES[hw.device_type],
                      t.low_cpu_fsdp and layout.fsdp, hw.host_memory)


def checkpoint_sizes(shapes: ModelShapes, cfg: Config, dtypes: Dtypes) -> Checkpoint:
    t = cfg.train
    from ..checkpoint.hf_stream import DTYPES

    trainable = [s for s in shapes.params if s.trainable]
    if t.use_peft:
        export, what = sum(s.nbytes for s in trainable), "adapter directory"
    else:
        size = torch.empty((), dtype=DTYPES[t.export_dtype]).element_size() if t.export_dtype else dtypes.weights.itemsize
        export, what = shapes.total_params * size, "HF model directory (safetensors)"
    # DCP: frozen base weights are not saved (checkpoint/sharded.py), nothing is padded
    model = sum(s.nbytes for s in (trainable if any(not s.trainable for s in shapes.params) else shapes.params))
    optim = sum(s.numel * state_bytes_per_element(s, cfg.fsdp.optimizer) + STEP_BYTES for s in trainable)
    return Checkpoint(export, what, model, optim)


def step_time(shapes: ModelShapes, cfg: Config, layout: Layout, hw: Hardware, ac: bool) -> StepTime:
    """``train/flops.py``'s model FLOPs (the formula the live MFU and ``benchmarks/`` use) for full
    rows of ``--context_length`` tokens, one document each; checkpointing adds a forward."""
    from ..train.flops import ModelShape, forward_flops, model_flops

    t = cfg.train
    rows = t.batch_size_training * t.gradient_accumulation_steps * rows_per_example(cfg)
    tokens = rows * t.context_length
    doc_len_sq = rows * t.context_length ** 2
    shape = ModelShape(layers=shapes.layers, hidden=shapes.hidden, heads=shapes.heads, kv_heads=shapes.kv_heads,
                       head_dim=shapes.head_dim, intermediate=shapes.intermediate, vocab=shapes.vocab)
    # N_w as train/flops.weight_grad_params counts it: trainable matrices but an untied input embedding
    n_w = sum(s.numel for s in shapes.params if s.trainable and len(s.shape) >= 2
              and (shapes.tied or not s.name.endswith("embed_tokens.weight")))
    model = model_flops(shape, tokens, doc_len_sq, weight_grad_params=n_w)
    # checkpointing recomputes a forward; --use_dpo runs the reference's forward (not in the model
    # FLOPs, as the live MFU of train/perf.py does not count it either)
    hardware = model + forward_flops(shape, tokens, doc_len_sq) * (int(ac) + int(live_reference(cfg)))
    seconds = hardware / (hw.peak_flops * hw.mfu) if hw.peak_flops > 0 else 0.0
    return StepTime(model, hardware, tokens, tokens * layout.world, seconds, hw.peak_flops, hw.peak_source, hw.mfu)


def _notes(shapes: ModelShapes, cfg: Config, layout: Layout) -> tuple[str, ...]:
    t = cfg.train
    notes = []
    if layout.fsdp and t.gradient_accumulation_steps > 1 and defers_gradient_sync(t, cfg.fsdp):
        notes.append(
            f"--gradient_accumulation_steps {t.gradient_accumulation_steps} with gradients reduced once per step "
            "(--fsdp_config.gradient_sync): the recipe skips the reduce-scatter on all but the last micro-batch, so "
            "FSDP2 keeps an unsharded fp32 gradient of every trainable parameter on every GPU until the step ends "
            "(counted under temporaries).")
    if shapes.quantized:
        notes.append("QLoRA: the activation formula treats the 4-bit linears like frozen ones; bitsandbytes' "
                     "dequantized weight of the running layer is not counted.")
    if t.use_dpo:
        if cfg.dpo.precompute_reference:
            reference = ("the reference's log-probabilities are precomputed: no reference forward per step and "
                         "no frozen copy (their one pass before training is not in the step time)")
        elif t.use_peft:
            reference = "the reference's forward (no gradients) is in the step time; it costs no memory (adapters off)"
        else:
            reference = "the reference's forward (no gradients) is in the step time and its frozen copy in the memory"
        notes.append("--use_dpo: a micro-batch of --batch_size_training pairs is 2x as many rows (chosen and "
                     f"rejected); {reference}.")
    if t.batching_strategy.value == "padding":
        notes.append("padding: activations are sized for full --context_length rows (the longest batch).")
    return tuple(notes)

