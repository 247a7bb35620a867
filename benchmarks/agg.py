"""AGG benchmark (issue 7): speed at 160x160 and a zero-shot inverse-problem sanity table.

1. Time per image of AGG (steps=60, t_edit=20, 1 Adam step) vs plain DDIM sampling (60 steps) with a
   randomly initialised SR-160 U-Net (msdiff.nn.unet.UNet, 3 -> 3 channels, score = output / s(t)),
   batch 1. A full run is too slow for this CPU, so each kind of step is timed alone (median of
   `--repeats` after one warm-up) and the totals are extrapolated:
       DDIM = 60 plain steps;   AGG = 60 inversion steps + 40 plain steps + 20 guided steps
   (an inversion step costs what a plain step costs: one forward pass, no grad).
2. Zero-shot SR (x2) and inpainting on msdiff.gaussian's Gaussian field: exact prior score + the
   consistency loss ||A x0 - y||^2, source = y (the degraded image), lambda_reg = 0, every step guided,
   eta = 0.8 so that draws differ; compared with exact posterior draws (the Monte-Carlo floor) and with
   AGG without guidance (DDIM inversion + reconstruction of y). Metrics from msdiff.gaussian.posterior_error
   (relative mean / covariance error of the residuals x - E[x|y], W2) and the measurement RMSE.

Usage: .venv/bin/python -m benchmarks.agg [--repeats 3] [--skip-speed] [--skip-gaussian]
Prints markdown tables (paste into benchmarks/RESULTS.md, section "## AGG").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


from msdiff.gaussian import GaussianField, GaussianInverseProblem, posterior_error
from msdiff.guidance import AGGSampler, ConsistencyLoss, MSELoss
from msdiff.nn.unet import UNet
from msdiff.sde import VESDE, VPSDE


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(repeats: int) -> None:
    torch.manual_seed(0)
    sde = VESDE(sigma_min=0.005, sigma_max=277.128)
    net = UNet(in_channels=3, out_channels=3).eval()
    with torch.no_grad():  # the zero-initialised heads make a random net output 0; give them weights
        for p in net.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 1e-3)

    def score_fn(x, t):
        return net(x, torch.log(sde.std(t))) / sde.std(t).view(-1, 1, 1, 1)

    x_src = torch.rand(1, 3, 160, 160)
    agg = AGGSampler(steps=60, t_edit=20, lambda_reg=200.0, losses=(MSELoss(torch.rand(1, 3, 160, 160), 200.0),))
    grid = agg.time_grid(sde)
    t, t_next = grid[40].expand(1), grid[39].expand(1)
    x_t = x_src + sde.std(t).view(-1, 1, 1, 1) * torch.randn_like(x_src)
    x0_star = x_src.clone()
    with torch.no_grad():
        t_plain = _median_time(lambda: agg.ddim_step(score_fn, sde, x_t, t, t_next), repeats)
        t_guided = _median_time(lambda: agg.guided_step(score_fn, sde, x_t, t, t_next, x0_star), repeats)
    ddim, total = 60 * t_plain, (60 + 40) * t_plain + 20 * t_guided
    print(f"\nSpeed, batch 1, 160x160, {sum(p.numel() for p in net.parameters()):,}-parameter U-Net, "
          f"{torch.get_num_threads()} CPU threads (median of {repeats})\n")
    print("| step | s/step |\n|---|---|")
    print(f"| plain DDIM / inversion step (1 forward) | {t_plain:.2f} |")
    print(f"| guided AGG step (forward + backward + 1 Adam step) | {t_guided:.2f} |")
    print(f"\n| sampler | network passes | s/image (extrapolated) | x DDIM |\n|---|---|---|---|")
    print(f"| DDIM, 60 steps | 60 fwd | {ddim:.1f} | 1.00 |")
    print(f"| AGG, 60 + 60 steps, t_edit 20 | 120 fwd + 20 bwd | {total:.1f} | {total / ddim:.2f} |")


def gaussian_table(draws: int = 8, conditions: int = 16) -> None:
    field = GaussianField(channels=1, size=16, std=0.2, length_scale=2.0)
    problems = {"SR x2": GaussianInverseProblem.super_resolution(field, factor=2, noise_std=0.05),
                "inpainting (8x8 hole)": GaussianInverseProblem.inpainting(field, hole=8, noise_std=0.05)}
    print(f"\nZero-shot inverse problems on a 1x16x16 Gaussian field ({draws} draws x {conditions} conditions; "
          f"floor = exact posterior draws)\n")
    print("| task | SDE | method | mean err | cov err | W2 | RMSE A(x)-y |\n|---|---|---|---|---|---|---|")
    for task, problem in problems.items():
        g = torch.Generator().manual_seed(0)
        _, y = problem.sample(conditions, g)
        m_post, c_post = problem.posterior(y)
        chol = torch.linalg.cholesky(c_post + 1e-10 * torch.eye(problem.dim, dtype=torch.float64))
        z = torch.randn(draws, conditions, problem.dim, generator=g, dtype=torch.float64)
        exact = (m_post.reshape(conditions, -1) + z @ chol.T).float().reshape(draws, *y.shape)
        rows = [("-", "exact posterior", exact)]
        for sde in (VESDE(sigma_min=0.01, sigma_max=20.0), VPSDE()):
            score_fn = lambda x, t, sde=sde: field.score(x, t, sde)  # noqa: E731
            for label, w in (("AGG, no guidance", 0.0), ("AGG, consistency w=1", 1.0), ("AGG, consistency w=5", 5.0)):
                agg = AGGSampler(steps=30, t_edit=30 if w else 0, eta=0.8, lambda_reg=0.0,
                          losses=(ConsistencyLoss(problem.apply, y, w),) if w else ())
                out = torch.stack([agg(score_fn, sde, y, generator=torch.Generator().manual_seed(k)) for k in range(draws)])
                rows.append((type(sde).__name__, label, out))
        for sde_name, label, samples in rows:
            err = posterior_error(samples, y, problem)
            rmse = (problem.apply(samples.reshape(-1, *y.shape[1:])) - y.repeat(draws, 1, 1, 1)).pow(2).mean().sqrt()
            print(f"| {task} | {sde_name} | {label} | {err['mean_error']:.3f} | {err['cov_error']:.3f} | "
                  f"{err['w2']:.3f} | {rmse:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-gaussian", action="store_true")
    args = parser.parse_args()
    if not args.skip_speed:
        speed(args.repeats)
    if not args.skip_gaussian:
        gaussian_table()


if __name__ == "__main__":
    main()
