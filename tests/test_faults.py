"""Fault matrix (issue 17): what a cluster, a full disk and a careless user do to a run.

Every case runs as the user would (train.py / sample.py; a subprocess where the process boundary is
the point: signals, exit statuses, real mounts) and asserts the exit status, ONE last line on stderr
that names the path / key / file, no traceback, and that every file written before the fault is
intact and loadable. In-process cases go through ``msdiff.cli.run_entry_point`` exactly like the
scripts. Disk full and read-only use real tmpfs mounts when the tests run as root (skipped
otherwise); the same write paths are also covered by an injected ``OSError(ENOSPC)`` everywhere.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, TEST_THREADS, run_train, tiny_config
from PIL import Image

from msdiff import signals
from msdiff.callbacks import PREEMPTED_EXIT_CODE
from msdiff.cli import (ENVIRONMENT_ERROR_EXIT_CODE, INTERRUPTED_EXIT_CODE, USER_ERROR_EXIT_CODE,
                        run_entry_point)
from msdiff.run_lock import RunLock

# the suite's intra-op thread count (conftest, MSDIFF_TEST_THREADS): a child run compared bitwise with an
# in-process run must reduce with the same number of threads
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": TEST_THREADS}


# ---- helpers ----------------------------------------------------------------------------------------
def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


def one_error_line(stderr: str, prog: str, kind: str = "error") -> str:
    """The last stderr line, which must be ``<prog>: <kind>: ...``; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: {kind}"), stderr[-3000:]
    print(f"[fault line] {last}")  # shown with -s: the fault matrix as a user sees it
    return last


def train_cmd(cfg: Path, root: Path, *extra) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(cfg), "--trainer.default_root_dir", str(root),
            "--trainer.logger", "false", *map(str, extra)]


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def popen(cmd: list[str]):
    p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=60)


def in_process(main, prog: str, capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``run_entry_point(main)``, as the script would exit."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_entry_point(main, prog=prog)
    return e.value.code, capsys.readouterr().err


def train_main(args):
    import train

    return lambda: train.main([str(a) for a in args])


def sample_main(args, monkeypatch):
    import sample

    monkeypatch.setattr(sys, "argv", ["sample.py", *map(str, args), "--device", "cpu"])  # also on a GPU machine
    return sample.main


def flip_tensor_bytes(path: Path, n: int = 64) -> str:
    """Invert n bytes in the middle of the largest tensor of a torch zip checkpoint (same size)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(start)
        data = f.read(n)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))
    return info.filename


def same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size_bytes: int, read_only: bool = False):
    """A size-limited (or read-only) tmpfs at path; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_bytes}" + (",ro" if read_only else "")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the injected-OSError tests cover these writes)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 4-step quickstart run (checkpoint every 2 steps: previous.ckpt = step 2)."""
    d = tmp_path_factory.mktemp("faults_run")
    cfg = tiny_config("quickstart", d, length=14)
    assert run_train(["--config", cfg, "--trainer.default_root_dir", d / "runs", "--trainer.logger", "false",
                      "--checkpoint.every_n_steps", "2", "--trainer.max_steps", "4"]) == 0
    return cfg, d / "runs" / "quickstart"


def copy_run(src: Path, dst_root: Path) -> Path:
    import shutil

    dst = dst_root / "quickstart"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ---- 1. checkpoints you can trust -------------------------------------------------------------------
