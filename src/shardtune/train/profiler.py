"""``--use_profiler``: a torch.profiler trace of a few training steps, written to ``profiler_dir``.

Schedule as llama-recipes: skip 1 step, warm up 2, record 3; traces are TensorBoard/Chrome
JSON files (open them in https://ui.perfetto.dev or TensorBoard's profiler plugin).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from .loop import StepResult


class StepProfiler:
    def __init__(self, profiler_dir: str | Path, rank: int = 0, wait: int = 1, warmup: int = 2,
                 active: int = 3):
        Path(profiler_dir).mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(profiler_dir), worker_name=f"rank{rank}"),
            record_shapes=True, profile_memory=True, with_stack=False)
        self._prof.__enter__()
        self._open = True

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, result: StepResult) -> None:
        if self._open:
            self._prof.step()

    def close(self) -> None:
        if self._open:
            self._prof.__exit__(None, None, None)
            self._open = False
