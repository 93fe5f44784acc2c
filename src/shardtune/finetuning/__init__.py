"""The fine-tuning recipe: the one place that wires the components together. Read it top to bottom:
the functions appear in the order they run (main → run → preflight → setup → train → merge).

    python -m shardtune.finetuning --model_name PATH --dataset alpaca_dataset ...
    torchrun --nproc_per_node 2 -m shardtune.finetuning --enable_fsdp ...   (FSDP)
    shardtune finetune --nproc_per_node 2 --enable_fsdp ...                   (the same, launched for you)

Flags are llama-recipes' (``--help-config`` lists them all); ``--config run.yaml`` and
``key=value`` overrides work too, and ``--print-config`` shows the resolved configuration.
When to save, what to load on resume and pre-emption are the checkpoint package's
(``checkpoint/manager.py``); where training is, is one ``TrainState`` (``checkpoint/state.py``).
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import yaml

from .. import runtime
from ..checkpoint.manager import CheckpointManager, refuse_non_finite  # noqa: F401 (re-exported)
from ..config import Config, describe_options, parse_args
from ..config.configs import BatchingStrategy, defers_gradient_sync
from ..convert.mergeable import check_mergeable
from ..data import Share, adopt_dataset_template, load_split, pad_fraction
from ..data.training import build_eval_loader, build_train_loader
from ..data.workers import stop_workers
from ..family_checks import refuse_for_family
from ..preflight import Checked, check_run, hold_outputs
from ..eval.quick import evaluate_after_training
from ..host_malloc import ReleaseAfterStep, release_free_memory, tune_host_malloc
from ..model.family import ModelFamily, decoder_layers, family_for_config
from ..model.freeze import freeze_first_layers, freeze_llm_only, freeze_vision_tower, trainable_summary
from ..model.attention import AttentionChoice, choose_attention
from ..model.loading import check_vocab_fits, load_config, load_inputs, load_model, match_vocab
from ..outputs.ownership import record as record_owned, top_entry_under
from ..model.quantization import bnb_config, check_storage_for_fsdp, keep_packed_layout, prepare_for_training
from ..parallel.activation_checkpointing import (check_activation_offload, enable_activation_checkpointing,
                                                with_activation_offload)
from ..parallel.compile import check_compile, compile_decoder_layers, warm_up
from ..parallel.distributed import DistEnv, init_distributed, shutdown
from ..parallel.fsdp import accumulation_switch, clip_grad_norm, reshard, shard_model
from ..model.low_cpu import build_meta_model, materialize_and_load
from ..precision import compute_dtype, describe_precision, fsdp_compute_dtype
from ..runtime import set_seed
from ..parallel.mesh import build_mesh
from ..train.flops import FlopMeasure
from ..data.fingerprint import rows_fingerprint
from ..data.preference import attach_reference_logps
from ..train.dpo import AdapterOffReference, build_objective, precompute_reference_logps
from ..train.reference_store import FILE as REFERENCE_FILE
from ..train.reference_store import load_reference_logps, reference_identity, save_reference_logps
from ..train.loop import Precision, evaluate, label_tokens, loss_sum, to_device, train_epoch
from ..train.types import LoopResult, LossStats
from ..train.loss import chunk_tokens_of
from ..train.metrics import MetricsLog
from ..train.optim import build_optimizer, build_scheduler
from ..train.perf import StepMeter
from ..train.profiler import StepProfiler
from ..train.progress import quiet_library_bars
from ..checkpoint.state import TrainState
from ..train.tensorboard_log import TensorBoardLogger, tensorboard_dir
from ..train.wandb_log import WandbLogger


@dataclass
class Components:
    model: torch.nn.Module
    tokenizer: object  # a vision model's processor (image processor + tokenizer)
    train_loader: object
    eval_loader: Optional[object]
    optimizer: torch.optim.Optimizer
    scheduler: object
    precision: Precision
    steps_per_epoch: int  # optimizer steps in a whole epoch (the last one may take fewer micro-batches)
    loss_fn: Callable = loss_sum  # a micro-batch's forward + summed loss (--loss, --activation_offload)
    compile_s: Optional[float] = None  # --compile: seconds the start-up forward + backward took
    count_fn: Callable = label_tokens  # what loss_fn's sum is over: label tokens; pairs for --use_dpo
    loss_stats: Optional[LossStats] = None  # loss_fn's other figures (--use_dpo: rewards, accuracy)


# --- entry: parse, refuse what cannot work, hold the output folder --------------------------------

def main(argv: Optional[Sequence[str]] = None, checked: Optional[Checked] = None) -> dict:
    """``checked``: see :func:`run`."""
    parsed = parse_args(sys.argv[1:] if argv is None else argv)
    if parsed.help_config:
        print(describe_options())
        return {}
    if parsed.print_config:
        print(yaml.safe_dump(parsed.config.to_dict(), sort_keys=False), end="")
        return {}
    return run(parsed.config, checked)


def run(cfg: Config, checked: Optional[Checked] = None) -> dict:
    """Fine-tune with a resolved config; returns llama-recipes' results dict (plus step losses).
    ``checked``: what ``preflight.check_run`` found, when the caller (the CLI, before importing
    this module) has run it in this process already."""
    foreign, family = checked or check_run(cfg)  # refuse what cannot work before any work
    with hold_outputs(cfg):  # one run per --output_dir, until this run has written everything
        return run_held(cfg, foreign, family)


def run_held(cfg: Config, foreign: list[str], family: Optional[ModelFamily] = None) -> dict:
    """:func:`run` once its options passed preflight and its output folder is held."""
    quiet_library_bars()  # in a log file: plain progress lines only (train/progress.py)
    t = cfg.train
    env = init_distributed(t.device, need_group=t.enable_fsdp,
                           cpu_collectives=t.enable_fsdp and cfg.fsdp.fsdp_cpu_offload)
    tune_host_malloc(cpu_work=env.device.type == "cpu")  # opt-in: SHARDTUNE_MALLOC_TUNING
    if foreign:
        say(env, f"note: --overwrite_output_dir: {len(foreign)} entries shardtune did not write are in "
                 f"{t.output_dir} ({', '.join(foreign[:8])}); those with the names of files this run "
                 "writes will be replaced, the others stay and from_pretrained may read some of them.")
    components = None
    try:
        components = setup(cfg, env, family)
        release_free_memory()  # loading's transient peak, kept by the tuned heap, goes back
        results = train(cfg, env, components)
    finally:
        if components is not None:
            stop_workers(components.train_loader, components.eval_loader)
        shutdown()
    merge_saved_adapter(cfg, env, results)  # --merge_lora, with no rank left waiting
    if t.run_eval_after and env.is_main:  # the saved model on the eval split, added to metrics.json
        results["eval_after"] = evaluate_after_training(cfg, results, env.device)
    return results


# --- setup: data, model, optimizer, precision, loss -----------------------------------------------

def setup(cfg: Config, env: DistEnv, family: Optional[ModelFamily] = None) -> Components:
    """Everything training needs; ``family``: the model's, when the caller has read its config."""
    t = cfg.train
    set_seed(t.seed)
    family = family or family_for_config(load_config(t.model_name))
    refuse_for_family(cfg, family)  # again in each rank: a hub model's config is first read here
    if t.compile:  # refused before any loading where inductor cannot work
        check_compile(env.device)
    if cfg.fsdp.activation_offload:
        check_activation_offload(env.device)
    tokenizer = load_inputs(t.model_name, t.tokenizer_name)  # the processor of a vision model
    template_line = adopt_dataset_template(cfg, tokenizer)  # --chat_dataset.chat_template goes out with the model
    if template_line:
        say(env, template_line)
    for line in describe_precision(cfg, env):
        say(env, line)
    attention = attention_for(cfg, env, family)
    say(env, attention.describe())
    if t.enable_fsdp and t.gradient_accumulation_steps > 1:
        say(env, _describe_gradient_sync(cfg))
    train_loader, eval_loader = setup_data(cfg, tokenizer, env, family, attention)
    model = setup_model(cfg, env, tokenizer, attention)
    optimizer = build_optimizer(model.parameters(), t, cfg.fsdp)
    steps_per_epoch = math.ceil(len(train_loader) / t.gradient_accumulation_steps)
    total = steps_per_epoch * t.num_epochs
    if t.max_train_step > 0:
        total = min(total, t.max_train_step)
    scheduler = build_scheduler(optimizer, t, steps_per_epoch=steps_per_epoch, total_steps=total)
    precision = setup_precision(cfg, env)
    c = Components(model, tokenizer, train_loader, eval_loader, optimizer, scheduler, precision, steps_per_epoch,
                   loss_fn=setup_loss(cfg))
    if t.use_dpo:  # --- preference tuning: the DPO/IPO loss over pairs (train/dpo.py) ---
        setup_preference(cfg, env, c, attention)
    if t.compile:  # compiled now, on a real batch, so that training steps are timed without it
        c.compile_s = warm_up(model, to_device(next(iter(train_loader)), env.device), c.loss_fn, precision.autocast)
        say(env, f"compile: compiled {len(decoder_layers(model))} decoder layers in {c.compile_s:.1f} s (one "
                 "forward + backward; a batch of a new shape compiles again)")
    return c


