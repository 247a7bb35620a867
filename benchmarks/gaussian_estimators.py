"""CDE, CDiffE, CMDE and VS-CMDE (Batzolis et al. 2021) on Gaussian inverse problems with exact posteriors.

For a Gaussian field x and y = A x + noise (super-resolution and inpainting, `msdiff.gaussian`)
every estimator is trained with the same small MLP and budget, for a VE and a VP SDE, and its
samples (Euler-Maruyama) are compared with the exact posterior p(x | y):

* W2 (posterior): 2-Wasserstein distance between the residuals x - E[x | y] of the samples and
  N(0, Sigma_post) (`posterior_error`), plus the relative covariance error;
* JFD: the exact joint Frechet distance of the (x, y) pairs (`joint_frechet_distance`, squared W2);
* "exact" rows: the network replaced by the exact score each estimator targets (the CDE
  conditional score, or the joint score of (x_t, y_t) for the diffusive ones), i.e. the bias of
  the estimator itself with no training error; "posterior" is exact posterior samples (the
  Monte-Carlo floor of both metrics at this sample size).

The paper's claims (Sec. 4, Theorem 3): CMDE ~ CDE, both better than CDiffE when y constrains x
strongly, since CDiffE's x-score is that of p(x_t | y_t) with y_t as noisy as x_t.

    python -m benchmarks.gaussian_estimators            # full run (a few minutes on a shared 2-core CPU)
    python -m benchmarks.gaussian_estimators --quick    # fewer training steps
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn


from msdiff.guidance import Unguided
from msdiff.estimators import (CDE, CMDE, VSCMDE, CDiffE, ConditionalEstimator, LikelihoodWeighting,
                               SimpleWeighting, Weighting)
from msdiff.gaussian import GaussianField, GaussianInverseProblem, joint_frechet_distance, posterior_error
from msdiff.samplers import EulerMaruyama
from msdiff.sde import SDE, MultiSpeedSDE, VESDE, VPSDE
from msdiff.utils import make_generator

SIZE = 4  # 1 x 4 x 4 field: x and y have 16 dimensions each


class ScoreMLP(nn.Module):
    """Small score network: flattened (x_t, y) input and Fourier features of t = label / 999."""

    def __init__(self, in_channels: int, out_channels: int, size: int, hidden: int = 128, freqs: int = 8):
        super().__init__()
        self.out_shape = (out_channels, size, size)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs))
        self.body = nn.Sequential(
            nn.Linear(in_channels * size * size + 2 * freqs, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, out_channels * size * size))

    def forward(self, h, label):
        a = (label / 999.0)[:, None] * self.freqs
        return self.body(torch.cat([h.flatten(1), a.sin(), a.cos()], 1)).view(-1, *self.out_shape)


class ExactNetwork(nn.Module):
    """The exact target of an estimator as a network output (score * std), for the "exact" rows."""

    def __init__(self, problem: GaussianInverseProblem, est: ConditionalEstimator):
        super().__init__()
        self.problem, self.x_sde, self.y_sde = problem, est.sampling_sde, est.y_sde

    def forward(self, h, label):
        t, v = label.double() / 999.0, (h.double() + 1) / 2  # undo the estimator's 2v - 1 input map
        x_t, y = v[:, :1], v[:, 1:]
        std_x = self.x_sde.std(t)[:, None, None, None]
        if self.y_sde is None:
            return (self.problem.conditional_score(x_t, y, t, self.x_sde) * std_x).to(h.dtype)
        s_x, s_y = self.problem.joint_score(x_t, y, t, MultiSpeedSDE(self.x_sde, self.y_sde))
        return torch.cat([s_x * std_x, s_y * self.y_sde.std(t)[:, None, None, None]], 1).to(h.dtype)


def make_sdes() -> dict[str, tuple[SDE, SDE, Weighting]]:
    """x SDE, the slow y SDE of CMDE (VS-CMDE's target) and the loss weighting: VE sigma_max_y =
    sigma_max_x / 30 with likelihood weighting (the reference); VP beta_max_y = beta_max_x / 10 with
    the simple (eps-MSE) weighting, since the VP likelihood weight g^2/s^2 ~ 1/t makes plain
    uniform-t training too noisy at this budget (Song et al. 2021b importance-sample t for it)."""
    return {"VE": (VESDE(1e-2, 3.0), VESDE(1e-2, 0.1), LikelihoodWeighting()),
            "VP": (VPSDE(0.1, 20.0), VPSDE(0.1, 2.0), SimpleWeighting())}


def make_estimators(x_sde: SDE, y_sde: SDE, weighting: Weighting, steps: int) -> dict[str, ConditionalEstimator]:
    pair = MultiSpeedSDE(x_sde, y_sde)
    return {
        "CDE": CDE(x_sde, weighting=weighting),
        "CDiffE": CDiffE(x_sde, weighting=weighting),
        "CMDE": CMDE(pair, weighting=weighting),
        "VS-CMDE": VSCMDE(pair, sigma_max_y_target=y_sde.speed, reach_target_steps=max(steps // 2, 1), clamp=True,
                          weighting=weighting),
    }


def train(est: ConditionalEstimator, problem: GaussianInverseProblem, steps: int, batch: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = ScoreMLP(2, est.out_channels(1, 1), SIZE)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = make_generator(seed)
    for step in range(steps):
        if isinstance(est, VSCMDE):
            est.set_step(step)
        x, y = problem.sample(batch, g)
        opt.zero_grad(set_to_none=True)
        est.loss(net, x, y, g).mean().backward()
        opt.step()
        sched.step()
    return net.eval()


def metrics(x: torch.Tensor, y: torch.Tensor, problem: GaussianInverseProblem) -> dict[str, float]:
    post = posterior_error(x[None], y, problem)
    return {"w2": post["w2"], "cov": post["cov_error"], "jfd": joint_frechet_distance(x, y, problem)}


def sample(est: ConditionalEstimator, net: nn.Module, y: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    return Unguided().sample(est, net, y, EulerMaruyama(steps), y.shape[1], generator=make_generator(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 training steps instead of 2000")
    parser.add_argument("--conditions", type=int, default=4096, help="test conditions y (one draw each)")
    parser.add_argument("--sampler_steps", type=int, default=200)
    parser.add_argument("--noise_std", type=float, default=0.02, help="observation noise (small = strong conditioning)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 500 if args.quick else 2000
    field = GaussianField(1, SIZE, length_scale=2.0)
    problems = {
        "SR x2": GaussianInverseProblem.super_resolution(field, factor=2, noise_std=args.noise_std),
        "inpaint 4x4": GaussianInverseProblem.inpainting(field, hole=SIZE // 2, noise_std=args.noise_std),
    }
    rows = []
    t_start = time.time()
    for p_name, problem in problems.items():
        x_true, y = problem.sample(args.conditions, make_generator(1000))
        mean, cov = problem.posterior(y)
        exact = mean + (torch.randn(args.conditions, problem.dim, generator=make_generator(1001), dtype=torch.float64)
                        @ torch.linalg.cholesky(cov).T).view_as(mean)
        floor = metrics(exact.float(), y, problem)
        rows.append((p_name, "-", "posterior", "exact samples", floor))
        for s_name, (x_sde, y_sde, weighting) in make_sdes().items():
            for e_name, est in make_estimators(x_sde, y_sde, weighting, steps).items():
                if isinstance(est, VSCMDE):
                    est.set_step(steps)  # the exact row uses the speed reached at the end of training
                oracle = sample(est, ExactNetwork(problem, est), y.double(), args.sampler_steps, 7).float()
                rows.append((p_name, s_name, e_name, "exact score", metrics(oracle, y, problem)))
                net = train(est, problem, steps, batch=256, seed=0)
                with torch.no_grad():
                    learned = sample(est, net, y, args.sampler_steps, 7)
                rows.append((p_name, s_name, e_name, f"trained ({steps} steps)", metrics(learned, y, problem)))
                print(f"[{time.time() - t_start:6.1f}s] {p_name} {s_name} {e_name}: exact {rows[-2][4]} trained {rows[-1][4]}",
                      file=sys.stderr)
    print(f"| problem | SDE | estimator | score | W2 posterior | cov. error | JFD |")
    print("|---|---|---|---|---|---|---|")
    for p_name, s_name, e_name, kind, m in rows:
        print(f"| {p_name} | {s_name} | {e_name} | {kind} | {m['w2']:.4f} | {m['cov']:.3f} | {m['jfd']:.5f} |")
    print(f"\n{args.conditions} conditions, 1 draw each, Euler-Maruyama {args.sampler_steps} steps; "
          f"noise_std {args.noise_std}; total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
