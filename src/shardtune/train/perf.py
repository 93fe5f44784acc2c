"""Live throughput, MFU and memory of the training steps (what the progress bar and metrics show).

Per optimizer step, from what the loop already reduced over ranks (tokens and Σ document length²,
in its first collective): tokens/s, model TFLOP/s per device (``flops.model_flops`` / world
size / step time) and MFU against ``peak.resolve_peak``'s figure. Memory is read at the end of
each step, with no sampling thread: the GPU's peak allocated and reserved bytes since the step
began (``torch.cuda.max_memory_*``, reset at its start) and this process's resident set (RSS)
from the OS. Per step these are the reporting rank's own; at the end of an epoch one small
all-reduce (MAX) gives the maximum over the epoch's steps and all ranks. The step time excludes
waiting for the data loader (the epoch figures include it).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..parallel.distributed import DistEnv
from .flops import ModelShape, mfu, model_flops, weight_grad_params
from .peak import Peak, resolve_peak
from .types import EpochPerf, StepPerf

GiB = 1024 ** 3


class HostMemory:
    """This process's resident set size, read from the OS when asked (one /proc read on Linux)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process(os.getpid())

    def rss(self) -> int:
        return int(self._process.memory_info().rss)


class StepMeter:
    """Measures each step for the loop (``train_epoch(..., meter=...)``) and the epoch at its end."""

    def __init__(self, shape: ModelShape, peak: Peak, env: DistEnv, weight_grad_params: Optional[int] = None):
        self.shape, self.peak, self.env = shape, peak, env
        self.weight_grad_params = weight_grad_params
        self._cuda = env.device.type == "cuda"
        self._host = HostMemory()
        self._epoch_max = [0.0, 0.0, 0.0]  # host rss, gpu allocated, gpu reserved (bytes)

    @classmethod
    def for_model(cls, model: torch.nn.Module, env: DistEnv, compute_dtype: torch.dtype,
                  peak_tflops: Optional[float] = None) -> "StepMeter":
        """The meter of ``model``'s training; a measured peak is averaged over ranks (one
        all-reduce, at start-up), so every rank reports against the same figure."""
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError("the model has no config to read its shape from")
        shape = ModelShape.from_config(config)
        peak = resolve_peak(env.device, compute_dtype, peak_tflops)
        if peak.measured and env.distributed and env.world_size > 1:
            total = env.all_reduce_sum(torch.tensor([peak.flops], dtype=torch.float64, device=env.device))
            peak = Peak(float(total) / env.world_size, f"{peak.source} (mean of {env.world_size} ranks)",
                        measured=True)
        return cls(shape, peak, env, weight_grad_params(model, shape))

    def describe(self) -> str:
        return self.peak.describe()

    def meta(self) -> dict:
        """Run-level facts for metrics files."""
        return {"peak_tflops": self.peak.flops / 1e12, "peak_source": self.peak.source,
                "world_size": self.env.world_size, "model_matmul_params": self.shape.matmul_params,
                "weight_grad_params": self.weight_grad_params}

    # --- called by the loop -------------------------------------------------------------------

    def start_epoch(self) -> None:
        self._epoch_max = [0.0, 0.0, 0.0]

    def before_step(self, step: int) -> None:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.env.device)

    def step_perf(self, tokens: int, doc_len_sq: int, seconds: float) -> StepPerf:
        """``tokens`` and ``doc_len_sq`` summed over ranks; ``seconds`` the step's wall time."""
        flops = model_flops(self.shape, tokens, doc_len_sq, self.weight_grad_params) / self.env.world_size
        rate = flops / max(seconds, 1e-9)
        rss = self._host.rss()
        alloc = reserved = None
        if self._cuda:
            alloc = torch.cuda.max_memory_allocated(self.env.device)
            reserved = torch.cuda.max_memory_reserved(self.env.device)
        for i, value in enumerate((rss, alloc or 0, reserved or 0)):
            self._epoch_max[i] = max(self._epoch_max[i], float(value))
        return StepPerf(tokens_per_s=tokens / max(seconds, 1e-9), tflops=rate / 1e12,
                        mfu=mfu(flops, seconds, self.peak.flops), model_flops=flops, host_rss_gib=rss / GiB,
                        gpu_max_allocated_gib=None if alloc is None else alloc / GiB,
                        gpu_max_reserved_gib=None if reserved is None else reserved / GiB)

    def epoch_perf(self, tokens: int, doc_len_sq: int, seconds: float) -> EpochPerf:
        """Called by every rank at the end of an epoch (one all-reduce of three numbers)."""
        peaks = torch.tensor(self._epoch_max, dtype=torch.float64, device=self.env.device)
        if self.env.distributed:
            import torch.distributed as dist

            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        host, alloc, reserved = (float(v) for v in peaks.tolist())
        flops = model_flops(self.shape, tokens, doc_len_sq, self.weight_grad_params) / self.env.world_size
        return EpochPerf(tflops=flops / max(seconds, 1e-9) / 1e12, mfu=mfu(flops, seconds, self.peak.flops),
                         host_rss_max_gib=host / GiB,
                         gpu_max_allocated_gib=alloc / GiB if self._cuda else None,
                         gpu_max_reserved_gib=reserved / GiB if self._cuda else None)

    @staticmethod
    def postfix(perf: StepPerf) -> dict[str, str]:
        """The progress bar's throughput and memory fields."""
        memory = perf.gpu_max_allocated_gib if perf.gpu_max_allocated_gib is not None else perf.host_rss_gib
        return {"tok_s": f"{perf.tokens_per_s:,.0f}", "tflops": f"{perf.tflops:.3g}",
                "mfu": f"{perf.mfu:.1%}", "mem": f"{memory:.2f}G"}
