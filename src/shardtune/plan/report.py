"""The planner's output: a table per GPU and per host, checkpoint sizes, the step-time estimate
and the flags to change; or the same as JSON (``--json``, sizes in bytes)."""

from __future__ import annotations

from typing import Optional

from .advise import Suggestion
from .estimate import RANK_BASELINE_BYTES, Estimate, GiB
from .shapes import DTYPE_NAMES


def gib(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:,.2f}"


def _dtype(d) -> str:
    return DTYPE_NAMES.get(d, str(d).removeprefix("torch."))


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M" if n >= 1e6 else f"{n:,}"


def _device(est: Estimate) -> str:
    return "GPU" if est.hardware.device_type == "cuda" else "rank"


def _flops(x: float) -> str:
    return f"{x / 1e12:,.1f} TFLOPs" if x >= 1e11 else f"{x / 1e9:,.2f} GFLOPs"


def describe_run(est: Estimate, cfg) -> list[str]:
    s, t, f = est.shapes, cfg.train, cfg.fsdp
    dev = _device(est)
    what = "full fine-tune"
    if t.use_peft:
        what = f"{'QLoRA ' + t.quantization if t.quantization else t.peft_method.value} adapter"
    elif t.freeze_layers:
        what = f"fine-tune with the first {t.num_freeze_layers} layers frozen"
    optim = ("AnyPrecisionAdamW (bf16 momentum, variance, Kahan buffer)" if f.optimizer.lower() == "anyprecision"
             else "AdamW (two moments in each parameter's dtype)")
    weights = f"weights {_dtype(est.dtypes.weights)}"
    if s.quantized:
        weights = f"{s.quantized} base ({cfg.quantization.quant_storage} storage), other weights fp32"
    if t.use_peft and any(
            p.trainable and p.itemsize == 4 for p in s.params) and (f.pure_bf16 or s.quantized):
        weights += ", fp32 adapter (peft)"
    return [
        f"model:     {s.name} ({_count(s.total_params)} parameters, {_count(s.trainable_params)} trained; "
        f"{s.layers} layers, hidden {s.hidden}, {s.heads} heads / {s.kv_heads} KV heads, MLP {s.intermediate}, "
        f"vocab {s.vocab}{', tied head' if s.tied else ''})",
        f"run:       {what}; {est.layout.describe('GPU' if dev == 'GPU' else 'CPU rank')}",
        f"precision: {weights}, compute {_dtype(est.dtypes.compute)}; {optim}",
        f"batch:     {t.batch_size_training} x {t.context_length} tokens per {dev} ({t.batching_strategy.value}), "
        f"gradient accumulation {t.gradient_accumulation_steps}; activation checkpointing "
        f"{'on' if est.checkpointing else 'off'}; attention {est.attention.describe()}",
        f"hardware:  {est.hardware.gpu}, {gib(est.gpu.capacity)} GiB per {dev}"
        + (f", {gib(est.host.capacity)} GiB per host" if est.host.capacity else ", host memory not given"),
    ]


def _verdict(fits: Optional[bool], total: int, capacity: Optional[int]) -> str:
    if fits is None:
        return "not judged (no capacity given)"
    share = f"{100 * total / capacity:.0f}% of {gib(capacity)} GiB"
    return f"fits ({share})" if fits else f"DOES NOT FIT ({share})"


