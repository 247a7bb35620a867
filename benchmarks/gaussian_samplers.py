"""Posterior error vs score evaluations for every sampler on the exact Gaussian field (VE and VP).

    .venv/bin/python -m benchmarks.gaussian_samplers [--draws 2000]

Problem: 1x4x4 Gaussian field (length scale 1.5), 2x super-resolution, noise 0.05, 4 conditions,
exact posterior score. Stochastic samplers: Monte-Carlo over `draws` x 4 samples (the row "exact
posterior draws" is the Monte-Carlo floor). Deterministic samplers are affine maps of x_T for a
Gaussian score, so their exact output law is read off D + 1 probes (no Monte-Carlo noise; marked
"exact law"). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import time

import torch

from msdiff.gaussian import GaussianField, GaussianInverseProblem, gaussian_w2, posterior_error
from msdiff.samplers import DDIM, EulerMaruyama, Heun, HeunPC, PredictorCorrector, ProbabilityFlowODE
from msdiff.sde import VESDE, VPSDE
from msdiff.utils import make_generator


def exact_law(sampler, sde, problem, y):
    """Output mean/cov of a deterministic sampler for condition y[0], from D + 1 affine probes."""
    D = problem.dim
    probes = torch.cat([torch.zeros(1, D), torch.eye(D) * sde.prior_std]).double().reshape(D + 1, *problem.shape)
    yy = y[:1].double().repeat(D + 1, 1, 1, 1)
    out = sampler(lambda x, t: problem.conditional_score(x, yy, t, sde), sde, probes).reshape(D + 1, D)
    M = out[1:] - out[0]
    m, C = problem.posterior(y[:1])
    mean, cov = out[0] - m.reshape(-1), M.T @ M
    return {"mean_error": float(mean.norm() / C.trace().sqrt()), "cov_error": float((cov - C).norm() / C.norm()),
            "w2": gaussian_w2(mean, cov, torch.zeros(D, dtype=torch.float64), C)}


def monte_carlo(sampler, sde, problem, y, draws):
    yy = y.repeat(draws, 1, 1, 1)
    g = make_generator(1)
    x = sampler(lambda v, t: problem.conditional_score(v, yy, t, sde), sde, sde.prior_sampling(yy.shape, g), g)
    return posterior_error(x.reshape(draws, *y.shape), y, problem)


def default_samplers():
    """(stochastic, deterministic) sampler lists of the full table; PC(1000) is the reference."""
    stochastic = [PredictorCorrector(1000), PredictorCorrector(100), PredictorCorrector(50, corrector_steps=0),
                  EulerMaruyama(1000), EulerMaruyama(100), DDIM(100, eta=1.0), HeunPC()]
    deterministic = [DDIM(100), DDIM(50), Heun(50), Heun(25), Heun(10), ProbabilityFlowODE()]
    return stochastic, deterministic


def accuracy_rows(draws: int = 2000, stochastic=None, deterministic=None, sdes=None) -> list[tuple]:
    """Rows (sde, label, nfe, measure, errors dict, seconds); the first row is the Monte-Carlo floor."""
    if stochastic is None or deterministic is None:
        stochastic, deterministic = default_samplers()
    sdes = sdes or (("VE", VESDE(0.01, 50.0)), ("VP", VPSDE(0.1, 20.0)))
    problem = GaussianInverseProblem.super_resolution(GaussianField(1, 4, length_scale=1.5), 2, noise_std=0.05)
    y = problem.sample(4, make_generator(0))[1]
    m, C = problem.posterior(y)
    L = torch.linalg.cholesky(C)
    z = torch.randn(draws, 4, problem.dim, generator=make_generator(2), dtype=torch.float64)
    floor = posterior_error(m + (z @ L.T).reshape(draws, *y.shape), y, problem)
    rows = [("VE/VP", "exact posterior draws (MC floor)", 0, "MC", floor, 0.0)]
    for name, sde in sdes:
        for s in stochastic:
            t0 = time.time()
            rows.append((name, _label(s), s.nfe, "MC", monte_carlo(s, sde, problem, y, draws), time.time() - t0))
        for s in deterministic:
            t0 = time.time()
            err = exact_law(s, sde, problem, y)
            rows.append((name, _label(s), s.nfe, "exact law", err, time.time() - t0))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = accuracy_rows(args.draws)
    print(f"| SDE | sampler | evals | measure | rel. mean err | rel. cov err | W2 | s |\n|---|---|---|---|---|---|---|---|")
    for sde, label, nfe, how, e, sec in rows:
        print(f"| {sde} | {label} | {nfe} | {how} | {e['mean_error']:.4f} | {e['cov_error']:.4f} | {e['w2']:.4f} | {sec:.1f} |")


def _label(s) -> str:
    kind = type(s).__name__
    if kind == "PredictorCorrector":
        return f"PC steps={s.steps} corrector={s.corrector_steps}" + (" (reference)" if s.steps == 1000 else "")
    if kind == "DDIM":
        return f"DDIM steps={s.steps} eta={s.eta:g}"
    if kind == "Heun":
        return f"Heun steps={s.steps} rho=7"
    if kind == "HeunPC":
        return (f"HeunPC heun={s.heun_steps} pc={s.pc.steps} switch={s.sigma_switch:g} snr={s.pc.snr:g} "
                f"corrector={s.pc.corrector}")
    if kind == "ProbabilityFlowODE":
        return f"ProbabilityFlowODE {s.method} {s.rtol:g}"
    return f"{kind} steps={s.steps}"


if __name__ == "__main__":
    main()
