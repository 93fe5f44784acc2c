"""The fine-tuning recipe: the one place that wires the components together. Read it top to bottom.

    python -m shardtune.finetuning --model_name PATH --dataset alpaca_dataset ...
    torchrun --nproc_per_node 2 -m shardtune.finetuning --enable_fsdp ...   (FSDP)

Flags are llama-recipes' (``--help-config`` lists them all); ``--config run.yaml`` and
``key=value`` overrides work too, and ``--print-config`` shows the resolved configuration.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import yaml

from . import runtime
from .checkpoint import layout as checkpoint_layout
from .checkpoint.hf_export import save_hf_model
from .checkpoint.hf_stream import DTYPES
from .checkpoint.listing import checkpoint_size
from .checkpoint.manager import Checkpointer, Position, StepCheckpoints
from .checkpoint.preemption import PreemptionSignal
from .checkpoint.resume_plan import DataRecord
from .checkpoint.sizes import human_size
from .config import Config, ShardtuneError, describe_options, parse_args
from .config.configs import BatchingStrategy, StateDictType, defers_gradient_sync
from .convert.mergeable import check_mergeable
from .data import build_dataloader, check_data_source, load_split, pad_fraction
from .data.fingerprint import rows_fingerprint
from .data.registry import check_dataset_for_model
from .eval.quick import evaluate_after_training
from .host_malloc import ReleaseAfterStep, release_free_memory, tune_host_malloc
from .model.family import ModelFamily, decoder_layers, family_for_config
from .model.freeze import freeze_first_layers, freeze_llm_only, freeze_vision_tower, trainable_summary
from .model.attention import AttentionChoice, choose_attention
from .model.loading import (check_model_source, check_tokenizer_source, check_vocab_fits, load_config, load_inputs,
                            load_model, match_vocab)
from .output_lock import hold_unless_launcher_does
from .ownership import check_not_an_input, check_output_dir, check_writable, record as record_owned, remove_stale_temps
from .model.peft import apply_peft
from .model.quantization import bnb_config, check_storage_for_fsdp, keep_packed_layout, prepare_for_training
from .parallel.activation_checkpointing import (check_activation_offload, enable_activation_checkpointing,
                                                with_activation_offload)
from .parallel.compile import check_compile, compile_decoder_layers, warm_up
from .parallel.distributed import DistEnv, check_world_size, init_distributed, shutdown
from .parallel.fsdp import accumulation_switch, clip_grad_norm, reshard, shard_model, weights_finite
from .model.low_cpu import build_meta_model, materialize_and_load
from .precision import compute_dtype, describe_precision, fsdp_compute_dtype
from .parallel.mesh import build_mesh
from .train.flops import FlopMeasure
from .data.preference import attach_reference_logps
from .train.dpo import AdapterOffReference, build_objective, precompute_reference_logps
from .train.loop import LossStats, Precision, evaluate, label_tokens, loss_sum, to_device, train_epoch
from .train.loss import chunk_tokens_of
from .train.metrics import MetricsLog
from .train.optim import build_optimizer, build_scheduler
from .train.perf import StepMeter
from .train.profiler import StepProfiler
from .train.progress import quiet_library_bars
from .train.tensorboard_log import TensorBoardLogger, check_tensorboard_dir, tensorboard_dir
from .train.wandb_log import WandbLogger


@dataclass
class Components:
    model: torch.nn.Module
    tokenizer: object  # a vision model's processor (image processor + tokenizer)
    train_loader: object
    eval_loader: Optional[object]
    optimizer: torch.optim.Optimizer
    scheduler: object
    precision: Precision
    loss_fn: Callable = loss_sum  # a micro-batch's forward + summed loss (--loss, --activation_offload)
    compile_s: Optional[float] = None  # --compile: seconds the start-up forward + backward took
    count_fn: Callable = label_tokens  # what loss_fn's sum is over: label tokens; pairs for --use_dpo
    loss_stats: Optional[LossStats] = None  # loss_fn's other figures (--use_dpo: rewards, accuracy)


def say(env: DistEnv, *args) -> None:
    if env.is_main:
        print(*args, flush=True)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a transformers dependency
        pass


def setup_model(cfg: Config, env: DistEnv, tokenizer) -> torch.nn.Module:
    t, f = cfg.train, cfg.fsdp
    dtype = runtime.training_dtype(env.device, pure_bf16=f.pure_bf16)
    attn = attention_for(cfg, env).implementation
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
    say(env, trainable_summary(model))
    return model


def attention_for(cfg: Config, env: DistEnv) -> AttentionChoice:
    cls = family_for_config(load_config(cfg.train.model_name)).model_class()
    supports_flash = getattr(cls, "_supports_flash_attn", True)  # an Auto class: decided per model
    return choose_attention(cfg.train.use_fast_kernels, env.device, compute_dtype(cfg, env),
                            model_supports_flash=supports_flash is not False, model_name=cls.__name__,
                            packing=cfg.train.batching_strategy == BatchingStrategy.packing)


def setup_data(cfg: Config, tokenizer, env: DistEnv, family: ModelFamily):
    t = cfg.train
    required = family.required_batch_keys  # a vision model's batches must all carry images
    varlen = attention_for(cfg, env).packed_needs_varlen  # flash / packed SDPA take document lengths
    train_split = load_split(cfg, tokenizer, "train")
    say(env, f"train data: {train_split.report.summary()}")
    train_loader = build_dataloader(
        train_split.samples, tokenizer=tokenizer, strategy=t.batching_strategy,
        batch_size=t.batch_size_training, context_length=t.context_length, shuffle=True,
        seed=t.seed, rank=env.rank, world_size=env.world_size, drop_last=True,
        num_workers=t.num_workers_dataloader, collate_fn=train_split.collate_fn, packed_varlen=varlen,
        required_keys=required)
    if len(train_loader) == 0:
        raise ShardtuneError(
            f"The training set gives no full batch: {len(train_split.samples)} samples (after "
            f"{t.batching_strategy.value}) for a global batch of {t.batch_size_training} x "
            f"{env.world_size} ranks. Lower --batch_size_training or add data.")
    say(env, f"batching: {t.batching_strategy.value}, {len(train_loader)} batches per rank per epoch, "
             f"pad fraction {pad_fraction(train_loader):.1%}")
    eval_loader = None
    if t.run_validation:
        eval_split = load_split(cfg, tokenizer, "test")
        say(env, f"eval data: {eval_split.report.summary()}")
        eval_loader = build_dataloader(
            eval_split.samples, tokenizer=tokenizer, strategy=t.batching_strategy,
            batch_size=t.val_batch_size, context_length=t.context_length, shuffle=False,
            seed=t.seed, rank=env.rank, world_size=env.world_size, drop_last=False,
            num_workers=t.num_workers_dataloader, collate_fn=eval_split.collate_fn, packed_varlen=varlen,
            required_keys=required)
    return train_loader, eval_loader


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


def setup(cfg: Config, env: DistEnv) -> Components:
    t = cfg.train
    set_seed(t.seed)
    family = family_for_config(load_config(t.model_name))
    check_family_options(cfg, family)
    if t.compile:  # refused before any loading where inductor cannot work
        check_compile(env.device)
    if cfg.fsdp.activation_offload:
        check_activation_offload(env.device)
    tokenizer = load_inputs(t.model_name, t.tokenizer_name)  # the processor of a vision model
    for line in describe_precision(cfg, env):
        say(env, line)
    say(env, attention_for(cfg, env).describe())
    if t.enable_fsdp and t.gradient_accumulation_steps > 1:
        say(env, _describe_gradient_sync(cfg))
    train_loader, eval_loader = setup_data(cfg, tokenizer, env, family)
    model = setup_model(cfg, env, tokenizer)
    optimizer = build_optimizer(model.parameters(), t, cfg.fsdp)
    steps_per_epoch = math.ceil(len(train_loader) / t.gradient_accumulation_steps)
    total = steps_per_epoch * t.num_epochs
    if t.max_train_step > 0:
        total = min(total, t.max_train_step)
    scheduler = build_scheduler(optimizer, t, steps_per_epoch=steps_per_epoch, total_steps=total)
    precision = setup_precision(cfg, env)
    c = Components(model, tokenizer, train_loader, eval_loader, optimizer, scheduler, precision,
                   loss_fn=setup_loss(cfg))
    if t.use_dpo:  # --- preference tuning: the DPO/IPO loss over pairs (train/dpo.py) ---
        setup_preference(cfg, env, c)
    if t.compile:  # compiled now, on a real batch, so that training steps are timed without it
        c.compile_s = warm_up(model, to_device(next(iter(train_loader)), env.device), c.loss_fn, precision.autocast)
        say(env, f"compile: compiled {len(decoder_layers(model))} decoder layers in {c.compile_s:.1f} s (one "
                 "forward + backward; a batch of a new shape compiles again)")
    return c


def setup_loss(cfg: Config) -> Callable:
    """A micro-batch's forward and summed loss: --loss plain|chunked, under --activation_offload."""
    t = cfg.train
    fn = functools.partial(loss_sum, chunk_tokens=chunk_tokens_of(t))
    return with_activation_offload(fn) if cfg.fsdp.activation_offload else fn


