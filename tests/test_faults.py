"""Fault matrix (issues 17 and 26): what a cluster, a full disk and a careless user do to a run.

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

    # sample.py: the disk fills up in the middle of the third sample PNG; the two before stay whole, the
    # third is not left half-written, and the same command continues once there is space again
    import msdiff.sampling.layout as layout
    from PIL import PngImagePlugin

    real_atomic_write = layout.atomic_write

    def atomic_write(path, write, **kw):
        if Path(path).name != "00000_draw1.png":
            return real_atomic_write(path, write, **kw)

        def partial(f):
            f.write(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_atomic_write(path, partial, **kw)

    monkeypatch.setattr(layout, "atomic_write", atomic_write)
    out = tmp_path / "out"
    sample_args = ["--ckpt_path", ckpts / "last.ckpt", "--output_dir", out, "--num_images", "2", "--draws", "2",
                   "--sampler", "DDIM", "--steps", "2"]
    code, err = in_process(sample_main(sample_args, monkeypatch), "sample.py", capsys)
    line = one_error_line(err, "sample.py")
    pngs = sorted((out / "samples").glob("*.png"))
    assert code == ENVIRONMENT_ERROR_EXIT_CODE and "No space left on device" in line
    assert [p.name for p in pngs] == ["00000_draw0.png", "00001_draw0.png"] and str(out / "samples") in line
    for p in pngs:
        assert isinstance(Image.open(p), PngImagePlugin.PngImageFile) and np.asarray(Image.open(p)).shape == (8, 8, 3)
    assert not list(out.rglob(".*.tmp"))
    monkeypatch.setattr(layout, "atomic_write", real_atomic_write)
    code, err = in_process(sample_main(sample_args, monkeypatch), "sample.py", capsys)
    assert code == 0 and len(list((out / "samples").glob("*.png"))) == 4

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


# ---- 6. issue 26: a careless user and a shared cluster ----------------------------------------------
def png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (grey: (H, W); RGB: (H, W, 3)), as a scanner or a raw
    converter writes it (PIL writes no 16-bit RGB)."""
    import zlib

    h, w = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\x00" + pixels[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_every_image_mode_is_read_at_its_true_scale_or_refused(tmp_path):
    """16-bit grey and RGB PNGs and 16-bit TIFFs: mid grey 32768 is 32768/65535, not white (PIL's
    I;16 -> L conversion clips; torchvision returns 16-bit RGB as uint16 that was divided by 255);
    8-bit uint8 reads round v/257. Every 8-bit mode (1-bit, L, P, RGB, CMYK, opaque LA/RGBA) reads
    as PIL converts it; 32-bit integer and float pixels, transparent pixels and several frames (an
    animated GIF: torchvision returned a 4-D stack) are refused naming the file."""
    from msdiff.datasets.images import ImageFolder
    from msdiff.images import read_image, read_image_uint8

    grey = np.array([[0, 32768, 65535, 257]], np.uint16)
    rgb = np.array([[[32768, 0, 65535], [257, 514, 1000]]], np.uint16)
    files = {"g16.png": png16(tmp_path / "g16.png", grey), "rgb16.png": png16(tmp_path / "rgb16.png", rgb)}
    Image.fromarray(grey).save(tmp_path / "g16.tif")
    Image.fromarray(grey.astype(">u2")).save(tmp_path / "g16b.tif")  # big-endian
    assert (Image.open(tmp_path / "g16.tif").mode, Image.open(tmp_path / "g16b.tif").mode) == ("I;16", "I;16B")
    for name in ("g16.png", "g16.tif", "g16b.tif"):
        assert read_image(tmp_path / name).flatten().tolist() == pytest.approx([0, 32768 / 65535, 1, 257 / 65535])
        assert read_image_uint8(tmp_path / name).flatten().tolist() == [0, 128, 255, 1]  # round(v / 257)
        assert read_image_uint8(tmp_path / name, 3).shape == (3, 1, 4)
    x = read_image(files["rgb16.png"])
    assert x.dtype == torch.float32 and x[:, 0, 0].tolist() == pytest.approx([32768 / 65535, 0, 1])
    assert read_image_uint8(files["rgb16.png"])[:, 0, 1].tolist() == [1, 2, 4]  # 257, 514, 1000 / 257 rounded

    Image.fromarray(np.array([[True, False]])).save(tmp_path / "bit.png")
    assert read_image(tmp_path / "bit.png").flatten().tolist() == [1.0, 0.0]
    Image.new("CMYK", (1, 1), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert read_image_uint8(tmp_path / "cmyk.jpg").flatten().tolist() == [255, 0, 255]  # magenta
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255])
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "palette.png")
    assert read_image_uint8(tmp_path / "palette.png").flatten().tolist() == [255, 0, 0, 0, 0, 255]
    Image.new("RGBA", (1, 1), (10, 20, 30, 255)).save(tmp_path / "opaque.png")
    assert read_image_uint8(tmp_path / "opaque.png").flatten().tolist() == [10, 20, 30]

    p.save(tmp_path / "p_transparent.png", transparency=0)
    Image.new("LA", (1, 1), (100, 0)).save(tmp_path / "la.png")
    Image.fromarray(np.array([[1, 70000]], np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray(np.array([[0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")
    frames = [Image.new("RGB", (2, 2), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    for name, why in (("anim.gif", "holds 2 frames"), ("p_transparent.png", "transparent pixels"),
                      ("la.png", "transparent pixels"), ("i32.tif", "32-bit integer"), ("f.tif", "32-bit float")):
        for read in (read_image, read_image_uint8):
            with pytest.raises(ValueError, match=why) as e:
                read(tmp_path / name)
            assert str(e.value).startswith(str(tmp_path / name))

    # the image datasets share the reader: a 16-bit folder reads as its 8-bit twin
    for sub, img in (("a16", rgb), ("a8", ((rgb.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))):
        (tmp_path / sub / "train").mkdir(parents=True)
        (png16(tmp_path / sub / "train" / "x.png", img) if img.dtype == np.uint16
         else Image.fromarray(img).save(tmp_path / sub / "train" / "x.png"))
    a16, a8 = (ImageFolder("train", root=str(tmp_path / sub), image_size=1, flip=False).load(0, torch.Generator())[0]
               for sub in ("a16", "a8"))
    assert torch.equal(a16, a8) and a16.flatten().tolist() == pytest.approx([128 / 255, 0, 1])  # not [1, 0, 1]


def test_one_writer_per_checkpoint_folder_judged_by_what_its_checkpoint_ran(tiny_run, tmp_path, capsys):
    """A second run given the first run's --checkpoint.dirpath: refused while the first holds it, and
    a normally refused change (ema_decay) is refused against the checkpoint's own config, nothing
    written. Deleting .lock under a live run opens nothing (the folder itself is locked). A deleted
    config.yaml no longer hides a changed seed; a hand-edited (even broken) config.yaml does not decide
    what the run used: the checkpoint's stored config does (one warning line names the file)."""
    cfg, src = tiny_run
    root = tmp_path / "runs"
    run_dir = copy_run(src, root)
    ckpts = run_dir / "checkpoints"
    base = ["--config", cfg, "--trainer.default_root_dir", root, "--trainer.logger", "false"]

    def digests() -> dict:
        return {p.name: sha(p) for p in [*ckpts.iterdir(), *run_dir.glob("config*.yaml")] if p.name != ".lock"}

    before = digests()
    code, err = in_process(train_main([*base, "--name", "second", "--checkpoint.dirpath", ckpts, "--trainer.max_steps",
                                       "6", "--model.init_args.ema_decay", "0.5"]), "train.py", capsys)
    line = one_error_line(err, "train.py")
    assert code == USER_ERROR_EXIT_CODE and "model.init_args.ema_decay (0.99 -> 0.5)" in line
    assert f"from {ckpts / 'last.ckpt'}" in line and digests() == before

    with RunLock(run_dir, ckpts):  # the first run is live (train.py locks its run and its checkpoint folder)
        code, err = in_process(train_main([*base, "--name", "second", "--checkpoint.dirpath", ckpts,
                                           "--trainer.max_steps", "6"]), "train.py", capsys)
    line = one_error_line(err, "train.py")
    assert code == USER_ERROR_EXIT_CODE and f"checkpoint folder {ckpts} is in use by PID {os.getpid()}" in line
    assert digests() == before

    with RunLock(run_dir):  # the run trains; someone deletes its lock file
        (run_dir / ".lock").unlink()
        code, err = in_process(train_main([*base, "--trainer.max_steps", "6"]), "train.py", capsys)
    line = one_error_line(err, "train.py")
    assert code == USER_ERROR_EXIT_CODE and f"run directory {run_dir} is in use" in line and digests() == before

    recorded = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").unlink()
    code, err = in_process(train_main([*base, "--trainer.max_steps", "6", "--model.init_args.seed", "1"]),
                           "train.py", capsys)
    line = one_error_line(err, "train.py")
    assert code == USER_ERROR_EXIT_CODE and "model.init_args.seed (0 -> 1)" in line
    assert {k: v for k, v in digests().items()} == {k: v for k, v in before.items() if k != "config.yaml"}

    (run_dir / "config.yaml").write_text(recorded.replace("ema_decay: 0.99", "ema_decay: 0.5"))
    code, err = in_process(train_main([*base, "--trainer.max_steps", "5"]), "train.py", capsys)
    assert code == 0 and "cannot change" not in err, err[-2000:]
    warning = [ln for ln in err.splitlines() if ln.startswith("train.py: warning:")]
    assert len(warning) == 1 and f"{run_dir / 'config.yaml'} differs from the config stored in the checkpoint " \
        "(model.init_args.ema_decay; edited by hand?)" in warning[0]
    assert ckpt_step(ckpts / "last.ckpt") == 5 and "ema_decay: 0.99" in (run_dir / "config-1.yaml").read_text()

    (run_dir / "config-1.yaml").write_text("oops: [\n")  # the newest record, broken by hand
    code, err = in_process(train_main([*base, "--trainer.max_steps", "6"]), "train.py", capsys)
    warning = [ln for ln in err.splitlines() if ln.startswith("train.py: warning:")]
    assert code == 0 and "Traceback" not in err and ckpt_step(ckpts / "last.ckpt") == 6
    assert len(warning) == 1 and f"{run_dir / 'config-1.yaml'}: not valid YAML (line 2" in warning[0]


def test_recorded_config_with_a_yaml_error_is_named(tiny_run, tmp_path, capsys):
    """A checkpoint written before checkpoints stored their config falls back to the run's config.yaml:
    a YAML error there is one line naming the file and line."""
    from msdiff.resume_config import RUN_CONFIG_KEY

    cfg, src = tiny_run
    run_dir = copy_run(src, tmp_path / "runs")
    last = run_dir / "checkpoints" / "last.ckpt"
    ck = torch.load(last, weights_only=True)
    del ck[RUN_CONFIG_KEY]
    torch.save(ck, last)
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text() + "oops: [\n")
    code, err = in_process(train_main(["--config", cfg, "--trainer.default_root_dir", tmp_path / "runs",
                                       "--trainer.logger", "false", "--trainer.max_steps", "5"]), "train.py", capsys)
    line = one_error_line(err, "train.py")
    assert code == USER_ERROR_EXIT_CODE and str(run_dir / "config.yaml") in line and "not valid YAML (line" in line


def test_config_files_are_bounded_and_strict(tiny_run, tmp_path, capsys):
    """A key given twice, a 4 KB alias bomb (10^8 values) and invalid YAML are refused in one line
    naming the file (and line), within a second (the bomb used to grow past 5 GB), also inside a
    config piece."""
    cfg, _ = tiny_run
    text = cfg.read_text()
    dup = tmp_path / "dup.yaml"
    dup.write_text(text.replace("    lr: ", "    lr: 0.5\n    lr: ", 1))
    assert dup.read_text().count("    lr: ") == 2
    levels = ["a0: &a0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(text + "\n".join(levels) + "\n")
    piece = tmp_path / "trainer_piece.yaml"
    piece.write_text("max_steps: 3\nmax_steps: 4\n")
    broken = tmp_path / "broken_piece.yaml"
    broken.write_text("max_steps: 3\n  devices: [1\n")
    for args, needles in (
            (["--config", cfg, "--trainer", broken], [str(broken), "not valid YAML (line 2"]),
            (["--config", dup], [str(dup), "key 'model.init_args.lr' given twice"]),
            (["--config", bomb], [str(bomb), "expands to more than 100,000 values"]),
            (["--config", cfg, "--trainer", piece], [str(piece), "key 'max_steps' given twice"])):
        t0 = time.perf_counter()
        code, err = in_process(train_main([*args, "--trainer.fast_dev_run", "1"]), "train.py", capsys)
        line = one_error_line(err, "train.py")
        assert code == USER_ERROR_EXIT_CODE and all(n in line for n in needles), line
        assert time.perf_counter() - t0 < 5


def test_user_named_paths_checked_before_the_first_write(tiny_run, tmp_path, capsys, monkeypatch):
    """$VAR in the run root is expanded for every file of the run (checkpoints, config.yaml, lock and
    TensorBoard events in one folder) or refused when unset; a --name that is a file or longer than
    the file system allows, and such an --output_dir, are one line each, nothing written."""
    cfg, src = tiny_run
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("MSDIFF_RUNS", str(scratch))
    monkeypatch.chdir(tmp_path)
    quick = ["--config", cfg, "--trainer.max_steps", "2", "--trainer.val_check_interval", "1000"]
    assert run_train([*quick, "--trainer.default_root_dir", "$MSDIFF_RUNS/runs", "--trainer.logger", "true"]) == 0
    run_dir = scratch / "runs" / "quickstart"
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 2 and (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / ".lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch"]  # no literal "$MSDIFF_RUNS" folder

    monkeypatch.delenv("MSDIFF_RUNS")
    code, err = in_process(train_main([*quick, "--trainer.default_root_dir", "${MSDIFF_RUNS}/runs"]), "train.py",
                           capsys)
    line = one_error_line(err, "train.py")
    assert code == USER_ERROR_EXIT_CODE and "environment variable $MSDIFF_RUNS is not set" in line

    root = tmp_path / "runs"
    root.mkdir()
    (root / "notes").write_text("mine")
    long_name = "n" * 300
    for name, needle in (("notes", f"--name: {root / 'notes'} is an existing file; expected a folder"),
                         (long_name, "is 300 bytes long; the file system allows names of at most 255")):
        code, err = in_process(train_main([*quick, "--trainer.default_root_dir", root, "--name", name]), "train.py",
                               capsys)
        line = one_error_line(err, "train.py")
        assert code == USER_ERROR_EXIT_CODE and needle in line, line
    assert sorted(p.name for p in root.iterdir()) == ["notes"] and (root / "notes").read_text() == "mine"

    ckpt = src / "checkpoints" / "last.ckpt"
    for out, needle in ((root / "notes", "is an existing file"), (tmp_path / long_name, "300 bytes long")):
        code, err = in_process(sample_main(["--ckpt_path", ckpt, "--output_dir", out, "--num_images", "1"],
                                           monkeypatch), "sample.py", capsys)
        line = one_error_line(err, "sample.py")
        assert code == USER_ERROR_EXIT_CODE and "--output_dir" in line and needle in line, line
    assert (root / "notes").read_text() == "mine"
    export = tmp_path / f"{long_name}.pt"  # any other path: the OS error names it, exit 2
    code, err = in_process(sample_main(["--ckpt_path", ckpt, "--export", export], monkeypatch), "sample.py", capsys)
    assert code == USER_ERROR_EXIT_CODE
    assert one_error_line(err, "sample.py") == f"sample.py: error: {export}: File name too long [errno ENAMETOOLONG]"
    code, err = in_process(train_main([*quick, "--trainer.default_root_dir", root, "--name", "/abs"]), "train.py",
                           capsys)
    assert code == USER_ERROR_EXIT_CODE and "not an absolute path" in one_error_line(err, "train.py")


def test_disk_full_under_tensorboard_and_at_the_lock(tiny_run, tmp_path, capsys, monkeypatch):
    """TensorBoard's writer thread hits a full disk: exit 74, one line naming the run's folder, no
    "Exception in thread" traceback, the checkpoints intact. A fresh run on a full disk: the lock
    file's PID write is named."""
    import tensorboard.compat.tensorflow_stub.io.gfile as gfile

    cfg, src = tiny_run
    run_dir = copy_run(src, tmp_path / "runs")
    ckpts = run_dir / "checkpoints"
    before = {p.name: sha(p) for p in ckpts.iterdir()}

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gfile.GFile, "write", full)
    code, err = in_process(train_main(["--config", cfg, "--trainer.default_root_dir", tmp_path / "runs",
                                       "--trainer.logger", "true", "--trainer.max_steps", "4"]), "train.py", capsys)
    line = one_error_line(err, "train.py")
    assert code == ENVIRONMENT_ERROR_EXIT_CODE and "Exception in thread" not in err
    assert line == (f"train.py: error: cannot write {run_dir} (the logger's files): No space left on device "
                    "[errno ENOSPC]")
    assert {p.name: sha(p) for p in ckpts.iterdir()} == before

    with mounted_tmpfs(tmp_path / "full", 64 * 1024) as disk:
        with contextlib.suppress(OSError):
            (disk / "filler").write_bytes(b"\0" * (1 << 20))
        code, err = in_process(train_main(["--config", cfg, "--trainer.default_root_dir", disk, "--trainer.logger",
                                           "false", "--trainer.max_steps", "2"]), "train.py", capsys)
        line = one_error_line(err, "train.py")
        assert code == ENVIRONMENT_ERROR_EXIT_CODE
        lock_file = disk / "quickstart" / ".lock"
        assert line == f"train.py: error: cannot write {lock_file}: No space left on device [errno ENOSPC]"


def test_a_finished_job_exits_0_whatever_signal_arrives_at_the_end(resumable_run, capsys, monkeypatch):
    """SIGUSR1 during the final checkpoint write: every step is done, so the job exits 0 and is not
    requeued (it used to exit 75: SLURM ran a finished job again); the same for a signal that arrives
    while a complete run is started again."""
    import msdiff.callbacks as callbacks

    cfg, root, ckpts = resumable_run
    real_save, requeued = callbacks.Checkpointing.save, []

    def save(self, trainer, pl_module):
        if trainer.global_step == 6:
            signals.record_preemption(signal.SIGUSR1)  # arrives while last.ckpt of the last step is written
        return real_save(self, trainer, pl_module)

    monkeypatch.setattr(callbacks.Checkpointing, "save", save)
    monkeypatch.setattr(callbacks, "requeue_slurm_job", lambda: requeued.append(1) or True)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    args = ["--config", cfg, "--trainer.default_root_dir", root, "--trainer.logger", "false",
            "--trainer.max_steps", "6"]
    try:
        code, err = in_process(train_main(args), "train.py", capsys)
        assert code == 0 and "Traceback" not in err, err[-2000:]
        assert ckpt_step(ckpts / "last.ckpt") == 6 and not requeued
        signals.record_preemption(signal.SIGTERM)  # during the start-up of the complete run
        code, err = in_process(train_main(args), "train.py", capsys)
        assert code == 0 and not requeued and ckpt_step(ckpts / "last.ckpt") == 6
    finally:
        signals.reset()


def test_overwrite_into_a_read_only_folder_names_it(tiny_run, tmp_path, capsys, monkeypatch):
    """sample.py --overwrite over an earlier run on a read-only mount: exit 74 naming the folder it
    could not clear (it named only rmtree's bare file name), the earlier run intact."""
    _, src = tiny_run
    ckpt = src / "checkpoints" / "last.ckpt"
    with mounted_tmpfs(tmp_path / "mnt", 16 << 20) as mnt:
        out = mnt / "out"
        args = ["--ckpt_path", ckpt, "--output_dir", out, "--num_images", "1", "--draws", "1", "--sampler", "DDIM",
                "--steps", "2"]
        assert in_process(sample_main(args, monkeypatch), "sample.py", capsys)[0] == 0
        earlier = {p.relative_to(out): sha(p) for p in out.rglob("*") if p.is_file()}
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        code, err = in_process(sample_main([*args, "--overwrite", "true"], monkeypatch), "sample.py", capsys)
        line = one_error_line(err, "sample.py")
        assert code == ENVIRONMENT_ERROR_EXIT_CODE
        assert line == f"sample.py: error: cannot write {out / 'samples'}: Read-only file system [errno EROFS]"
        assert {p.relative_to(out): sha(p) for p in out.rglob("*") if p.is_file()} == earlier


@pytest.mark.slow
def test_sigkill_to_a_data_loader_worker(resumable_run):
    """The out-of-memory killer's SIGKILL to a data-loader worker: exit 74 with one line naming the
    worker and the way on (it was exit 1 with a traceback); last.ckpt and previous.ckpt load."""
    cfg, root, ckpts = resumable_run
    last = ckpts / "last.ckpt"
    with popen(train_cmd(cfg, root, "--trainer.max_steps", "100000", "--checkpoint.every_n_steps", "1",
                         "--data.init_args.num_workers", "1")) as p:
        wait_for(step_at_least(last, 6), p, what="step 6")
        end = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < end:
            children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(child), signal.SIGKILL)
            time.sleep(0.2)
        _, err = p.communicate(timeout=60)
    line = one_error_line(err, "train.py")
    assert p.returncode == ENVIRONMENT_ERROR_EXIT_CODE and "a data-loader worker (pid" in line
    assert ("was killed by signal" in line or "exited unexpectedly" in line) and "rerun the command to resume" in line
    assert ckpt_step(last) >= 6 and ckpt_step(ckpts / "previous.ckpt") >= 5


def test_16_bit_input_is_read_at_its_true_scale_by_sample_py(tiny_run, tmp_path, capsys, monkeypatch):
    """sample.py --input with a 16-bit PNG of mid grey (32768): the condition column of the grid is
    mid grey 128 (it was read as white 255); a float TIFF is refused naming it before any write."""
    _, src = tiny_run
    ckpt = src / "checkpoints" / "last.ckpt"
    inp = tmp_path / "in"
    inp.mkdir()
    png16(inp / "grey.png", np.full((2, 2), 32768, np.uint16))  # the SR-4x condition of an 8x8 x
    out = tmp_path / "out"
    args = ["--ckpt_path", ckpt, "--output_dir", out, "--input", inp, "--draws", "1", "--sampler", "DDIM",
            "--steps", "1"]
    assert in_process(sample_main(args, monkeypatch), "sample.py", capsys)[0] == 0
    grid = np.asarray(Image.open(out / "grids" / "batch00000.png"))
    assert grid[:8, :8].min() == grid[:8, :8].max() == 128  # the y cell: 32768 / 65535 -> 8-bit 128

    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(inp / "float.tif")
    code, err = in_process(sample_main([*args[:3], tmp_path / "out2", *args[4:]], monkeypatch), "sample.py", capsys)
    line = one_error_line(err, "sample.py")
    assert code == USER_ERROR_EXIT_CODE and str(inp / "float.tif") in line and "32-bit float" in line
    assert not (tmp_path / "out2").exists()
