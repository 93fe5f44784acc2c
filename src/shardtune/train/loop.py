"""The train and eval loops. They know nothing of FSDP strategies, datasets or checkpoints.

Loss normalisation: a step's loss is the sum of token losses over all its micro-batches and
all ranks divided by the *global* number of label tokens. Each rank backpropagates
``local_sum * world_size / global_tokens``, and FSDP/DDP averaging over ranks then yields the
gradient of the global token mean. So k accumulated micro-batches equal one batch k times
larger, and W ranks equal one process with the same global batch, exactly (llama-recipes
averages per-micro-batch means, which weights short batches' tokens more).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional

import torch
from ..batches import CAUSAL_PADDING, IGNORE_INDEX
from ..config.errors import ShardtuneError
from ..parallel.distributed import DistEnv
from .flops import batch_token_stats
from .loss import next_token_loss_sum
from .progress import LoopProgress
from .types import LossStats, LoopResult, StepHook, StepResult

if TYPE_CHECKING:
    from .perf import StepMeter

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values",
                 "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask",
                 # packed batches for flash-attn's varlen kernel (data/packing.varlen_lengths)
                 "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class Precision:
    """How the forward runs: autocast dtype (None = full precision) and an fp16 grad scaler."""

    device_type: str = "cpu"
    autocast_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)


def loss_sum(model: torch.nn.Module, batch: dict, chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the batch's label tokens, in fp32;
    ``chunk_tokens``: the head and the loss a chunk of label tokens at a time (train/loss.py)."""
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    if batch.get(CAUSAL_PADDING):  # right padding without labels: the causal mask alone is exact
        inputs.pop("attention_mask", None)
    return next_token_loss_sum(model, inputs, batch["labels"], chunk_tokens)


def label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: dict) -> int:
    """Non-pad tokens: attention-mask ones, or a packed row's documents without its pad tail."""
    return batch_token_stats(batch)[0]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _groups(loader: Iterable, size: int) -> Iterator[list]:
    group: list = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:  # the epoch's last, shorter group still makes an optimizer step (as llama-recipes)
        yield group


class NonFiniteStep(ShardtuneError):
    """A step's loss or gradient norm was NaN/inf; raised before the update, on every rank."""

    def __init__(self, step: int, epoch: int, problem: str) -> None:
        self.step = step
        super().__init__(
            f"Training stopped at step {step} (epoch {epoch + 1}): {problem}. This step made no update, "
            f"so the model is still the one after step {step - 1}, and nothing non-finite was saved; "
            "earlier checkpoints are kept. Lower --lr, turn on --gradient_clipping, check the data, "
            "or use --fsdp_config.pure_bf16 / --use_fp16 with care; --resume continues from the last "
            "checkpoint, and --skip_nonfinite_steps skips such steps instead of stopping.")


def _non_finite(loss_sum: float, grad_norm: Optional[torch.Tensor], scaled: bool) -> str:
    """What is wrong with a step ("" when its loss and gradient norm are finite)."""
    if not math.isfinite(loss_sum):
        return f"the loss is {loss_sum}"
    if grad_norm is not None and not scaled:
        norm = float(grad_norm)
        if not math.isfinite(norm):
            return f"the gradient norm is {norm}"
    return ""