def attention_for(cfg: Config, env: DistEnv, family: Optional[ModelFamily] = None) -> AttentionChoice:
    """The attention kernel for this model, device, dtype and batching (``family``: read when not given)."""
    family = family or family_for_config(load_config(cfg.train.model_name))
    cls = family.model_class()
    supports_flash = getattr(cls, "_supports_flash_attn", True)  # an Auto class: decided per model
    return choose_attention(cfg.train.use_fast_kernels, env.device, compute_dtype(cfg, env),
                            model_supports_flash=supports_flash is not False, model_name=cls.__name__,
                            packing=cfg.train.batching_strategy == BatchingStrategy.packing)


def _describe_gradient_sync(cfg: Config) -> str:
    n, f = cfg.train.gradient_accumulation_steps, cfg.fsdp
    if not defers_gradient_sync(cfg.train, f):
        return (f"gradient accumulation: {n} micro-batches, gradients reduce-scattered after each one (no unsharded "
                "gradient is held; --fsdp_config.gradient_sync last_micro_batch reduces once per step instead)")
    line = (f"gradient accumulation: {n} micro-batches, gradients reduced once per step (each rank holds an unsharded "
            "fp32 gradient of the trainable parameters until then")
    if f.sharding_strategy.value != "NO_SHARD":
        line += "; --fsdp_config.gradient_sync every_micro_batch keeps only sharded ones"
    return line + ")"


