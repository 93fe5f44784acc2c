"""Training metrics: an in-memory log, ``metrics.json`` and PNG plots of the curves.

Key names follow llama-recipes' metrics file (``train_step_loss``, ``val_epoch_perplexity``...)
so existing plotting scripts keep working; shardtune adds steps, learning rates and tokens/s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import ownership
from .loop import LoopResult, StepResult


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@dataclass
class MetricsLog:
    train_step: list[int] = field(default_factory=list)
    train_step_loss: list[float] = field(default_factory=list)
    train_step_perplexity: list[float] = field(default_factory=list)
    train_step_lr: list[float] = field(default_factory=list)
    train_step_tokens_per_s: list[float] = field(default_factory=list)
    train_epoch_loss: list[float] = field(default_factory=list)
    train_epoch_perplexity: list[float] = field(default_factory=list)
    train_epoch_tokens_per_s: list[float] = field(default_factory=list)
    epoch_time_s: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)  # optimizer step at which validation ran
    val_epoch_loss: list[float] = field(default_factory=list)
    val_epoch_perplexity: list[float] = field(default_factory=list)

    # StepHook interface: the train loop calls these.
    def before_step(self, step: int) -> None:
        pass

    def after_step(self, r: StepResult) -> None:
        if r.skipped:  # no update and a NaN loss: not a point of the curves
            return
        self.train_step.append(r.step)
        self.train_step_loss.append(r.loss)
        self.train_step_perplexity.append(_ppl(r.loss))
        self.train_step_lr.append(r.lr)
        self.train_step_tokens_per_s.append(r.tokens_per_s)

    def add_epoch(self, train: LoopResult) -> None:
        self.train_epoch_loss.append(train.loss)
        self.train_epoch_perplexity.append(train.perplexity)
        self.train_epoch_tokens_per_s.append(train.tokens_per_s)
        self.epoch_time_s.append(train.seconds)

    def add_validation(self, step: int, val: LoopResult) -> None:
        self.val_step.append(step)
        self.val_epoch_loss.append(val.loss)
        self.val_epoch_perplexity.append(val.perplexity)

    @classmethod
    def continued(cls, output_dir: str | Path, *, step: int, epochs_done: int) -> "MetricsLog":
        """The log of a resumed run: ``metrics.json``'s history up to the checkpoint's ``step``
        (later entries were trained after the checkpoint and are redone), or an empty log."""
        path = Path(output_dir) / "metrics.json"
        log = cls()
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return log
        keep = [i for i, s in enumerate(saved.get("train_step", [])) if s <= step]
        for name in ("train_step", "train_step_loss", "train_step_perplexity", "train_step_lr",
                     "train_step_tokens_per_s"):
            values = saved.get(name, [])
            getattr(log, name).extend(values[i] for i in keep if i < len(values))
        for name in ("train_epoch_loss", "train_epoch_perplexity", "train_epoch_tokens_per_s", "epoch_time_s"):
            getattr(log, name).extend(saved.get(name, [])[:epochs_done])
        vals = [i for i, s in enumerate(saved.get("val_step", [])) if s <= step]
        for name in ("val_step", "val_epoch_loss", "val_epoch_perplexity"):
            values = saved.get(name, [])
            getattr(log, name).extend(values[i] for i in vals if i < len(values))
        return log

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def write(self, output_dir: str | Path) -> Path:
        """Write ``metrics.json`` (atomically) and the plots; returns the JSON path."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        plots = self.plot(out)
        ownership.record(out, added=[path.name, *(p.name for p in plots)])
        return path

    def plot(self, out: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")  # no display on training nodes
        import matplotlib.pyplot as plt

        written = []
        for name, train, val in (("loss", self.train_step_loss, self.val_epoch_loss),
                                 ("perplexity", self.train_step_perplexity, self.val_epoch_perplexity)):
            if not train:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(self.train_step, train, label=f"train {name}")
            if val:
                ax.plot(self.val_step, val, "o-", label=f"validation {name}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(name)
            if name == "perplexity":
                ax.set_yscale("log")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
        return written
