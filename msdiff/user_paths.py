"""Paths a user names (run roots, run names, checkpoint and output folders), read the same way
everywhere and checked before the first write.

* :func:`expand_path`: ``~`` and ``$VAR`` / ``${VAR}`` are expanded, as a shell would (and as
  TensorBoard does for its own folder, so one run is never split between a literal ``$VAR``
  folder and the expanded one); a variable that is not set is an error naming the key and the
  variable, not a folder called ``$VAR``.
* :func:`check_dir_path`: a folder that is to be created or written: every part of the path at
  most the file system's name length (``NAME_MAX``, 255 bytes on Linux), the whole at most
  ``PATH_MAX``, and every part that exists already a folder (not a file). One line names the key,
  the path and what was expected.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["expand_path", "check_dir_path"]

_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(value: str | os.PathLike, key: str) -> str:
    """``value`` with ``~`` and every ``$VAR`` / ``${VAR}`` expanded; ValueError naming ``key`` and the
    variable when one is not set."""
    text = os.path.expanduser(str(value))
    for m in _VAR.finditer(text):
        name = m.group(1).strip("{}")
        if name not in os.environ:
            raise ValueError(f"{key}={value}: environment variable ${name} is not set; set it, or give the "
                             "path without it")
    return os.path.expandvars(text)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long to look up
        return False


def _limit(path: Path, name: str, default: int) -> int:
    """os.pathconf of the nearest existing folder above ``path``."""
    p = path
    while not _exists(p) and p != p.parent:
        p = p.parent
    try:
        return int(os.pathconf(p if p.is_dir() else p.parent, name))
    except (OSError, ValueError):
        return default


def check_dir_path(path: str | os.PathLike, key: str) -> Path:
    """``path`` (as given) when it can be a folder to write into; ValueError naming ``key`` otherwise:
    a part longer than the file system allows, a path too long, or a part that is an existing file."""
    path = Path(path)
    name_max = _limit(path, "PC_NAME_MAX", 255)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise ValueError(f"{key}: '{shown}' is {size} bytes long; the file system allows names of at most "
                             f"{name_max} bytes (path {path})")
    path_max = _limit(path, "PC_PATH_MAX", 4096)
    if len(os.fsencode(os.path.abspath(path))) >= path_max:
        raise ValueError(f"{key}: the path {path} is longer than the file system's {path_max} bytes")
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            where = str(path) if p == path else f"{p} (part of {path})"
            raise ValueError(f"{key}: {where} is an existing file; expected a folder")
    return path
