"""The checkpoint policy: when a run saves, what it loads on resume, and pre-emption.

The recipe asks one :class:`CheckpointManager` (as torchtitan's trainer asks its own): ``load``
resumes from ``--resume`` / ``--resume_from`` or starts fresh and returns the run's
:class:`~shardtune.checkpoint.state.TrainState`; as a step hook the manager advances that state after
every optimizer step and saves every ``save_every_n_steps`` steps (``should_save``) and on
pre-emption (then asks the loop to stop); ``save_epoch_end`` applies llama-recipes' rule at the end
of an epoch (with validation, save only when the eval loss improves). ``keep_last_n`` prunes older
checkpoints. :class:`Checkpointer` below it reads and writes one run folder's checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import Config, ShardtuneError
from ..data.fingerprint import rows_fingerprint
from ..outputs.ownership import record as record_owned, top_entry_under
from ..parallel.distributed import DistEnv
from ..parallel.fsdp import weights_finite
from .state import TrainState
from . import layout
from .layout import checkpoint_run_dir, writes_resumable_checkpoints  # noqa: F401 (re-exported)
from .hf_export import save_hf_model
from .hf_stream import DTYPES
from .listing import checkpoint_size
from .preemption import PreemptionSignal
from .resume_plan import DataRecord, ResumePlan, plan_resume
from .sharded import load_checkpoint, save_checkpoint, verify_before_loading
from .sizes import human_size


def export_dtype(t) -> Optional[torch.dtype]:
    """--export_dtype of a full model's export (None: the training dtype)."""
    return DTYPES[t.export_dtype] if t.export_dtype else None


def refuse_non_finite(model: torch.nn.Module, env: DistEnv, step: int, what: str) -> None:
    """A model with a NaN/inf weight is never saved: no export, no checkpoint over a good one."""
    if not weights_finite(model, env.all_reduce_sum, env.device):
        raise ShardtuneError(
            f"After step {step} the model has non-finite (NaN or inf) weights, so the {what} was not "
            "saved and the earlier checkpoints and outputs are untouched. The learning rate is "
            "likely too high for this model (or fp16 overflowed); lower --lr or turn on "
            "--gradient_clipping, and --resume from the last checkpoint.")


class Checkpointer:
    """One run folder's resumable checkpoints. ``data_of()`` gives the run's :class:`DataRecord`
    (how its data position is counted), asked for once, at the first save or resume: it digests
    every training row."""

    def __init__(self, run: Path, *, env: DistEnv, config_dict: dict, keep_last_n: int = 0,
                 data_of: Optional[Callable[[], DataRecord]] = None) -> None:
        self.run, self.env, self.config_dict, self.keep_last_n = run, env, config_dict, keep_last_n
        self._data_of, self._data = data_of, None

    @property
    def data(self) -> Optional[DataRecord]:
        if self._data is None and self._data_of is not None:
            self._data = self._data_of()
        return self._data

    def save(self, state: TrainState, *, model, optimizer, scheduler) -> Optional[Path]:
        saved = state.state_dict()  # train_state.json's "position"
        if self.data is not None:
            saved["data"] = asdict(self.data)
        path = save_checkpoint(self.run, state.step, model=model, optimizer=optimizer,
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
            return layout.resume_point(resume_from)
        if resume:
            return layout.latest_checkpoint(self.run)
        return None

    def plan(self, path: Path, *, sampler, steps_per_epoch: int, num_epochs: int,
             max_train_step: int) -> ResumePlan:
        """What resuming ``path`` under this run's config means (``resume_plan.py``), after checking its
        files against their digests; refuses what cannot be continued before anything is loaded."""
        state = layout.read_train_state(path)
        verify_before_loading(path, self.env)  # the files the plan reads are checked before they are trusted
        return plan_resume(path, state, config=self.config_dict, world_size=self.env.world_size,
                           sampler=sampler, data=self.data, steps_per_epoch=steps_per_epoch,
                           num_epochs=num_epochs, max_train_step=max_train_step)

    def resume(self, path: Path, plan: ResumePlan, *, model, optimizer, scheduler) -> TrainState:
        """Load ``path`` into model, optimizer and scheduler, with ``plan``'s lr and weight decay and
        data position."""
        saved = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, env=self.env,
                                hyper=plan.hyper, verified=True)
        state = TrainState.from_state_dict(saved)
        state.batch, state.trained = plan.start_batch, plan.skip
        return state