def setup_preference(cfg: Config, env: DistEnv, c: Components) -> None:
    """--use_dpo: the loop's loss becomes the preference loss, counted per pair, with its reference:
    the policy with adapters disabled (PEFT), or a frozen copy of the starting model (full), or
    (--dpo_config.precompute_reference) their log-probabilities computed once, before training."""
    d, chunk = cfg.dpo, chunk_tokens_of(cfg.train)
    objective = build_objective(d, c.model, chunk_tokens=chunk,
                                frozen_copy=lambda: setup_reference_model(cfg, env, c.tokenizer),
                                after_forward=reshard)
    # the model has not trained yet: it is the reference (adapters off); before the loaders' workers
    # start (at their first batch), so that the samples they are sent carry the values
    if d.precompute_reference:
        started = time.perf_counter()
        for loader in (c.train_loader, c.eval_loader):
            if loader is None:
                continue
            samples = loader.dataset.samples
            attach_reference_logps(samples, precompute_reference_logps(
                c.model, samples, objective.reference, collate=loader.collate_fn.inner,
                batch_size=cfg.train.batch_size_training, rank=env.rank, world_size=env.world_size,
                device=env.device, all_reduce_sum=env.all_reduce_sum, chunk_tokens=chunk))
        reshard(c.model)
        reference = f"precomputed for every pair in {time.perf_counter() - started:.1f} s"
    elif isinstance(objective.reference, AdapterOffReference):
        reference = "the model with its adapters disabled"
    else:
        reference = "a frozen copy of the starting model" + (", sharded like it" if cfg.train.enable_fsdp else "")
    say(env, f"preference tuning: {d.loss_type.value} loss, beta {d.beta}; reference: {reference}")
    c.loss_fn = with_activation_offload(objective) if cfg.fsdp.activation_offload else objective
    c.count_fn, c.loss_stats = objective.count, objective


