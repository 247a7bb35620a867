"""Checkpoint writes are atomic (msdiff.callbacks.atomic_write / AtomicCheckpointIO), tested
deterministically: the writer is stopped at chosen points (an exception or SIGKILL in the middle of
the write, an interruption between the write and the rename) and a file-system spy checks what the
rename publishes. No timing, no polling."""
from __future__ import annotations

import os
import signal
import sys
import textwrap

import pytest
import torch
from conftest import REPO, run_process

import msdiff.callbacks as callbacks
from msdiff.callbacks import AtomicCheckpointIO, atomic_copy, atomic_write

OLD = {"global_step": 3, "w": torch.arange(6.0)}
NEW = {"global_step": 6, "w": torch.arange(6.0) * 2}


def _write_old(path):
    torch.save(OLD, path)
    return path.read_bytes()


def _temps(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_rename_publishes_a_complete_fsynced_file_over_the_old_one(tmp_path, monkeypatch):
    """The spy sees: the temp file lies in the target's directory, holds the whole new checkpoint and
    was fsync'ed before the rename; until the rename the target still holds the old checkpoint."""
    target = tmp_path / "last.ckpt"
    old_bytes = _write_old(target)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else fd))
        return real_fsync(fd)

    def replace(src, dst):
        src, dst = os.fspath(src), os.fspath(dst)
        if dst == str(target.with_name("previous.ckpt")):  # the old checkpoint is kept first (issue 17)
            assert os.path.dirname(src) == str(tmp_path) and open(src, "rb").read() == old_bytes
            return real_replace(src, dst)
        events.append(("replace", src, dst))
        assert os.path.dirname(src) == str(tmp_path) and dst == str(target)
        assert target.read_bytes() == old_bytes  # not touched before the rename
        got = torch.load(src, weights_only=True)
        assert got["global_step"] == 6 and torch.equal(got["w"], NEW["w"])
        return real_replace(src, dst)

    monkeypatch.setattr(callbacks.os, "fsync", fsync)
    monkeypatch.setattr(callbacks.os, "replace", replace)
    AtomicCheckpointIO().save_checkpoint(NEW, target)
    kinds = [e[0] for e in events]
    assert kinds.count("replace") == 1
    i = kinds.index("replace")
    assert "fsync" in kinds[:i]  # the data were flushed before the rename
    if os.path.isdir("/proc/self/fd"):
        assert events[kinds.index("fsync")][1] == events[i][1]  # ... and it was the temp file's data
    assert torch.load(target, weights_only=True)["global_step"] == 6
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("where", ["during_write", "before_rename"])
def test_interrupted_writer_leaves_the_old_checkpoint(tmp_path, monkeypatch, where):
    target = tmp_path / "last.ckpt"
    old_bytes = _write_old(target)

    def write(f):
        f.write(b"\x80\x02partial")
        if where == "during_write":
            raise KeyboardInterrupt
        torch.save(NEW, f)

    if where == "before_rename":
        def replace(src, dst):
            raise KeyboardInterrupt

        monkeypatch.setattr(callbacks.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_bytes() == old_bytes
    assert torch.load(target, weights_only=True)["global_step"] == 3
    assert _temps(tmp_path) == []  # the writer's own temp file is removed


def test_first_write_interrupted_leaves_no_target(tmp_path, monkeypatch):
    monkeypatch.setattr(callbacks.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint(NEW, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_copy_is_byte_exact_and_atomic(tmp_path, monkeypatch):
    src, dst = tmp_path / "last.ckpt", tmp_path / "step=6.ckpt"
    torch.save(NEW, src)
    atomic_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    old = dst.read_bytes()
    torch.save(OLD, src)
    monkeypatch.setattr(callbacks.os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_copy(src, dst)
    assert dst.read_bytes() == old


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_write_leaves_the_old_checkpoint(tmp_path):
    """A real SIGKILL (no cleanup runs) after half of the new checkpoint was written."""
    target = tmp_path / "last.ckpt"
    old_bytes = _write_old(target)
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from msdiff.callbacks import atomic_write

        def write(f):
            f.write(b"x" * 100000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write({str(target)!r}, write)
    """))
    r = run_process([sys.executable, script], timeout=120, cwd=REPO)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert target.read_bytes() == old_bytes
    assert torch.load(target, weights_only=True)["global_step"] == 3