class CheckpointManager:
    """The run's checkpoint policy and its :class:`TrainState` (``state``). A step hook; use it as a
    context manager around training, which catches pre-emption signals (SIGTERM / SIGUSR1).

    ``after_save`` runs on every rank after each resumable save (the recipe writes its metrics
    there, so the curves always reach the newest checkpoint)."""

    def __init__(self, cfg: Config, env: DistEnv, *, model: torch.nn.Module, tokenizer, optimizer,
                 scheduler, scheduler_for: Callable[..., Any], train_loader, steps_per_epoch: int,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.env, self.log = cfg, env, log
        self.model, self.tokenizer, self.optimizer, self.scheduler = model, tokenizer, optimizer, scheduler
        self.scheduler_for = scheduler_for  # (total_steps=, resumed_epoch=) -> the schedule of a resumed run
        self.sampler, self.steps_per_epoch = train_loader.batch_sampler, steps_per_epoch
        rows = train_loader.dataset.samples  # digested once, at the first save or resume: how positions are counted
        self.checkpointer = Checkpointer(checkpoint_run_dir(cfg), env=env, config_dict=cfg.to_dict(),
                                         keep_last_n=cfg.train.keep_last_n,
                                         data_of=lambda: DataRecord.of(self.sampler, rows_fingerprint(rows)))
        self.inside_output = top_entry_under(cfg.train.output_dir, self.checkpointer.run)
        self.state = TrainState()
        self.resumed_from: Optional[Path] = None
        self.preemption = PreemptionSignal(env)
        self.stop_requested = False  # pre-empted: the checkpoint is written, the loop stops
        self.last_saved_step: Optional[int] = None
        self.after_save: Callable[[], Any] = lambda: None

    @property
    def run(self) -> Path:
        return self.checkpointer.run

    def load(self) -> TrainState:
        """Resume (each setting that differs from the checkpoint's applied, remapped or refused before
        loading; the scheduler rebuilt for the run's remaining steps in this layout), or start fresh."""
        t = self.cfg.train
        path = self.checkpointer.find_resume_point(t.resume, t.resume_from)
        if path is None:
            if t.resume:
                self.log(f"--resume: no complete checkpoint under {self.run} yet; starting from scratch")
            return self.state
        started = time.perf_counter()
        self.log(f"resuming from {path} ({human_size(checkpoint_size(path))}): checking its files' digests, "
                 "then loading")
        plan = self.checkpointer.plan(path, sampler=self.sampler, steps_per_epoch=self.steps_per_epoch,
                                      num_epochs=t.num_epochs, max_train_step=t.max_train_step)
        for line in plan.lines:
            self.log(line)
        self.scheduler = self.scheduler_for(total_steps=plan.total_steps, resumed_epoch=plan.resumed_epoch)
        self.state = self.checkpointer.resume(path, plan, model=self.model, optimizer=self.optimizer,
                                              scheduler=self.scheduler)
        self.resumed_from = path
        self.log(f"resumed from {path} in {time.perf_counter() - started:.1f} s: epoch {self.state.epoch + 1}, "
                 f"step {self.state.step}")
        done = self.state.resumed_done(t.num_epochs, t.max_train_step)
        if done:
            self.log(f"nothing to train: the checkpoint is at step {self.state.step} and {done}. Raise "
                     "--max_train_step or --num_epochs to train further.")
        return self.state

    def should_save(self, step: int) -> bool:
        """A step checkpoint is due after optimizer step ``step`` (``--save_every_n_steps``)."""
        every = self.cfg.train.save_every_n_steps
        return bool(every) and step % every == 0

    def save(self, with_optimizer: bool = True) -> None:
        """A resumable checkpoint of the model, optimizer, scheduler and :attr:`state` (all ranks)."""
        t, step = self.cfg.train, self.state.step
        refuse_non_finite(self.model, self.env, step, "checkpoint")
        if self.env.is_main and self.inside_output:  # the checkpoint folder under --output_dir is shardtune's,
            Path(t.output_dir).mkdir(parents=True, exist_ok=True)  # recorded before the first write
            record_owned(t.output_dir, added=[self.inside_output])
        path = self.checkpointer.save(self.state, model=self.model,
                                      optimizer=self.optimizer if with_optimizer else None, scheduler=self.scheduler)
        self.last_saved_step = step
        self.log(f"checkpoint: {path}")
        self.after_save()

    def save_epoch_end(self, val_loss: Optional[float]) -> bool:
        """llama-recipes' rule: with validation (``val_loss``), the model is saved only when the eval
        loss improves, else after every epoch; a resumable checkpoint goes with it unless this step
        has one. Returns whether the model was saved."""
        t, state = self.cfg.train, self.state
        improved = state.record_validation(val_loss) if val_loss is not None else True
        if not (t.save_model and improved):
            return False
        refuse_non_finite(self.model, self.env, state.step, "model")
        state.saved_at.append(state.step)
        # a full model or an adapter; --merge_lora is the recipe's, once the process group is gone
        save_hf_model(self.model, self.tokenizer, t.output_dir, env=self.env, dtype=export_dtype(t))
        self.log(f"saved the {'adapter' if t.use_peft else 'model'} to {t.output_dir} (step {state.step})")
        if writes_resumable_checkpoints(self.cfg) and self.last_saved_step != state.step:
            self.save(with_optimizer=t.save_optimizer or t.save_every_n_steps > 0 or t.resume or bool(t.resume_from))
        return True

    # the step hook (train/loop.py): the state advances, then a due or pre-emption checkpoint is saved
    def before_step(self, step: int) -> None:
        pass

    def after_step(self, result) -> None:
        self.state.advance(result.step, result.epoch, result.epoch_batch, self.sampler.epoch_batches,
                           self.sampler.skip)
        preempted = self.preemption.requested()  # a collective: every rank asks after every step
        if preempted or self.should_save(result.step):
            self.save()
        if preempted:
            self.preemption.report_saved(result.step)
            self.stop_requested = True

    def __enter__(self) -> "CheckpointManager":
        self.preemption.install()
        return self

    def __exit__(self, *exc) -> None:  # the signal handlers are the process's: restored even on an error
        self.preemption.uninstall()

    def report_preemption(self) -> None:
        if self.stop_requested:
            self.log(f"pre-empted ({self.preemption.received or 'signal on another rank'}): saved a checkpoint "
                     f"at step {self.state.step} under {self.run}. Run the same command with --resume to continue.")