def setup_reference_model(cfg: Config, env: DistEnv, tokenizer) -> torch.nn.Module:
    """A full-parameter preference run's reference: the starting model built and sharded as the
    policy is (same mesh and dtype), without what only training needs (activation checkpointing,
    compilation, freezing); train/dpo.FrozenReference freezes it."""
    ref = copy.deepcopy(cfg)
    ref.train.compile = ref.train.freeze_layers = False
    ref.fsdp.fsdp_activation_checkpointing = False
    say(env, "reference model (frozen, no gradients or optimizer state):")
    return setup_model(ref, env, tokenizer)


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


def checkpoint_run_dir(cfg: Config) -> Path:
    """``<dist_checkpoint_root_folder>/<dist_checkpoint_folder>``; llama-recipes' placeholder
    root (never set by the user) means ``<output_dir>/checkpoints``."""
    t = cfg.train
    root = t.dist_checkpoint_root_folder
    if root == type(t)().dist_checkpoint_root_folder:
        root = str(Path(t.output_dir) / "checkpoints")
    return checkpoint_layout.run_dir(root, t.dist_checkpoint_folder)


def top_entry_under(directory: str, path: Path) -> Optional[str]:
    """The top-level folder of ``directory`` that holds ``path`` (``"checkpoints/"``), or None."""
    try:
        rel = Path(path).resolve().relative_to(Path(directory).resolve())
    except ValueError:
        return None
    return rel.parts[0] + "/" if rel.parts else None


def writes_resumable_checkpoints(cfg: Config) -> bool:
    t = cfg.train
    sharded = t.enable_fsdp and cfg.fsdp.checkpoint_type == StateDictType.SHARDED_STATE_DICT
    return sharded or t.save_every_n_steps > 0 or t.resume or bool(t.resume_from)


