"""Atomic file writes (no torch, no Lightning): a temporary file in the target's own folder, fsync,
rename over the target, fsync of the folder. A kill at any moment leaves the old file or the new one,
never a truncated one (also when ``$TMPDIR`` is on another file system); a failure removes the
temporary file, and an OSError of the file system (disk full, read-only, permission) is re-raised as
an OSError that names the target path, so the entry points can print it as one line
(``msdiff.cli``, exit status 74).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_copy", "named_error"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _RecordingWriter:
    """A file's ``write`` that remembers the first OSError: ``torch.save``'s zip writer swallows it
    and raises "enforce fail ... unexpected pos" instead (e.g. on a full disk)."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str | Path, write, before_replace=None, fsync: bool = True) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it and rename it over ``path``
    (``before_replace()`` runs just before the rename, e.g. to keep the previous file).
    ``fsync=False`` skips both fsyncs: the rename is still atomic for every reader, but after a
    power loss the file may be empty; only for files whose integrity is checked otherwise (sample.py
    records each sample's sha256 and redoes a sample that does not match).

    A failure removes the temporary file and leaves ``path`` as it was; an OSError of the file
    system (disk full, read-only, permission) is re-raised as an OSError naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise named_error(e, path) from None
    recorder = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 -> the mode open() would give
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingWriter(f)
            write(recorder)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        err = recorder.error if recorder is not None and recorder.error is not None else e
        if isinstance(e, Exception) and isinstance(err, OSError) and err.errno is not None:
            raise named_error(err, path) from None
        raise
    if fsync:
        _fsync_dir(path.parent)


def named_error(e: OSError, path: str | Path) -> OSError:
    """The same OSError (errno, reason) naming ``path`` (the target, not a temporary file or an
    unnamed file descriptor)."""
    return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) if e.errno is not None else e


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` atomically (same guarantees as :func:`atomic_write`)."""
    with open(src, "rb") as fin:
        atomic_write(dst, lambda f: shutil.copyfileobj(fin, f, 16 << 20))
