"""The estimators compared on real images: Fashion-MNIST 4x SR, inpainting and footwear edges -> shoe.

    python data/prepare_fashion_mnist.py                      # once
    python -m benchmarks.fmnist [--tasks sr inpaint edges] [--steps 300] [--minutes M]
                                [--conditions 16] [--draws 2] [--sampler heunpc|pc] [--threads 1]

For each task, every estimator config (configs/fmnist_<task>_<estimator>.yaml) is trained with the
same budget and seed by train.py (in this process, into --workdir/<config>; a rerun reuses a run
that already reached the budget and continues a shorter one), then its EMA network samples the
same `--conditions` test images (evenly spaced over the test split; the footwear test split for
edges), `--draws` draws each, with the same sampler and the same noise seeds. Reported, as means
over conditions and draws: PSNR and SSIM against x, consistency (the task's PSNR between A(sample)
and y), diversity (per-pixel std over the draws, 0-255 scale) and the total-variation ratio
(mean TV of the samples / mean TV of the x's; 1 = the data's texture, >> 1 speckle, << 1 blur).
Baselines of y: nearest-neighbour (y itself) and bicubic upsampling for SR; y (hole filled
with 0) for inpainting. The table and one grid PNG per task (rows: y | one draw of each
estimator | x) go to benchmarks/RESULTS.md (the block of this script's markers for this --steps,
so budgets coexist) and benchmarks/fmnist_<task>_<steps>.png.

`--steps` is the budget (equal steps: fair on a shared machine); `--minutes` additionally caps each
training's wall time (Lightning's max_time), which on a shared CPU gives unequal step counts; the
steps actually trained are reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, add_results_arguments, environment, replace_block, results_path

from msdiff.images import sample_grid, write_png
from msdiff.metrics import diversity, psnr, ssim
from msdiff.samplers import HeunPC, PredictorCorrector
from msdiff.run import TrainedRun
from msdiff.systems.score import ScoreSystem
from msdiff.tasks import SuperResolution, Task

TASKS = {"sr": ("fmnist_sr4x", ["cde", "cdiffe", "cmde", "vscmde"]),
         "inpaint": ("fmnist_inpaint", ["cde", "cmde"]),
         "edges": ("fmnist_edges", ["cde", "cmde"])}
TITLES = {"sr": "4x super-resolution (8x8 -> 32x32)", "inpaint": "inpainting (16x16 square hole)",
          "edges": "edges -> shoe (footwear subset)"}
NAMES = {"cde": "CDE", "cdiffe": "CDiffE", "cmde": "CMDE", "vscmde": "VS-CMDE"}
BLOCK = "benchmarks/fmnist.py"  # one RESULTS.md block per budget: "benchmarks/fmnist.py --steps N"


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per image, sum |x[i+1,j]-x[i,j]| + |x[i,j+1]-x[i,j]| over pixels
    and channels, (B, C, H, W) -> (B,)."""
    dv = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)
    dh = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(1)
    return dv + dh


