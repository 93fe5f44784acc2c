"""Cluster pre-emption: SIGTERM / SIGUSR1 ask the run to save a checkpoint and stop cleanly.

The handler only sets a flag. After each optimizer step the ranks agree (one all-reduce of a
scalar) whether any of them was signalled, so all of them stop after the same step, save one
consistent checkpoint and exit 0.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

from ..parallel.distributed import DistEnv

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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

    def requested(self) -> bool:
        """True on every rank if any rank has been signalled (a collective: call it on all ranks)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.env.device)
        self.env.all_reduce_sum(flag)
        return bool(flag.item() > 0)
