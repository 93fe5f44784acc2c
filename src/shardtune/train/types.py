"""The values the train loop hands out, and the hook protocol it calls: what the loop, the
throughput meter (``perf.py``), the FLOP counter (``flops.py``) and the step hooks (metrics,
profiler, wandb, TensorBoard, checkpoint saves) share. Here, below all of them, so that none of
them imports another for a type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch


@dataclass
class StepPerf:
    tokens_per_s: float  # non-pad tokens of all ranks per second
    tflops: float  # model TFLOP/s per device
    mfu: float  # model FLOP/s per device / peak
    model_flops: float  # per device, this step
    host_rss_gib: float  # this rank's resident set at the step's end
    gpu_max_allocated_gib: Optional[float] = None  # this rank's peak during the step (GPU runs)
    gpu_max_reserved_gib: Optional[float] = None


@dataclass
class EpochPerf:
    tflops: float
    mfu: float
    host_rss_max_gib: float  # max over the epoch's step ends and all ranks
    gpu_max_allocated_gib: Optional[float] = None  # max over the epoch's steps and all ranks
    gpu_max_reserved_gib: Optional[float] = None


@dataclass
class StepResult:
    step: int  # optimizer steps completed in the run, after this one
    epoch: int
    loss: float  # global token-mean loss of this step
    label_tokens: int
    input_tokens: int  # non-pad tokens fed, summed over ranks
    seconds: float
    lr: float
    epoch_batch: int = 0  # micro-batches of this epoch consumed so far (resume offset included)
    skipped: bool = False  # non-finite and skipped (--skip_nonfinite_steps): no update, loss is NaN/inf
    doc_len_sq: int = 0  # Σ document length² over ranks (the attention term of the model FLOPs)
    perf: Optional[StepPerf] = None  # throughput, MFU and memory, when the loop has a meter
    extra: dict = field(default_factory=dict)  # the objective's own figures (``LossStats``: DPO rewards)

    @property
    def tokens_per_s(self) -> float:
        return self.input_tokens / max(self.seconds, 1e-9)


@dataclass
class LoopResult:
    loss: float
    steps: int
    label_tokens: int
    input_tokens: int
    seconds: float
    doc_len_sq: int = 0
    perf: Optional[EpochPerf] = None
    extra: dict = field(default_factory=dict)  # evaluate: the objective's own figures (``LossStats``)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def tokens_per_s(self) -> float:
        return self.input_tokens / max(self.seconds, 1e-9)


class LossStats(Protocol):
    """Figures a loss function collects besides its loss (train/dpo.py's rewards and accuracy):
    the loop resets them before each step (and evaluation) and reduces them over ranks after it,
    into ``StepResult.extra`` / ``LoopResult.extra``."""

    def reset(self) -> None: ...
    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], object], device: torch.device) -> dict: ...


class StepHook(Protocol):
    """Called around every optimizer step. A hook may set ``stop_requested`` to end the epoch
    after the current step (pre-emption)."""

    def before_step(self, step: int) -> None: ...
    def after_step(self, result: StepResult) -> None: ...