def setup_data(cfg: Config, tokenizer, env: DistEnv, family: ModelFamily, attention: AttentionChoice):
    """The train loader (and the eval loader with --run_validation), batched for ``attention``."""
    t = cfg.train
    required = family.required_batch_keys  # a vision model's batches must all carry images
    varlen = attention.packed_needs_varlen  # flash / packed SDPA take document lengths
    share = data_share(env)  # each rank checks its share of the images; the ranks agree on the bad rows
    train_split = load_split(cfg, tokenizer, "train", share)
    say(env, f"train data: {train_split.report.summary()}")
    train_loader = build_train_loader(cfg, train_split, tokenizer, rank=env.rank, world_size=env.world_size,
                                      packed_varlen=varlen, required_keys=required)
    say(env, f"batching: {t.batching_strategy.value}, {len(train_loader)} batches per rank per epoch, "
             f"pad fraction {pad_fraction(train_loader):.1%}")
    eval_loader = None
    if t.run_validation:
        eval_split = load_split(cfg, tokenizer, "test", share)
        say(env, f"eval data: {eval_split.report.summary()}")
        eval_loader = build_eval_loader(cfg, eval_split, tokenizer, rank=env.rank, world_size=env.world_size,
                                        packed_varlen=varlen, required_keys=required)
    return train_loader, eval_loader


def data_share(env: DistEnv) -> Share:
    """This rank's part of the load-time data checks, exchanged over the process group."""
    return Share(env.rank, env.world_size, env.all_gather_object) if env.distributed else Share()


