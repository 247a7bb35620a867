"""How HeunPC's corrector settings trade exact-score accuracy for consistency on a trained network.

    .venv/bin/python -m benchmarks.heunpc_sweep --ckpt runs/quickstart/checkpoints/last.ckpt
        [--images 4] [--draws 4] [--snr 0.4 0.5 0.55 0.6] [--correctors lm euler]

For each (corrector, snr) of `msdiff.samplers.HeunPC` (8 Heun + 42 PC steps, 100 evaluations):
the relative covariance error and W2 of 2,000 x 4 draws on the exact VE and VP Gaussian fields
(`gaussian_samplers.py`'s problem; PC-1000 is in the "gaussian" table of RESULTS.md), and the
consistency PSNR, PSNR and diversity on the checkpoint (same conditions and seed as
`run.py --only ckpt`). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


import torch

from benchmarks import gaussian_samplers as gs
from msdiff.gaussian import GaussianField, GaussianInverseProblem
from msdiff.samplers import HeunPC
from msdiff.sde import VESDE, VPSDE
from msdiff.utils import make_generator


def checkpoint_metrics(ckpt: str, images: int, draws: int):
    """A function sampler -> (consistency dB, PSNR dB, diversity) on the checkpoint's test split."""
    from msdiff.metrics import diversity
    from msdiff.run import TrainedRun
    from msdiff.utils import quantize

    trained = TrainedRun.open(ckpt)
    system, test = trained.system(), trained.split("test")
    items = [test[i] for i in range(images)]
    x = torch.stack([it["x"] for it in items]).repeat(draws, 1, 1, 1)
    y = torch.stack([it["y"] for it in items]).repeat(draws, 1, 1, 1)

    def measure(sampler) -> tuple[float, float, float]:
        with torch.no_grad():
            q = quantize(system.sample(y, sampler, generator=torch.Generator().manual_seed(0)))
        psnr = -10 * torch.log10((q - x).square().flatten(1).mean(1).clamp_min(1e-10))
        div = diversity(q.reshape(draws, images, *q.shape[1:])).mean()
        return float(dm.task.consistency(q, y).mean()), float(psnr.mean()), float(div)

    return measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="a quickstart checkpoint (omit: Gaussian columns only)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--snr", type=float, nargs="+", default=[0.4, 0.5, 0.55, 0.6])
    p.add_argument("--correctors", nargs="+", default=["lm", "euler"], choices=["lm", "euler"])
    a = p.parse_args()
    problem = GaussianInverseProblem.super_resolution(GaussianField(1, 4, length_scale=1.5), 2, noise_std=0.05)
    y = problem.sample(4, make_generator(0))[1]
    measure = checkpoint_metrics(a.ckpt, a.images, a.draws) if a.ckpt else None
    print("| corrector | snr | VE cov err | VE W2 | VP cov err | VP W2 | consistency dB | PSNR dB | diversity | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for corrector in a.correctors:
        for snr in a.snr:
            t0 = time.perf_counter()
            sampler = HeunPC(snr=snr, corrector=corrector)
            cells = []
            for sde in (VESDE(0.01, 50.0), VPSDE(0.1, 20.0)):
                e = gs.monte_carlo(sampler, sde, problem, y, 2000)
                cells += [f"{float(e['cov_error']):.4f}", f"{float(e['w2']):.4f}"]
            cells += [f"{v:.2f}" for v in measure(sampler)] if measure else ["", "", ""]
            print(f"| {corrector} | {snr:g} | " + " | ".join(cells) + f" | {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
