"""AGG zero-shot inverse problems versus the trained conditional estimator (msdiff.run.TrainedRun).

On the same test images of the embedded data (msdiff.datasets.Shapes) and one checkpoint, a CDE
trained with condition dropout (so it has both the conditional score and the unconditional one):

* "trained CDE": the conditional estimator sampled normally (DDIM);
* "AGG zero-shot": `AGG(consistency=True, prior="unconditional")` (sample.py's `--guidance AGG
  --guidance.consistency true --guidance.prior unconditional`), the null-condition score, the task's
  forward operator and y only (the network never sees y);
* "AGG + conditional prior": the same guidance on the conditional score;
* "input": the condition itself (nearest-upsampled low-res / masked image), for reference.
Inpainting is zero-shot for this SR checkpoint (the task msdiff.tasks.Inpainting): no trained baseline.
Every draw is `TrainedRun.sample` (sample.py's noise streams) and is scored by sample.py's metrics.

    python train.py --config quickstart.yaml --name quickstart_cde_cfg \
        --model.init_args.estimator '{"class_path":"msdiff.estimators.CDE","init_args":{"sde":{"class_path":
        "msdiff.sde.VESDE","init_args":{"sigma_min":0.005,"sigma_max":55.426}},"p_uncond":0.2}}' \
        --model.init_args.net.init_args.out_channels 3 --trainer.max_steps 1000
    python -m benchmarks.agg_zero_shot --ckpt_path runs/quickstart_cde_cfg/checkpoints/last.ckpt [--num_images 16]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Optional

import torch

from msdiff.guidance import AGG, Guidance
from msdiff.metrics import ConditionalSampleMetrics, psnr, ssim
from msdiff.run import TrainedRun
from msdiff.samplers import DDIM
from msdiff.utils import quantize


def agg(**options) -> Callable[[], AGG]:
    """AGG solving the task from y through its forward operator (`consistency`), with these options."""
    return lambda: AGG(consistency=True, **options)


#: (label, tasks, guidance or None for the trained estimator alone); every draw uses DDIM 50 where a sampler runs
METHODS: list[tuple[str, tuple[str, ...], Optional[Callable[[], Guidance]]]] = [
    ("trained CDE, DDIM 50", ("sr",), None),
    ("AGG zero-shot, t_start T, t_edit 20, lambda_reg 200", ("sr", "inpaint"), agg(prior="unconditional", t_start=None)),
    ("AGG zero-shot, t_start 0.5, t_edit 20, lambda_reg 200", ("sr", "inpaint"), agg(prior="unconditional", t_start=0.5)),
    ("AGG zero-shot, t_start 0.5, t_edit 60, lambda_reg 0", ("sr", "inpaint"),
     agg(prior="unconditional", t_start=0.5, t_edit=60, lambda_reg=0.0)),
    ("AGG + conditional prior, t_start 0.5, t_edit 60, lambda_reg 0", ("sr",),
     agg(prior="conditional", t_start=0.5, t_edit=60, lambda_reg=0.0)),
]
TASKS = {"sr": None, "inpaint": "msdiff.tasks.Inpainting"}  # the --task of each inverse problem


def batch(trained: TrainedRun, task: Optional[str], n: int) -> dict[str, torch.Tensor]:
    """The first n test items with the task's measurement y (and mask)."""
    dataset = trained.split("test", task)
    items = [dataset[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in ("x", "y", "mask") if k in items[0]}


def input_baseline(trained: TrainedRun, task: Optional[str], n: int) -> dict:
    """PSNR/SSIM/consistency of the condition itself taken as the answer."""
    b, t = batch(trained, task, n), trained.task(task)
    x, y, mask = quantize(b["x"]), quantize(b["y"]), b.get("mask")
    return {"consistency": float(t.consistency(y, y, mask=mask).clamp(max=100).mean()), "psnr": float(psnr(y, x).mean()),
            "ssim": float(ssim(y, x).mean()), "s_per_image": 0.0, "nfe": 0}


def run_method(trained: TrainedRun, task: Optional[str], guidance: Optional[Guidance], n: int) -> dict:
    """One draw per condition (TrainedRun.sample: sample.py's noise streams), scored as sample.py scores it."""
    b, t, sampler = batch(trained, task, n), trained.task(task), DDIM(steps=50)
    t0 = time.perf_counter()
    draws = trained.sample(b["y"], sampler, guidance=guidance, mask=b.get("mask"), task=t)
    seconds = time.perf_counter() - t0
    metrics = ConditionalSampleMetrics(task=t, draws=1)
    metrics.update(draws, b["y"].float(), b["x"].float(), mask=b.get("mask"))
    m = metrics.compute()
    return {"consistency": m["consistency"], "psnr": m["psnr"], "ssim": m["ssim"], "s_per_image": seconds / n,
            "nfe": guidance.nfe(sampler) if guidance is not None else sampler.nfe}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--num_images", type=int, default=16)
    a = p.parse_args()
    trained = TrainedRun.open(a.ckpt_path)
    rows = []
    for name, task in TASKS.items():
        rows.append((name, "input (the condition itself)", input_baseline(trained, task, a.num_images)))
        for label, tasks, guidance in METHODS:
            if name in tasks:
                rows.append((name, label, run_method(trained, task, guidance() if guidance else None, a.num_images)))
    print("| task | method | consistency PSNR | PSNR | SSIM | NFE/sample | s/image |")
    print("|---|---|---|---|---|---|---|")
    def f(v, fmt: str) -> str:
        return "n/a (non-finite samples)" if v is None else format(v, fmt)

    for task, name, r in rows:
        print(f"| {task} | {name} | {f(r['consistency'], '.2f')} | {f(r['psnr'], '.2f')} | {f(r['ssim'], '.3f')} | "
              f"{r['nfe']} | {r['s_per_image']:.2f} |")


if __name__ == "__main__":
    main()
