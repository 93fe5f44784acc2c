"""Progress of the train and eval loops: a tqdm bar on a terminal; in a log file (Slurm, ``> run.log``,
a pipe) plain lines at a steady interval with the same figures, never carriage-return frames.

A bar redraws its line with ``\\r`` several times a second; in a file each redraw stays, so a
59-step epoch left ~100 KB of frames on one line. Without a terminal a line is printed after the
first step, then every ``LINE_EVERY_FRACTION`` of the known total or ``LINE_EVERY_S`` seconds,
whichever comes first, and after the last step.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

LINE_EVERY_FRACTION = 0.1  # of the epoch's steps (or the eval's batches)
LINE_EVERY_S = 30.0


def is_terminal() -> bool:
    """Where bars go (stderr, tqdm's stream) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def quiet_library_bars() -> None:
    """Without a terminal, transformers' and the Hub's own bars (loading and writing weights) are
    off too: their frames would fill the log the same way."""
    if is_terminal():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


class LoopProgress:
    """``update(figures)`` after each step or batch; ``write(line)`` for a message; ``close()``.

    ``figures``: ordered ``name -> formatted value`` (loss, tok_s, tflops, mfu, mem, lr), shown as
    the bar's postfix or in the plain line. ``enabled`` False (ranks other than the main one): silent.
    """

    def __init__(self, desc: str, total: Optional[int], enabled: bool = True, unit: str = "step",
                 bar: Optional[bool] = None) -> None:
        self.desc, self.total, self.enabled, self.unit = desc, total, enabled, unit
        self.done = 0
        self.start = self._last_line = time.monotonic()
        self._printed_at = 0
        self._figures: Optional[dict[str, str]] = None  # the last update's, for close()
        self._bar = None
        if enabled and (bar if bar is not None else is_terminal()):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True)

    def update(self, figures: Optional[dict[str, str]] = None) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if figures:
                self._bar.set_postfix(figures)
            return
        self._figures = figures
        now = time.monotonic()
        every = max(1, round(self.total * LINE_EVERY_FRACTION)) if self.total else None
        if (self.done == 1 or self.done == self.total or now - self._last_line >= LINE_EVERY_S
                or (every is not None and self.done - self._printed_at >= every)):
            self._line(now, figures)

    def _line(self, now: float, figures: Optional[dict[str, str]]) -> None:
        count = f"{self.unit} {self.done}/{self.total} ({self.done / self.total:.0%})" if self.total \
            else f"{self.unit} {self.done}"
        shown = " ".join(f"{k}={v}" for k, v in (figures or {}).items())
        print(f"{self.desc}: {count}{' ' + shown if shown else ''} elapsed={now - self.start:.1f}s", flush=True)
        self._last_line, self._printed_at = now, self.done

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Ends the bar; without one, a last line when the loop stopped early (its last step unshown)."""
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done and self._printed_at != self.done:
            self._line(time.monotonic(), self._figures)