def render_text(est: Estimate, cfg, suggestions: list[Suggestion]) -> str:
    g, h, c, st, temps = est.gpu, est.host, est.checkpoint, est.step, est.gpu.temporaries
    unit = "GPU" if est.hardware.device_type == "cuda" else "rank (CPU)"
    where = " (in host memory: --fsdp_config.fsdp_cpu_offload)" if est.offload else ""
    ac = "with" if est.checkpointing else "without"
    rows: list[tuple[str, Optional[int]]] = [
        (f"parameters{where}", g.params if not est.offload else est.shard.params),
        ("gradients", g.grads if not est.offload else est.shard.grads_offloaded),
        ("optimizer state", g.optimizer if not est.offload else est.shard.optimizer),
    ]
    if g.quant_state:
        rows.append(("4-bit quantization state (every rank holds all of it)", g.quant_state))
    if g.reference:
        rows.append(("frozen reference model (--use_dpo, full-parameter)", g.reference))
    if temps.accumulation:
        rows.append(("unsharded fp32 gradients across accumulated micro-batches", temps.accumulation))
    rows.append((f"activations, {ac} activation checkpointing", g.activations))
    rows.append(("  of which the loss (logits, fp32 copy, log_softmax)", min(est.activations.loss, g.activations)))
    rows.append((f"  (without checkpointing: {gib(g.activations_without_ac)} GiB, with: "
                 f"{gib(g.activations_with_ac)} GiB)", None))
    if est.layout.fsdp:
        rows += [("FSDP all-gather buffers (root + gathered blocks)", temps.all_gather),
                 ("FSDP reduce-scatter buffers (one block)", temps.reduce_scatter)]
        if temps.head_grad:
            rows.append(("unsharded head gradient until the root's reduce-scatter", temps.head_grad))
    if temps.autocast:
        rows.append(("autocast's cached bf16 weight copies", temps.autocast))
    if g.reserve:
        rows.append(("CUDA context, NCCL, cuBLAS (assumed)", g.reserve))
    phases = g.phases
    peak_phase = max(phases, key=phases.get)
    if g.loading:
        rows.append(("while loading: the whole 4-bit model on every GPU, before sharding", g.loading))
        if g.loading > g.persistent + phases[peak_phase]:
            peak_phase = "loading"
    lines = ["shardtune plan", *describe_run(est, cfg), "", f"per {unit}{' ' * 50}GiB"]
    lines += [f"  {name:<58}{'' if value is None else gib(value):>12}" for name, value in rows]
    lines.append(f"  {'total (peak, during ' + peak_phase + ')':<58}{gib(g.total):>12}   "
                 f"{_verdict(g.fits, g.total, g.capacity)}")
    others = [f"{name} +{gib(v)} GiB" for name, v in phases.items() if name != peak_phase and v]
    if others:
        lines.append(f"    (other phases on top of the persistent {gib(g.persistent)} GiB: {', '.join(others)})")
    ranks = est.layout.nproc_per_node
    lines += ["", f"per host ({ranks} rank{'s' if ranks > 1 else ''})"]
    load = "--low_cpu_fsdp" if h.low_cpu else "normal loading"
    host_rows = [
        ("loading, normal (every rank builds the whole model)", h.load_normal),
        ("loading, --low_cpu_fsdp (each rank reads its own rows)", h.load_low_cpu if est.layout.fsdp else None),
        ("resident while training" + (" (offloaded shards)" if est.offload else ""), h.resident),
        (f"processes ({gib(RANK_BASELINE_BYTES[est.hardware.device_type])} GiB per rank, assumed)", h.baseline),
    ]
    lines += [f"  {name:<58}{'n/a (needs --enable_fsdp)' if value is None else gib(value):>12}"
              for name, value in host_rows]
    lines.append(f"  {'peak with ' + load:<58}{gib(h.peak):>12}   {_verdict(h.fits, h.peak, h.capacity)}")
    lines += ["", "checkpoints on disk",
              f"  {c.export_what:<58}{gib(c.export_bytes):>12}",
              f"  {'resumable checkpoint (DCP), model only':<58}{gib(c.sharded_model_bytes):>12}",
              f"  {'resumable checkpoint (DCP) with optimizer state':<58}"
              f"{gib(c.sharded_model_bytes + c.sharded_optimizer_bytes):>12}"]
    lines += ["", "step time (an estimate, not a measurement)"]
    if st.peak_flops > 0:
        implied = st.model_flops / (st.seconds * st.peak_flops) if st.seconds else 0.0
        recompute = " + the recomputed forward" if est.checkpointing else ""
        lines += [
            f"  {st.seconds:,.2f} s per optimizer step, {st.tokens_per_s:,.0f} tokens/s over {est.layout.world} "
            f"{_device(est)}{'s' if est.layout.world > 1 else ''} ({st.tokens_global:,} tokens per step)",
            f"  = {_flops(st.hardware_flops)} per {_device(est)} per step (6·N·T + 12·L·d·seq² model FLOPs"
            f"{recompute}) / ({st.mfu:.0%} assumed utilisation x {st.peak_flops / 1e12:,.3g} TFLOP/s, "
            f"{st.peak_source}); that is an MFU of {implied:.0%}. Real runs vary (25-55% is common); "
            "measure yours with --flop_counter.",
        ]
    else:
        lines.append("  pass --peak_tflops (the device's dense peak in the compute dtype) for a step-time estimate.")
    for note in est.notes:
        lines += ["", f"note: {note}"]
    lines.append("")
    if est.fits:
        lines.append("verdict: fits.")
    elif suggestions:
        lines.append("verdict: does not fit. Changes that make it fit:")
        for problem in dict.fromkeys(x.fixes for x in suggestions):
            lines.append(f"  for {problem}:")
            for x in (x for x in suggestions if x.fixes == problem):
                after = x.estimate
                lines.append(f"    {x.flags}")
                lines.append(f"        {x.why} (then per {_device(est)} {gib(after.gpu.total)} GiB, host peak "
                             f"{gib(after.host.peak)} GiB)")
    else:
        lines.append("verdict: does not fit, and no combination of the usual changes (FULL_SHARD, activation "
                     "checkpointing, pure bf16, LoRA, QLoRA, CPU offload, more nodes, smaller batches) makes it fit.")
    return "\n".join(lines)


