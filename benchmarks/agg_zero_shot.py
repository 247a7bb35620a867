"""AGG zero-shot inverse problems versus the trained conditional estimator, through sample.py.

On the same test images of the embedded data (msdiff.datasets.Shapes) and one checkpoint, a CDE
trained with condition dropout (so it has both the conditional score and the unconditional one):

* "trained CDE": the conditional estimator sampled normally (DDIM);
* "AGG zero-shot": `--guidance AGG --guidance.consistency true --guidance.prior unconditional`, the
  null-condition score, the task's forward operator and y only (the network never sees y);
* "AGG + conditional prior": the same guidance on the conditional score;
* "input": the condition itself (nearest-upsampled low-res / masked image), for reference.
Inpainting is zero-shot for this SR checkpoint (`--task msdiff.tasks.Inpainting`): no trained baseline.

    python train.py --config quickstart.yaml --name quickstart_cde_cfg \
        --model.init_args.estimator '{"class_path":"msdiff.estimators.CDE","init_args":{"sde":{"class_path":
        "msdiff.sde.VESDE","init_args":{"sigma_min":0.005,"sigma_max":55.426}},"p_uncond":0.2}}' \
        --model.init_args.net.init_args.out_channels 3 --trainer.max_steps 1000
    python benchmarks/agg_zero_shot.py --ckpt_path runs/quickstart_cde_cfg/checkpoints/last.ckpt [--num_images 16]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from msdiff.metrics import psnr, ssim  # noqa: E402
from msdiff.run import TrainedRun  # noqa: E402
from msdiff.utils import quantize  # noqa: E402

AGG_ZS = ["--guidance", "AGG", "--guidance.consistency", "true", "--guidance.prior", "unconditional"]
HALF = ["--guidance.t_start", "0.5"]  # invert only to t = 0.5 (VE std 0.53 instead of 55)
METHODS = {  # name -> (tasks, extra sample.py arguments)
    "trained CDE, DDIM 50": (("sr",), ["--sampler", "DDIM", "--sampler.steps", "50"]),
    "AGG zero-shot, defaults (t_start T, t_edit 20, lambda_reg 200)": (("sr", "inpaint"), AGG_ZS),
    "AGG zero-shot, t_start 0.5, t_edit 20, lambda_reg 200": (("sr", "inpaint"), AGG_ZS + HALF),
    "AGG zero-shot, t_start 0.5, t_edit 60, lambda_reg 0": (("sr", "inpaint"), AGG_ZS + HALF + ["--guidance.t_edit", "60", "--guidance.lambda_reg", "0"]),
    "AGG + conditional prior, t_start 0.5, t_edit 60, lambda_reg 0": (("sr",), ["--guidance", "AGG", "--guidance.consistency", "true", "--guidance.prior", "conditional", "--guidance.t_edit", "60", "--guidance.lambda_reg", "0"] + HALF),
}
TASKS = {"sr": [], "inpaint": ["--task", "msdiff.tasks.Inpainting"]}


def input_baseline(ckpt: str, task_args: list[str], n: int) -> dict:
    """PSNR/SSIM/consistency of the condition itself taken as the answer."""
    trained, override = TrainedRun.open(ckpt), (task_args[1] if task_args else None)
    dataset, task = trained.split("test", override), trained.task(override)
    items = [dataset[i] for i in range(n)]
    x = quantize(torch.stack([it["x"] for it in items]))
    y = quantize(torch.stack([it["y"] for it in items]))
    mask = torch.stack([it["mask"] for it in items]) if "mask" in items[0] else None
    return {"consistency": float(task.consistency(y, y, mask=mask).clamp(max=100).mean()), "psnr": float(psnr(y, x).mean()),
            "ssim": float(ssim(y, x).mean()), "s_per_image": 0.0, "nfe": 0}


def run_method(ckpt: str, out: Path, task_args: list[str], extra: list[str], n: int) -> dict:
    argv = ["sample.py", "--ckpt_path", ckpt, "--output_dir", str(out), "--overwrite", "true", "--num_images", str(n), "--draws", "1",
            "--batch_size", str(n), *task_args, *extra]
    old, sys.argv = sys.argv, argv
    try:
        sample.main()
    finally:
        sys.argv = old
    r = json.loads((out / "metrics.json").read_text())
    m, s = r["metrics"], r["settings"]
    return {"consistency": m["consistency"], "psnr": m["psnr"], "ssim": m["ssim"],
            "s_per_image": s["seconds"] / n, "nfe": s["nfe_per_sample"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--num_images", type=int, default=16)
    p.add_argument("--output_dir", default="runs/agg_zero_shot")
    a = p.parse_args()
    rows = []
    for task, task_args in TASKS.items():
        rows.append((task, "input (the condition itself)", input_baseline(a.ckpt_path, task_args, a.num_images)))
        for i, (name, (tasks, extra)) in enumerate(METHODS.items()):
            if task in tasks:
                rows.append((task, name, run_method(a.ckpt_path, Path(a.output_dir) / f"{task}{i}", task_args, extra, a.num_images)))
    print("| task | method | consistency PSNR | PSNR | SSIM | NFE/sample | s/image |")
    print("|---|---|---|---|---|---|---|")
    def f(v, fmt: str) -> str:
        return "n/a (non-finite samples)" if v is None else format(v, fmt)

    for task, name, r in rows:
        print(f"| {task} | {name} | {f(r['consistency'], '.2f')} | {f(r['psnr'], '.2f')} | {f(r['ssim'], '.3f')} | "
              f"{r['nfe']} | {r['s_per_image']:.2f} |")


if __name__ == "__main__":
    main()
