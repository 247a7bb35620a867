"""Is a trained checkpoint's output convincing? PSNR, consistency and the speckle statistic.

    python -m benchmarks.quickstart_quality --ckpt runs/quickstart/checkpoints/last.ckpt
        [--samplers+ Heun --samplers.steps 13] [--conditions 16] [--split test] [--png runs/quickstart_grid.png]

The checkpoint's EMA network (`msdiff.run.TrainedRun.sample`) samples `--conditions` evenly spaced
examples of its data's `--split`, one draw each (noise seed 1000), with each sampler: by default
sample.py's (PredictorCorrector: reverse diffusion + Langevin, 1,000 steps, 2,000 evaluations) and
the validation grids' HeunPC (100 evaluations); `--samplers+ CLASS` adds any `msdiff.samplers`
class (its arguments as `--samplers.KEY VALUE`), `--samplers '[...]'` replaces the list. Reported per sampler: PSNR against x,
consistency (the task's PSNR between A(sample) and y), and the total-variation ratio: the mean
total variation of the samples over that of the real images x (1.0 = the data's texture; >> 1 is
pixel speckle, << 1 washed out). `--png` writes [y | one sample per sampler | x] rows.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser

from benchmarks.common import environment
from benchmarks.fmnist import conditions, evaluate
from msdiff.images import sample_grid, write_png
from msdiff.run import TrainedRun
from msdiff.samplers import REFERENCE_SAMPLER, Sampler
from msdiff.train_feedback import describe

#: sample.py's default (the reference PC, 2,000 evaluations) and the validation grids' HeunPC (100)
DEFAULT_SAMPLERS = [REFERENCE_SAMPLER, {"class_path": "msdiff.samplers.HeunPC"}]


def main(argv: Optional[list[str]] = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], exit_on_error=False)
    p.add_argument("--ckpt", type=str, required=True)
    p.add_argument("--samplers", type=list[Sampler], default=DEFAULT_SAMPLERS,
                   help="msdiff.samplers classes; --samplers+ CLASS [--samplers.KEY V] adds one to the default two")
    p.add_argument("--conditions", type=int, default=16)
    p.add_argument("--split", type=str, default="test")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--png", type=Optional[str], default=None)
    args = p.instantiate(p.parse_args(argv))
    torch.set_num_threads(args.threads)
    trained = TrainedRun.open(args.ckpt)
    batch, task = conditions(trained, args.conditions, args.split)
    env = environment("cpu")
    print(f"{args.ckpt} (step {trained.step}), {args.conditions} {args.split} conditions x 1 draw; {env['date']}; "
          f"{env['cpu']}; load {env['load_average']}; commit {env['commit']}\n")
    print("| sampler | network evaluations | PSNR dB | consistency dB | total variation vs data | s |")
    print("|---|---|---|---|---|---|")
    shown = []
    for sampler in args.samplers:
        t0 = time.perf_counter()
        s = trained.sample(batch["y"], sampler, seed=1000)[0]
        m = evaluate(s[None], batch["x"], batch["y"], task, batch.get("mask"))
        print(f"| {describe(sampler)} | {sampler.nfe} | {m['psnr']:.2f} | {m['consistency']:.2f} | {m['tv_ratio']:.2f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
        shown.append(s[:8])
    if args.png:
        grid = sample_grid(batch["y"][:8], torch.stack(shown), batch["x"][:8])
        write_png(F.interpolate(grid[None], scale_factor=2, mode="nearest")[0], args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