def _global_sums(env: DistEnv, *values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    env.all_reduce_sum(t)
    return t.tolist()


def train_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    env: DistEnv,
    epoch: int,
    start_step: int,
    accumulation_steps: int = 1,
    clip_grad: Optional[Callable[[], torch.Tensor]] = None,
    max_steps: Optional[int] = None,
    precision: Precision = Precision(),
    before_backward: Callable[[bool], None] = lambda last: None,
    hooks: Iterable[StepHook] = (),
    progress_desc: str = "Training",
    total_steps_hint: Optional[int] = None,
    start_batch: int = 0,
    on_non_finite: str = "stop",
    meter: Optional["StepMeter"] = None,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] = loss_sum,
    count_fn: Callable[[dict], int] = label_tokens,
    loss_stats: Optional[LossStats] = None,
) -> LoopResult:
    """One epoch of optimizer steps; stops early after ``max_steps`` steps (None = no limit) or
    when a hook sets ``stop_requested``. ``start_batch`` is how many micro-batches of the epoch
    the loader skips (resume); it only offsets ``StepResult.epoch_batch``.

    ``clip_grad`` clips and returns the global gradient norm. A step whose loss or gradient norm
    is not finite makes no update: ``on_non_finite="stop"`` raises :class:`NonFiniteStep` (the
    weights are still those of the step before); ``"skip"`` warns and goes on (the step counts
    for the schedule and the hooks, with ``StepResult.skipped``, but not in the epoch loss). With
    an fp16 grad scaler an infinite gradient is an overflow the scaler handles itself.

    ``before_backward(last)`` runs before each micro-batch's forward and backward, with whether it
    is the step's last (the recipe's FSDP gradient-reduction schedule, ``parallel.fsdp.accumulation_switch``).

    ``meter`` (``perf.StepMeter``) measures throughput, MFU and memory: per step into
    ``StepResult.perf`` (before the hooks see it) and the progress bar, per epoch into
    ``LoopResult.perf`` (every rank calls it at the end: it reduces over ranks).

    ``loss_fn(model, batch)`` runs a micro-batch's forward and returns its summed loss
    (:func:`loss_sum`; the recipe picks plain or chunked and adds activation offloading);
    ``count_fn(batch)`` is how many units its loss sums over (label tokens; preference pairs for
    DPO), the normaliser of a step's loss; ``loss_stats``: the loss function's other figures."""
    model.train()
    hooks = list(hooks)
    step = start_step
    run_loss_sum = run_label_tokens = run_input_tokens = run_doc_len_sq = 0.0
    if meter is not None:
        meter.start_epoch()
    epoch_start = time.perf_counter()
    steps_done = 0
    batches_done = start_batch
    bar = LoopProgress(progress_desc, total_steps_hint, enabled=env.is_main)  # a tqdm bar, or plain lines in a log
    for group in _groups(loader, accumulation_steps):
        if max_steps is not None and steps_done >= max_steps:
            break
        if meter is not None:
            meter.before_step(step)
        for hook in hooks:
            hook.before_step(step)
        t0 = time.perf_counter()
        stats = [batch_token_stats(b) for b in group]  # on the host, before the copy to the device
        group = [to_device(b, env.device) for b in group]
        local_labels = sum(count_fn(b) for b in group)
        local_inputs = sum(n for n, _ in stats)
        local_sq = sum(sq for _, sq in stats)
        global_labels, global_inputs, global_sq = _global_sums(env, local_labels, local_inputs, local_sq)
        scale = env.world_size / max(global_labels, 1.0)
        local_loss = torch.zeros((), dtype=torch.float64, device=env.device)
        if loss_stats is not None:
            loss_stats.reset()
        for i, batch in enumerate(group):
            before_backward(i == len(group) - 1)  # FSDP: which reductions wait for the last micro-batch
            with precision.autocast():
                summed = loss_fn(model, batch)
            loss = summed * scale
            (precision.scaler.scale(loss) if precision.scaler else loss).backward()
            local_loss += summed.detach().double()
        if precision.scaler:
            precision.scaler.unscale_(optimizer)
        grad_norm = clip_grad() if clip_grad is not None else None
        (step_loss_sum,) = _global_sums(env, float(local_loss))
        # Both are global (reduced over ranks), so every rank takes the same branch.
        problem = _non_finite(step_loss_sum, grad_norm, scaled=precision.scaler is not None)
        if problem and on_non_finite != "skip":
            optimizer.zero_grad(set_to_none=True)
            if precision.scaler:  # end the unscaled step: a scaler keyed by id(optimizer) stays usable
                precision.scaler.update()
            bar.close()
            raise NonFiniteStep(step + 1, epoch, problem)
        if problem:  # --skip_nonfinite_steps: the step happens (schedule, hooks, position) without an update
            bar.write(f"step {step + 1}: {problem}; skipped (--skip_nonfinite_steps): no update")
            if precision.scaler:
                precision.scaler.update()  # unscale_ was called; update() ends the step (and lowers the scale)
        elif precision.scaler:
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        steps_done += 1
        batches_done += len(group)
        result = StepResult(step=step, epoch=epoch, loss=step_loss_sum / max(global_labels, 1.0),
                            label_tokens=int(global_labels), input_tokens=int(global_inputs),
                            seconds=time.perf_counter() - t0, lr=lr, epoch_batch=batches_done,
                            skipped=bool(problem), doc_len_sq=int(global_sq))
        if loss_stats is not None:  # a collective: every rank reaches it
            result.extra = loss_stats.reduce(env.all_reduce_sum, env.device)
        if meter is not None:
            result.perf = meter.step_perf(result.input_tokens, result.doc_len_sq, result.seconds)
        if not problem:  # a skipped step's NaN stays out of the epoch's loss
            run_loss_sum += step_loss_sum
            run_label_tokens += global_labels
            run_input_tokens += global_inputs
            run_doc_len_sq += global_sq
        for hook in hooks:
            hook.after_step(result)
        shown = meter.postfix(result.perf) if result.perf is not None else {"tok_s": f"{result.tokens_per_s:,.0f}"}
        extra = {k: f"{v:.4f}" for k, v in result.extra.items()}
        bar.update({"loss": f"{result.loss:.4f}", **extra, **shown, "lr": f"{lr:.2e}"})  # in this order
        if any(getattr(hook, "stop_requested", False) for hook in hooks):
            break
    bar.close()
    result = LoopResult(loss=run_loss_sum / max(run_label_tokens, 1.0), steps=steps_done,
                        label_tokens=int(run_label_tokens), input_tokens=int(run_input_tokens),
                        seconds=time.perf_counter() - epoch_start, doc_len_sq=int(run_doc_len_sq))
    if meter is not None:
        result.perf = meter.epoch_perf(result.input_tokens, result.doc_len_sq, result.seconds)
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, *, env: DistEnv,
             max_steps: Optional[int] = None, precision: Precision = Precision(),
             progress_desc: str = "Evaluating",
             loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] = loss_sum,
             count_fn: Callable[[dict], int] = label_tokens, loss_stats: Optional[LossStats] = None) -> LoopResult:
    """Token-mean loss over the eval set (over the batches actually run when ``max_steps`` cuts it);
    ``count_fn`` and ``loss_stats`` as in :func:`train_epoch` (the mean is then per ``count_fn`` unit)."""
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, labels, inputs
    start = time.perf_counter()
    steps = 0
    batches = len(loader) if hasattr(loader, "__len__") else None
    if max_steps is not None and batches is not None:
        batches = min(batches, max_steps)
    bar = LoopProgress(progress_desc, batches, enabled=env.is_main, unit="batch")
    if loss_stats is not None:
        loss_stats.reset()
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        batch = to_device(batch, env.device)
        with precision.autocast():
            total[0] += loss_fn(model, batch).double()
        total[1] += count_fn(batch)
        total[2] += input_tokens(batch)
        steps += 1
        bar.update()
    bar.close()
    env.all_reduce_sum(total)
    extra = loss_stats.reduce(env.all_reduce_sum, env.device) if loss_stats is not None else {}
    model.train()
    return LoopResult(loss=float(total[0] / total[1].clamp(min=1)), steps=steps,
                      label_tokens=int(total[1]), input_tokens=int(total[2]),
                      seconds=time.perf_counter() - start, extra=extra)
