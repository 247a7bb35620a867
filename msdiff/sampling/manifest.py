"""The manifest of a sample.py output directory (plain Python, no torch).

`DIR/manifest.json` holds the settings that define the samples (`SamplingSettings.as_dict()`) and
their digest. Every process that writes samples appends to its own log `DIR/manifest/<name>.jsonl`
(an exclusive `flock` keeps a second writer of the same log out), one JSON line per finished unit,
fsync'ed after the unit's files were written atomically:

    {"index": i, "draw": k, "name": NAME, "noise": [seed, i, k], "settings": DIGEST,
     "files": {"samples/NAME_drawk.png": SHA256, ...}}

(`draw` null: the condition's own files, y/x/mask and the exact tensors). A unit counts as finished
only when every file it lists exists with that digest and its settings digest is the run's: a
missing, truncated or rewritten file, a line cut by a kill, or a unit of other settings is redone.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["MANIFEST", "LOG_DIR", "settings_digest", "file_digest", "read_settings", "write_settings",
           "ManifestLog", "finished_units"]

MANIFEST = "manifest.json"
LOG_DIR = "manifest"
FORMAT = "msdiff-samples-1"


def settings_digest(settings: dict[str, Any]) -> str:
    """sha256 (hex, 16 digits) of the settings' canonical JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> Optional[str]:
    """sha256 (hex) of a file's bytes, None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def read_settings(out: Path) -> Optional[dict[str, Any]]:
    """The settings recorded in out/manifest.json, None when there is none; ValueError naming the
    file when it is not a manifest (it is written atomically, so only a foreign file is)."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a sample.py manifest ({type(e).__name__}); remove it or pass --overwrite") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("settings"), dict):
        raise ValueError(f"{path}: not a sample.py manifest (expected format {FORMAT}); remove it or pass --overwrite")
    return data["settings"]


def write_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write out/manifest.json atomically (the same content when several jobs of a run write it)."""
    from msdiff.atomic_io import atomic_write

    text = json.dumps({"format": FORMAT, "settings": settings, "digest": settings_digest(settings)}, indent=1,
                      sort_keys=True, default=str)
    atomic_write(out / MANIFEST, lambda f: f.write((text + "\n").encode()))


class ManifestLog:
    """This process's append-only log out/manifest/<name>.jsonl (module doc), locked while open."""

    def __init__(self, out: Path, name: str) -> None:
        self.path = out / LOG_DIR / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            self._fd = -1
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise ValueError(f"{self.path}: in use by another sample.py process writing the same share of this "
                             "--output_dir; wait for it to finish or stop it") from None
        size = os.fstat(self._fd).st_size
        if size:  # a line cut by a kill: end it, so that the next record starts on a line of its own
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append the records (one JSON line each) and fsync; OSError naming the log on failure."""
        data = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records).encode()
        try:
            os.write(self._fd, data)
            os.fsync(self._fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops the lock
            self._fd = -1

    def __enter__(self) -> "ManifestLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _records(out: Path) -> Iterable[dict[str, Any]]:
    folder = out / LOG_DIR
    if not folder.is_dir():
        return
    for log in sorted(folder.glob("*.jsonl")):
        try:
            lines = log.read_bytes().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):  # a line cut by a kill
                continue
            if isinstance(rec, dict) and isinstance(rec.get("files"), dict) and isinstance(rec.get("index"), int):
                yield rec


def finished_units(out: Path, digest: str, indices: Optional[set[int]] = None) -> dict[tuple[int, Optional[int]], dict]:
    """{(index, draw): record} of the units of settings `digest` whose files are all on disk with
    their recorded digests (draw None: the condition's own files); only conditions in `indices` when
    given. Each file is hashed once."""
    hashes: dict[str, Optional[str]] = {}
    done: dict[tuple[int, Optional[int]], dict] = {}
    for rec in _records(out):
        if rec.get("settings") != digest or (indices is not None and rec["index"] not in indices):
            continue
        ok = True
        for rel, sha in rec["files"].items():
            if rel not in hashes:
                hashes[rel] = file_digest(out / rel)
            ok = ok and hashes[rel] == sha
        key = (rec["index"], rec.get("draw"))
        if ok:
            done[key] = rec
    return done
