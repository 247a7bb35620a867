"""Checkpoint files you can trust: integrity check, the previous good checkpoint, stale temporaries.

* :func:`verify_checkpoint`: a ``torch.save`` file is a zip archive whose every member carries a
  CRC-32 of its bytes; ``torch.load(weights_only=True)`` does not check them (a flipped byte inside a
  tensor loads silently), Python's :mod:`zipfile` does. A file that fails (CRC mismatch, truncated,
  not a zip) raises :class:`CorruptCheckpointError`, one line naming the file.
* :func:`load_checkpoint`: THE way msdiff opens a checkpoint or weights file: integrity check,
  ``torch.load(weights_only=True)`` (tensors and plain containers only, no pickled code), and one
  set of one-line errors "FLAG PATH: why" (FLAG names where the path came from, e.g. --ckpt_path).
* :func:`keep_previous`: called right before a new ``last.ckpt`` replaces the old one; the old
  file, if it verifies, becomes ``previous.ckpt`` by a hard link renamed into place (a copy where the
  file system has no hard links), so at every instant both names hold a complete checkpoint.
* :func:`resume_checkpoint`: the file a run resumes from: ``last.ckpt`` if it verifies, else
  ``previous.ckpt`` with a one-line warning that says which steps are lost (the corrupt file stays
  until the next save replaces it, so that every DDP rank, deciding on its own, picks the same file).
* :func:`remove_stale_temporaries`: the hidden ``.NAME.*.tmp`` files a SIGKILL during a save leaves
  behind (only safe while holding the run's lock, :mod:`msdiff.run_lock`).

This module imports no Lightning (torch only inside :func:`load_checkpoint`).
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional

PREVIOUS_NAME = "previous.ckpt"
CHECKPOINT_KEY = "msdiff"
"""The entry of a train.py checkpoint holding {"model": {class_path, init_args}, "data": ..., "version"}."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file failed its integrity check (its message is one line naming the file)."""


def previous_path(last: str | os.PathLike) -> Path:
    """Where the checkpoint before ``last`` is kept: ``previous.ckpt`` in the same folder."""
    return Path(last).with_name(PREVIOUS_NAME)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every member's CRC-32 of a torch zip checkpoint; CorruptCheckpointError naming ``path``
    when one differs or the file is truncated / not a torch zip file. OSErrors (missing file,
    permission) propagate unchanged."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as e:
        raise CorruptCheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None
    except (EOFError, zlib.error, NotImplementedError) as e:
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint (CRC-32 mismatch in member '{bad}')")


def is_intact(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that passes :func:`verify_checkpoint`."""
    try:
        verify_checkpoint(path)
    except (CorruptCheckpointError, OSError):
        return False
    return True


def keep_previous(last: str | os.PathLike) -> None:
    """Make the current ``last`` (if intact) the new ``previous.ckpt``, atomically; ``last`` itself
    is left in place (the caller renames the new file over it next)."""
    last = Path(last)
    if not last.is_file() or not is_intact(last):
        return
    prev = previous_path(last)
    tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(last, tmp)
    except OSError:  # no hard links here: copy (atomically)
        from msdiff.atomic_io import atomic_copy

        atomic_copy(last, prev)
        return
    os.replace(tmp, prev)


def load_checkpoint(path: str | os.PathLike, flag: str = "--ckpt_path", map_location: Any = "cpu",
                    mmap: bool = True, verify: bool = True) -> dict:
    """The dict stored in the torch file ``path``, loaded with ``weights_only=True``.

    ``verify`` first checks every member's CRC-32 (:func:`verify_checkpoint`; torch.load does not);
    ``mmap`` maps the tensors instead of reading them (cheap when only a few entries are used; needs
    the zip format of torch >= 1.6). Every failure is a ValueError "FLAG PATH: why": no such file,
    corrupt (a :class:`CorruptCheckpointError`), not a readable torch file, not a dict."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such checkpoint file")
    if verify:
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{flag} {e}") from None
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, not a torch file, a pickled class weights_only refuses, ...
        why = (str(e).splitlines() or [""])[0][:160]
        raise ValueError(f"{flag} {path}: not a readable torch checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{flag} {path}: not a checkpoint (holds a {type(obj).__name__}, expected a dict)")
    return obj


def instantiate_config(config: dict, base: type) -> Any:
    """Build an object from a LightningCLI-style ``{"class_path": ..., "init_args": {...}}`` dict (as a
    checkpoint's ``CHECKPOINT_KEY`` entry stores it), type-checked against ``base`` by jsonargparse
    (nested class_path dicts are built too). A stored config is read through `msdiff.run.TrainedRun`,
    which first upgrades configs written before the estimators took typed options."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "obj", fail_untyped=False)
    cfg = parser.parse_object({"obj": config})
    return parser.instantiate(cfg).obj


def checkpoint_step(path: str | os.PathLike) -> Optional[int]:
    """``global_step`` stored in a checkpoint, or None when it cannot be read."""
    try:
        return int(load_checkpoint(path, verify=False)["global_step"])
    except (ValueError, KeyError, TypeError):
        return None


def resume_checkpoint(last: str | os.PathLike) -> tuple[Path, Optional[str]]:
    """(the checkpoint to resume from, a one-line warning or None) for a run whose newest file is
    ``last``. For a corrupt ``last``, ``previous.ckpt`` is used (``last`` is left in place; the next
    save replaces it and, being corrupt, it never becomes previous.ckpt); CorruptCheckpointError when
    there is no intact previous checkpoint either."""
    last = Path(last)
    try:
        verify_checkpoint(last)
        return last, None
    except CorruptCheckpointError as e:
        reason = str(e)
    prev = previous_path(last)
    if not is_intact(prev):
        raise CorruptCheckpointError(
            f"{reason}; no intact {prev.name} to fall back to: resume from another checkpoint with "
            f"--ckpt_path (e.g. a step=N.ckpt), or move {last} away to start the run afresh")
    n, m = checkpoint_step(prev), checkpoint_step(last)
    lost = (f"steps {n + 1}..{m} are lost and will be trained again" if n is not None and m is not None and m > n
            else f"the steps saved after step {n} are lost")
    return prev, f"{reason}; resuming from {prev} (step {n}): {lost}"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporary files (``.NAME.XXXX.tmp``) that an interrupted atomic write left in
    ``folder``; returns what was removed. Call it only while no other process writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(".*.tmp"):
        if p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