def train(cfg: Config, env: DistEnv, c: Components, extra_hooks: Sequence = ()) -> dict:
    """Epochs of training and validation with saving; ``extra_hooks`` are more step hooks
    (``before_step`` / ``after_step``), e.g. a benchmark's timer."""
    t = cfg.train
    # tokens/s, TFLOP/s, MFU and memory of every step (progress bar, metrics, loggers)
    meter = StepMeter.for_model(c.model, env, compute_dtype(cfg, env), t.peak_tflops)
    say(env, meter.describe())
    metrics = MetricsLog()
    metrics.info = meter.meta()
    hooks: list = [metrics, *extra_hooks, ReleaseAfterStep()]  # after metrics: RSS is the step's peak
    if t.flop_counter:  # its count goes to metrics.json (late binding: a resume replaces the log)
        hooks.append(FlopMeasure(t.flop_counter_start, print_fn=lambda *a: say(env, *a),
                                 on_measured=lambda record: metrics.add_flop_count(record)))
    if t.use_profiler:
        hooks.append(StepProfiler(t.profiler_dir, rank=env.rank))
    trainable = [p for p in c.model.parameters() if p.requires_grad]
    # Clips with --gradient_clipping; always measures the norm (a NaN/inf one stops the step).
    clip_to = t.gradient_clipping_threshold if t.gradient_clipping else None
    clip = lambda: clip_grad_norm(trainable, clip_to)  # noqa: E731

    # Resume, then checkpoints every N steps and on pre-emption (a step hook).
    sampler = c.train_loader.batch_sampler
    batches_per_epoch = len(c.train_loader)  # a whole epoch: before a resume positions the sampler
    steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
    rows = c.train_loader.dataset.samples  # digested once, at the first save or resume: how positions are counted
    checkpointer = Checkpointer(checkpoint_run_dir(cfg), env=env, config_dict=cfg.to_dict(), keep_last_n=t.keep_last_n,
                                data_of=lambda: DataRecord.of(sampler, rows_fingerprint(rows)))
    inside_output = top_entry_under(t.output_dir, checkpointer.run)
    pos = Position()
    resume_path = checkpointer.find_resume_point(t.resume, t.resume_from)
    if resume_path is not None:
        started = time.perf_counter()
        say(env, f"resuming from {resume_path} ({human_size(checkpoint_size(resume_path))}): checking its files' "
                 "digests, then loading")
        # each setting that differs from the checkpoint's: applied, remapped, or refused before loading
        plan = checkpointer.plan(resume_path, sampler=sampler, steps_per_epoch=steps_per_epoch,
                                 num_epochs=t.num_epochs, max_train_step=t.max_train_step)
        for line in plan.lines:
            say(env, line)
        c.scheduler = build_scheduler(c.optimizer, t, steps_per_epoch=steps_per_epoch, total_steps=plan.total_steps,
                                      resumed_epoch=plan.resumed_epoch)  # the run's remaining steps, this layout
        pos = checkpointer.resume(resume_path, plan, model=c.model, optimizer=c.optimizer, scheduler=c.scheduler)
        say(env, f"resumed from {resume_path} in {time.perf_counter() - started:.1f} s: epoch {pos.epoch + 1}, "
                 f"step {pos.step}")
        if 0 < t.max_train_step <= pos.step or pos.epoch >= t.num_epochs:
            limit = (f"--max_train_step is {t.max_train_step}" if 0 < t.max_train_step <= pos.step
                     else f"all {t.num_epochs} epochs (--num_epochs) are done")
            say(env, f"nothing to train: the checkpoint is at step {pos.step} and {limit}. Raise "
                     "--max_train_step or --num_epochs to train further.")
        if t.save_metrics:  # keep the curves of the steps before the checkpoint
            metrics = MetricsLog.continued(t.output_dir, step=pos.step, epochs_done=pos.epoch)
            metrics.info = meter.meta()
            hooks[0] = metrics
    elif t.resume:
        say(env, f"--resume: no complete checkpoint under {checkpointer.run} yet; starting from scratch")
    loggers = start_loggers(cfg, env, meter, resumed_at=pos.step if resume_path is not None else None)
    hooks.extend(loggers)
    best_val = pos.best_val if pos.best_val is not None else math.inf
    saved_at = list(pos.saved_at)

    def position_after(result) -> Position:
        done = result.epoch_batch >= sampler.epoch_batches
        return Position(epoch=result.epoch + done, batch=0 if done else result.epoch_batch,
                        step=result.step, best_val=best_val if math.isfinite(best_val) else None,
                        saved_at=tuple(saved_at), trained=() if done else tuple(sorted(sampler.skip)))

    def save_resumable(position: Position, with_optimizer: bool = True) -> None:
        refuse_non_finite(c.model, env, position.step, "checkpoint")
        if env.is_main and inside_output:  # the checkpoint folder under --output_dir is shardtune's,
            Path(t.output_dir).mkdir(parents=True, exist_ok=True)  # recorded before the first write
            record_owned(t.output_dir, added=[inside_output])
        path = checkpointer.save(position, model=c.model, optimizer=c.optimizer if with_optimizer else None,
                                 scheduler=c.scheduler)
        say(env, f"checkpoint: {path}")
        if t.save_metrics and env.is_main:  # the curves always reach the newest checkpoint
            metrics.write(t.output_dir)

    preemption = PreemptionSignal(env).install()
    step_saves = StepCheckpoints(checkpointer, every_n=t.save_every_n_steps, preemption=preemption,
                                 position_of=position_after, save=save_resumable)
    hooks.append(step_saves)
    step = pos.step
    sync = accumulation_switch(c.model, defer=defers_gradient_sync(t, cfg.fsdp))
    try:
        for epoch in range(pos.epoch, t.num_epochs):
            remaining = t.max_train_step - step if t.max_train_step > 0 else None
            if (remaining is not None and remaining <= 0) or step_saves.stop_requested:
                break
            start_batch = pos.batch if epoch == pos.epoch else 0
            sampler.set_epoch(epoch, start_batch, pos.trained if epoch == pos.epoch else ())  # a new order every epoch
            result = train_epoch(
                c.model, c.train_loader, c.optimizer, c.scheduler, env=env, epoch=epoch,
                start_step=step, accumulation_steps=t.gradient_accumulation_steps, clip_grad=clip,
                max_steps=remaining, precision=c.precision, hooks=hooks, start_batch=start_batch,
                before_backward=sync,
                on_non_finite="skip" if t.skip_nonfinite_steps else "stop",
                progress_desc=f"Training Epoch {epoch + 1}/{t.num_epochs}",
                total_steps_hint=min(steps_per_epoch, remaining or steps_per_epoch), meter=meter,
                loss_fn=c.loss_fn, count_fn=c.count_fn, loss_stats=c.loss_stats)
            step += result.steps
            if result.steps == 0:
                continue
            metrics.add_epoch(result, step)
            last = step_saves.last_result
            if step_saves.stop_requested:
                break  # pre-empted: the checkpoint is written, skip validation and saving
            line = (f"Epoch {epoch + 1}/{t.num_epochs}: train_loss={result.loss:.4f} "
                    f"train_ppl={result.perplexity:.4f} {result.tokens_per_s:,.0f} tok/s "
                    f"MFU {result.perf.mfu:.1%} {result.seconds:.1f}s")
            improved, val = True, None
            if c.eval_loader is not None:
                val = evaluate(c.model, c.eval_loader, env=env, precision=c.precision, loss_fn=c.loss_fn,
                               count_fn=c.count_fn, loss_stats=c.loss_stats, max_steps=t.max_eval_step or None)
                reshard(c.model)
                metrics.add_validation(step, val)
                line += f" | val_loss={val.loss:.4f} val_ppl={val.perplexity:.4f}"
                line += "".join(f" val_{k}={v:.4f}" for k, v in val.extra.items())  # --use_dpo
                improved = val.loss < best_val
                best_val = min(best_val, val.loss)
            say(env, line)
            for logger in loggers:
                logger.log_epoch(step, result, val)
            # llama-recipes semantics: with validation, save only when the eval loss improves.
            if t.save_model and improved:
                refuse_non_finite(c.model, env, step, "model")
                saved_at.append(step)
                save_hf_model(c.model, c.tokenizer, t.output_dir, env=env, dtype=export_dtype(t))  # --merge_lora: run()
                say(env, f"saved the {'adapter' if t.use_peft else 'model'} to {t.output_dir} (step {step})")
                if writes_resumable_checkpoints(cfg) and step_saves.last_saved_step != step:
                    save_resumable(position_after(last), with_optimizer=t.save_optimizer or t.save_every_n_steps > 0
                                   or t.resume or bool(t.resume_from))
            if t.save_metrics and env.is_main:
                metrics.write(t.output_dir)
    finally:  # the signal handlers are the process's: restore them even on an error
        preemption.uninstall()
    for hook in hooks:
        getattr(hook, "close", lambda: None)()
    if step_saves.stop_requested:
        say(env, f"pre-empted ({preemption.received or 'signal on another rank'}): saved a checkpoint "
                 f"at step {step} under {checkpointer.run}. Run the same command with --resume to continue.")
    results = {
        "avg_train_loss": _mean(metrics.train_epoch_loss),
        "avg_train_prep": _mean(metrics.train_epoch_perplexity),
        "avg_eval_loss": _mean(metrics.val_epoch_loss),
        "avg_eval_prep": _mean(metrics.val_epoch_perplexity),
        "avg_epoch_time": _mean(metrics.epoch_time_s),
        "best_eval_loss": best_val if math.isfinite(best_val) else None,
        "steps": step,
        "saved_at_steps": saved_at,
        "train_step_loss": metrics.train_step_loss,
        "preempted": step_saves.stop_requested,
        "compile_s": c.compile_s,  # --compile: the start-up compilation, not in any step's time
    }
    if t.save_metrics:
        results["metrics_filename"] = str(Path(t.output_dir) / "metrics.json")
    return results


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


