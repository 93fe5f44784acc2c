"""``python -m warm_cli SOCKET``: the test suite's pre-imported ``python -m shardtune``.

Most of a shardtune command's CPU in the suite is its start-up: importing torch and transformers'
model code costs ~4.5 s a process here, and the suite runs ~70 such commands. This server
imports them once, then serves each command (a JSON line on a Unix socket: argv, environment,
folder, stdin and output files) by forking a child that runs ``python -m shardtune ARGV``
exactly as a fresh interpreter would from there on: ``runpy`` runs ``shardtune.__main__`` as
``__main__``, with the request's environment, folder, ``sys.argv`` and file descriptors 0-2, and
the child ends through the interpreter's own exit (atexit handlers, exit code, a traceback for an
uncaught exception). The child is a real process: its ranks, DataLoader fork servers and locks
are real. It replies with the child's pid, then its exit code.

Forking is safe because this process runs no Python thread (checked before serving: a fork while
another thread holds the interpreter's thread-state lock can hang, ../shared/TRAPS.md) and never
runs a torch operator; the idle worker threads numpy's OpenBLAS starts at import are rebuilt in
the child by OpenBLAS's own fork handler, as in any forked DataLoader worker. What differs
from a fresh interpreter is only what was imported first, so tests about imports, interpreter
flags or start-up environment (``-X importtime``, PYTHONPATH, malloc tunables) use a fresh
process: ``tests/conftest.py``'s client falls back to one whenever the request's start-up
environment differs from this server's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys


def _preload() -> None:
    import matplotlib.figure  # noqa: F401  (--save_metrics' plots)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from transformers.models.mllama import modeling_mllama  # noqa: F401

    import shardtune.cli  # noqa: F401
    import shardtune.commands.generate  # noqa: F401
    import shardtune.convert.cli  # noqa: F401
    import shardtune.finetuning  # noqa: F401
    import shardtune.infer.loading  # noqa: F401


def _child(request: dict) -> None:
    """Become ``python -m shardtune ARGV`` (never returns: SystemExit or an exception ends it)."""
    import runpy

    os.setpgid(0, 0)  # its own group: a timed-out command is killed with everything it started
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, (path, mode) in enumerate([(request["stdin"], os.O_RDONLY), (request["stdout"], os.O_WRONLY),
                                       (request["stderr"], os.O_WRONLY)]):
        opened = os.open(path, mode)
        os.dup2(opened, fd)
        os.close(opened)
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:  # read by the OpenMP runtime when torch loaded it: this server's value otherwise
        import torch

        torch.set_num_threads(int(threads))
    sys.path[0] = request["cwd"]  # as `python -m` puts the current folder first
    sys.argv = ["shardtune", *request["argv"]]
    runpy.run_module("shardtune", run_name="__main__", alter_sys=True)
    sys.exit(0)


def serve(path: str) -> None:
    import threading

    _preload()
    import torch

    if threading.active_count() != 1:
        print(f"not serving: Python threads after the imports: {threading.enumerate()}", flush=True)
        return
    if torch.cuda.is_initialized():  # bitsandbytes' import asks for the GPU's capability on a GPU host
        print("not serving: CUDA was initialised by the imports, and a forked child cannot use it", flush=True)
        return
    # The imported objects move to the collector's permanent generation: a child's collections
    # (and its exit) then neither scan them nor copy their pages (its exit: 2.2 s -> 0.4 s here).
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    # A child's end wakes the loop at once (SIGCHLD writes to this pipe), so its exit code goes
    # back without polling; the 1 s timeout only checks that the test session is still there.
    woken, wake = os.pipe()
    os.set_blocking(wake, False)
    signal.set_wakeup_fd(wake)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    parent = os.getppid()
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    while os.getppid() == parent:  # the test session is gone: so is this server
        ready, _, _ = select.select([listener, woken], [], [], 1.0)
        if woken in ready:
            os.read(woken, 4096)
        if listener in ready:
            conn, _ = listener.accept()
            try:
                with conn.makefile("r") as lines:
                    request = json.loads(lines.readline())
            except (OSError, ValueError):  # a client that went away: serve the next one
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # as in a fresh interpreter
                os.close(woken)
                os.close(wake)
                for held in (listener, conn, *waiting.values()):
                    held.close()
                _child(request)
            waiting[pid] = conn
            with contextlib.suppress(OSError):  # a client gone now still has its child reaped below
                conn.sendall(f"{pid}\n".encode())
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):  # the client gave up on it (timed out)
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                conn.close()
    for pid in waiting:  # the session ended: so do the commands it was waiting for
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


if __name__ == "__main__":
    serve(sys.argv[1])
