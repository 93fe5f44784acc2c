"""``--use_wandb``: log step and epoch metrics to Weights & Biases (rank 0 only)."""

from __future__ import annotations

import dataclasses

from ..config.errors import ConfigError
from .loop import LoopResult, StepResult


class WandbLogger:
    def __init__(self, wandb_cfg, run_config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--use_wandb needs the wandb package: pip install 'shardtune[wandb]' "
                              "(or drop --use_wandb).") from None
        init_kwargs = {k: v for k, v in dataclasses.asdict(wandb_cfg).items() if v is not None}
        self._wandb = wandb
        self.run = wandb.init(config=run_config, **init_kwargs)

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, r: StepResult) -> None:
        if r.skipped:
            return
        self.run.log({"train/loss": r.loss, "train/lr": r.lr, "train/tokens_per_s": r.tokens_per_s,
                      "train/epoch": r.epoch}, step=r.step)

    def log_epoch(self, step: int, train: LoopResult, val: LoopResult | None) -> None:
        data = {"train/epoch_loss": train.loss, "train/epoch_perplexity": train.perplexity}
        if val is not None:
            data.update({"eval/loss": val.loss, "eval/perplexity": val.perplexity})
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()
