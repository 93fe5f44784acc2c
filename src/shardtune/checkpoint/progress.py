"""Progress of long non-training work (conversion, export, checkpoint loading): a bar of bytes and
tensors on a terminal, one line per finished file (or, for a load, one line at the end)
otherwise, so logs stay readable."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

from .sizes import human_size


class Progress:
    """Counts bytes and tensors; ``tensor_done`` per tensor, ``file_done`` per written file."""

    def __init__(self, what: str, total_bytes: int, total_tensors: int, log: Callable[[str], None] = print,
                 bar: Optional[bool] = None):
        self.what, self.total_bytes, self.total_tensors, self.log = what, total_bytes, total_tensors, log
        self.bytes = self.tensors = 0
        self.start = time.perf_counter()
        self._bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what, leave=False)

    def tensor_done(self, nbytes: int) -> None:
        self.bytes += nbytes
        self.tensors += 1
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

    def file_done(self, name: str, size: int) -> None:
        if self._bar is None:
            elapsed = time.perf_counter() - self.start
            self.log(f"  {self.what}: {name} ({human_size(size)}); {self.tensors}/{self.total_tensors} tensors, "
                     f"{human_size(self.bytes)} of {human_size(self.total_bytes)} in {elapsed:.1f} s")

    def close(self, summary: bool = False) -> None:
        """Close the bar; ``summary``: without a bar, say in one line what was done."""
        if self._bar is not None:
            self._bar.close()
        elif summary:
            self.log(f"{self.what}: {self.tensors} tensors, {human_size(self.bytes)} in "
                     f"{time.perf_counter() - self.start:.1f} s")
