"""Run torchrun inside the ``shardtune finetune --nproc_per_node N`` process and turn its outcome
into an exit code with at most one line of its own (the ranks report their own errors).

torchrun's ``main`` raises ``SignalException`` when the launcher is interrupted (Ctrl-C,
SIGTERM) and ``ChildFailedError`` when a rank fails; run as a program, both end in a traceback
of the launcher's own frames, which says nothing the user can act on.

Pre-emption: on SIGTERM torchrun signals every rank's process group, waits for the ranks and
raises. The ranks finish their step, save and exit 0; each reports its committed save in a
folder this launcher names (``checkpoint.preemption.REPORT_ENV``), so the job exits 0 when every
local rank saved, as a scheduler expects of a job that stopped cleanly when asked to.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from typing import Sequence

from ..config.errors import ShardtuneError
from ..exits import PEER_LOST_EXIT

# A rank that a signal ends (kill -9, the OOM killer, torchrun's SIGTERM after another rank failed)
# never closes its DataLoader worker queues: its multiprocessing resource tracker frees their
# semaphores and warns "There appear to be N leaked semaphore objects" after the launcher's last
# line, which already names the cause. Only that warning is filtered (its category and message).
LEAKED_SEMAPHORE_FILTER = "ignore:resource_tracker:UserWarning"


def run_torchrun(args: Sequence[str], local_ranks: int) -> int:
    """``torchrun ARGS`` (starting ``local_ranks`` ranks here) in this process; returns the job's
    exit code: 0 when pre-empted and every local rank saved, 130 after Ctrl-C."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from ..checkpoint.preemption import REPORT_ENV, saved_reports

    with tempfile.TemporaryDirectory(prefix="shardtune-preemption-") as reports:
        os.environ[REPORT_ENV] = reports  # the ranks inherit the launcher's environment
        warnings_before = os.environ.get("PYTHONWARNINGS")
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [warnings_before, LEAKED_SEMAPHORE_FILTER]))
        try:
            torchrun_main(list(args))
            return 0
        except (SignalException, KeyboardInterrupt) as exc:
            sig = signal.Signals(getattr(exc, "sigval", signal.SIGINT))
            saved = saved_reports(reports)
            if len(saved) >= local_ranks:
                print(f"pre-empted ({sig.name}): every rank saved a checkpoint at step {max(saved.values())} "
                      "and stopped; run the same command with --resume to continue.", file=sys.stderr, flush=True)
                return 0
            partly = f" ({len(saved)} of {local_ranks} saved a checkpoint)" if saved else ""
            print(f"interrupted ({sig.name}): the ranks were stopped{partly}.", file=sys.stderr, flush=True)
            return 128 + int(sig)
        except ChildFailedError as exc:
            return _report_failure(exc)
        finally:
            os.environ.pop(REPORT_ENV, None)
            if warnings_before is None:
                os.environ.pop("PYTHONWARNINGS", None)
            else:
                os.environ["PYTHONWARNINGS"] = warnings_before


def _report_failure(exc) -> int:
    """One line naming the rank that caused a failed job; returns the job's exit code."""
    failures = exc.failures  # {global rank: ProcessFailure} of the ranks found dead, in rank order
    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    # A user error (exit 2) is printed by the rank in one paragraph; torchrun then stops the
    # other ranks with a signal. Nothing to add.
    if 2 in codes.values() and all(code in (2, PEER_LOST_EXIT) or code < 0 for code in codes.values()):
        return 2
    # The cause, first found: a rank that died of a signal (kill -9, the out-of-memory killer, a
    # segfault), then a rank that failed on its own (exit code > 0), then one that torchrun
    # stopped with its own SIGTERM once the job had failed, then one that stopped because its
    # next collective found a peer gone (PEER_LOST_EXIT), lowest rank first within each.
    def blame(item: tuple[int, int]) -> tuple[int, int]:
        rank, code = item
        if code < 0:
            return (2 if -code in (signal.SIGTERM, signal.SIGINT) else 0, rank)
        return (3 if code == PEER_LOST_EXIT else 1, rank)

    rank, code = min(codes.items(), key=blame)
    others = len(codes) - 1
    also = f" {others} other rank{'s' if others > 1 else ''} of the job stopped after it." if others else ""
    if code < 0:
        sig = signal.Signals(-code).name
        hint = " (kill -9, or the out-of-memory killer: see `dmesg`)" if sig == "SIGKILL" else ""
        print(f"error: rank {rank} (pid {failures[rank].pid}) was killed by {sig}{hint}.{also}",
              file=sys.stderr, flush=True)
        return 1
    print(f"error: rank {rank} failed (exit code {code}); its output above says why.{also}",
          file=sys.stderr, flush=True)
    return code


# torchrun options `shardtune finetune` forwards to the launcher instead of the recipe.
_LAUNCH_OPTS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint",
                "rdzv_id", "master_addr", "master_port", "max_restarts",
                "shutdown_timeout", "signals_to_handle")  # pre-emption: docs/checkpoints.md
_LAUNCH_FLAGS = ("standalone",)  # torchrun options without a value


def split_launch_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate torchrun options (``--nproc_per_node 2``) from the recipe's options."""
    launch, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        tok = args[i]
        name = tok[2:].partition("=")[0] if tok.startswith("--") else ""
        if name in _LAUNCH_FLAGS:
            launch.append(tok)
        elif name in _LAUNCH_OPTS:
            if "=" in tok:
                launch.append(tok)
            else:
                if i + 1 >= len(args):
                    raise ShardtuneError(f"{tok} needs a value.")
                launch += [tok, args[i + 1]]
                i += 1
        else:
            rest.append(tok)
        i += 1
    return launch, rest
