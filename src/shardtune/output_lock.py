"""One run per output folder: a run holds an exclusive lock on its output folder for its whole life.

The lock is ``fcntl.flock`` on ``<folder>/.shardtune-lock`` (``ownership.LOCK``, which the
ownership rules count as shardtune's, so it never blocks the folder's next run). The kernel
releases it when the holding process ends, however it ends (a crash, SIGKILL, a lost node), so a
dead run never leaves a folder locked. The file is deleted only with a folder the run created
and left empty (it failed before writing anything); no run waits on the lock (a second run is
refused at once), so that cannot let two runs hold it.

``shardtune finetune --nproc_per_node N`` takes the lock in the launcher and tells its ranks so
through ``HELD_ENV`` (``<pid>:<lock path>``); a rank that sees its launcher holding the lock of its
own output folder does not take it again (it could not: the launcher holds it). Rank 0 waits for
it instead (``inherit_from_launcher``): a launcher killed alone (``kill -9``, the out-of-memory
killer) leaves its ranks training and writing the folder, and the kernel grants rank 0 the lock
the moment the launcher's is gone, so a run started then is still refused.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .config.errors import ShardtuneError
from .outputs.ownership import LOCK

HELD_ENV = "SHARDTUNE_HELD_OUTPUT_LOCK"


class OutputLock:
    """An held lock on ``folder``; ``release()`` (or the process's end) lets the next run in."""

    def __init__(self, folder: Path, fd: int, created: bool = False) -> None:
        self.folder, self.path, self._fd = folder, folder / LOCK, fd
        self._exported = False
        self._created = created  # the folder did not exist before this run
        self._closing = threading.Lock()  # release() vs inherit_from_launcher's waiting thread

    def release(self) -> None:
        if self._exported:
            os.environ.pop(HELD_ENV, None)
            self._exported = False
        with self._closing:
            if self._fd is None:
                return
            if self._created and [p.name for p in self.folder.iterdir()] == [LOCK]:
                # A run that failed before writing anything leaves no folder behind. Removed while
                # still held: a run started meanwhile was refused (non-blocking lock), not queued on it.
                self.path.unlink(missing_ok=True)
                self.folder.rmdir()
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def export_to_children(self) -> None:
        """Let processes this one starts (torchrun's ranks) know that their output folder is held."""
        os.environ[HELD_ENV] = f"{os.getpid()}:{self.path.resolve()}"
        self._exported = True


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


def hold(folder: str | Path, flag: str = "--output_dir") -> OutputLock:
    """Create ``folder`` if needed and lock it for this process; a folder another live shardtune
    process holds is a clear error."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ShardtuneError(
            f"{flag} {str(folder)!r} is in use by another shardtune run{_holder(path)}: two runs writing "
            "one folder would replace each other's model and checkpoints. Wait for that run to end, or "
            f"choose another {flag}. (The lock is released when that process ends, even by a crash.)") from None
    _write_holder(fd)
    return OutputLock(folder, fd, created)


def _write_holder(fd: int) -> None:
    """Say in the lock file who holds it (a refused run names that process)."""
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.pwrite(fd, f"process {os.getpid()} on {os.uname().nodename}, started {started}: "
                  f"{' '.join(sys.argv[:3])}\n".encode(), 0)


def held_by_launcher(folder: str | Path) -> bool:
    """True in a rank whose launcher (``HELD_ENV``) holds the lock of ``folder`` and is alive."""
    value = os.environ.get(HELD_ENV, "")
    pid, _, path = value.partition(":")
    if not (pid.isdigit() and path):
        return False
    if Path(path) != (Path(folder) / LOCK).resolve():
        return False
    try:
        os.kill(int(pid), 0)  # the launcher is still alive (then it still holds the lock)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def hold_unless_launcher_does(folder: str | Path, flag: str = "--output_dir") -> Optional[OutputLock]:
    """The lock of ``folder`` for this run: taken here, or None when this rank's launcher holds it."""
    return None if held_by_launcher(folder) else hold(folder, flag)


def inherit_from_launcher(folder: str | Path) -> OutputLock:
    """The lock of ``folder``, which this rank's launcher holds, taken by this process if the
    launcher dies first: a thread waits for it (a blocking flock), which the kernel grants only
    once the launcher's lock is gone. ``release()`` closes the descriptor; that does not interrupt
    a flock already waiting, but the thread then finds the lock no longer this run's and writes
    nothing (its grant, if it comes, ends with the call's own reference to the closed file; the
    daemon thread ends with the process)."""
    lock = OutputLock(Path(folder), os.open(Path(folder) / LOCK, os.O_RDWR))
    fd = lock._fd

    def wait() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            return  # released (the descriptor closed) while waiting
        with lock._closing:
            if lock._fd == fd:  # still this run's: it holds the folder now
                _write_holder(fd)

    threading.Thread(target=wait, name="shardtune-output-lock", daemon=True).start()
    return lock