def setup_model(cfg: Config, env: DistEnv, tokenizer, attention: Optional[AttentionChoice] = None, *,
                trained: bool = True) -> torch.nn.Module:
    """Loaded (or built on the meta device), frozen / PEFT-wrapped, checkpointed, compiled and sharded.
    ``trained`` False (a DPO reference, frozen by its caller): no "trainable params" line."""
    t, f = cfg.train, cfg.fsdp
    dtype = runtime.training_dtype(env.device, pure_bf16=f.pure_bf16)
    attn = (attention or attention_for(cfg, env)).implementation
    low_cpu = t.enable_fsdp and t.low_cpu_fsdp
    quantization = bnb_config(t.quantization, cfg.quantization) if t.quantization else None
    if quantization is not None and t.enable_fsdp:  # before the load: packed 4-bit bytes must survive FSDP's casts
        check_storage_for_fsdp(cfg.quantization, compute_dtype(cfg, env))
    if low_cpu:  # weights arrive after sharding, each rank reading only its own slices
        model = build_meta_model(t.model_name, dtype=dtype, attn=attn, quantization=quantization)
        check_vocab_fits(model, tokenizer)
    elif quantization is not None:  # QLoRA: quantized as it loads, onto the device
        model = load_model(t.model_name, dtype=dtype, attn=attn, device=env.device, quantization=quantization)
        check_vocab_fits(model, tokenizer, "--quantization")
    else:
        model = load_model(t.model_name, dtype=dtype, attn=attn)
        match_vocab(model, tokenizer)
    if quantization is not None:  # the quantized base stays frozen
        model = prepare_for_training(model)
        keep_packed_layout(model)
    if t.freeze_layers:
        freeze_first_layers(model, t.num_freeze_layers)
    if t.freeze_LLM_only:
        freeze_llm_only(model)
    if t.freeze_vision_tower:
        freeze_vision_tower(model)
    if t.use_peft:
        from ..model.peft import apply_peft  # peft imports bitsandbytes and torch._inductor: ~2.3 s CPU a process

        model = apply_peft(model, cfg)
        if t.merge_lora:
            check_mergeable(model)  # refused now rather than after training
    if t.enable_fsdp and f.fsdp_activation_checkpointing:  # an FSDP option, as in llama-recipes
        n = enable_activation_checkpointing(model, f.activation_checkpointing_policy, f.activation_checkpointing_every_k)
        say(env, f"activation checkpointing: {n} of {len(decoder_layers(model))} decoder layers, "
                 f"policy {f.activation_checkpointing_policy.value}")
    if t.compile:  # torchtitan's order: activation checkpointing, compile, FSDP
        # padded batches change length every step: dynamic shapes from the start, one graph for all
        dynamic = True if t.batching_strategy == BatchingStrategy.padding else None
        say(env, f"compile: torch.compile of {compile_decoder_layers(model, dynamic)} decoder layers")
    if t.enable_fsdp:
        mesh = build_mesh(f, world_size=env.world_size, local_world_size=env.local_world_size,
                          device_type=env.device.type)
        shard_model(model, mesh=mesh, strategy=f.sharding_strategy,
                    param_dtype=fsdp_compute_dtype(cfg, env), cpu_offload=f.fsdp_cpu_offload)
        if low_cpu:
            materialize_and_load(model, t.model_name, env.device, seed=t.seed,
                                 param_device=torch.device("cpu") if f.fsdp_cpu_offload else None,
                                 adapter_dir=(t.from_peft_checkpoint or None) if t.use_peft else None,
                                 weights_dtype=dtype)
    elif not t.quantization:  # a quantized model was loaded onto its device
        model.to(env.device)
    if trained:
        say(env, trainable_summary(model))
    return model


def setup_precision(cfg: Config, env: DistEnv) -> Precision:
    """Autocast (single process) or FSDP's mixed-precision policy; a grad scaler for fp16."""
    t = cfg.train
    use_fp16 = t.use_fp16 or cfg.fsdp.use_fp16
    if t.enable_fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # ShardedGradScaler agrees on inf/nan across ranks, so all ranks skip the same steps.
        return Precision(device_type=env.device.type, autocast_dtype=None,
                         scaler=ShardedGradScaler(env.device.type) if use_fp16 else None)
    return Precision(device_type=env.device.type,
                     autocast_dtype=runtime.autocast_dtype(env.device, t.mixed_precision, use_fp16),
                     scaler=torch.amp.GradScaler(env.device.type) if use_fp16 else None)


