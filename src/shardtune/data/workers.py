"""How DataLoader worker processes are started: from a fork server, never by forking a rank.

A rank runs threads that touch Python's thread states (gloo's and NCCL's work threads take the
GIL to release a finished collective's tensors). Forking the rank while one of them holds the
interpreter's thread-state lock leaves that lock held forever in the child: CPython 3.11 takes it
in ``PyOS_AfterFork_Child`` before re-initialising it, so the new DataLoader worker hangs before
running a line, and the rank waits for its first batch forever. Seen here in the 2-rank tests
(gdb: ``PyOS_AfterFork_Child -> _PyEval_ReInitThreads -> _PyThreadState_DeleteExcept`` waiting
on that lock). Workers are therefore started by multiprocessing's fork server, a single-threaded
process started once with torch already imported, and kept for the whole run
(``persistent_workers``) so each is started and sent the dataset once, not every epoch. A
fork-server worker's parent is the fork server, not the rank, so PyTorch's own check that the
rank is alive never fires; each worker therefore watches the rank's pid and exits when the rank
is gone (after ``end_process``, a crash or a kill), instead of lingering with its output pipes.

Workers receive the dataset and collator by pickling. A collator or rows from a custom dataset
file (imported under ``custom.MODULE_PREFIX``, a module no other process can import) cannot be
sent; such a loader reads its batches in the training process instead, with a note.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import pickletools
import signal
import sys
import threading
import time
from typing import Any, Optional

import psutil

from ..notes import note
from .custom import MODULE_PREFIX

START_METHOD = "forkserver"
_PACKAGE = __name__.split(".")[0]


def _preload(rows: Any, collate_fn: Any) -> list[str]:
    """What the fork server imports once, so that a worker forked from it starts in milliseconds.

    A worker needs torch, this module (its ``worker_init_fn``) and the modules that unpickling
    the dataset's rows and the collator imports: for a built-in dataset, torch and shardtune.data
    (~1.5 s CPU), not the recipe's transformers, peft and bitsandbytes (~7 s more per rank).
    "__main__" covers a script run by path (the fork server runs it once; workers then do not).

    A main module run by path or by a name not ending in ".__main__" (a user's script, or
    module) keeps the full preload: one run by name is run again in every worker
    (multiprocessing's rule for fork-server and spawned processes), and a process that builds
    many loaders (tests/parallel/fsdp_worker.py runs dozens of cases) starts a worker per
    loader, which imports on demand what the fork server lacks: measured, the light list made
    such a process's suite 2.4x slower. Then the shardtune modules this rank has loaded are
    preloaded too (~2 s per worker start without them, ~0.1 s with), except a main module run
    by name: the worker runs it by that name with runpy, which warns ("'mod' found in
    sys.modules ... prior to execution") in every worker when the fork server has imported it
    already. shardtune's own entries are packages' ``__main__`` modules (``-m shardtune
    finetune``, ``-m shardtune.finetuning``), so their ranks take the light list.
    """
    main = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    if main is None or not main.endswith(".__main__"):
        ours = sorted(name for name in list(sys.modules)
                      if name.split(".")[0] == _PACKAGE and name != main)
        return ["__main__", "torch", *ours]
    return ["__main__", "torch", __name__, *sorted(_modules_to_unpickle(rows[0] if len(rows) else None, collate_fn))]


def _modules_to_unpickle(*objs: Any) -> set[str]:
    """The modules unpickling ``objs`` imports: pickle protocol 2 names each class and function it
    needs in a GLOBAL opcode ("module name"). An object that does not pickle adds none."""
    found = set()
    for obj in objs:
        try:
            data = pickle.dumps(obj, protocol=2)
        except Exception:  # noqa: BLE001 - any pickling failure: nothing to preload for it
            continue
        found.update(arg.split(" ", 1)[0] for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL")
    return found


_WATCH_INTERVAL_S = 1.0
_FEEDER_JOIN_S = 5.0  # a closed queue's feeder thread only flushes one message: far less in practice


def stop_workers(*loaders: Any) -> None:
    """Stop the persistent worker processes of ``loaders`` (DataLoaders, or None) now.

    A DataLoader stops its persistent workers only when its iterator is freed. Freed by Python's
    cycle collector (a loader that a reference cycle keeps alive: the recipe's frames in a
    traceback, a hook that holds the recipe's objects; ``end_process`` collects them), the
    iterator's index queues are finalised before its ``__del__`` runs: multiprocessing closes a
    queue from a weakref callback, and the collector runs those first. The "stop" each worker
    waits for then sits in a closed queue's buffer, and the loader waits for each worker for
    torch's full status interval (5 s) before killing it: 10 s at the end of every run with two
    workers. Stopped here, while everything is alive, the workers exit at once.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # DataLoader's own handle on its persistent pool
        if iterator is not None:
            loader._iterator = None
            iterator._shutdown_workers()
            # DataLoader closes each index queue without waiting for its feeder thread, which holds
            # two of the queue's named semaphores until it has sent the "stop": a rank that ends
            # (os._exit) a moment later left them to the resource tracker ("2 leaked semaphore
            # objects", about 1 bare-torchrun run in 6 here). The thread ends as soon as it is sent.
            for queue in iterator._index_queues:
                feeder = getattr(queue, "_thread", None)
                if feeder is not None:
                    feeder.join(timeout=_FEEDER_JOIN_S)


def worker_options(num_workers: int, rows: Any, collate_fn: Any) -> dict:
    """DataLoader keyword arguments for ``num_workers`` worker processes (none when 0)."""
    if num_workers <= 0:
        return {"num_workers": 0}
    reason = _why_not_sendable(rows, collate_fn)
    if reason is not None:
        note(f"--num_workers_dataloader {num_workers}: {reason}, so batches are built in the "
             "training process (as with --num_workers_dataloader 0). Define the collator "
             "and row types in an importable module to use worker processes.")
        return {"num_workers": 0}
    if START_METHOD not in multiprocessing.get_all_start_methods():  # Windows: spawn is the default
        return {"num_workers": num_workers, "persistent_workers": True}
    context = multiprocessing.get_context(START_METHOD)
    context.set_forkserver_preload(_preload(rows, collate_fn))
    _start_fork_server()
    return {"num_workers": num_workers, "persistent_workers": True, "multiprocessing_context": context,
            "worker_init_fn": functools.partial(exit_with_parent, os.getpid(), psutil.Process().create_time())}


# Signals meant for the rank that the fork server and its workers ignore (see _start_fork_server).
_RANK_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _start_fork_server() -> None:
    """Start the fork server now, with SIGINT, SIGTERM and SIGUSR1 ignored (ignored dispositions
    survive its exec and every fork of a worker from it).

    The fork server is started by the rank, so it and its workers are in the rank's process
    group, and whatever signals that group reaches them too: Ctrl-C from a terminal, and the
    SIGTERM that torchrun sends to each rank's whole group when it is itself told to stop (Slurm,
    Kubernetes). A worker killed by it makes the rank fail with "DataLoader worker exited
    unexpectedly" instead of finishing its step and saving a pre-emption checkpoint. So they
    ignore these signals and stop with their rank instead (``exit_with_parent``: when the rank
    stops them or is gone; the fork server: when the rank is gone); SIGKILL still ends them.
    """
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():  # signal.signal needs the main thread
        forkserver.ensure_running()
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _RANK_SIGNALS}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_with_parent(parent_pid: int, parent_started: float, worker_id: int) -> None:
    """``worker_init_fn``: end this worker when the process that started it asks (SIGTERM from that
    process: DataLoader and multiprocessing shut workers down so) or has gone, and on no other
    signal meant for the rank.

    PyTorch's worker loop installs its own SIGTERM handler before it calls this function, and that
    handler would end the worker on a SIGTERM from anyone (torchrun's to the rank's process
    group, Slurm's to every process of the job). Ignoring SIGTERM outright would instead make
    the parent's own shutdown wait for ever on a worker that does not stop. So the rank's signals
    are blocked in this thread (and in every thread started from it) and a watcher thread takes
    them with their sender: SIGTERM from the parent ends the worker, the rest are dropped.
    """
    threading.excepthook = functools.partial(_quiet_when_parent_gone, parent_pid, parent_started,
                                             threading.excepthook)
    # multiprocessing's resource_sharer thread catches its own errors and reports them through
    # sys.excepthook (resource_sharer._ResourceSharer._serve), not threading.excepthook
    sys.excepthook = functools.partial(_quiet_sys_hook, parent_pid, parent_started, sys.excepthook)
    if not hasattr(signal, "sigtimedwait"):  # macOS: no sender to tell apart; PyTorch's handler stays
        return _watch_parent(parent_pid, parent_started)
    for sig in _RANK_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # the fallback in any thread that does not block them
    signal.pthread_sigmask(signal.SIG_BLOCK, _RANK_SIGNALS)  # kept pending for the watcher

    def watch() -> None:
        while True:
            info = signal.sigtimedwait(_RANK_SIGNALS, _WATCH_INTERVAL_S)
            if info is not None and info.si_signo == signal.SIGTERM and info.si_pid == parent_pid:
                os._exit(0)
            if _gone(parent_pid, parent_started):
                os._exit(0)

    threading.Thread(target=watch, name="shardtune-parent-watch", daemon=True).start()


# How long a worker waits, after a connection to its rank broke, for the rank to be gone: a killed
# process closes its sockets a moment before the kernel marks it a zombie.
_GONE_WAIT_S = 5.0


def _quiet_when_parent_gone(parent_pid: int, parent_started: float, default, args) -> None:
    """``threading.excepthook`` of a worker: a thread whose connection to the rank broke because the
    rank is gone ends the worker quietly instead of printing a traceback.

    The worker sends each batch's tensors as file descriptors, which multiprocessing's
    ``resource_sharer`` thread hands over when the rank connects to it. A rank killed in that
    moment (kill -9, the OOM killer) resets the connection, and the thread's traceback would land
    in the job's output after the launcher's one-line account of the kill. Any other error, or one
    while the rank lives, is printed as before.
    """
    _end_if_parent_gone(args.exc_type, parent_pid, parent_started)
    default(args)


def _quiet_sys_hook(parent_pid: int, parent_started: float, default, exc_type, exc, tb) -> None:
    """``sys.excepthook`` of a worker, as :func:`_quiet_when_parent_gone`."""
    _end_if_parent_gone(exc_type, parent_pid, parent_started)
    default(exc_type, exc, tb)


def _end_if_parent_gone(exc_type: type, parent_pid: int, parent_started: float) -> None:
    """End the worker quietly when a broken connection comes from its rank being gone."""
    if issubclass(exc_type, (ConnectionError, EOFError)):
        deadline = time.monotonic() + _GONE_WAIT_S
        while time.monotonic() < deadline:
            if _gone(parent_pid, parent_started):
                os._exit(0)
            time.sleep(0.05)


def _watch_parent(parent_pid: int, parent_started: float) -> None:
    def watch() -> None:
        while not _gone(parent_pid, parent_started):
            time.sleep(_WATCH_INTERVAL_S)
        os._exit(0)

    threading.Thread(target=watch, name="shardtune-parent-watch", daemon=True).start()


def _gone(pid: int, started: float) -> bool:
    # A zombie counts as gone: a launcher that reads the rank's output to EOF before reaping it
    # would otherwise wait on a worker that waits on the launcher.
    try:
        process = psutil.Process(pid)
        return process.create_time() != started or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _why_not_sendable(rows: Any, collate_fn: Any) -> Optional[str]:
    probes = {"the data collator": collate_fn, "a row of the dataset": rows[0] if len(rows) else None}
    for what, obj in probes.items():
        try:
            data = pickle.dumps(obj)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means "cannot be sent"
            return f"{what} cannot be sent to a worker process ({type(exc).__name__}: {exc})"
        if MODULE_PREFIX.encode() in data:
            return f"{what} is defined in the custom dataset file, which worker processes cannot import"
    return None
