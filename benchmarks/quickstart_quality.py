"""Is a trained checkpoint's output convincing? PSNR, consistency and the speckle statistic.

    python benchmarks/quickstart_quality.py --ckpt runs/quickstart/checkpoints/last.ckpt
        [--samplers pc heunpc heun] [--conditions 16] [--split test] [--png benchmarks/quickstart_grid.png]

The checkpoint's EMA network samples `--conditions` evenly spaced examples of its data's `--split`,
one draw each (noise seed 1000), with each sampler: `pc` = sample.py's default (reverse diffusion +
Langevin, 1,000 steps, 2,000 evaluations), `heunpc` = the validation grids' sampler (100
evaluations), `heun` = Heun with 13 steps (25 evaluations). Reported per sampler: PSNR against x,
consistency (the task's PSNR between A(sample) and y), and the total-variation ratio: the mean
total variation of the samples over that of the real images x (1.0 = the data's texture; >> 1 is
pixel speckle, << 1 washed out). `--png` writes [y | one sample per sampler | x] rows.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import environment  # noqa: I001 (benchmarks/ is on sys.path)
from fmnist import conditions, evaluate

from msdiff.images import sample_grid, write_png
from msdiff.samplers import Heun, HeunPC, PredictorCorrector
from msdiff.run import TrainedRun

SAMPLERS = {"pc": (lambda: PredictorCorrector(), 2000), "heunpc": (lambda: HeunPC(), 100),
            "heun": (lambda: Heun(steps=13), 25)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=["pc", "heunpc"])
    p.add_argument("--conditions", type=int, default=16)
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    trained = TrainedRun.open(args.ckpt)
    system, step = trained.system(), trained.step
    batch, task = conditions(Path(args.ckpt), args.conditions, args.split)
    env = environment("cpu")
    print(f"{args.ckpt} (step {step}), {args.conditions} {args.split} conditions x 1 draw; {env['date']}; "
          f"{env['cpu']}; load {env['load_average']}; commit {env['commit']}\n")
    print("| sampler | network evaluations | PSNR dB | consistency dB | total variation vs data | s |")
    print("|---|---|---|---|---|---|")
    shown = []
    for name in args.samplers:
        make, nfe = SAMPLERS[name]
        t0 = time.perf_counter()
        s = system.sample(batch["y"], make(), generator=torch.Generator().manual_seed(1000))
        m = evaluate(s[None], batch["x"], batch["y"], task, batch.get("mask"))
        print(f"| {name} | {nfe} | {m['psnr']:.2f} | {m['consistency']:.2f} | {m['tv_ratio']:.2f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
        shown.append(s[:8])
    if args.png:
        grid = sample_grid(batch["y"][:8], torch.stack(shown), batch["x"][:8])
        write_png(F.interpolate(grid[None], scale_factor=2, mode="nearest")[0], args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