def refuse_non_finite(model: torch.nn.Module, env: DistEnv, step: int, what: str) -> None:
    """A model with a NaN/inf weight is never saved: no export, no checkpoint over a good one."""
    if not weights_finite(model, env.all_reduce_sum, env.device):
        raise ShardtuneError(
            f"After step {step} the model has non-finite (NaN or inf) weights, so the {what} was not "
            "saved and the earlier checkpoints and outputs are untouched. The learning rate is "
            "likely too high for this model (or fp16 overflowed); lower --lr or turn on "
            "--gradient_clipping, and --resume from the last checkpoint.")


def merge_saved_adapter(cfg: Config, env: DistEnv, results: dict) -> Optional[Path]:
    """--merge_lora: the saved adapter folded into --model_name's own files, streamed tensor by tensor
    by ``shardtune convert --merge`` (the one merge there is), into ``<output_dir>/merged``.

    From the saved adapter, not the model in memory: what is merged is exactly what
    ``PeftModel.from_pretrained`` loads, and a QLoRA adapter lands on the *unquantized* base (folding it
    into the 4-bit weights would bake their quantization error into every merged weight). Run once,
    by the main process after the process group is gone: a long merge (70B) then makes no other rank
    wait in a collective, and an error in it cannot hang them. Nothing to do on other ranks, without
    --merge_lora, or when no adapter was saved."""
    from .convert.core import convert

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


