"""``--use_tensorboard``: the run's scalars as TensorBoard event files (main process only).

Written through ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package:
``pip install 'shardtune[tensorboard]'``) into ``--tensorboard_dir`` (default
``<output_dir>/tensorboard``): the same values as metrics.json, under the names in
``metrics.TAGS``, at the optimizer step. A writer only adds new, uniquely named event files, so
a shared runs folder is safe; a resumed run hides the earlier run's events from its first step
on (``purge_step``), so the curves show the steps as they were redone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping, Optional

from ..config.errors import ConfigError, ShardtuneError
from ..outputs.ownership import is_inside
from .loop import LoopResult, StepResult
from .metrics import epoch_record, scalars, step_record, val_record

MISSING = ("--use_tensorboard needs the tensorboard package, which torch.utils.tensorboard writes "
           "through: pip install 'shardtune[tensorboard]' (or pip install tensorboard), or drop "
           "--use_tensorboard.")


def tensorboard_dir(output_dir: str, tensorboard_dir: str) -> Path:
    """``--tensorboard_dir``, or ``<output_dir>/tensorboard`` when it is not given."""
    return Path(tensorboard_dir) if tensorboard_dir else Path(output_dir) / "tensorboard"


def check_tensorboard_dir(path: Path, protected: Mapping[str, Optional[str]], output_dir: str) -> None:
    """Refused before any work: a folder that is, or is inside, a path the run reads from, the
    top of --output_dir itself (its event files would be files shardtune does not list), a file."""
    for flag, other in protected.items():
        if other and Path(other).exists() and is_inside(path, Path(other)):
            raise ShardtuneError(f"--tensorboard_dir {str(path)!r} is inside the path {flag} reads from "
                                 f"({other}); choose another --tensorboard_dir.")
    if Path(output_dir).resolve() == path.resolve():
        raise ShardtuneError(f"--tensorboard_dir is --output_dir itself ({output_dir}); give a folder inside "
                             "it or elsewhere (the default is <output_dir>/tensorboard).")
    if path.exists() and not path.is_dir():
        raise ShardtuneError(f"--tensorboard_dir {str(path)!r} is a file, but a folder is needed (it is "
                             "created if missing).")


def check_installed() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(MISSING)


class TensorBoardLogger:
    def __init__(self, log_dir: str | Path, purge_step: Optional[int] = None, text: Optional[dict] = None):
        check_installed()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
        for key, value in (text or {}).items():
            self.writer.add_text(key, str(value), global_step=purge_step or 0)

    def _add(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, r: StepResult) -> None:
        if not r.skipped:
            self._add(scalars(step_record(r)), r.step)

    def log_epoch(self, step: int, train: LoopResult, val: Optional[LoopResult]) -> None:
        self._add(scalars(epoch_record(train, step)), step)
        if val is not None:
            self._add(scalars(val_record(step, val)), step)
        self.writer.flush()  # the epoch's events are on disk for a TensorBoard that is watching

    def close(self) -> None:
        self.writer.close()