def setup_loss(cfg: Config) -> Callable:
    """A micro-batch's forward and summed loss: --loss plain|chunked, under --activation_offload."""
    t = cfg.train
    fn = functools.partial(loss_sum, chunk_tokens=chunk_tokens_of(t))
    return with_activation_offload(fn) if cfg.fsdp.activation_offload else fn


def setup_preference(cfg: Config, env: DistEnv, c: Components, attention: AttentionChoice) -> None:
    """--use_dpo: the loop's loss becomes the preference loss, counted per pair, with its reference:
    the policy with adapters disabled (PEFT), or a frozen copy of the starting model (full), or
    (--dpo_config.precompute_reference) their log-probabilities computed once, before training."""
    d, chunk = cfg.dpo, chunk_tokens_of(cfg.train)
    objective = build_objective(d, c.model, chunk_tokens=chunk,
                                frozen_copy=lambda: setup_reference_model(cfg, env, c.tokenizer, attention),
                                after_forward=reshard)
    # the model has not trained yet: it is the reference (adapters off); before the loaders' workers
    # start (at their first batch), so that the samples they are sent carry the values
    if d.precompute_reference:
        reference = precompute_reference(cfg, env, c, objective.reference, chunk)
    elif isinstance(objective.reference, AdapterOffReference):
        reference = "the model with its adapters disabled"
    else:
        reference = "a frozen copy of the starting model" + (", sharded like it" if cfg.train.enable_fsdp else "")
    say(env, f"preference tuning: {d.loss_type.value} loss, beta {d.beta}; reference: {reference}")
    c.loss_fn = with_activation_offload(objective) if cfg.fsdp.activation_offload else objective
    c.count_fn, c.loss_stats = objective.count, objective


def precompute_reference(cfg: Config, env: DistEnv, c: Components, reference, chunk: Optional[int]) -> str:
    """--dpo_config.precompute_reference: every pair's reference log-probabilities attached to its
    samples, computed in one pass and written to <output_dir>/dpo_reference_logps.json, or, on
    --resume, read back from there when they are this run's (train/reference_store.py). Returns how."""
    loaders = {name: loader for name, loader in (("train", c.train_loader), ("eval", c.eval_loader))
               if loader is not None}
    fingerprints = {name: rows_fingerprint(loader.dataset.samples) for name, loader in loaders.items()}
    identity = reference_identity(cfg.train.model_name, cfg.train.quantization)
    out = Path(cfg.train.output_dir)
    stored, why = None, ""
    if cfg.train.resume or cfg.train.resume_from:
        stored, why = load_reference_logps(out, identity, fingerprints)
        # every rank must take the same path (computing them runs collectives)
        missing = env.all_reduce_sum(torch.tensor([0.0 if stored is not None else 1.0], device=env.device))
        if stored is not None and float(missing) > 0:
            stored, why = None, "another rank could not read it"
    if stored is not None:
        for name, loader in loaders.items():
            attach_reference_logps(loader.dataset.samples, stored[name].tolist())
        return f"read from {out / REFERENCE_FILE} (as this run computed them before its first step)"
    if why:
        say(env, f"note: --resume computes the reference log-probabilities again: {why}")
    started = time.perf_counter()
    values = {}
    for name, loader in loaders.items():
        samples = loader.dataset.samples
        values[name] = precompute_reference_logps(
            c.model, samples, reference, collate=loader.collate_fn.inner,
            batch_size=cfg.train.batch_size_training, rank=env.rank, world_size=env.world_size,
            device=env.device, all_reduce_sum=env.all_reduce_sum, chunk_tokens=chunk)
        attach_reference_logps(samples, values[name].tolist())
    reshard(c.model)
    if env.is_main:
        save_reference_logps(out, identity, fingerprints, values)
    return (f"precomputed for every pair in {time.perf_counter() - started:.1f} s, "
            f"kept in {out / REFERENCE_FILE}")


