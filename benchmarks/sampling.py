"""Sampling speed and peak memory per sampler (SR 160 UNet, randomly initialised: speed does not
depend on the weights), batch 1 and 8. Each sampler runs a few steps; the per-sample cost of S
steps is extrapolated linearly from two short runs (steps s1 < s2), per-step cost =
(t(s2) - t(s1)) / (s2 - s1), which removes the fixed cost. Peak memory is measured at s1 and s2
steps: a sampler whose memory grows with steps is flagged.

    python benchmarks/sampling.py [--device cuda] [--image_size 160] [--steps 4 8] [--batch 1 8]
"""
from __future__ import annotations

import argparse
import time

import torch

from msdiff.estimators import CDE
from msdiff.nn.unet import UNet
from msdiff.samplers import DDIM, EulerMaruyama, Heun, PredictorCorrector
from msdiff.sde import VESDE

SAMPLERS = {"pc": PredictorCorrector, "em": EulerMaruyama, "heun": Heun, "ddim": DDIM}
FULL_STEPS = {"pc": 1000, "em": 1000, "heun": 50, "ddim": 50}


def run_once(name, steps, net, est, y, device):
    sampler = SAMPLERS[name](steps=steps)
    sde = est.sampling_sde
    g = torch.Generator(device=device).manual_seed(0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        x_T = sde.prior_sampling((y.shape[0], 3, *y.shape[2:]), generator=g, device=device)
        sampler(est.score_fn(net, y, generator=g), sde, x_T, generator=g)
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return time.perf_counter() - t0, peak, sampler.nfe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image_size", type=int, default=160)
    p.add_argument("--steps", type=int, nargs=2, default=(4, 8))
    p.add_argument("--batch", type=int, nargs="+", default=(1, 8))
    p.add_argument("--ch", type=int, default=96)
    a = p.parse_args()
    net = UNet(in_channels=6, out_channels=3, ch=a.ch, image_size=a.image_size,
               attn_resolutions=(a.image_size // 8, a.image_size // 16, a.image_size // 32)).to(a.device).eval()
    est = CDE(sde=VESDE(sigma_min=0.005, sigma_max=277.128))
    print(f"| sampler | batch | NFE/step | s per step | samples/s at full steps | peak MiB (s1 / s2 steps) |")
    print("|---|---|---|---|---|---|")
    for b in a.batch:
        y = torch.rand(b, 3, a.image_size, a.image_size, device=a.device)
        for name in SAMPLERS:
            run_once(name, a.steps[0], net, est, y, a.device)  # warm-up
            (t1, m1, n1), (t2, m2, n2) = (run_once(name, s, net, est, y, a.device) for s in a.steps)
            per_step = (t2 - t1) / (a.steps[1] - a.steps[0])
            full = FULL_STEPS[name]
            nfe_per_step = (n2 - n1) / (a.steps[1] - a.steps[0])
            print(f"| {name} ({full} steps) | {b} | {nfe_per_step:.0f} | {per_step:.4f} | {b / (per_step * full):.3f} | "
                  f"{m1:.0f} / {m2:.0f}{' GROWS' if m2 > m1 * 1.05 + 1 else ''} |")


if __name__ == "__main__":
    main()
