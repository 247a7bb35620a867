"""Attention guidance benchmark (issue 8): ASAG, PAG, SEG and CFG swept over their scale.

(a) Gaussian field (msdiff.gaussian): 1 x 8 x 8 field, x2 super-resolution with noise 0.05, where the
    exact posterior is known. A tiny U-Net (ch 32, levels 8 and 4, attention at 4x4 and in the middle)
    is trained briefly from scratch with CDE (p_uncond = 0.1, so CFG applies to the same network) and
    with CMDE. Each configuration samples K draws for each of B conditions with DDIM (eta = 0) and is
    scored by msdiff.gaussian.posterior_error (relative mean / covariance error of x - E[x|y], W2),
    the spread (mean per-pixel std of the draws over the exact posterior std: 1 is right, < 1 means
    the draws collapse) and the measurement RMSE |A x - y| (the exact posterior gives ~ its own value).
    References: exact posterior draws (Monte-Carlo floor), the exact score with the same sampler
    (sampler floor), and CFG on exact scores (prior score as s_u) to show what CFG does to a perfect
    model. A CMDE ablation draws y_t independently for the perturbed branch (what sharing y_t avoids).
(b) A trained checkpoint (--ckpt, else every runs/quickstart*/**/last.ckpt): ASAG and PAG at each scale of
    QS_SCALES and SEG 3.0, on the middle block and on every attention layer, with HeunPC shrunk to --qs-nfe
    evaluations; PSNR, consistency, TV ratio and diversity (benchmarks.fmnist.evaluate) of --qs-draws draws
    of --qs-conditions test conditions, an unguided row at another noise seed (the noise floor), and with
    --grid a PNG with one row of samples per setting. Skipped with a message when no checkpoint exists.
Cost: network evaluations per sampler step (in units of the batch; batched guidance runs them as ONE
call of that many times the batch) and seconds per sampling run, measured with 1 CPU thread.

Usage: .venv/bin/python -m benchmarks.guidance_sweep [--train-steps 400] [--conditions 8] [--draws 16]
       [--steps 20] [--skip-gaussian] [--skip-quickstart] [--ckpt PATH] [--qs-conditions 16] [--qs-draws 2]
       [--qs-nfe 50] [--grid PNG] [--json FILE]
Prints markdown tables (section "## Attention guidance (ASAG, PAG, SEG, CFG)" of benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from msdiff.estimators import CDE, CMDE
from msdiff.gaussian import GaussianField, GaussianInverseProblem, posterior_error
from msdiff.guidance import ASAG, CFG, PAG, SEG
from msdiff.nn.attention import ASAGProcessor, swap_attention_processors
from msdiff.nn.unet import UNet
from msdiff.samplers import DDIM
from msdiff.sde import VESDE, MultiSpeedSDE
from msdiff.utils import make_generator

SCALES = (0.5, 1.5, 3.0)
QS_SCALES = (1.5, 3.0, 6.0)
CFG_SCALES = (1.5, 3.0)


def attention_methods():
    """(label, guidance) rows shared by both estimators."""
    rows = [("none", None)]
    for s in SCALES:
        rows += [(f"ASAG {s}", ASAG(scale=s)), (f"PAG {s}", PAG(scale=s)), (f"SEG {s}", SEG(scale=s))]
    return rows


# ---- (a) Gaussian field -------------------------------------------------------------------------
def train(est, problem, steps: int, seed: int) -> UNet:
    torch.manual_seed(seed)
    net = UNet(in_channels=2, out_channels=est.out_channels(1, 1), ch=32, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), image_size=8, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = make_generator(seed)
    t0, running = time.perf_counter(), None
    for _ in range(steps):
        x, y = problem.sample(128, g)
        loss = est.loss(net, x, y, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
    print(f"  trained {type(est).__name__}: {steps} steps in {time.perf_counter() - t0:.0f} s, loss ~ {running:.3f}",
          file=sys.stderr)
    return net.eval()


def independent_draw_asag(est, net, y, g, scale: float):
    """Ablation: s from one y_t draw, s_perturbed from ANOTHER (what AttentionGuidance avoids)."""
    plain = est.score_fn(net, y, g)

    def score(x, t):
        s = plain(x, t)
        with swap_attention_processors(net, ASAGProcessor(2), "mid"):
            s_p = plain(x, t)
        return s + scale * (s - s_p)

    return score


def evaluate(problem, y, samples_fn, K: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        s = samples_fn()
    seconds = time.perf_counter() - t0
    s = s.reshape(K, y.shape[0], *problem.shape)
    err = posterior_error(s, y, problem)
    post_std = problem.posterior(y[:1])[1].diagonal().sqrt().mean()
    err["spread"] = float(s.double().std(0).mean() / post_std)
    err["rmse"] = float((problem.apply(s.reshape(-1, *problem.shape)) - y.repeat(K, 1, 1, 1)).pow(2).mean().sqrt())
    return err, seconds


def gaussian(args) -> None:
    field = GaussianField(channels=1, size=8)
    problem = GaussianInverseProblem.super_resolution(field, factor=2, noise_std=0.05)
    ve = VESDE(0.01, 10.0)
    B, K = args.conditions, args.draws
    _, y = problem.sample(B, make_generator(123))
    yK = y.repeat(K, 1, 1, 1)                       # draw k of condition i at row k * B + i
    sampler = DDIM(steps=args.steps, eta=0.0)
    x_T = ve.prior_sampling(yK.shape, generator=make_generator(7))

    def run(score_fn):
        return sampler(score_fn, ve, x_T, make_generator(8))

    header = ("| estimator | guidance | net evals / step | s / run | mean err | cov err | W2 | spread | RMSE A x - y |\n"
              "|---|---|---|---|---|---|---|---|---|")
    rows = []

    def add(est_name, label, evals, fn):
        err, sec = evaluate(problem, y, fn, K)
        rows.append(f"| {est_name} | {label} | {evals} | {sec:.1f} | {err['mean_error']:.3f} | {err['cov_error']:.3f} | "
                    f"{err['w2']:.3f} | {err['spread']:.2f} | {err['rmse']:.4f} |")
        print(rows[-1], file=sys.stderr)

    def exact_posterior():
        m, P = problem.posterior(yK)
        L = torch.linalg.cholesky(P)
        z = torch.randn(yK.shape[0], problem.dim, generator=make_generator(9), dtype=torch.float64)
        return (m.reshape(yK.shape[0], -1) + z @ L.T).float()

    def exact_score(w: float):
        def score(x, t):
            s_c = problem.conditional_score(x, yK, t, ve)
            return s_c if w == 1.0 else field.score(x, t, ve) + w * (s_c - field.score(x, t, ve))
        return score

    add("exact", "posterior draws (MC floor)", 0, exact_posterior)
    add("exact", "exact score (sampler floor)", 1, lambda: run(exact_score(1.0)))
    for w in CFG_SCALES:
        add("exact", f"CFG {w} (exact s_u, s_c)", 2, lambda w=w: run(exact_score(w)))

    estimators = {"CDE": CDE(ve, p_uncond=0.1), "CMDE": CMDE(MultiSpeedSDE(ve, VESDE(0.01, 0.5)))}
    for name, est in estimators.items():
        net = train(est, problem, args.train_steps, seed=0)
        methods = attention_methods()
        if est.trained_for_cfg:
            methods += [(f"CFG {w}", CFG(scale=w)) for w in CFG_SCALES]
            methods += [("CFG 3.0 + ASAG 1.5", ASAG(scale=1.5, cfg_scale=3.0))]
        for label, guidance in methods:
            evals = 1 if guidance is None else guidance.evaluations
            fn = (est.score_fn if guidance is None else lambda n, yy, g, gd=guidance: gd.score_fn(est, n, yy, g))
            add(name, label, evals, lambda fn=fn: run(fn(net, yK, make_generator(10))))
        if est.y_sde is not None:
            add(name, "ASAG 1.5, independent y_t draws (ablation)", 2,
                lambda: run(independent_draw_asag(est, net, yK, make_generator(10), 1.5)))
        batched, unbatched = ASAG(scale=1.5, batched=True), ASAG(scale=1.5, batched=False)
        for label, gd in (("ASAG 1.5 batched=True", batched), ("ASAG 1.5 batched=False", unbatched)):
            add(name, label, gd.evaluations, lambda gd=gd: run(gd.score_fn(est, net, yK, make_generator(10))))

    print(f"\n### Gaussian field (1x8x8, SR x2, noise 0.05), {B} conditions x {K} draws, DDIM {args.steps} steps, "
          f"eta 0, nets trained {args.train_steps} steps\n")
    print(header)
    print("\n".join(rows))


# ---- (b) quickstart checkpoint ------------------------------------------------------------------
def find_checkpoints(explicit: str | None) -> list[Path]:
    """--ckpt, else every runs/quickstart*/**/last.ckpt (train.py --config quickstart.yaml and variants)."""
    if explicit:
        return [Path(explicit)]
    return sorted((ROOT / "runs").glob("quickstart*/**/last.ckpt")) if (ROOT / "runs").is_dir() else []


def quickstart(args) -> None:
    ckpts = [c for c in find_checkpoints(args.ckpt) if c.is_file()]
    if not ckpts:
        print("\n### Quickstart checkpoint: skipped (no runs/quickstart*/**/last.ckpt; train one with "
              "`python train.py --config quickstart.yaml`, or pass --ckpt)\n")
    for ckpt in ckpts:
        quickstart_one(args, ckpt)


def quickstart_methods() -> list[tuple[str, object]]:
    """(label, guidance) rows of the checkpoint sweep: each attention guidance's scale, on the middle block
    (the default layers) and on every attention layer."""
    rows: list[tuple[str, object]] = [("none", None)]
    for layers, where in ((("mid",), "mid"), (("down", "mid", "up"), "all layers")):
        for scale in QS_SCALES:
            rows += [(f"ASAG {scale}, {where}", ASAG(scale=scale, layers=layers)),
                     (f"PAG {scale}, {where}", PAG(scale=scale, layers=layers))]
        rows.append((f"SEG 3.0, {where}", SEG(scale=3.0, layers=layers)))
    return rows


def quickstart_one(args, ckpt: Path) -> None:
    """The sweep on a trained checkpoint with the few-step sampler of the frontier (HeunPC at --qs-nfe
    evaluations per score call): PSNR, consistency, TV ratio and diversity of `benchmarks.fmnist.evaluate`,
    the same conditions and noise streams for every row, and a picture (--grid) with one row per setting."""
    from torchvision.utils import save_image

    from benchmarks.fmnist import conditions, evaluate
    from benchmarks.sampler_frontier import heunpc_budget
    from msdiff.run import TrainedRun

    trained = TrainedRun.open(ckpt)
    batch, task = conditions(trained, args.qs_conditions)
    K, sampler = args.qs_draws, heunpc_budget(args.qs_nfe)
    name = ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt
    print(f"\n### `{name}` (step {trained.step}), {args.qs_conditions} test conditions x {K} draws, "
          f"HeunPC at {sampler.nfe} evaluations per score call\n")
    print("| guidance | net evals / call | s / run | PSNR dB | consistency dB | TV ratio | diversity | dPSNR | dcons. "
          "| ddiv. |\n|---|---|---|---|---|---|---|---|---|---|")
    rows, pictures, base = [], [], None
    runs = [(label, gd, 0) for label, gd in quickstart_methods()]
    runs.insert(1, ("none, another noise seed (noise floor)", None, 1))
    for label, gd, seed in runs:
        t0 = time.perf_counter()
        s = trained.sample(batch["y"], sampler, draws=K, seed=seed, guidance=gd, mask=batch.get("mask"))
        sec = time.perf_counter() - t0
        m = evaluate(s, batch["x"], batch["y"], task, batch.get("mask"))
        base = base or m
        rows.append({"guidance": label, "evaluations": 1 if gd is None else gd.evaluations, "seconds": sec, **m})
        print(f"| {label} | {rows[-1]['evaluations']} | {sec:.0f} | {m['psnr']:.2f} | {m['consistency']:.2f} | "
              f"{m['tv_ratio']:.2f} | {m['diversity']:.2f} | {m['psnr'] - base['psnr']:+.2f} | "
              f"{m['consistency'] - base['consistency']:+.2f} | {m['diversity'] / base['diversity'] - 1:+.0%} |",
              flush=True)
        pictures.append(s[0, :8])
    if args.grid:
        save_image(torch.cat([batch["y"][:8], batch["x"][:8], *pictures]), args.grid, nrow=8, padding=1)
        print(f"\n{args.grid}: rows y, x, then one per guidance row above (draw 0 of the first 8 conditions)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--conditions", type=int, default=8)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-gaussian", action="store_true")
    p.add_argument("--skip-quickstart", action="store_true")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--qs-conditions", type=int, default=16)
    p.add_argument("--qs-draws", type=int, default=2)
    p.add_argument("--qs-nfe", type=int, default=50, help="evaluations of the sampler (HeunPC shrunk to them)")
    p.add_argument("--grid", default=None, help="PNG: one row of samples per guidance setting")
    p.add_argument("--json", default=None, help="the checkpoint sweep's rows as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    if not args.skip_gaussian:
        gaussian(args)
    if not args.skip_quickstart:
        quickstart(args)


if __name__ == "__main__":
    main()
