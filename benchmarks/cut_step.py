"""Seconds per training iteration (D step + G/F step) and peak memory of CUT and FastCUT.

Runs `CUTSystem.training_step`'s work (without a Trainer) at the reference size: batch 1,
256x256, ngf/ndf 64, 9 blocks, 256 patches. Each variant runs in its own subprocess so its peak
resident memory (CPU: ru_maxrss) or peak CUDA memory is its own. Prints a markdown table.

    .venv/bin/python -m benchmarks.cut_step [--iters 3] [--size 256] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


VARIANTS = {"CUT": dict(lambda_nce=1.0, nce_idt=True, flip_equivariance=False),
            "FastCUT": dict(lambda_nce=10.0, nce_idt=False, flip_equivariance=True)}


def run_one(name: str, iters: int, size: int, device: str) -> dict:
    import torch
    from unittest import mock

    from msdiff.cut.system import CUTSystem

    torch.manual_seed(0)
    m = CUTSystem(**VARIANTS[name]).to(device)
    opts = [torch.optim.Adam(p.parameters(), lr=2e-4, betas=(0.5, 0.999)) for p in (m.G, m.D, m.F)]
    wrapped = [mock.Mock(step=o.step, zero_grad=o.zero_grad) for o in opts]
    m.optimizers = lambda: wrapped
    m.lr_schedulers = lambda: []
    m.manual_backward = lambda loss: loss.backward()
    m.log_dict = lambda *a, **k: None
    batch = {"A": torch.rand(1, 3, size, size, device=device), "B": torch.rand(1, 3, size, size, device=device)}
    times = []
    for i in range(iters + 1):  # the first iteration is a warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.training_step(batch, i)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"name": name, "s_per_iter": statistics.median(times[1:]), "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.iters, a.size, a.device)))
        return
    rows = []
    for name in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--iters", str(a.iters), "--size", str(a.size),
                              "--device", a.device], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    mem = "peak CUDA memory (MiB)" if a.device == "cuda" else "peak RSS (MiB)"
    print(f"| variant | s / iteration (median of {a.iters}) | {mem} |\n|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['s_per_iter']:.2f} | {r['peak_mib']:.0f} |")
    c, f = rows
    print(f"\nFastCUT / CUT: time x{f['s_per_iter'] / c['s_per_iter']:.2f}, memory x{f['peak_mib'] / c['peak_mib']:.2f}"
          f" ({a.size}x{a.size}, batch 1, device {a.device})")


if __name__ == "__main__":
    main()