def setup_reference_model(cfg: Config, env: DistEnv, tokenizer, attention: AttentionChoice) -> torch.nn.Module:
    """A full-parameter preference run's reference: the starting model built and sharded as the
    policy is (same mesh and dtype), without what only training needs (activation checkpointing,
    compilation, freezing); train/dpo.FrozenReference freezes it."""
    ref = copy.deepcopy(cfg)
    ref.train.compile = ref.train.freeze_layers = False
    ref.fsdp.fsdp_activation_checkpointing = False
    say(env, "reference model (frozen, no gradients or optimizer state):")
    return setup_model(ref, env, tokenizer, attention, trained=False)


# --- train: epochs of steps, validation and saving; the results ------------------------------------

def train(cfg: Config, env: DistEnv, c: Components, extra_hooks: Sequence = ()) -> dict:
    """Epochs of training and validation with saving; ``extra_hooks`` are more step hooks
    (``before_step`` / ``after_step``), e.g. a benchmark's timer."""
    t = cfg.train
    # tokens/s, TFLOP/s, MFU and memory of every step (progress bar, metrics, loggers)
    meter = StepMeter.for_model(c.model, env, compute_dtype(cfg, env), t.peak_tflops)
    say(env, meter.describe())
    checkpoints = CheckpointManager(cfg, env, model=c.model, tokenizer=c.tokenizer, optimizer=c.optimizer,
                                    scheduler=c.scheduler, train_loader=c.train_loader,
                                    scheduler_for=functools.partial(build_scheduler, c.optimizer, cfg.train,
                                                                    steps_per_epoch=c.steps_per_epoch),
                                    steps_per_epoch=c.steps_per_epoch, log=functools.partial(say, env))
    state = checkpoints.load()  # resumed (the scheduler rebuilt for the remaining steps), or fresh
    c.scheduler = checkpoints.scheduler
    resumed = checkpoints.resumed_from is not None
    metrics = start_metrics(cfg, meter, state if resumed else None)
    if t.save_metrics and env.is_main:  # the curves always reach the newest checkpoint
        checkpoints.after_save = lambda: metrics.write(t.output_dir)
    loggers = start_loggers(cfg, env, meter, resumed_at=state.step if resumed else None)
    hooks = [*step_hooks(cfg, env, metrics, extra_hooks), *loggers, checkpoints]  # checkpoints: the last hook
    clip = gradient_clipper(cfg, c.model)
    sync = accumulation_switch(c.model, defer=defers_gradient_sync(t, cfg.fsdp))
    with checkpoints:  # SIGTERM / SIGUSR1 until training ends: save a checkpoint and stop
        for epoch in range(state.epoch, t.num_epochs):
            remaining = t.max_train_step - state.step if t.max_train_step > 0 else None
            if (remaining is not None and remaining <= 0) or checkpoints.stop_requested:
                break
            result = train_one_epoch(cfg, env, c, state, epoch, remaining, hooks=hooks, meter=meter,
                                     clip=clip, sync=sync)
            if result.steps == 0:
                continue
            metrics.add_epoch(result, state.step)
            if checkpoints.stop_requested:
                break  # pre-empted: the checkpoint is written, skip validation and saving
            end_epoch(cfg, env, c, epoch, result, metrics=metrics, loggers=loggers, checkpoints=checkpoints)
    for hook in hooks:
        getattr(hook, "close", lambda: None)()
    checkpoints.report_preemption()
    return results_of(cfg, metrics, checkpoints, c.compile_s)


def start_metrics(cfg: Config, meter: StepMeter, resumed: Optional[TrainState]) -> MetricsLog:
    """metrics.json's log; a resumed run keeps the curves of the steps before its checkpoint."""
    t = cfg.train
    if resumed is not None and t.save_metrics:
        metrics = MetricsLog.continued(t.output_dir, step=resumed.step, epochs_done=resumed.epoch)
    else:
        metrics = MetricsLog()
    metrics.info = meter.meta()
    return metrics