def to_json(est: Estimate, cfg, suggestions: list[Suggestion]) -> dict:
    g, h, c, st, temps = est.gpu, est.host, est.checkpoint, est.step, est.gpu.temporaries
    s = est.shapes
    return {
        "model": {"name": s.name, "parameters": s.total_params, "trainable_parameters": s.trainable_params,
                  "layers": s.layers, "hidden_size": s.hidden, "heads": s.heads, "kv_heads": s.kv_heads,
                  "intermediate_size": s.intermediate, "vocab_size": s.vocab, "tied_embeddings": s.tied},
        "layout": {"fsdp": est.layout.fsdp, "strategy": est.layout.strategy.value if est.layout.strategy else None,
                   "nnodes": est.layout.nnodes, "nproc_per_node": est.layout.nproc_per_node,
                   "world_size": est.layout.world, "replicas": est.layout.replicas, "shard_group": est.layout.shard},
        "precision": {"compute": _dtype(est.dtypes.compute), "weights": _dtype(est.dtypes.weights),
                      "optimizer": cfg.fsdp.optimizer},
        "activation_checkpointing": est.checkpointing,
        "attention": {"kernel": est.attention.kernel, "mask": est.attention.mask},
        "per_gpu": {
            "params_bytes": g.params, "grads_bytes": g.grads, "optimizer_bytes": g.optimizer,
            "quant_state_bytes": g.quant_state, "reference_bytes": g.reference,
            "activations_bytes": g.activations, "activations_without_ac_bytes": g.activations_without_ac,
            "activations_with_ac_bytes": g.activations_with_ac,
            "loss_bytes": est.activations.loss,
            "all_gather_bytes": temps.all_gather, "reduce_scatter_bytes": temps.reduce_scatter,
            "head_grad_bytes": temps.head_grad, "end_of_backward_bytes": temps.root_reduce,
            "accumulation_bytes": temps.accumulation, "autocast_bytes": temps.autocast,
            "optimizer_step_bytes": temps.optimizer_step, "reserve_bytes": g.reserve,
            "loading_bytes": g.loading, "persistent_bytes": g.persistent, "phases_bytes": g.phases,
            "total_bytes": g.total, "capacity_bytes": g.capacity, "fits": g.fits,
            "offloaded": est.offload,
        },
        "per_host": {"ranks": est.layout.nproc_per_node, "load_normal_bytes": h.load_normal,
                     "load_low_cpu_bytes": h.load_low_cpu, "resident_bytes": h.resident,
                     "baseline_bytes": h.baseline, "peak_bytes": h.peak, "low_cpu_fsdp": h.low_cpu,
                     "capacity_bytes": h.capacity, "fits": h.fits},
        "checkpoint": {"export_bytes": c.export_bytes, "export": c.export_what,
                       "sharded_model_bytes": c.sharded_model_bytes,
                       "sharded_with_optimizer_bytes": c.sharded_model_bytes + c.sharded_optimizer_bytes},
        "step_time": {"estimate": True, "seconds": st.seconds if st.peak_flops > 0 else None,
                      "model_flops_per_gpu": st.model_flops, "hardware_flops_per_gpu": st.hardware_flops,
                      "tokens_per_step": st.tokens_global, "peak_flops": st.peak_flops or None,
                      "peak_source": st.peak_source, "assumed_mfu": st.mfu},
        "notes": list(est.notes),
        "fits": est.fits,
        "suggestions": [{"fixes": x.fixes, "flags": x.flags, "why": x.why, "total_bytes": x.total,
                         "host_peak_bytes": x.estimate.host.peak} for x in suggestions],
    }
