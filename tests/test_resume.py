"""Exact resume (single process and 2-process CPU DDP), SIGUSR1 preemption and SIGKILL recovery."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_THREADS, run_process, run_train, tiny_config

from msdiff.callbacks import PREEMPTED_EXIT_CODE


def _final_state(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:  # network, EMA (weights and counter), VS-CMDE buffer
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.parametrize("name,length", [("quickstart", 10), ("sr8x_vscmde", 12)], ids=["mid_epoch", "epoch_boundary"])
def test_exact_resume_single_process(name, length, tmp_path):
    """6 steps, then the same command resumed to 12 == 12 uninterrupted steps, bit for bit
    (length 10 / batch 2: step 6 is mid-epoch; length 12: step 6 ends epoch 0), with validation
    and sample grids in between."""
    cfg = tiny_config(name, tmp_path, length=length)
    common = ["--config", cfg, "--trainer.logger", "false", "--trainer.val_check_interval", "4"]
    assert run_train([*common, "--trainer.max_steps", "12", "--trainer.default_root_dir", tmp_path / "a"]) == 0
    assert run_train([*common, "--trainer.max_steps", "6", "--trainer.default_root_dir", tmp_path / "b"]) == 0
    assert _final_state(tmp_path / "b" / name)["global_step"] == 6
    assert run_train([*common, "--trainer.max_steps", "12", "--trainer.default_root_dir", tmp_path / "b"]) == 0
    _assert_same_training_state(_final_state(tmp_path / "a" / name), _final_state(tmp_path / "b" / name))


def _train_cmd(cfg: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(cfg), "--trainer.default_root_dir", str(root),
            "--trainer.logger", "false", *extra]


# the suite's intra-op thread count (conftest, MSDIFF_TEST_THREADS): a child run compared bitwise with an
# in-process run must reduce with the same number of threads
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": TEST_THREADS}


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return run_process(cmd, timeout, cwd=REPO, env=ENV)


@pytest.mark.slow
def test_exact_resume_ddp_two_processes(tmp_path):
    """The same with strategy=ddp on 2 CPU processes (gloo), launched as train.py subprocesses: 12
    uninterrupted steps (keeping the step-4 checkpoint) == a new run resumed from that checkpoint to
    step 12 (two launches instead of three: each costs seconds of process start-up). 14 examples over
    2 ranks at batch 2: 3 steps per epoch, so step 4 is mid-epoch (epoch 1, after its first batch),
    where each rank's shard must continue at global position 4 of the epoch's order."""
    cfg = tiny_config("quickstart", tmp_path, length=14)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.val_check_interval", "4"]
    r = _run(_train_cmd(cfg, tmp_path / "a", *ddp, "--trainer.max_steps", "12", "--checkpoint.every_n_steps", "4",
                        "--checkpoint.keep_every_n_steps", "4"))
    assert r.returncode == 0, r.stderr[-3000:]
    mid = tmp_path / "a" / "quickstart" / "checkpoints" / "step=4.ckpt"
    ck = torch.load(mid, weights_only=True)
    assert ck["global_step"] == 4
    # the loader's position: epoch 1, one batch of 2 on each of the 2 ranks consumed
    assert ck["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "consumed": 4}]
    r = _run(_train_cmd(cfg, tmp_path / "b", *ddp, "--trainer.max_steps", "12", "--ckpt_path", str(mid)))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _final_state(tmp_path / "a" / "quickstart"), _final_state(tmp_path / "b" / "quickstart")
    assert a["global_step"] == 12
    _assert_same_training_state(a, b)


def _wait_for_step(path: Path, proc: subprocess.Popen, min_step: int, timeout: float = 180) -> int:
    """Poll until `path` holds a checkpoint of step >= min_step. On every failure path the caller's
    `spawn` fixture kills the process group (this function never leaves `proc` running by itself)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) before step {min_step}: "
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if path.is_file():
            step = torch.load(path, weights_only=True)["global_step"]  # atomic writes: always loadable
            if step >= min_step:
                return step
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint with step >= {min_step} within {timeout}s")


@pytest.mark.slow
def test_preemption_signal_then_sigkill_then_resume(tmp_path, spawn):
    """SIGUSR1: last.ckpt saved at a batch boundary, exit 75. Re-run resumes; SIGKILL mid-run leaves
    a loadable last.ckpt; a third run (in-process) resumes from it and completes."""
    cfg = tiny_config("quickstart", tmp_path, length=14)
    root = tmp_path / "runs"
    last = root / "quickstart" / "checkpoints" / "last.ckpt"
    cmd = _train_cmd(cfg, root, "--checkpoint.every_n_steps", "3", "--trainer.max_steps", "100000")

    p = spawn(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(last, p, 3)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=120)
    assert p.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    k = torch.load(last, weights_only=True)["global_step"]
    assert k >= 3

    p = spawn(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_after = _wait_for_step(last, p, k + 3)
    p.kill()
    p.communicate(timeout=60)
    k2 = torch.load(last, weights_only=True)["global_step"]
    assert k2 >= killed_after > k

    assert run_train(cmd[2:-1] + [str(k2 + 4)]) == 0  # the third run in-process (saves a process start-up)
    assert torch.load(last, weights_only=True)["global_step"] == k2 + 4
