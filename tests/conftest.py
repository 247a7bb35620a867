"""Shared fixtures of the training tests (and of sample.py's tests).

`tiny_score_checkpoint` (session scope) trains a tiny CMDE model with train.py for 4 steps on
the embedded procedural data and returns the path of its `last.ckpt`; load it with
`msdiff.run.TrainedRun.open(path).system()`. `tiny_config(...)` writes a shrunken copy of any
experiment config (tiny U-Net, procedural data) for tests that run train.py.

Processes: tests start child processes through `run_process(...)` (a `subprocess.run` that
kills the child's whole process group on every path: timeout, failure, KeyboardInterrupt) or the
`spawn` fixture (a `Popen` whose process group is killed at teardown). Every child inherits
`PYTEST_MSDIFF_SESSION`; when the run ends, any process still carrying this session's token (a
leaked child, or a grandchild such as a DDP rank whose parent died) is killed and the run fails.

`--skip-slow` deselects the tests marked `slow` (subprocesses, DDP, torch.compile); the default
run keeps them (CI runs everything).
"""
from __future__ import annotations

import copy
import functools
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The tests use tiny tensors: one intra-op thread per process is fastest, and subprocesses (train.py,
# 2-process DDP) inherit it through OMP_NUM_THREADS instead of oversubscribing the 2 CI cores.
# MSDIFF_TEST_THREADS=2 runs the suite with two intra-op threads per process (CONTRIBUTING.md,
# "Tolerances": results must not depend on the thread count beyond the stated tolerances).
TEST_THREADS = os.environ.get("MSDIFF_TEST_THREADS", "1")
if not TEST_THREADS.isdigit() or int(TEST_THREADS) < 1:
    raise pytest.UsageError(f"MSDIFF_TEST_THREADS={TEST_THREADS!r}: expected a positive integer")
os.environ["OMP_NUM_THREADS"] = TEST_THREADS
import torch  # noqa: E402

torch.set_num_threads(int(TEST_THREADS))

SESSION_ENV = "PYTEST_MSDIFF_SESSION"
SESSION_TOKEN = f"{os.getpid()}-{uuid.uuid4().hex}"
os.environ[SESSION_ENV] = SESSION_TOKEN


# ---- child processes ----------------------------------------------------------------------------
def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group led by `proc` (the child and whatever it started), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        pass


def run_process(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)` in a new process
    group that is killed on every path (a timeout raises subprocess.TimeoutExpired as usual)."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        _kill_group(proc)


@pytest.fixture
def spawn():
    """`spawn(cmd, **popen_kwargs) -> Popen` in a new process group; all groups are killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(cmd: list, **kw) -> subprocess.Popen:
        proc = subprocess.Popen([str(c) for c in cmd], start_new_session=True, **kw)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        _kill_group(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _session_processes() -> dict[int, str]:
    """{pid: command line} of the processes (other than this one) that carry this session's token."""
    found = {}
    needle = f"{SESSION_ENV}={SESSION_TOKEN}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return found


def pytest_addoption(parser):
    parser.addoption("--skip-slow", action="store_true", default=False,
                     help="deselect the tests marked slow (subprocesses, DDP, torch.compile)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--skip-slow"):
        return
    kept = [item for item in items if item.get_closest_marker("slow") is None]
    deselected = [item for item in items if item.get_closest_marker("slow") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if it leaves a process behind (killing the leftovers)."""
    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + 5.0  # children that are exiting right now
    left = _session_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _session_processes()
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    lines = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items()))
    session.config.get_terminal_writer().line(f"\nERROR: the test run left {len(left)} process(es) running "
                                              f"(killed now):\n{lines}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _task_of(cfg: dict) -> dict:
    ds = cfg["data"]["init_args"]["dataset"]
    task = ds.get("init_args", {}).get("task")
    if task is None:  # edges2shoes provides y; the procedural stand-in builds it with the Edges task
        task = {"class_path": "msdiff.tasks.Edges"}
    return task


def shrink_config(cfg: dict, image_size: int = 8, length: int = 16, batch_size: int = 2) -> dict:
    """A copy of an experiment config with a tiny U-Net, procedural data (Gaussian-field configs keep
    their data, which needs no files), CPU/1 device and a 2-step grid sampler."""
    cfg = copy.deepcopy(cfg)
    data = cfg["data"]["init_args"]
    if "GaussianField" in data["dataset"]["class_path"]:
        image_size = data["dataset"]["init_args"].get("size", 8)
        data["dataset"]["init_args"]["length"] = length
    else:
        data["dataset"] = {"class_path": "msdiff.datasets.Shapes",
                           "init_args": {"image_size": image_size, "length": length, "max_shapes": 3,
                                         "task": _task_of(cfg),
                                         "channels": cfg["model"]["init_args"].get("x_channels", 3)}}
    data.update(batch_size=batch_size, val_batch_size=2, val_size=2, num_workers=0,
                pin_memory=False, persistent_workers=False)
    net = cfg["model"]["init_args"]["net"]["init_args"]
    net.update(ch=32, ch_mult=[1], num_res_blocks=1, attn_resolutions=[], image_size=image_size, dropout=0.1)
    model = cfg["model"]["init_args"]
    model["sampler"] = {"class_path": "msdiff.samplers.DDIM", "init_args": {"steps": 2}}
    model["sample_grid_size"] = 2
    est = model["estimator"]["init_args"]
    if "reach_target_steps" in est:
        est["reach_target_steps"] = 10
    tr = cfg.setdefault("trainer", {})
    tr.update(accelerator="cpu", devices=1, strategy="auto", enable_progress_bar=False,
              enable_model_summary=False, log_every_n_steps=1, val_check_interval=10,
              num_sanity_val_steps=0, precision="32-true")
    cfg["checkpoint"] = {"every_n_steps": 1000}
    return cfg


def tiny_config(name: str, out_dir: Path, **kw) -> Path:
    """Write shrink_config(configs/<name>.yaml, resolved) to out_dir/<name>.yaml and return its path."""
    cfg = shrink_config(resolved_config(name), **kw)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def resolved_config(name: str) -> dict:
    """configs/<name>.yaml as train.py resolves it (pieces inlined, defaults and derived values); a
    fresh copy per call, each config parsed once per session."""
    return copy.deepcopy(_resolved_config(name))


@functools.lru_cache(maxsize=None)
def _resolved_config(name: str) -> dict:
    import train

    return train.resolved_config(CONFIGS / f"{name}.yaml")


def run_train(args: list[str]) -> int:
    """train.py's main() in this process (user errors raise; see msdiff.cli.run_entry_point)."""
    import train

    return train.main([str(a) for a in args])


@pytest.fixture(scope="session")
def tiny_score_checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a 4-step tiny CMDE (quickstart) run: 8x8 procedural images, SR 4x."""
    d = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = tiny_config("quickstart", d)
    assert run_train(["--config", cfg, "--trainer.max_steps", "4", "--trainer.default_root_dir", d / "runs",
                      "--trainer.logger", "false"]) == 0
    path = d / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def run_sample(*args) -> None:
    """Run sample.py's main in-process with these arguments; it must exit 0. On the CPU unless the
    arguments name a --device: the tests compare against values computed on the CPU, also on a
    machine with a GPU (where sample.py's default, auto, would sample on it)."""
    import sample

    old = sys.argv
    device = [] if "--device" in map(str, args) else ["--device", "cpu"]
    sys.argv = ["sample.py", *map(str, args), *device]
    try:
        assert sample.main() == 0
    finally:
        sys.argv = old


def sample_pngs(d: Path) -> dict:
    """{file name: pixels} of the per-draw PNGs sample.py wrote under d/samples."""
    import numpy as np
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)) for p in sorted((d / "samples").glob("*.png"))}


def watch_host_traffic(monkeypatch, record) -> None:
    """Call `record()` at every Tensor -> Python conversion (item, tolist, bool, float, int) and every
    torch.tensor/as_tensor call on host data: on a GPU each is a host-device synchronisation (a read
    back, or a copy from pageable host memory). The tests of "nothing per step" count with it."""
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, **k: record() or _f(self, *a, **k))
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda data, *a, _f=original, **k: (
            None if isinstance(data, torch.Tensor) else record()) or _f(data, *a, **k))


def cpu_bf16_attention_missing() -> str | None:
    """Why bf16 attention cannot run on this CPU's selected ATen kernels, or None when it can.
    PyTorch 2.14's bf16 flash attention packs its blocks with AVX-512 (VNNI) whenever the CPU has
    it, even when ATEN_CPU_CAPABILITY selects a lower kernel set (default, avx2), and then raises
    "pack_vnni2 is only supported when avx512 is supported": a PyTorch limitation of forcing the
    capability below the hardware's; a genuine AVX2 CPU never asks for the packing."""
    q = torch.zeros(1, 1, 64, 32, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        if "pack_vnni2" in str(e):
            return (f"bf16 attention unavailable with ATEN_CPU_CAPABILITY="
                    f"{torch.backends.cpu.get_cpu_capability()} on an AVX-512 CPU (PyTorch: {e})")
        raise
    return None


# ---- tolerances (CONTRIBUTING.md, "Tolerances") -------------------------------------------------------
def kernel_path_atol(net: torch.nn.Module, reference: torch.Tensor) -> torch.Tensor:
    """Absolute tolerance, per batch row of `reference`, between two evaluations of `net` that reach
    the same value by different kernel paths (another batch composition, vector unit, thread count,
    BLAS or device). Each of the network's L convolution / linear layers sums K = fan-in products in
    an order the kernel chooses; a sum's rounding is about sqrt(K) eps |sum| (round-off errors of
    random sign, Higham, "Accuracy and Stability of Numerical Algorithms", Sec. 2.8), and the layers'
    errors add up along the depth. Relative to the row's largest output value m:

        atol = L * sqrt(K_max) * eps(dtype) * m.

    For the float32 tiny U-Net of the guidance tests (L = 41, K_max = 1152) that is 1.7e-4 of m: far
    below what a wrong formula changes (O(m)), and 160x the largest difference measured between two
    batch compositions on an AMD EPYC (1.07e-4 at m = 104; 0 on the Intel machine, all vector units)."""
    layers = [mod for mod in net.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    fan_in = max(mod.weight[0].numel() for mod in layers)
    m = reference.detach().abs().flatten(1).amax(1).view(-1, *[1] * (reference.dim() - 1))
    return len(layers) * math.sqrt(fan_in) * torch.finfo(reference.dtype).eps * m


def assert_close_across_kernel_paths(actual: torch.Tensor, expected: torch.Tensor, net: torch.nn.Module) -> None:
    """`actual` equals `expected` to within `kernel_path_atol(net, expected)` element by element."""
    atol = kernel_path_atol(net, expected)
    excess = (actual - expected).abs() - atol
    assert actual.shape == expected.shape and bool((excess <= 0).all()), (
        f"{int((excess > 0).sum())} of {expected.numel()} elements differ by more than the kernel-path "
        f"tolerance (largest difference {float((actual - expected).abs().max()):.3g}, atol {float(atol.max()):.3g})")
