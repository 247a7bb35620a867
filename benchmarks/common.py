"""Shared helpers of the benchmark scripts: timing, FLOP counting, peak memory, environment header
and the rewriting of marked sections of ``benchmarks/RESULTS.md``.

Timing: ``median_time`` runs warm-up calls, then the median of repeats (CUDA synchronised around each
call). FLOPs: ``torch.utils.flop_counter.FlopCounterMode``. The hardware reference is
``matmul_flops``: a dense square matmul's FLOP/s in the same process, same dtype and device.

Peak memory of a callable (``peak_memory``):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory only);
- CPU: the resident-set high-water mark (``VmHWM``) of the process, reset before the call by writing
  5 to ``/proc/self/clear_refs`` (Linux >= 4.0); the result is the peak RSS during the call and its
  increase over the RSS just before it. For a clean figure run it in a fresh process with
  ``peak_memory_in_subprocess("module:function", kwargs)``: the child imports the module, calls
  ``function(**kwargs)`` to build a zero-argument callable (setup is not measured), then measures
  that callable once; the child's ``ru_maxrss`` is reported too.

This module imports nothing heavy at import time, so a child process for a pure-Python target
starts quickly.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"          # tracked: rewritten only when a script is told --update-results
SCRATCH = ROOT / "runs" / "benchmarks"  # where results go otherwise (runs/ is not tracked)


# ---- timing and FLOPs --------------------------------------------------------------------------
def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int = 10, warmup: int = 2,
                      device: str = "cpu") -> dict[str, dict[str, float]]:
    """{name: {"median", "min"}} seconds of each callable, called in turn (a, b, a, b, ...) so that a load
    change on a shared machine hits all of them alike; the minimum is the least disturbed call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}


