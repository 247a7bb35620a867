"""Sampling speed and peak memory per sampler at 160x160 with the SR-160 U-Net (Batzolis et al.:
ch 96, ch_mult (1,1,2,2,3,3), attention at 20/10/5; randomly initialised, since speed does not depend
on the weights), CDE estimator on the reference VE SDE, batch 1 and 8.

Method. Every (sampler, batch, steps) runs in a FRESH subprocess, so its peak memory (CUDA:
max_memory_allocated; CPU: the process's peak RSS, ru_maxrss) is its own. Each subprocess first runs
one 1-step call (allocator and kernel warm-up), then the timed call with `steps` steps. With two step
counts s1 < s2 the per-step cost is (t(s2) - t(s1)) / (s2 - s1), which removes fixed costs; the cost of
a full-length run (pc/em 1000 steps, heun/ddim 50) is extrapolated linearly from it. Memory that grew
from s1 to s2 steps (more than 5% + 16 MiB) is flagged GROWS. The probability-flow ODE has no step
count: it runs once per batch at `--ode_tol` (rtol = atol), and its row reports the cost per network
evaluation and samples/s at the NFE the solver used.

    python benchmarks/sampling.py [--device cuda] [--steps 2 6] [--batch 1 8] [--ode_tol 1e-2]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msdiff.estimators import CDE  # noqa: E402
from msdiff.nn.unet import UNet  # noqa: E402
from msdiff.samplers import DDIM, EulerMaruyama, Heun, PredictorCorrector, ProbabilityFlowODE  # noqa: E402
from msdiff.sde import VESDE  # noqa: E402

SAMPLERS = {"pc": PredictorCorrector, "em": EulerMaruyama, "ode": ProbabilityFlowODE, "heun": Heun, "ddim": DDIM}
FULL_STEPS = {"pc": 1000, "em": 1000, "heun": 50, "ddim": 50}


def make_sampler(name: str, steps: int, tol: float):
    return SAMPLERS[name](rtol=tol, atol=tol) if name == "ode" else SAMPLERS[name](steps=steps)


def child(name: str, batch: int, steps: int, device: str, size: int, tol: float) -> dict:
    """One measurement in this (fresh) process: warm-up, then the timed call."""
    torch.manual_seed(0)
    net = UNet(in_channels=6, out_channels=3, ch=96, ch_mult=(1, 1, 2, 2, 3, 3), num_res_blocks=2,
               attn_resolutions=(size // 8, size // 16, size // 32), image_size=size, dropout=0.0).to(device).eval()
    est = CDE(sde=VESDE(sigma_min=0.005, sigma_max=(3 * size * size) ** 0.5))
    sde = est.sampling_sde
    y = torch.rand(batch, 3, size, size, device=device)

    def call(sampler) -> float:
        g = torch.Generator(device=device).manual_seed(0)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            x_T = sde.prior_sampling((batch, 3, size, size), generator=g, device=device)
            sampler(est.score_fn(net, y, generator=g), sde, x_T, generator=g)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if name != "ode":
        call(make_sampler(name, 1, tol))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = make_sampler(name, steps, tol)
    seconds = call(sampler)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"seconds": seconds, "nfe": sampler.nfe, "peak_mib": peak}


def measure(name: str, batch: int, steps: int, a) -> dict:
    cmd = [sys.executable, __file__, "--child", name, str(batch), str(steps), "--device", a.device,
           "--image_size", str(a.image_size), "--ode_tol", str(a.ode_tol)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image_size", type=int, default=160)
    p.add_argument("--steps", type=int, nargs=2, default=(2, 6))
    p.add_argument("--batch", type=int, nargs="+", default=(1, 8))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--ode_tol", type=float, default=1e-2)
    p.add_argument("--child", nargs=3, default=None, metavar=("SAMPLER", "BATCH", "STEPS"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), int(a.child[2]), a.device, a.image_size, a.ode_tol)))
        return
    mem = "peak CUDA MiB" if a.device == "cuda" else "peak RSS MiB"
    s1, s2 = a.steps
    print(f"| sampler | batch | NFE/step | s per step | samples/s at full length | {mem} ({s1} / {s2} steps) |")
    print("|---|---|---|---|---|---|")
    for b in a.batch:
        for name in a.samplers:
            if name == "ode":
                r = measure(name, b, 0, a)
                print(f"| ode (rtol=atol={a.ode_tol}, {r['nfe']} NFE) | {b} | - | {r['seconds'] / r['nfe']:.4f} per NFE | "
                      f"{b / r['seconds']:.4f} | {r['peak_mib']:.0f} |", flush=True)
                continue
            r1, r2 = measure(name, b, s1, a), measure(name, b, s2, a)
            per_step = (r2["seconds"] - r1["seconds"]) / (s2 - s1)
            nfe_step = (r2["nfe"] - r1["nfe"]) / (s2 - s1)
            grows = r2["peak_mib"] > 1.05 * r1["peak_mib"] + 16
            print(f"| {name} ({FULL_STEPS[name]} steps) | {b} | {nfe_step:.0f} | {per_step:.3f} | "
                  f"{b / (per_step * FULL_STEPS[name]):.5f} | {r1['peak_mib']:.0f} / {r2['peak_mib']:.0f}"
                  f"{' GROWS' if grows else ''} |", flush=True)


if __name__ == "__main__":
    main()