def export_dtype(t) -> Optional[torch.dtype]:
    return DTYPES[t.export_dtype] if t.export_dtype else None


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def check_family_options(cfg: Config, family: ModelFamily) -> None:
    """Options that this model family cannot honour are refused, never silently ignored."""
    t = cfg.train
    check_dataset_for_model(t.dataset, family.is_vision, t.model_name)
    if family.is_vision and t.batching_strategy.value == "packing":
        raise ShardtuneError(
            f"--batching_strategy packing is not available for vision models ({family.name}): a packed row "
            "would join several samples' images and text, and each image must stay with its own "
            "text. Pass --batching_strategy padding (as llama-recipes' vision examples do).")
    if family.is_vision and t.quantization:
        raise ShardtuneError(
            f"--quantization (QLoRA) is not supported for vision models ({family.name}) yet. Use LoRA "
            "without --quantization (--use_peft --peft_method lora), or --freeze_LLM_only.")
    if family.is_vision and t.use_peft and t.peft_method.value == "llama_adapter":
        raise ShardtuneError(
            "--peft_method llama_adapter is for text models: peft's LLaMA-Adapter wraps Llama's "
            "self-attention and does not know Llama 3.2 Vision's. Use --peft_method lora.")
    for flag, on in (("--freeze_LLM_only", t.freeze_LLM_only), ("--freeze_vision_tower", t.freeze_vision_tower)):
        if on and not family.is_vision:
            raise ShardtuneError(
                f"{flag} is for vision models (Llama 3.2 Vision / Mllama), which have a language model and a "
                "vision tower to freeze separately; this model has none. Use --freeze_layers or --use_peft.")
        if on and t.use_peft:  # peft freezes every base weight: the parts the flag keeps would not train
            raise ShardtuneError(
                f"{flag} chooses which base weights train, but --use_peft freezes all of them and trains only "
                "the adapter, so the flag would change nothing. Use one or the other (a LoRA can reach "
                "the vision tower through --lora_config.target_modules with dotted names: docs/vision.md).")


