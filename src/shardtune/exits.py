"""How a shardtune process ends: a user error as one paragraph and exit 2, and a process that ran
a process group through ``end_process``. Lives below the CLI so that the recipe, ``convert`` and
workers use it without importing ``cli`` (which imports them)."""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable

from .config.errors import SameOnEveryRank, ShardtuneError

_RANK_ERROR_GRACE_S = 3.0
# The exit code of a rank that stopped because another rank of the job went away (its
# collective failed): the launcher then names the other rank as the cause (parallel/launch.py).
PEER_LOST_EXIT = 3


def run_with_clean_errors(fn: Callable[[], object]) -> None:
    """Run ``fn``; a user error prints its one-paragraph message (no traceback) and exits 2.

    A process in which ``fn`` started a process group (an FSDP rank) ends through ``end_process``,
    which skips the interpreter teardown that can abort or hang such a process after its work is
    done. Only a group started by this call counts: a caller that runs commands in-process (a
    test suite that had started a group earlier) must get control back, not an ``os._exit``.
    """
    before = _process_groups_started()
    try:
        fn()
        code = 0
    except ShardtuneError as exc:
        rank = os.environ.get("RANK", "0")
        if rank != "0" and isinstance(exc, SameOnEveryRank):
            pass  # rank 0 says it
        elif rank != "0":
            # A user error (bad flag, path, data) is usually raised on every rank alike. Rank 0
            # reports it and torchrun then stops the other ranks; a rank > 0 speaks only if it
            # is still alive after a grace period, i.e. when the error was its own.
            time.sleep(_RANK_ERROR_GRACE_S)
        if rank == "0" or not isinstance(exc, SameOnEveryRank):
            prefix = f"[rank {rank}] " if rank != "0" else ""
            print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:
        if _process_groups_started() == before:
            raise
        from .parallel.distributed import peer_lost

        lost = peer_lost(exc)
        code = 1
        if lost:  # another rank died first: the launcher names it, this rank's traceback is noise
            print(f"[rank {os.environ.get('RANK', '0')}] stopped: another rank of the job has gone ({lost}).",
                  file=sys.stderr, flush=True)
            code = PEER_LOST_EXIT
        else:
            traceback.print_exc()
    if _process_groups_started() > before:
        from .parallel.distributed import end_process

        end_process(code)
    if code:
        sys.exit(code)


def _process_groups_started() -> int:
    # Looked up, not imported: a command that never touched torch.distributed started none, and
    # importing it here would cost every command the torch import.
    module = sys.modules.get(f"{__package__}.parallel.distributed")
    return 0 if module is None else module.process_groups_started()