@pytest.mark.slow
def test_corrupted_last_ckpt_falls_back_to_previous_and_ends_bitwise(tmp_path):
    """64 bytes flipped inside one tensor of last.ckpt (step 6): the re-run warns in one line naming
    the file and the lost steps, resumes from previous.ckpt (step 3) and ends bitwise equal to an
    uninterrupted 9-step run (which exact resume makes equal to a run restarted from step 3)."""
    cfg = tiny_config("quickstart", tmp_path, length=14)
    common = ["--config", cfg, "--trainer.logger", "false", "--checkpoint.every_n_steps", "3"]
    assert run_train([*common, "--trainer.max_steps", "9", "--trainer.default_root_dir", tmp_path / "a"]) == 0
    assert run_train([*common, "--trainer.max_steps", "6", "--trainer.default_root_dir", tmp_path / "b"]) == 0
    ckpts = tmp_path / "b" / "quickstart" / "checkpoints"
    assert (ckpt_step(ckpts / "last.ckpt"), ckpt_step(ckpts / "previous.ckpt")) == (6, 3)
    previous = sha(ckpts / "previous.ckpt")
    flip_tensor_bytes(ckpts / "last.ckpt")
    torch.load(ckpts / "last.ckpt", weights_only=True)  # what used to be accepted silently

    r = run(train_cmd(cfg, tmp_path / "b", "--checkpoint.every_n_steps", "3", "--trainer.max_steps", "9"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("train.py: warning:")]
    assert len(warn) == 1, r.stderr[-3000:]
    assert str(ckpts / "last.ckpt") in warn[0] and "CRC" in warn[0] and "step 3" in warn[0] and "4..6" in warn[0]
    a = torch.load(tmp_path / "a" / "quickstart" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(ckpts / "last.ckpt", weights_only=True)
    same_training_state(a, b)
    assert sha(ckpts / "previous.ckpt") != previous and ckpt_step(ckpts / "previous.ckpt") == 6  # rotated on
    assert not list(ckpts.glob(".*.tmp"))


def test_corrupt_checkpoint_without_fallback_and_in_sample_py(tiny_run, tmp_path, capsys, monkeypatch):
    """A truncated last.ckpt with no intact previous.ckpt: exit 2, one line naming the file and the
    way out; sample.py refuses a corrupted checkpoint before writing anything."""
    cfg, src = tiny_run
    run_dir = copy_run(src, tmp_path / "runs")
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (run_dir / "checkpoints" / "previous.ckpt").unlink()
    code, err = in_process(train_main(["--config", cfg, "--trainer.default_root_dir", tmp_path / "runs",
                                       "--trainer.logger", "false", "--trainer.max_steps", "6"]), "train.py", capsys)
    line = one_error_line(err, "train.py")
    assert code == USER_ERROR_EXIT_CODE and str(last) in line and "truncated" in line and "--ckpt_path" in line

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes((src / "checkpoints" / "last.ckpt").read_bytes())
    flip_tensor_bytes(bad)
    code, err = in_process(sample_main(["--ckpt_path", bad, "--output_dir", tmp_path / "out"], monkeypatch),
                           "sample.py", capsys)
    line = one_error_line(err, "sample.py")
    assert code == USER_ERROR_EXIT_CODE and str(bad) in line and "CRC-32 mismatch" in line
    assert not (tmp_path / "out").exists()


def test_stale_temporaries_removed_and_stale_lock_taken_over(tiny_run, tmp_path, capsys):
    """Hidden .last.ckpt.*.tmp files of a SIGKILLed save are removed at start; a lock file left by a
    dead process (no flock held) is taken over; a live holder is named in one line."""
    cfg, src = tiny_run
    run_dir = copy_run(src, tmp_path / "runs")
    ckpts = run_dir / "checkpoints"
    for name in (".last.ckpt.abc123.tmp", ".previous.ckpt.99.tmp"):
        (ckpts / name).write_bytes(b"partial")
    (run_dir / ".lock").write_text("999999 deadhost\n")
    args = ["--config", cfg, "--trainer.default_root_dir", tmp_path / "runs", "--trainer.logger", "false",
            "--trainer.max_steps", "5"]
    assert run_train(args) == 0
    assert not list(ckpts.glob(".*.tmp")) and ckpt_step(ckpts / "last.ckpt") == 5

    with RunLock(run_dir):  # another live writer (this process, another open file description)
        before = sha(ckpts / "last.ckpt")
        code, err = in_process(train_main([*args[:-1], "6"]), "train.py", capsys)
    line = one_error_line(err, "train.py")
    assert code == USER_ERROR_EXIT_CODE and str(run_dir) in line and f"PID {os.getpid()}" in line
    assert sha(ckpts / "last.ckpt") == before


def test_rotation_never_promotes_a_corrupt_file(tmp_path):
    """previous.ckpt only ever holds an intact file: a corrupt last.ckpt is not rotated into it, and a
    run whose last and previous are both bad is an error naming both remedies."""
    from msdiff.atomic_io import atomic_write
    from msdiff.checkpoint_file import (CorruptCheckpointError, keep_previous, previous_path, resume_checkpoint,
                                        verify_checkpoint)

    last = tmp_path / "last.ckpt"

    def save(step):
        atomic_write(last, lambda f: torch.save({"global_step": step, "w": torch.full((4096,), float(step))}, f),
                     before_replace=lambda: keep_previous(last))

    save(1)
    save(2)
    assert ckpt_step(previous_path(last)) == 1 and ckpt_step(last) == 2
    flip_tensor_bytes(last)
    with pytest.raises(CorruptCheckpointError, match="CRC-32 mismatch"):
        verify_checkpoint(last)
    chosen, warning = resume_checkpoint(last)
    assert chosen == previous_path(last) and "step 1" in warning and "steps 2..2" in warning
    save(3)  # the corrupt step-2 file is replaced, previous.ckpt still holds step 1
    assert ckpt_step(previous_path(last)) == 1 and ckpt_step(last) == 3
    flip_tensor_bytes(previous_path(last))
    flip_tensor_bytes(last)
    with pytest.raises(CorruptCheckpointError, match="no intact previous.ckpt"):
        resume_checkpoint(last)


# ---- 2. resume with a changed config -------------------------------------------------------------
def test_resume_with_changed_settings_is_explicit(tiny_run, tmp_path, capsys):
    """Resumable changes (max_steps, lr) are listed in one line and the lr reaches the restored
    optimizer; a model-defining change is refused naming the key, nothing written; --name starts a
    new run."""
    cfg, src = tiny_run
    run_dir = copy_run(src, tmp_path / "runs")
    ckpts = run_dir / "checkpoints"
    base = ["--config", cfg, "--trainer.default_root_dir", tmp_path / "runs", "--trainer.logger", "false"]

    before = {p.name: sha(p) for p in [*ckpts.iterdir(), *run_dir.glob("config*.yaml")]}
    code, err = in_process(train_main([*base, "--trainer.max_steps", "6",
                                       "--model.init_args.net.init_args.dropout", "0.3"]), "train.py", capsys)
    line = one_error_line(err, "train.py")
    assert code == USER_ERROR_EXIT_CODE and "model.init_args.net.init_args.dropout (0.1 -> 0.3)" in line
    assert "--name" in line and str(run_dir) in line
    assert {p.name: sha(p) for p in [*ckpts.iterdir(), *run_dir.glob("config*.yaml")]} == before

    capsys.readouterr()
    assert run_train([*base, "--trainer.max_steps", "6", "--model.init_args.lr", "0.5"]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "changed settings" in ln]
    assert len(notes) == 1 and "trainer.max_steps 4 -> 6" in notes[0] and "model.init_args.lr 0.001 -> 0.5" in notes[0]
    ck = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 6
    group = ck["optimizer_states"][0]["param_groups"][0]
    warmup = 100  # quickstart's warm-up: the lr at step 6 is lr * min(1, 6 / 100) of the NEW lr
    assert group["initial_lr"] == 0.5 and ck["lr_schedulers"][0]["base_lrs"] == [0.5]
    assert group["lr"] == pytest.approx(0.5 * 6 / warmup, rel=1e-12)
    assert yaml.safe_load((run_dir / "config-1.yaml").read_text())["model"]["init_args"]["lr"] == 0.5  # what ran

    assert run_train([*base, "--trainer.max_steps", "2", "--model.init_args.net.init_args.dropout", "0.3",
                      "--name", "other"]) == 0
    assert ckpt_step(tmp_path / "runs" / "other" / "checkpoints" / "last.ckpt") == 2


# ---- 3. environment errors ------------------------------------------------------------------------
def test_disk_full_injected_at_every_write(tiny_run, tmp_path, capsys, monkeypatch):
    """OSError(ENOSPC) injected at the file write of a checkpoint save, a config, a sample PNG, the
    metrics and an export: exit 74, one line 'cannot write PATH: No space left on device', the files
    written before intact (last.ckpt loadable and unchanged), no temporary or partial file left."""
    import msdiff.atomic_io as atomic_io

    cfg, src = tiny_run
    run_dir = copy_run(src, tmp_path / "runs")
    ckpts = run_dir / "checkpoints"
    before = {p.name: sha(p) for p in ckpts.iterdir()}

    real_write = atomic_io._RecordingWriter.write

    def full_after(limit):
        state = {"n": 0}

        def write(self, data):
            state["n"] += len(data)
            if state["n"] > limit:
                self.error = self.error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise self.error
            return real_write(self, data)
        return write

    monkeypatch.setattr(atomic_io._RecordingWriter, "write", full_after(100_000))  # inside torch.save's zip writer
    code, err = in_process(train_main(["--config", cfg, "--trainer.default_root_dir", tmp_path / "runs",
                                       "--trainer.logger", "false", "--trainer.max_steps", "6"]), "train.py", capsys)
    line = one_error_line(err, "train.py")
    assert code == ENVIRONMENT_ERROR_EXIT_CODE
    assert line.endswith(f"cannot write {ckpts / 'last.ckpt'}: No space left on device [errno ENOSPC]"), line
    assert {p.name: sha(p) for p in ckpts.iterdir()} == before and ckpt_step(ckpts / "last.ckpt") == 4

    monkeypatch.setattr(atomic_io._RecordingWriter, "write", full_after(0))  # the config file at start
    code, err = in_process(train_main(["--config", cfg, "--trainer.default_root_dir", tmp_path / "runs",
                                       "--trainer.logger", "false", "--trainer.max_steps", "7"]), "train.py", capsys)
    assert code == ENVIRONMENT_ERROR_EXIT_CODE and str(run_dir / "config-") in one_error_line(err, "train.py")
    assert {p.name: sha(p) for p in ckpts.iterdir()} == before
    monkeypatch.setattr(atomic_io._RecordingWriter, "write", real_write)

    # sample.py: the third PNG hits a full disk; the first two stay whole, the third is not left half-written
    from PIL import PngImagePlugin

    real_save, calls = Image.Image.save, {"n": 0}

    def save(self, fp, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            Path(fp).write_bytes(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    code, err = in_process(sample_main(["--ckpt_path", ckpts / "last.ckpt", "--output_dir", out, "--num_images", "2",
                                        "--draws", "2", "--sampler", "DDIM", "--steps", "2"], monkeypatch),
                           "sample.py", capsys)
    line = one_error_line(err, "sample.py")
    pngs = sorted((out / "samples").glob("*.png"))
    assert code == ENVIRONMENT_ERROR_EXIT_CODE and "No space left on device" in line
    assert len(pngs) == 2 and str(out / "samples") in line and all(p.name not in line for p in pngs)
    for p in pngs:
        assert isinstance(Image.open(p), PngImagePlugin.PngImageFile) and np.asarray(Image.open(p)).shape == (8, 8, 3)
    monkeypatch.setattr(Image.Image, "save", real_save)

    # permission denied on the run directory (root ignores file modes: injected at mkdir)
    real_mkdir, denied = Path.mkdir, tmp_path / "locked_root"

    def mkdir(self, *a, **k):
        if self == denied / "quickstart":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = in_process(train_main(["--config", cfg, "--trainer.default_root_dir", denied, "--trainer.logger",
                                       "false", "--trainer.max_steps", "2"]), "train.py", capsys)
    assert code == ENVIRONMENT_ERROR_EXIT_CODE
    assert one_error_line(err, "train.py").endswith(f"cannot use {denied / 'quickstart'}: Permission denied [errno EACCES]")
    monkeypatch.setattr(Path, "mkdir", real_mkdir)

    monkeypatch.setattr(atomic_io._RecordingWriter, "write", full_after(1000))  # --export
    code, err = in_process(sample_main(["--ckpt_path", ckpts / "last.ckpt", "--export", tmp_path / "m.pt"],
                                       monkeypatch), "sample.py", capsys)
    line = one_error_line(err, "sample.py")
    assert code == ENVIRONMENT_ERROR_EXIT_CODE and f"cannot write {tmp_path / 'm.pt'}: No space left" in line
    assert not [p for p in tmp_path.iterdir() if "m.pt" in p.name]  # no export, no temporary file
    assert not (denied / "quickstart").exists()


@pytest.mark.slow
def test_disk_full_on_a_real_mount(tiny_run, tmp_path):
    """A real full tmpfs during a checkpoint save (subprocess): exit 74, one line with the path and the
    reason, the checkpoint of step 2 and the config intact, no temporary file left."""
    cfg, src = tiny_run
    size = (src / "checkpoints" / "last.ckpt").stat().st_size
    with mounted_tmpfs(tmp_path / "small", int(size * 1.6) + 64 * 1024) as root:  # one checkpoint fits, not two
        r = run(train_cmd(cfg, root, "--checkpoint.every_n_steps", "2", "--trainer.max_steps", "4"))
        last = root / "quickstart" / "checkpoints" / "last.ckpt"
        line = one_error_line(r.stderr, "train.py")
        assert r.returncode == ENVIRONMENT_ERROR_EXIT_CODE, r.stderr[-3000:]
        assert line == f"train.py: error: cannot write {last}: No space left on device [errno ENOSPC]"
        assert ckpt_step(last) == 2 and not list(last.parent.glob(".*.tmp"))
        assert yaml.safe_load((root / "quickstart" / "config.yaml").read_text())["trainer"]["max_steps"] == 4


def test_read_only_file_system(tiny_run, tmp_path, capsys, monkeypatch):
    """A read-only mount as the run root (train.py) and as --output_dir / --export (sample.py):
    exit 74, one line with the path and 'Read-only file system'."""
    cfg, src = tiny_run
    with mounted_tmpfs(tmp_path / "ro", 1 << 20, read_only=True) as ro:
        code, err = in_process(train_main(["--config", cfg, "--trainer.default_root_dir", ro, "--trainer.logger",
                                           "false", "--trainer.max_steps", "2"]), "train.py", capsys)
        assert code == ENVIRONMENT_ERROR_EXIT_CODE
        assert f"cannot write {ro / 'quickstart'}: Read-only file system" in one_error_line(err, "train.py")
        ckpt = src / "checkpoints" / "last.ckpt"
        for args, path in ((["--output_dir", ro / "out", "--num_images", "1", "--draws", "1"], ro / "out"),
                           (["--export", ro / "m.pt"], ro / "m.pt")):
            code, err = in_process(sample_main(["--ckpt_path", ckpt, *args], monkeypatch), "sample.py", capsys)
            line = one_error_line(err, "sample.py")
            assert code == ENVIRONMENT_ERROR_EXIT_CODE and str(path) in line and "Read-only file system" in line


# ---- 4. the one-line reporter ---------------------------------------------------------------------
def test_config_errors_name_the_key(tiny_run, tmp_path, capsys):
    cfg, _ = tiny_run
    base = yaml.safe_load(cfg.read_text())

    def variant(name, edit):
        c = yaml.safe_load(yaml.safe_dump(base))
        edit(c["model"]["init_args"])
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(c))
        return p

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    cases = [
        (["--config", variant("typo", lambda m: m["estimator"].update(class_path="msdiff.estimators.CMDEX"))],
         ["model.init_args.estimator", "CMDEX", "did you mean msdiff.estimators.CMDE"]),
        (["--config", cfg, "--model.init_args.estimator", "msdiff.estimators.CDiffE"],
         ["model.init_args.estimator", "required: sde", "CDiffE"]),
        (["--config", empty], [str(empty), "empty"]),
        (["--config", cfg, "--model.init_args.lr", "-1e-3"], ["lr=-0.001", "positive"]),
        (["--config", variant("fast", lambda m: m.update(lr="fast"))], ["model.init_args.lr", "fast"]),
        (["--config", cfg, "--model.init_args.net.init_args.ch", "16"], ["model.init_args.net", "channels=16"]),
    ]
    for args, needles in cases:
        code, err = in_process(train_main([*args, "--trainer.fast_dev_run", "1"]), "train.py", capsys)
        line = one_error_line(err, "train.py")
        assert code == USER_ERROR_EXIT_CODE and all(n in line for n in needles), (args, line)
        assert "Problem with given class_path 'msdiff.systems" not in line and "--model:" not in line


def test_sample_inputs_checked_before_the_first_write(tiny_run, tmp_path, capsys, monkeypatch):
    """sample.py: a misspelled --task gets its cause and a 'did you mean'; a wrong-size --input image
    or mask is named (the message survives `raise ... from None`); nothing is written."""
    _, src = tiny_run
    ckpt = src / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    code, err = in_process(sample_main(["--ckpt_path", ckpt, "--output_dir", out, "--task", "msdiff.tasks.Inpaint"],
                                       monkeypatch), "sample.py", capsys)
    line = one_error_line(err, "sample.py")
    assert code == USER_ERROR_EXIT_CODE and "--task msdiff.tasks.Inpaint" in line
    assert "did you mean msdiff.tasks.Inpainting" in line
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(inp / "a.png")     # the SR-4x condition of an 8x8 x
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(inp / "b.png")   # wrong size
    code, err = in_process(sample_main(["--ckpt_path", ckpt, "--output_dir", out, "--input", inp], monkeypatch),
                           "sample.py", capsys)
    line = one_error_line(err, "sample.py")
    assert code == USER_ERROR_EXIT_CODE and str(inp / "b.png") in line and "2x2" in line and "32x32" in line
    assert not out.exists()

    # inpainting: a mask of the wrong size is named too
    ip = tmp_path / "ip"
    ip.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ip / "c.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(ip / "c_mask.png")
    code, err = in_process(sample_main(["--ckpt_path", ckpt, "--output_dir", out, "--input", ip, "--task",
                                        "msdiff.tasks.Inpainting"],
                                       monkeypatch), "sample.py", capsys)
    line = one_error_line(err, "sample.py")
    assert code == USER_ERROR_EXIT_CODE and str(ip / "c_mask.png") in line and "8x8" in line and "4x4" in line
    assert not out.exists()


def test_cut_translation_checks_every_input_first(tmp_path, capsys, monkeypatch):
    """16 inputs, the 15th 4x4 pixels: exit 2 naming it, no output written (used to crash with a
    padding traceback after 14 outputs)."""
    from msdiff.cut.system import CUTSystem

    torch.manual_seed(0)
    m = CUTSystem(ngf=8, ndf=8, n_blocks=1, num_patches=16, netf_nc=16, n_epochs=1, n_epochs_decay=1)
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, ckpt)
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        side = 4 if i == 14 else 8
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    code, err = in_process(sample_main(["--ckpt_path", ckpt, "--input", src, "--output_dir", tmp_path / "o"],
                                       monkeypatch), "sample.py", capsys)
    line = one_error_line(err, "sample.py")
    assert code == USER_ERROR_EXIT_CODE and str(src / "14.png") in line and "4x4" in line and "5x5" in line
    assert not (tmp_path / "o").exists()


# ---- 5. signals from the first line to the last ---------------------------------------------------
def wait_for(pred, proc, timeout: float = 120, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        assert proc.poll() is None, f"exited {proc.returncode} before {what}: {proc.stderr.read()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def step_at_least(path: Path, k: int):
    def pred() -> bool:
        try:
            return path.is_file() and ckpt_step(path) >= k
        except Exception:
            return False
    return pred


@pytest.fixture
def resumable_run(tiny_run, tmp_path):
    cfg, src = tiny_run
    run_dir = copy_run(src, tmp_path / "runs")
    return cfg, tmp_path / "runs", run_dir / "checkpoints"


@pytest.mark.slow
def test_sigterm_during_start_up_exits_75_after_the_restore(resumable_run):
    """SIGTERM while Python is still importing: the run restores, trains no step and exits 75 with
    last.ckpt untouched (used to die with 143: SLURM would not requeue)."""
    cfg, root, ckpts = resumable_run
    digest = sha(ckpts / "last.ckpt")
    with popen(train_cmd(cfg, root, "--trainer.max_steps", "8")) as p:
        time.sleep(1.0)  # inside `import torch` / `import lightning`
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    assert p.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and "before the first step" in err and sha(ckpts / "last.ckpt") == digest


@pytest.mark.slow
def test_sigusr1_inside_a_long_validation_grid(resumable_run):
    """SIGUSR1 inside a 20000-step validation sample grid (about a minute here): honoured before the
    grid ends, without training another step; last.ckpt of that step saved, exit 75."""
    cfg, root, ckpts = resumable_run
    last = ckpts / "last.ckpt"
    grid = ["--model.init_args.sampler.init_args.steps", "20000", "--trainer.val_check_interval", "6",
            "--checkpoint.every_n_steps", "6", "--trainer.max_steps", "12"]
    with popen(train_cmd(cfg, root, *grid)) as p:
        wait_for(step_at_least(last, 6), p, what="step 6")  # saved just before the validation starts
        time.sleep(1.0)
        t0 = time.monotonic()
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=100)
        waited = time.monotonic() - t0
    assert p.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and ckpt_step(last) == 6 and ckpt_step(ckpts / "previous.ckpt") == 4
    print(f"SIGUSR1 during the validation grid: exited after {waited:.1f} s")


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line(resumable_run):
    cfg, root, ckpts = resumable_run
    last = ckpts / "last.ckpt"
    with popen(train_cmd(cfg, root, "--trainer.max_steps", "100000", "--checkpoint.every_n_steps", "1")) as p:
        wait_for(step_at_least(last, 6), p, what="step 6")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    assert p.returncode == INTERRUPTED_EXIT_CODE, err[-3000:]
    assert one_error_line(err, "train.py", "interrupted") == "train.py: interrupted"
    assert ckpt_step(last) >= 6


def test_signal_flags_are_process_wide():
    """The handler only records (no exception, no exit); Preemption reads the same flag."""
    from msdiff.callbacks import Preemption

    old = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        signals.reset()
        assert signals.install_preemption_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.preemption_signal() == signal.SIGUSR1 and Preemption().signalled == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert signals.interrupted()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signals.reset()


def test_ctrl_c_inside_a_checkpoint_write_is_an_interrupt(capsys):
    """Ctrl-C while torch.save writes a checkpoint surfaces as torch's zip-writer RuntimeError
    ("unexpected pos") raised while handling the KeyboardInterrupt: still exit 130, one line."""
    import torch

    from msdiff.cli import INTERRUPTED_EXIT_CODE, run_entry_point

    class Interrupting(io.BytesIO):
        def write(self, b):
            if self.tell() > 64:
                raise KeyboardInterrupt
            return super().write(b)

    def main():
        torch.save({"w": torch.zeros(1000)}, Interrupting())

    with pytest.raises(SystemExit) as e:
        run_entry_point(main, prog="train.py")
    assert e.value.code == INTERRUPTED_EXIT_CODE
    assert capsys.readouterr().err.strip().splitlines()[-1] == "train.py: interrupted"
