"""sample.py on a cluster (issue 24): the time from SIGTERM to exit, the cost of the per-sample
atomic writes and the manifest, and a whole run against an older checkout.

    python -m benchmarks.sample_cluster --ckpt_path CKPT [--repeats 5] [--old OLD_CHECKOUT]

* stop: a run is started, and once its first (batch, draw) is on disk plus a random 0-0.3 s (so the
  signal lands inside a draw), SIGTERM is sent; the time until the process has exited (exit 75).
* writes: per sample of 160x160 RGB (SR-160) and of 8x8, in units of 8 samples: PNG encoding +
  atomic write (temporary file, rename) + sha256, and the unit's fsync'ed manifest lines, against
  the plain `write_png` of earlier versions; and the sha256 check of a file when a run is continued.
* run: the same sample.py command (tiny model, 32 conditions x 2 draws, Heun 30 steps) with this
  checkout and with OLD_CHECKOUT (e.g. a `git worktree` of an earlier commit), alternated; wall
  time of the whole process.
Medians over the repeats; the machine's load is printed with them.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--num_images", "32", "--batch_size", "8", "--draws", "2", "--sampler", "Heun", "--sampler.steps", "30",
       "--device", "cpu"]


def _env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}


def _draw_lines(out: Path) -> int:
    logs = list((out / "manifest").glob("*.jsonl")) if (out / "manifest").is_dir() else []
    return sum(p.read_text().count('"draw":') - p.read_text().count('"draw":null') for p in logs)


def stop_times(ckpt: str, repeats: int, sig: int = signal.SIGTERM) -> list[float]:
    """Seconds from `sig` to the exit of a sample.py stopped inside a draw."""
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "out"
            p = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--ckpt_path", ckpt, "--output_dir", str(out),
                                  *RUN[:-4], "--sampler.steps", "200", "--device", "cpu"], cwd=ROOT, env=_env(ROOT),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while _draw_lines(out) == 0 and p.poll() is None:
                time.sleep(0.01)
            time.sleep(random.uniform(0.0, 0.3))
            t = time.perf_counter()
            p.send_signal(sig)
            code = p.wait()
            times.append(time.perf_counter() - t)
            if code != 75 and sig != signal.SIGINT:
                raise RuntimeError(f"sample.py exited {code} after the signal, expected 75")
    return times


def write_costs(repeats: int) -> dict[str, float]:
    """Milliseconds per sample: the new atomic write + manifest line vs write_png; the sha256 check."""
    from msdiff.images import write_png
    from msdiff.sampling.layout import png_bytes, sample_file, write_files
    from msdiff.sampling.manifest import ManifestLog, file_digest

    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    for size in (160, 8):
        img = torch.rand(3, size, size, generator=g)
        new, old, check = [], [], []
        with tempfile.TemporaryDirectory() as d, ManifestLog(Path(d), "bench") as log:
            for r in range(repeats):  # a unit: a batch of 8 samples, then its manifest lines (one fsync)
                t = time.perf_counter()
                records = [{"index": 8 * r + j, "draw": 0,
                            "files": write_files(Path(d), {sample_file(f"n{8 * r + j}", 0): png_bytes(img)})}
                           for j in range(8)]
                log.append(records)
                new.append((time.perf_counter() - t) / 8)
                t = time.perf_counter()
                for j in range(8):
                    write_png(img, Path(d) / f"old{8 * r + j}.png")
                old.append((time.perf_counter() - t) / 8)
                t = time.perf_counter()
                file_digest(Path(d) / sample_file(f"n{8 * r}", 0))
                check.append(time.perf_counter() - t)
        out[f"{size}px atomic write + manifest line (ms)"] = 1e3 * statistics.median(new)
        out[f"{size}px write_png before (ms)"] = 1e3 * statistics.median(old)
        out[f"{size}px sha256 check on continuing (ms)"] = 1e3 * statistics.median(check)
    return out


def run_times(ckpt: str, old: Path, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of the same command with this checkout and with `old`, alternated."""
    times: dict[str, list[float]] = {"this checkout": [], str(old): []}
    for _ in range(repeats):
        for label, root in (("this checkout", ROOT), (str(old), old)):
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                subprocess.run([sys.executable, str(root / "sample.py"), "--ckpt_path", ckpt, "--output_dir",
                                str(Path(d) / "o"), *RUN], cwd=root, env=_env(root), check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[label].append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--old", type=Path, default=None, help="an older checkout to compare whole runs with")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)")
    for name, sig in (("SIGTERM", signal.SIGTERM), ("SIGINT", signal.SIGINT)):
        t = stop_times(a.ckpt_path, a.repeats, sig)
        print(f"{name} to exit: median {statistics.median(t):.3f} s (min {min(t):.3f}, max {max(t):.3f}, n={len(t)})")
    for k, v in write_costs(max(a.repeats, 20)).items():
        print(f"{k}: {v:.2f}")
    if a.old is not None:
        for label, t in run_times(a.ckpt_path, a.old, a.repeats).items():
            print(f"whole run, {label}: median {statistics.median(t):.2f} s ({', '.join(f'{x:.2f}' for x in t)})")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