def preflight(cfg: Config, world_size: int) -> list[str]:
    """Everything that can be refused before any work starts (and before ranks are launched):
    the model path, the data source, the world size, and the output directory. Returns the
    files of --output_dir that --overwrite_output_dir lets the run write beside."""
    t = cfg.train
    check_model_source(t.model_name)
    if (Path(t.model_name) / "config.json").is_file():  # a hub id's config is read once ranks start
        check_family_options(cfg, family_for_config(load_config(t.model_name)))
    if t.tokenizer_name:
        check_tokenizer_source(t.tokenizer_name, "--tokenizer_name")
    check_data_source(cfg)
    check_world_size(t.enable_fsdp, world_size)
    board = tensorboard_dir(t.output_dir, t.tensorboard_dir) if t.use_tensorboard else None
    if board is not None:
        check_tensorboard_dir(board, {"--model_name": t.model_name, "--tokenizer_name": t.tokenizer_name,
                                      "--from_peft_checkpoint": t.from_peft_checkpoint}, t.output_dir)
    ckpt = checkpoint_run_dir(cfg)
    whole = [entry for entry in (top_entry_under(t.output_dir, ckpt),
                                 "merged/" if t.merge_lora else None,
                                 top_entry_under(t.output_dir, board) if board is not None else None) if entry]
    inputs = {"--model_name": t.model_name, "--tokenizer_name": t.tokenizer_name,
              "--from_peft_checkpoint": t.from_peft_checkpoint}
    foreign = check_output_dir(t.output_dir, flag="--output_dir", overwrite=t.overwrite_output_dir,
                               overwrite_flag="--overwrite_output_dir", replaced_whole=whole, protected=inputs)
    check_writable(t.output_dir, "--output_dir")
    if writes_resumable_checkpoints(cfg) and not top_entry_under(t.output_dir, ckpt):  # elsewhere
        check_not_an_input(ckpt, "--dist_checkpoint_root_folder", inputs)
        check_writable(ckpt, "--dist_checkpoint_root_folder")
    if board is not None:
        check_writable(board, "--tensorboard_dir")
    return foreign


@contextlib.contextmanager
def hold_outputs(cfg: Config, launcher: bool = False) -> Iterator[None]:
    """One run per --output_dir: the launcher (``launcher``: it tells its ranks), a single process,
    or rank 0 of a bare torchrun launch locks it for the run's life, and removes what an
    interrupted earlier save left there (no other run can be writing it now)."""
    lock = None
    if int(os.environ.get("RANK", 0)) == 0:
        lock = hold_unless_launcher_does(cfg.train.output_dir)
        if lock is not None:
            remove_stale_temps(cfg.train.output_dir)
            if launcher:
                lock.export_to_children()
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def run(cfg: Config) -> dict:
    """Fine-tune with a resolved config; returns llama-recipes' results dict (plus step losses)."""
    foreign = preflight(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    with hold_outputs(cfg):  # one run per --output_dir, until this run has written everything
        return run_held(cfg, foreign)


def run_held(cfg: Config, foreign: list[str]) -> dict:
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
    try:
        components = setup(cfg, env)
        release_free_memory()  # loading's transient peak, kept by the tuned heap, goes back
        results = train(cfg, env, components)
    finally:
        shutdown()
    merge_saved_adapter(cfg, env, results)  # --merge_lora, with no rank left waiting
    if t.run_eval_after and env.is_main:  # the saved model on the eval split, added to metrics.json
        results["eval_after"] = evaluate_after_training(cfg, results, env.device)
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parsed = parse_args(sys.argv[1:] if argv is None else argv)
    if parsed.help_config:
        print(describe_options())
        return {}
    if parsed.print_config:
        print(yaml.safe_dump(parsed.config.to_dict(), sort_keys=False), end="")
        return {}
    return run(parsed.config)


if __name__ == "__main__":
    from .exits import run_with_clean_errors

    run_with_clean_errors(main)