def train(config: str, steps: int, minutes: float | None, workdir: Path, root: str) -> tuple[Path, float]:
    """Train configs/<config>.yaml for `steps` (reach_target_steps of VS-CMDE at 20% of them);
    returns (last.ckpt, wall seconds)."""
    import train as train_py

    args = ["--config", f"{config}.yaml", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(workdir),
            "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--checkpoint.every_n_steps", str(steps),
            "--data.init_args.dataset.init_args.root", root]
    if config.endswith("vscmde"):
        args += ["--model.init_args.estimator.init_args.reach_target_steps", str(max(1, steps // 5))]
    if minutes:
        sec = round(minutes * 60)
        args += ["--trainer.max_time", f"00:{sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}"]
    t0 = time.perf_counter()
    if train_py.main(args) != 0:
        raise RuntimeError(f"train.py failed for {config}")
    return workdir / config / "checkpoints" / "last.ckpt", time.perf_counter() - t0


def conditions(trained: TrainedRun, n: int, split: str = "test") -> tuple[dict[str, torch.Tensor], Task]:
    """n evenly spaced examples of a split (default test) of the run's data, and its task."""
    ds = trained.split(split)
    idx = torch.linspace(0, len(ds) - 1, n).round().long().tolist()
    items = [ds[i] for i in idx]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "index"}
    return batch, ds.task


def per_sample(samples: torch.Tensor, x: torch.Tensor, y: torch.Tensor, task: Task,
               mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat samples (K * B, C, H, W), PSNR against x, consistency with y) of samples (K, B, C, H, W)."""
    k = samples.shape[0]
    flat, m_rep = samples.flatten(0, 1), None if mask is None else mask.repeat(k, 1, 1, 1)
    return flat, psnr(flat, x.repeat(k, 1, 1, 1)), task.consistency(flat, y.repeat(k, 1, 1, 1), m_rep)


def evaluate(samples: torch.Tensor, x: torch.Tensor, y: torch.Tensor, task: Task, mask: torch.Tensor | None) -> dict:
    """Means over conditions and draws of samples (K, B, C, H, W)."""
    flat, psnrs, consistencies = per_sample(samples, x, y, task, mask)
    out = {"psnr": psnrs.mean().item(), "ssim": ssim(flat, x.repeat(samples.shape[0], 1, 1, 1)).mean().item(),
           "consistency": consistencies.mean().item(),
           "tv_ratio": (total_variation(flat).mean() / total_variation(x).mean()).item()}
    out["diversity"] = diversity(samples).mean().item() if samples.shape[0] > 1 else float("nan")
    return out


def standard_errors(samples: torch.Tensor, x: torch.Tensor, y: torch.Tensor, task: Task,
                    mask: torch.Tensor | None) -> dict:
    """Standard errors of `evaluate`'s means from the spread of their terms (std / sqrt(count)): PSNR and
    consistency over the K x B samples, diversity over the B conditions (relative to its mean). Two
    independent runs' means differ by about sqrt(2) times this."""
    _, psnrs, consistencies = per_sample(samples, x, y, task, mask)
    out = {f"{name}_se": (v.double().std() / len(v) ** 0.5).item()
           for name, v in (("psnr", psnrs), ("consistency", consistencies))}
    div = diversity(samples)
    out["diversity_se"] = (div.std() / len(div) ** 0.5 / div.mean()).item()
    return out


def baselines(task: Task, batch: dict) -> dict[str, torch.Tensor]:
    """Non-learned reconstructions from y alone."""
    y = batch["y"]
    if isinstance(task, SuperResolution):
        low = task.low_res(y)
        bicubic = F.interpolate(low, size=y.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        return {"nearest-neighbour upsampling of y": y, "bicubic upsampling of y": bicubic}
    if "mask" in batch:
        return {"y (hole filled with 0)": y}
    return {}


def run_task(key: str, args, workdir: Path, sampler) -> tuple[str, dict]:
    prefix, estimators = TASKS[key]
    rows, grid_samples, batch, task, info = [], [], None, None, {}
    for est in estimators:
        config = f"{prefix}_{est}"
        ckpt, wall = train(config, args.steps, args.minutes, workdir, args.root)
        trained = TrainedRun.open(ckpt)
        system: ScoreSystem = trained.system()
        step = trained.step
        if batch is None:
            batch, task = conditions(trained, args.conditions)
        draws, t0 = [], time.perf_counter()
        for d in range(args.draws):
            g = torch.Generator().manual_seed(1000 + d)  # the same noise for every estimator
            draws.append(system.sample(batch["y"], sampler, generator=g))
        t_sample = time.perf_counter() - t0
        samples = torch.stack(draws)
        grid_samples.append(samples[0, : args.grid])
        rows.append((NAMES[est], step, wall, t_sample, evaluate(samples, batch["x"], batch["y"], task, batch.get("mask"))))
        print(f"{config}: {step} steps in {wall:.0f} s, {rows[-1][-1]}", flush=True)
    base = [(name, evaluate(b[None], batch["x"], batch["y"], task, batch.get("mask")))
            for name, b in baselines(task, batch).items()]
    png = Path(args.out) / f"fmnist_{key}_{args.steps}.png"
    grid = sample_grid(batch["y"][: args.grid], torch.stack(grid_samples), batch["x"][: args.grid])
    write_png(F.interpolate(grid[None], scale_factor=2, mode="nearest")[0], png)
    info.update(rows=rows, base=base, png=png.name)
    return key, info


def fmt(v: float, digits: int = 2) -> str:
    return "-" if v != v else f"{v:.{digits}f}"


def table(key: str, info: dict, args) -> str:
    lines = [f"### {TITLES[key]}", "",
             "| method | steps | train s | sample s | PSNR dB | SSIM | consistency dB | diversity | TV ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, step, wall, t_sample, m in info["rows"]:
        lines.append(f"| {name} | {step} | {wall:.0f} | {t_sample:.0f} | {fmt(m['psnr'])} | {fmt(m['ssim'], 3)} | "
                     f"{fmt(m['consistency'])} | {fmt(m['diversity'], 1)} | {fmt(m['tv_ratio'])} |")
    for name, m in info["base"]:
        lines.append(f"| {name} | - | - | - | {fmt(m['psnr'])} | {fmt(m['ssim'], 3)} | {fmt(m['consistency'])} | - | "
                     f"{fmt(m['tv_ratio'])} |")
    cols = " | ".join(["y"] + [r[0] for r in info["rows"]] + ["x"])
    lines += ["", f"![{TITLES[key]}]({info['png']}) (first {args.grid} conditions, one draw each; columns: {cols})", ""]
    return "\n".join(lines)


def verdict(results: dict) -> str:
    """The paper's qualitative claim checked against these numbers (within 0.5 dB = 'about equal'; with
    16 conditions x 2 draws smaller differences are not resolved)."""
    out = []
    for key, info in results.items():
        m = {name: met for name, _, _, _, met in info["rows"]}
        if "CDE" in m and "CMDE" in m:
            d = m["CMDE"]["psnr"] - m["CDE"]["psnr"]
            out.append(f"{TITLES[key]}: CMDE - CDE = {d:+.2f} dB PSNR "
                       f"({'about equal' if abs(d) <= 0.5 else 'not equal'} at this budget)")
        if "CDiffE" in m:
            better = all(m[k]["psnr"] > m["CDiffE"]["psnr"] for k in ("CDE", "CMDE"))
            out.append(f"{TITLES[key]}: CDE and CMDE {'both beat' if better else 'do not both beat'} CDiffE in PSNR "
                       f"({m['CDE']['psnr']:.2f}, {m['CMDE']['psnr']:.2f} vs {m['CDiffE']['psnr']:.2f} dB)")
        if "VS-CMDE" in m:
            dq, dc = m["VS-CMDE"]["psnr"] - m["CMDE"]["psnr"], m["VS-CMDE"]["consistency"] - m["CMDE"]["consistency"]
            trade = dq <= 0 and dc >= 0.5  # a consistency gain this small sample resolves
            out.append(f"{TITLES[key]}: VS-CMDE vs CMDE: {dq:+.2f} dB PSNR, {dc:+.2f} dB consistency "
                       f"({'the claimed trade' if trade else 'not the claimed trade: no consistency gain of 0.5 dB or more' if dc < 0.5 else 'not the claimed trade: no loss of quality'})")
    return "\n".join(f"- {line}" for line in out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--steps", type=int, default=300, help="training steps per estimator (default 300)")
    p.add_argument("--minutes", type=float, default=None, help="also cap each training at this wall time")
    p.add_argument("--conditions", type=int, default=16)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--grid", type=int, default=8, help="conditions shown in the grid PNG")
    p.add_argument("--sampler", choices=["heunpc", "pc"], default="heunpc")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: one core per training run)")
    p.add_argument("--root", default="data/fashion_mnist")
    p.add_argument("--workdir", default="runs/bench_fmnist")
    p.add_argument("--out", default=None, help="folder of the grid PNGs (default: that of the results file)")
    add_results_arguments(p)
    args = p.parse_args(argv)
    try:
        args.output = results_path(args.output, args.update_results)
    except ValueError as e:
        p.error(str(e))
    args.out = args.out or str(args.output.parent)
    if args.steps < 1 or args.draws < 1 or args.conditions < 1:
        p.error("--steps, --draws and --conditions must be positive")
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    sampler = HeunPC() if args.sampler == "heunpc" else PredictorCorrector()
    nfe = "100 evaluations" if args.sampler == "heunpc" else "2,000 evaluations"
    results, t0 = {}, time.perf_counter()
    for key in args.tasks:
        k, info = run_task(key, args, Path(args.workdir), sampler)
        results[k] = info
    env = environment("cpu")
    cmd = "python -m benchmarks.fmnist " + " ".join(argv if argv is not None else sys.argv[1:])
    block = f"{BLOCK} --steps {args.steps}"
    head = (f"## Fashion-MNIST: the estimators on real images, {args.steps} steps ({BLOCK})\n\n"
            f"Generated by `{cmd}` (total {time.perf_counter() - t0:.0f} s); date {env['date']}; {env['cpu']}; "
            f"load average at the end {env['load_average']}; torch {env['torch']}; commit {env['commit']}. "
            "The machine was shared with other developers' jobs: wall times are pessimistic and noisy.\n\n"
            f"Budget: {args.steps} training steps of batch 16 per estimator"
            f"{f', capped at {args.minutes} min each' if args.minutes else ''}, seed 0, the configs' recipe "
            f"(U-Net ch 32, lr 1e-3, EMA 0.99, EDM preconditioning). Sampling: {args.sampler} ({nfe}), "
            f"{args.conditions} test conditions x {args.draws} draws, noise seeds 1000+draw for every estimator. "
            "PSNR/SSIM against x, consistency = PSNR(A(sample), y), diversity = per-pixel std over draws "
            "(0-255), TV ratio = mean total variation of the samples / of the x's.\n")
    claim = ("The paper's claim (Batzolis et al.): CMDE performs about as well as CDE, both better than CDiffE; "
             "VS-CMDE trades a little quality for consistency. At this budget:\n\n" + verdict(results))
    body = head + "\n" + "\n".join(table(k, v, args) for k, v in results.items()) + "\n" + claim + "\n"
    path = args.output
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    path.write_text(replace_block(text, block, body, after_title=False))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
