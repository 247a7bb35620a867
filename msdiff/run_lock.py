"""One writer per run directory and per checkpoint folder: an advisory lock on each folder, with
``<folder>/.lock`` holding "PID HOST".

Two train.py processes on the same run (or two runs given the same ``--checkpoint.dirpath``) would
both resume from the same ``last.ckpt`` and overwrite each other's checkpoints (the last writer
wins). :class:`RunLock` takes, for every folder it guards (the run directory and its checkpoint
folder, wherever that is), an exclusive ``flock`` on the folder itself (its inode cannot be deleted
while the run's files are in it: deleting ``.lock`` does not open the run to a second writer) and
on the ``.lock`` file of the run directory and of a checkpoint folder outside it (the only lock
where a file system cannot lock folders, e.g. NFS; the PID and host written in it name the holder).
A second process fails with one line naming the folder and the holder. The kernel drops the locks
when their holder dies (also on SIGKILL), so a stale lock file of a dead process is simply taken
over.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

from msdiff.atomic_io import named_error

LOCK_NAME = ".lock"
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


class RunLockedError(ValueError):
    """Another live process holds the run directory's lock (one line naming it)."""


class RunLock:
    """Exclusive lock on ``run_dir`` (and on each of ``more_dirs``, e.g. a checkpoint folder outside
    the run directory) for the lifetime of this object (or until :meth:`release`)."""

    def __init__(self, run_dir: str | os.PathLike, *more_dirs: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        #: (folder, whether it gets its own .lock file): a folder inside the run directory (its
        #: checkpoints/) is locked itself, so that another run pointed at it is refused too
        self.dirs = [(self.run_dir, True)] + [(Path(d), not _inside(Path(d), self.run_dir)) for d in more_dirs
                                              if os.path.abspath(d) != os.path.abspath(self.run_dir)]
        self._fds: list[int] = []

    def acquire(self) -> "RunLock":
        """Take the locks (creating the folders); RunLockedError naming the holder when another process
        has one, OSError naming the path when a folder or lock file cannot be written."""
        try:
            for folder, with_file in self.dirs:
                self._lock_folder(folder, with_file)
        except BaseException:
            self.release()
            raise
        return self

    def _lock_folder(self, folder: Path, with_file: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        lock_file = folder / LOCK_NAME
        dir_fd = os.open(folder, os.O_RDONLY)
        self._fds.append(dir_fd)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _BUSY:
                self._refuse(folder, lock_file if lock_file.exists() else folder.parent / LOCK_NAME)
            # the file system cannot lock a folder (NFS: ENOLCK/EBADF): the lock file alone guards it
        if not with_file:
            return
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        self._fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in _BUSY:
                raise named_error(e, lock_file) from None
            self._refuse(folder, lock_file)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            os.fsync(fd)
        except OSError as e:  # e.g. a full disk: name the file
            raise named_error(e, lock_file) from None

    def _refuse(self, folder: Path, lock_file: Path) -> None:
        what = "run directory" if folder == self.run_dir else "checkpoint folder"
        raise RunLockedError(f"{what} {folder} is in use by {holder(lock_file)} (lock file {lock_file}); wait for "
                             "it to finish, stop it, or use another --name"
                             + ("" if folder == self.run_dir else " / --checkpoint.dirpath")) from None

    def release(self) -> None:
        """Drop the locks (the files stay; they are only places to lock)."""
        while self._fds:
            fd = self._fds.pop()
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            finally:
                os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or below it (guarded by ``folder``'s lock)."""
    a, b = os.path.abspath(path), os.path.abspath(folder)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def holder(path: str | os.PathLike) -> str:
    """"PID N on HOST" as written in the lock file (or "another process" when unreadable)."""
    try:
        pid, host = Path(path).read_text().split()[:2]
        return f"PID {int(pid)} on {host}"
    except (OSError, ValueError):
        return "another process"
