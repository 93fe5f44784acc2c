"""Cluster pre-emption: SIGTERM / SIGUSR1 ask the run to save a checkpoint and stop cleanly.

The handler only sets a flag. After each optimizer step the ranks agree (one all-reduce of a
scalar) whether any of them was signalled, so all of them stop after the same step, save one
consistent checkpoint and exit 0.

torchrun, told to stop (``kill -TERM <launcher>``, what Slurm and Kubernetes send), signals each
rank's process group and then raises the signal in itself. So that ``shardtune finetune`` can
still exit 0 when the job was saved, the launcher names a folder in ``REPORT_ENV`` and each rank
writes a file there once its pre-emption checkpoint is committed (``report_saved``).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

import torch

from ..outputs.atomic import atomic_write
from ..parallel.distributed import DistEnv

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPORT_ENV = "SHARDTUNE_PREEMPTION_REPORTS"  # a folder, set by `shardtune finetune` for its ranks
_REPORT_PREFIX = "saved-local-rank-"


def saved_reports(folder: str | Path) -> dict[int, int]:
    """{local rank: checkpoint step} of the ranks that reported a committed pre-emption save."""
    found = {}
    for path in Path(folder).glob(f"{_REPORT_PREFIX}*"):
        try:
            found[int(path.name[len(_REPORT_PREFIX):])] = int(path.read_text())
        except ValueError:  # a report being written as the launcher looks: not saved yet
            continue
    return found


class PreemptionSignal:
    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.received: Optional[str] = None
        self._previous: dict = {}

    def install(self) -> "PreemptionSignal":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def report_saved(self, step: int) -> None:
        """Tell this rank's launcher (``REPORT_ENV``, when set) that the checkpoint at ``step`` is
        committed: written and renamed into place by every rank."""
        folder = os.environ.get(REPORT_ENV)
        if folder and Path(folder).is_dir():
            atomic_write(Path(folder, f"{_REPORT_PREFIX}{self.env.local_rank}"), str(step))  # never read half-written

    def requested(self) -> bool:
        """True on every rank if any rank has been signalled (a collective: call it on all ranks)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.env.device)
        self.env.all_reduce_sum(flag)
        return bool(flag.item() > 0)