def matmul_flops(n: int = 2048, repeats: int = 5, device: str = "cpu", dtype=None) -> float:
    """FLOP/s of a dense (n x n) @ (n x n) matmul (2 n^3 FLOPs), median of repeats after a warm-up."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_time(lambda: torch.mm(a, b), repeats, warmup=1, device=device)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter`` (matmuls, convs, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---- memory ------------------------------------------------------------------------------------
def _status_mib(key: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def rss_mib() -> float | None:
    """Current resident set size of this process (MiB), None where /proc is unavailable."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to the current RSS; False when not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: str = "cpu") -> dict:
    """Run ``fn`` once; return {"peak_mib", "increase_mib", "kind"} (see the module docstring)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"peak_mib": peak, "increase_mib": peak - base, "kind": "CUDA max_memory_allocated"}
    base = rss_mib()
    if base is None or not reset_peak_rss():
        import resource

        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"peak_mib": peak, "increase_mib": float("nan"), "kind": "ru_maxrss"}
    fn()
    peak = _status_mib("VmHWM")
    return {"peak_mib": peak, "increase_mib": peak - base, "kind": "peak RSS"}


def peak_memory_in_subprocess(target: str, kwargs: dict | None = None, device: str = "cpu",
                              timeout: float | None = None, system_malloc: bool = False) -> dict:
    """``peak_memory`` of the callable built by ``target`` ("module:function", e.g.
    "benchmarks.sections_unet:unet_setup", importable from the repository root) with ``kwargs``, in a fresh Python process. The builder may
    return a callable or (callable, info dict); info is merged into the result. ``system_malloc``:
    the child runs with glibc's default settings (no MALLOC_* variables of msdiff/malloc.py), so its
    peak resident memory is the memory the call needs, not what a caching heap keeps."""
    cmd = [sys.executable, "-m", "benchmarks.common", "--child", target, json.dumps(kwargs or {}), device]
    env = None
    if system_malloc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def call_in_subprocess(target: str, kwargs: dict | None = None, timeout: float | None = None) -> Any:
    """The JSON-able result of ``target(**kwargs)`` ("module:function") computed in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.common", "--call", target, json.dumps(kwargs or {}), "-"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _child(mode: str, target: str, kwargs_json: str, device: str) -> None:
    if mode == "--call":
        print(json.dumps(_resolve(target)(**json.loads(kwargs_json))))
        return
    built = _resolve(target)(**json.loads(kwargs_json))
    fn, info = built if isinstance(built, tuple) else (built, {})
    res = peak_memory(fn, device)
    import resource

    res["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({**info, **res}))


def allocation_probe(mib: int):
    """A builder for tests of the memory helpers: a callable that allocates and touches ``mib`` MiB."""
    def fn():
        buf = bytearray(mib * 2**20)
        buf[::4096] = b"\x01" * len(buf[::4096])
        return len(buf)

    return fn, {"mib": mib}


# ---- where results go -----------------------------------------------------------------------------
def add_results_arguments(parser, default_name: str = "RESULTS.md") -> None:
    """--update-results and --output of a script that writes results (see `results_path`)."""
    parser.add_argument("--update-results", action="store_true",
                        help="write into the tracked benchmarks/ files (default: runs/benchmarks/, untracked)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"results file (default: runs/benchmarks/{default_name}, or benchmarks/{default_name} "
                             "with --update-results)")


def results_path(output: Path | None, update: bool, name: str = "RESULTS.md") -> Path:
    """The file a run writes: ``output`` when given, else ``benchmarks/NAME`` with ``update`` (the
    tracked file), else ``runs/benchmarks/NAME``, first created as a copy of the tracked file so that
    its other blocks stay. A quick or partial run therefore never rewrites a tracked file unless
    told --update-results; ValueError for an --output that names a tracked benchmarks/ file."""
    tracked = BENCH / name
    if output is None:
        output = tracked if update else SCRATCH / name
    output = Path(output)
    if output.resolve().parent == BENCH and not update:
        raise ValueError(f"--output {output}: a tracked file of benchmarks/; add --update-results to rewrite it")
    if not output.exists() and tracked.is_file() and output.resolve() != tracked:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(tracked.read_text())
    return output


# ---- environment and RESULTS.md ------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else platform.processor() or platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
        return "not installed"


def environment(device: str = "cpu") -> dict:
    """Device, versions, date and machine load, for the header of a results table."""
    import torch

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads",
        "load_average": " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True,
                                       text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    return env


def begin_marker(name: str) -> str:
    return f"<!-- BEGIN {name} (generated: edits here are overwritten) -->"


def end_marker(name: str) -> str:
    return f"<!-- END {name} -->"


def replace_block(text: str, name: str, body: str, after_title: bool = True) -> str:
    """Replace the text between ``name``'s markers by ``body`` and leave everything else intact. A
    missing block is inserted after the document's first ``# `` title (or at the top/end)."""
    begin, end = begin_marker(name), end_marker(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    i, j = text.find(begin), text.find(end)
    if i >= 0 and j > i:
        return text[:i] + block + text[j + len(end):]
    if i >= 0 or j >= 0:
        raise ValueError(f"RESULTS file: unbalanced markers for block {name!r}")
    m = re.search(r"^# .*\n", text, re.M) if after_title else None
    if m:
        return text[:m.end()] + "\n" + block + "\n\n" + text[m.end():].lstrip("\n")
    return (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"


def read_block(text: str, name: str) -> str | None:
    begin, end = begin_marker(name), end_marker(name)
    i, j = text.find(begin), text.find(end)
    return text[i + len(begin):j].strip() if i >= 0 and j > i else None


def write_summary(path: Path, block: str, titles: dict[str, str], done: dict[str, str], header: str, stamp: str,
                  quick: bool = False) -> None:
    """Rewrite ``block`` of the results file ``path``: a header sub-block, then one sub-block per section
    of ``titles`` (in that order). Sections in ``done`` ({name: markdown}) are replaced, the others keep
    their last content; the "- Target" lines of all sections are gathered under the header. Text outside
    ``block`` is left intact. ``quick``: met/missed verdicts are marked as saying nothing."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    body = read_block(text, block)
    if body is None:
        body = "\n\n".join([f"{begin_marker(block + ':header')}\n{end_marker(block + ':header')}"] + [
            f"{begin_marker(f'{block}:{s}')}\n### {t}\n\nNot run yet.\n{end_marker(f'{block}:{s}')}" for s, t in titles.items()])
    for s, md in done.items():
        if quick:
            md = re.sub(r"\*\*(met|missed)\*\*", r"\1 (quick sizes: says nothing about the target)", md)
        body = replace_block(body, f"{block}:{s}", f"### {titles[s]}\n\n{stamp}\n\n{md}", after_title=False)
    targets = [f"{line} ({t})" for s, t in titles.items() for line in (read_block(body, f"{block}:{s}") or "")
               .splitlines() if line.startswith("- Target")]
    if targets:
        header += "\n\nTargets of issue 9, as last measured in the subsections below:\n\n" + "\n".join(targets)
    body = replace_block(body, block + ":header", header, after_title=False)
    path.write_text(replace_block(text, block, body))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] in ("--child", "--call"):
    _child(*sys.argv[1:5])