def start_loggers(cfg: Config, env: DistEnv, meter: StepMeter, resumed_at: Optional[int]) -> list:
    """--use_wandb and --use_tensorboard (main process): step hooks with ``log_epoch``."""
    t = cfg.train
    loggers: list = []
    if not env.is_main:
        return loggers
    if t.use_wandb:
        wandb = WandbLogger(cfg.wandb, cfg.to_dict())
        wandb.log_summary(meter.meta())
        loggers.append(wandb)
    if t.use_tensorboard:
        log_dir = tensorboard_dir(t.output_dir, t.tensorboard_dir)
        inside = top_entry_under(t.output_dir, log_dir)
        if inside:  # a folder of --output_dir shardtune writes: recorded before the first event file
            Path(t.output_dir).mkdir(parents=True, exist_ok=True)
            record_owned(t.output_dir, added=[inside])
        loggers.append(TensorBoardLogger(log_dir, purge_step=None if resumed_at is None else resumed_at + 1,
                                         text={"peak": meter.describe()}))
        say(env, f"tensorboard: {log_dir} (tensorboard --logdir {log_dir})")
    return loggers


def step_hooks(cfg: Config, env: DistEnv, metrics: MetricsLog, extra_hooks: Sequence) -> list:
    """The metrics log, ``extra_hooks``, the heap release, and --flop_counter / --use_profiler."""
    t = cfg.train
    hooks: list = [metrics, *extra_hooks, ReleaseAfterStep()]  # after metrics: RSS is the step's peak
    if t.flop_counter:  # its count goes to metrics.json
        hooks.append(FlopMeasure(t.flop_counter_start, print_fn=lambda *a: say(env, *a),
                                 on_measured=lambda record: metrics.add_flop_count(record)))
    if t.use_profiler:
        hooks.append(StepProfiler(t.profiler_dir, rank=env.rank))
    return hooks


def gradient_clipper(cfg: Config, model: torch.nn.Module) -> Callable[[], torch.Tensor]:
    """Clips with --gradient_clipping; always measures the norm (a NaN/inf one stops the step)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip_to = cfg.train.gradient_clipping_threshold if cfg.train.gradient_clipping else None
    return lambda: clip_grad_norm(trainable, clip_to)


def train_one_epoch(cfg: Config, env: DistEnv, c: Components, state: TrainState, epoch: int,
                    remaining: Optional[int], *, hooks: list, meter: StepMeter, clip: Callable,
                    sync: Callable[[bool], None]) -> LoopResult:
    """``epoch``'s steps, from ``state``'s data position when the run is in that epoch."""
    t = cfg.train
    current = epoch == state.epoch  # a resumed epoch: its trained batches (and samples) are skipped
    start_batch = state.batch if current else 0
    sampler = c.train_loader.batch_sampler
    sampler.set_epoch(epoch, start_batch, state.trained if current else ())  # a new order every epoch
    return train_epoch(
        c.model, c.train_loader, c.optimizer, c.scheduler, env=env, epoch=epoch,
        start_step=state.step, accumulation_steps=t.gradient_accumulation_steps, clip_grad=clip,
        max_steps=remaining, precision=c.precision, hooks=hooks, start_batch=start_batch,
        before_backward=sync,
        on_non_finite="skip" if t.skip_nonfinite_steps else "stop",
        progress_desc=f"Training Epoch {epoch + 1}/{t.num_epochs}",
        total_steps_hint=min(c.steps_per_epoch, remaining or c.steps_per_epoch), meter=meter,
        loss_fn=c.loss_fn, count_fn=c.count_fn, loss_stats=c.loss_stats)


def end_epoch(cfg: Config, env: DistEnv, c: Components, epoch: int, result: LoopResult, *,
              metrics: MetricsLog, loggers: list, checkpoints: CheckpointManager) -> None:
    """Validation, the epoch's line and loggers, saving (the checkpoint policy) and metrics.json."""
    t, step = cfg.train, checkpoints.state.step
    line = (f"Epoch {epoch + 1}/{t.num_epochs}: train_loss={result.loss:.4f} "
            f"train_ppl={result.perplexity:.4f} {result.tokens_per_s:,.0f} tok/s "
            f"MFU {result.perf.mfu:.1%} {result.seconds:.1f}s")
    val = None
    if c.eval_loader is not None:
        val = evaluate(c.model, c.eval_loader, env=env, precision=c.precision, loss_fn=c.loss_fn,
                       count_fn=c.count_fn, loss_stats=c.loss_stats, max_steps=t.max_eval_step or None)
        reshard(c.model)
        metrics.add_validation(step, val)
        line += f" | val_loss={val.loss:.4f} val_ppl={val.perplexity:.4f}"
        line += "".join(f" val_{k}={v:.4f}" for k, v in val.extra.items())  # --use_dpo
    say(env, line)
    for logger in loggers:
        logger.log_epoch(step, result, val)
    checkpoints.save_epoch_end(val.loss if val is not None else None)  # with validation: on improvement only
    if t.save_metrics and env.is_main:
        metrics.write(t.output_dir)


