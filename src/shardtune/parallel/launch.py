"""Run torchrun inside the ``shardtune finetune --nproc_per_node N`` process and turn its outcome
into an exit code with at most one line of its own (the ranks report their own errors).

torchrun's ``main`` raises ``SignalException`` when the launcher is interrupted (Ctrl-C,
SIGTERM) and ``ChildFailedError`` when a rank fails; run as a program, both end in a traceback
of the launcher's own frames, which says nothing the user can act on.
"""

from __future__ import annotations

import signal
import sys
from typing import Sequence

from ..config.errors import ShardtuneError


def run_torchrun(args: Sequence[str]) -> int:
    """``torchrun ARGS`` in this process; returns the job's exit code (130 after Ctrl-C)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(list(args))
        return 0
    except (SignalException, KeyboardInterrupt) as exc:
        sig = getattr(exc, "sigval", signal.SIGINT)
        print(f"interrupted ({signal.Signals(sig).name}): the ranks were stopped.", file=sys.stderr, flush=True)
        return 128 + int(sig)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        # A user error (exit 2) is printed by the rank in one paragraph; torchrun then stops the
        # other ranks with a signal. Nothing to add.
        if 2 in codes.values() and all(code == 2 or code < 0 for code in codes.values()):
            return 2
        rank, code = min(codes.items(), key=lambda item: (item[1] < 0, item[0]))
        what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        print(f"error: rank {rank} failed ({what}); its output above says why. {len(codes)} of the "
              "job's ranks failed.", file=sys.stderr, flush=True)
        return code if code > 0 else 1


# torchrun options `shardtune finetune` forwards to the launcher instead of the recipe.
_LAUNCH_OPTS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint",
                "rdzv_id", "master_addr", "master_port", "max_restarts")
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
