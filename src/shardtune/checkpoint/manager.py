"""When and where the recipe writes resumable checkpoints, and how a run resumes from one.

The recipe owns one ``Checkpointer``. Saves happen at llama-recipes' epoch save points, every
``save_every_n_steps`` optimizer steps, and on pre-emption (``StepCheckpoints``, a step hook the
train loop calls after each optimizer step); ``keep_last_n`` prunes older ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..parallel.distributed import DistEnv
from . import layout
from .preemption import PreemptionSignal
from .resume_plan import DataRecord, ResumePlan, plan_resume
from .sharded import load_checkpoint, read_train_state, save_checkpoint, verify_before_loading


@dataclass
class Position:
    """Where training is: the next epoch to run and how many of its global batches are done (after
    the ``trained`` samples, which an earlier layout trained)."""

    epoch: int = 0
    batch: int = 0  # global batches (each rank's micro-batches) of ``epoch`` already trained
    step: int = 0  # optimizer steps done in the whole run
    best_val: Optional[float] = None
    saved_at: tuple = ()
    trained: tuple = ()  # samples of ``epoch`` trained under an earlier data layout (resume_plan.py)


class Checkpointer:
    """``data_of()`` gives the run's :class:`DataRecord` (how its data position is counted), asked for
    once, at the first save or resume: it digests every training row."""

    def __init__(self, run: Path, *, env: DistEnv, config_dict: dict, keep_last_n: int = 0,
                 data_of: Optional[Callable[[], DataRecord]] = None) -> None:
        self.run, self.env, self.config_dict, self.keep_last_n = run, env, config_dict, keep_last_n
        self._data_of, self._data = data_of, None

    @property
    def data(self) -> Optional[DataRecord]:
        if self._data is None and self._data_of is not None:
            self._data = self._data_of()
        return self._data

    def save(self, position: Position, *, model, optimizer, scheduler) -> Optional[Path]:
        saved = asdict(position)
        if self.data is not None:
            saved["data"] = asdict(self.data)
        path = save_checkpoint(self.run, position.step, model=model, optimizer=optimizer,
                               scheduler=scheduler, position=saved,
                               config_dict=self.config_dict, env=self.env)
        if self.env.is_main:
            layout.prune(self.run, self.keep_last_n)
        return path

    def find_resume_point(self, resume: bool, resume_from: str) -> Optional[Path]:
        """The checkpoint to resume from, or None to start fresh (``--resume`` with none yet).

        Leftovers of a save that was interrupted (``.tmp-step-N``) are removed first.
        """
        if self.env.is_main and self.run.is_dir():
            layout.prune(self.run, keep_last_n=0)
        if resume_from:
            path = Path(resume_from)
            newest = layout.latest_checkpoint(path)  # a run folder was given: its newest checkpoint
            if newest is not None:
                path = newest
            read_train_state(path)  # exists, complete, readable: or a clear error
            return path
        if resume:
            return layout.latest_checkpoint(self.run)
        return None

    def plan(self, path: Path, *, sampler, steps_per_epoch: int, num_epochs: int,
             max_train_step: int) -> ResumePlan:
        """What resuming ``path`` under this run's config means (``resume_plan.py``), after checking its
        files against their digests; refuses what cannot be continued before anything is loaded."""
        state = read_train_state(path)
        verify_before_loading(path, self.env)  # the files the plan reads are checked before they are trusted
        return plan_resume(path, state, config=self.config_dict, world_size=self.env.world_size,
                           sampler=sampler, data=self.data, steps_per_epoch=steps_per_epoch,
                           num_epochs=num_epochs, max_train_step=max_train_step)

    def resume(self, path: Path, plan: ResumePlan, *, model, optimizer, scheduler) -> Position:
        """Load ``path`` into model, optimizer and scheduler, with ``plan``'s lr and weight decay and
        data position."""
        saved = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, env=self.env,
                                hyper=plan.hyper, verified=True)
        known = set(Position.__dataclass_fields__)
        position = Position(**{k: v for k, v in saved.items() if k in known})
        position.batch, position.trained = plan.start_batch, plan.skip
        return position


class StepCheckpoints:
    """Step hook: save every ``every_n`` steps, and on pre-emption save and ask the loop to stop."""

    def __init__(self, checkpointer: Checkpointer, *, every_n: int, preemption: PreemptionSignal,
                 position_of: Callable[[Any], Position], save: Callable[[Position], Any]) -> None:
        self.checkpointer, self.every_n, self.preemption = checkpointer, every_n, preemption
        self.position_of, self._save = position_of, save
        self.stop_requested = False
        self.last_saved_step: Optional[int] = None
        self.last_result = None  # the latest StepResult: where an epoch-end save resumes from

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, result) -> None:
        self.last_result = result
        preempted = self.preemption.requested()
        if preempted or (self.every_n and result.step % self.every_n == 0):
            self._save(self.position_of(result))
            self.last_saved_step = result.step
        if preempted:
            self.preemption.report_saved(result.step)
            self.stop_requested = True
