"""What every peer runner shares: the spec and batch plan, threads, the step clock, memory and
the result line. Imports only the standard library (and ``benchmarks.common``, which does the
same) at module level, so that it loads in both shardtune's ``.venv`` and the peer virtual
environment, which need not have shardtune: what the runners need of it (``IGNORE_INDEX``) comes
in the spec.

A batch plan (written by ``benchmarks.peers``) is the exact sequence of micro-batches shardtune's recipe
trains on, one list of rows per step. Padded rows are single documents (``input_ids``,
``labels``); packed rows are chunks of exactly ``seq_len`` tokens with ``position_ids`` restarting
at every document and ``seq_lens`` (the documents' lengths, the pad tail last). Every framework
trains on these rows in this order, so the first-step losses must agree.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .. import common

RESULT_PREFIX = "PEER_RESULT "


def load_spec(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.peer_runners.<runner> SPEC.json (written by benchmarks.peers)")
    return json.loads(Path(argv[0]).read_text())


def load_plan(path: str) -> dict:
    return json.loads(Path(path).read_text())


def plan_rows(plan: dict) -> list[dict]:
    """The plan's rows in training order (step after step): a sequential sampler with batch
    size ``plan['batch_size']`` gives back exactly the plan's batches."""
    return [row for batch in plan["steps"] for row in batch]


def setup_torch(spec: dict) -> None:
    """Same thread count in every framework's process (the driver also sets OMP_NUM_THREADS)."""
    import torch

    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])


def checksum(input_ids, pad_id: int) -> int:
    """Sum of the batch's non-pad token ids: equal for every framework's collation of the same
    rows (padding to the longest row, stacking or flattening them into one row)."""
    ids = input_ids.reshape(-1)
    return int(ids[ids != pad_id].sum())


class StepClock:
    """Wall-clock stamps at the end of every optimizer step (after a CUDA sync on a GPU, so a
    stamp marks finished work, not queued kernels)."""

    def __init__(self, device: str) -> None:
        self.ends: list[float] = []
        self._cuda = device == "cuda"

    def stamp(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


class MemoryProbe:
    """Peak memory of one run. GPU: ``torch.cuda.max_memory_allocated`` (reset at start). CPU:
    the peak of the process's private anonymous RSS, sampled every 5 ms from before the model
    is loaded to the end of training (imports included: ``start_bytes`` is the level at start)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._sampler: Optional[common.PeakSampler] = None
        self.start_bytes = 0

    def __enter__(self) -> "MemoryProbe":
        import gc

        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
        else:
            self.start_bytes = common.memory_now()["anon"]
            self._sampler = common.PeakSampler(interval=0.005).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._sampler is not None:
            self._sampler.__exit__(*exc)

    def result(self) -> dict:
        if self.device == "cuda":
            import torch

            return {"peak_bytes": torch.cuda.max_memory_allocated(), "start_bytes": self.start_bytes,
                    "kind": "torch.cuda.max_memory_allocated"}
        peak = self._sampler.peak if self._sampler else {}
        return {"peak_bytes": peak.get("anon", 0), "start_bytes": self.start_bytes,
                "hwm_bytes": peak.get("hwm", 0), "kind": "peak anon RSS (process)"}


def versions(*names: str) -> dict[str, str]:
    import importlib

    out = {}
    for name in ("torch", "transformers", *names):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as exc:  # report, never fail a run for a version string
            out[name] = f"? ({type(exc).__name__})"
    return out


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def check_first_batches(seen: list[int], plan: dict, framework: str) -> None:
    """Refuse a run that did not train on the plan's batches in the plan's order."""
    want = plan["checksums"][: len(seen)]
    if seen[: len(want)] != want:
        first = next(i for i, (a, b) in enumerate(zip(seen, want)) if a != b)
        raise SystemExit(f"{framework}: batch {first + 1} differs from the plan (token checksum "
                         f"{seen[first]} != {want[first]}): the frameworks would not train on the same data")


def run_modes(run: Callable[[dict, str], dict[str, Any]]) -> None:
    """A runner's main: read the spec, set torch up, run and report every mode in it."""
    spec = load_spec()
    setup_torch(spec)
    for mode in spec["modes"]:
        emit(run(spec, mode))
