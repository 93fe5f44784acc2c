"""Keep large host buffers in glibc's heap, so that a CPU training step reuses memory instead of
asking the kernel for fresh pages.

Why: torch's CPU allocator is plain ``posix_memalign``/``free``. glibc serves a request above its
mmap threshold (dynamic, at most 32 MiB by default) with a fresh ``mmap`` and returns it with
``munmap`` on ``free``. At Llama-3.2-1B width nearly every buffer of a step is larger than that
(a gathered MLP weight is 64 MiB in fp32, a gathered tied embedding 1 GiB, the logits of a batch
hundreds of MiB; ~11 GB mapped and unmapped per rank and step), so every step page-faults
gigabytes in anew and the kernel zeroes each page: a 2-rank LoRA run spent 20-49% of its CPU time
in the kernel, with ~12 M minor faults per rank for 4 steps (docs/benchmarks.md, "Real shape").
(A LoRA run no longer gathers the frozen embedding, parallel/fsdp.py: 17% and ~8.7 M by default.)
With mmap off and no automatic trimming, a freed buffer stays in the heap and the step's next
buffer of that size reuses it; :class:`ReleaseAfterStep` hands the free pages back between steps.
Huge pages are no cure: they cut the faults ~100x but not the kernel time (zeroing dominates).

It is **opt-in**: measured at that shape it cut kernel time by a quarter to a third and the faults
by 40%, but raised each rank's peak RSS by 60-66% (4.4 -> 7.0-7.3 GiB), because glibc's one heap
fragments (long-lived small blocks split the big holes); the planner's host figures assume the
default. ``SHARDTUNE_MALLOC_TUNING``: unset or ``0`` leaves glibc's defaults; ``auto`` tunes
processes whose work runs on the CPU (the caller says so); ``1`` tunes any process. Only glibc is
touched (other C libraries, macOS and Windows keep their allocator), and only host memory: CUDA
memory has its own caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

from .config.errors import ShardtuneError

ENV = "SHARDTUNE_MALLOC_TUNING"

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# -1: never give the heap's free top back to the kernel (man mallopt). A finite threshold is no
# good: mallopt takes an int (at most 2 GiB), and a 1B-width step frees more than that at once,
# which then faults in again on the next step (replayed here: 572k faults a step instead of 0).
TRIM_THRESHOLD = -1

_applied: Optional[bool] = None  # what tune_host_malloc did in this process (None: not asked yet)


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def wanted(cpu_work: bool) -> bool:
    """Whether ``SHARDTUNE_MALLOC_TUNING`` asks for the tuning in a process whose heavy work is
    (``cpu_work``) or is not on the CPU."""
    value = os.environ.get(ENV, "0").strip().lower()
    if value == "auto":
        return cpu_work
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("", "0", "off", "false", "no"):
        return False
    raise ShardtuneError(  # a typo would otherwise leave the tuning silently off
        f"{ENV}={os.environ[ENV]!r} is not a setting of the host malloc tuning: use 0 (glibc's defaults, "
        "the default), auto (tune processes whose work runs on the CPU) or 1 (tune every process).")


def tune_host_malloc(cpu_work: bool) -> bool:
    """Serve every allocation from glibc's one main heap (``M_ARENA_MAX`` 1, ``M_MMAP_MAX`` 0) and
    keep its free memory (``M_TRIM_THRESHOLD`` -1); returns whether the tuning is in effect.

    Call it once the process knows where its work runs, before the big allocations. Freed memory
    then stays resident for reuse: call :func:`release_free_memory` after a phase whose transient
    peak the rest of the run does not need again (model loading)."""
    global _applied
    if _applied is not None:
        return _applied
    libc = _glibc() if wanted(cpu_work) else None
    # One arena: gloo's worker threads allocate the temporary flat buffer of every all-gather (as
    # large as the gathered unit); in a thread arena of their own a buffer over 64 MiB is always
    # mmap-ed, whatever M_MMAP_MAX says.
    _applied = bool(libc is not None and libc.mallopt(M_ARENA_MAX, 1) == 1
                    and libc.mallopt(M_MMAP_MAX, 0) == 1
                    and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _applied


class ReleaseAfterStep:
    """A train-loop step hook: :func:`release_free_memory` after every optimizer step.

    Within a step the tuned heap reuses what earlier buffers of the step freed (a 1B-width step
    gathers a 232 MiB layer 18 times and a 1 GiB embedding 4 times); between steps the free pages
    go back to the kernel, so RSS between steps is what is live. It does not stop fragmentation:
    the pages a step touches still grew over 4 steps (step-end RSS before the trim 4.75 -> 6.88
    GiB with it, 4.98 -> 6.95 without; peak 7.0 GiB with it, 8.3 without)."""

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, result) -> None:
        release_free_memory()


def release_free_memory() -> None:
    """Give the heap's free pages back to the kernel (``malloc_trim``) when the tuning is on:
    without it they would stay resident after a one-off peak."""
    libc = _glibc() if _applied else None
    if libc is not None:
        libc.malloc_trim(0)
