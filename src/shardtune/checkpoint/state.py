"""Run state: where training is, as one checkpointable object (torchtitan's ``TrainState``).

The recipe keeps no loose counters: the step, the epoch and data position, the best validation
loss and the steps whose model was saved live here, are advanced after every optimizer step, and
are what a resumable checkpoint stores (``position`` in ``train_state.json``: :meth:`state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Optional


@dataclass
class TrainState:
    """The next epoch to run and how many of its global batches are done (after the ``trained``
    samples, which an earlier data layout trained); the field order is ``train_state.json``'s."""

    epoch: int = 0
    batch: int = 0  # global batches (each rank's micro-batches) of ``epoch`` already trained
    step: int = 0  # optimizer steps done in the whole run
    best_val: Optional[float] = None  # the lowest validation loss so far (None: none yet)
    saved_at: list = field(default_factory=list)  # steps after which the model was exported
    trained: tuple = ()  # samples of ``epoch`` trained under an earlier data layout (resume_plan.py)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, saved: dict) -> "TrainState":
        """From a checkpoint's ``position`` (keys this class does not know, like ``data``, are left)."""
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in known})
        state.saved_at = list(state.saved_at)
        return state

    def advance(self, step: int, epoch: int, epoch_batch: int, epoch_batches: int, skip: Iterable[int]) -> None:
        """After optimizer step ``step``, which ended at global batch ``epoch_batch`` of ``epoch``'s
        ``epoch_batches``: a finished epoch moves the position to the start of the next one."""
        done = epoch_batch >= epoch_batches
        self.step = step
        self.epoch = epoch + done
        self.batch = 0 if done else epoch_batch
        self.trained = () if done else tuple(sorted(skip))

    def record_validation(self, loss: float) -> bool:
        """Whether ``loss`` improves on the best so far (a NaN never does); keeps the best."""
        best = self.best_val if self.best_val is not None else math.inf
        if loss < best:
            self.best_val = loss
            return True
        return False

    def resumed_done(self, num_epochs: int, max_train_step: int) -> Optional[str]:
        """Why a resumed run has nothing left to train (``None`` when it has)."""
        if 0 < max_train_step <= self.step:
            return f"--max_train_step is {max_train_step}"
        if self.epoch >= num_epochs:
            return f"all {num_epochs} epochs (--num_epochs) are done"
        return None
