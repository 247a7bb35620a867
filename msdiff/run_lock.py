"""One writer per run directory: an advisory lock file ``<run_dir>/.lock`` holding "PID HOST".

Two train.py processes on the same run would both resume from the same ``last.ckpt`` and overwrite
each other's checkpoints (the last writer wins). :class:`RunLock` takes an exclusive ``flock`` on the
lock file; a second process fails with one line naming the holder's PID and host. The kernel drops
the lock when its holder dies (also on SIGKILL), so a stale lock file of a dead process is simply
taken over; the PID/host written in it are only for the message.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

LOCK_NAME = ".lock"


class RunLockedError(ValueError):
    """Another live process holds the run directory's lock (one line naming it)."""


class RunLock:
    """Exclusive lock on ``run_dir`` for the lifetime of this object (or until :meth:`release`)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock (creating the run directory); RunLockedError naming the holder when another
        process has it, OSError naming the path when the directory cannot be written."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunLockedError(f"run directory {self.run_dir} is in use by {holder(self.path)} (lock file "
                                 f"{self.path}); wait for it to finish, stop it, or use another --name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; it is only a place to lock)."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: str | os.PathLike) -> str:
    """"PID N on HOST" as written in the lock file (or "another process" when unreadable)."""
    try:
        pid, host = Path(path).read_text().split()[:2]
        return f"PID {int(pid)} on {host}"
    except (OSError, ValueError):
        return "another process"
