"""``--flop_counter``: count the FLOPs of one training step with torch's FlopCounterMode.

As in llama-recipes, counting starts at step ``flop_counter_start`` (after warm-up) and covers
one optimizer step (forward + backward of all its micro-batches). The count is per rank; the
reported TFLOP/s divides it by the step's wall time.
"""

from __future__ import annotations

from typing import Optional

from torch.utils.flop_counter import FlopCounterMode

from .loop import StepResult


class FlopMeasure:
    def __init__(self, start_step: int, print_fn=print):
        self.start_step = start_step
        self.print = print_fn
        self._mode: Optional[FlopCounterMode] = None
        self.flops: Optional[int] = None
        self.tflops_per_s: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.flops is not None

    def before_step(self, step: int) -> None:
        if not self.done and self._mode is None and step >= self.start_step:
            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()

    def after_step(self, result: StepResult) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self.flops = self._mode.get_total_flops()
        self._mode = None
        self.tflops_per_s = self.flops / 1e12 / max(result.seconds, 1e-9)
        self.print(f"FLOP counter (step {result.step}): {self.flops / 1e12:.4f} TFLOPs per rank "
                   f"per step, {self.tflops_per_s:.4f} TFLOP/s")

    def close(self) -> None:
        if self._mode is not None:  # training ended before the measured step completed
            self._mode.__exit__(None, None, None)
            self._mode = None