def results_of(cfg: Config, metrics: MetricsLog, checkpoints: CheckpointManager, compile_s: Optional[float]) -> dict:
    """llama-recipes' results dict, plus the step losses, the saves and whether the run was pre-empted."""
    state = checkpoints.state
    results = {
        "avg_train_loss": _mean(metrics.train_epoch_loss),
        "avg_train_prep": _mean(metrics.train_epoch_perplexity),
        "avg_eval_loss": _mean(metrics.val_epoch_loss),
        "avg_eval_prep": _mean(metrics.val_epoch_perplexity),
        "avg_epoch_time": _mean(metrics.epoch_time_s),
        "best_eval_loss": state.best_val,
        "steps": state.step,
        "saved_at_steps": list(state.saved_at),
        "train_step_loss": metrics.train_step_loss,
        "preempted": checkpoints.stop_requested,
        "compile_s": compile_s,  # --compile: the start-up compilation, not in any step's time
    }
    if cfg.train.save_metrics:
        results["metrics_filename"] = str(Path(cfg.train.output_dir) / "metrics.json")
    return results


# --- after the process group is gone -----------------------------------------------------------------

def merge_saved_adapter(cfg: Config, env: DistEnv, results: dict) -> Optional[Path]:
    """--merge_lora: the saved adapter folded into --model_name's own files, streamed tensor by tensor
    by ``shardtune convert --merge`` (the one merge there is), into ``<output_dir>/merged``.

    From the saved adapter, not the model in memory: what is merged is exactly what
    ``PeftModel.from_pretrained`` loads, and a QLoRA adapter lands on the *unquantized* base (folding it
    into the 4-bit weights would bake their quantization error into every merged weight). Run once,
    by the main process after the process group is gone: a long merge (70B) then makes no other rank
    wait in a collective, and an error in it cannot hang them. Nothing to do on other ranks, without
    --merge_lora, or when no adapter was saved."""
    from ..convert.core import convert

    t = cfg.train
    if not (t.merge_lora and env.is_main and results["saved_at_steps"]):
        return None
    merged = Path(t.output_dir) / "merged"
    record_owned(t.output_dir, added=["merged/"])  # recorded before it is written
    # tokenizer: the run's own (or a vision model's processor), saved with the adapter
    convert(t.output_dir, merged, model=t.model_name, merge=True, dtype=merged_dtype(cfg, env),
            tokenizer=t.output_dir, overwrite=True, log=lambda line: None)
    base = "the unquantized base" if t.quantization else "the base"
    print(f"merged the adapter into {base} {t.model_name}: {merged}", flush=True)
    return merged


def merged_dtype(cfg: Config, env: DistEnv) -> str:
    """--export_dtype, else the dtype the run kept its weights in (what a full fine-tune's export
    writes); a QLoRA run's base weights were 4-bit, so its merge keeps the base files' dtype."""
    t = cfg.train
    if t.export_dtype:
        return t.export_dtype
    if t.quantization:
        return "keep"
    return str(runtime.training_dtype(env.device, pure_bf16=cfg.fsdp.pure_bf16)).removeprefix("torch.")


# --- small helpers ---------------------------------------------------------------------------------

def say(env: DistEnv, *args) -> None:
    if env.is_main:
        print(*args, flush=True)


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None
