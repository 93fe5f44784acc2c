"""``--use_wandb``: the run's scalars in Weights & Biases (main process only).

Every ``wandb_config`` field goes to ``wandb.init`` as it is (project, entity, job_type, tags,
group, notes, mode: ``online``, ``offline`` or ``disabled``); unset ones are left to wandb and its
``WANDB_*`` environment variables (``WANDB_MODE=offline`` keeps the run on disk under
``WANDB_DIR``, for ``wandb sync`` later). The scalars are metrics.json's, under the names in
``metrics.TAGS``, logged at the optimizer step; the resolved configuration is the run's config.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..config.errors import ConfigError
from .loop import LoopResult, StepResult
from .metrics import epoch_record, scalars, step_record, val_record

MODES = ("online", "offline", "disabled")


class WandbLogger:
    def __init__(self, wandb_cfg, run_config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--use_wandb needs the wandb package: pip install 'shardtune[wandb]' "
                              "(or drop --use_wandb).") from None
        init_kwargs = {k: v for k, v in dataclasses.asdict(wandb_cfg).items() if v is not None}
        self.run = wandb.init(config=run_config, **init_kwargs)

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, r: StepResult) -> None:
        if r.skipped:
            return
        self.run.log({**scalars(step_record(r)), "train/epoch": r.epoch}, step=r.step)

    def log_epoch(self, step: int, train: LoopResult, val: Optional[LoopResult]) -> None:
        data = scalars(epoch_record(train, step))
        if val is not None:
            data.update(scalars(val_record(step, val)))
        self.run.log(data, step=step)

    def log_summary(self, values: dict) -> None:
        """Run-level facts (peak FLOP/s and its source...) in the run's summary."""
        for key, value in values.items():
            self.run.summary[key] = value

    def close(self) -> None:
        self.run.finish()
