"""The adaptive-step SDE solver of Jolicoeur-Martineau et al. 2021, "Gotta Go Fast When Generating
Data with Score-Based Models" (Alg. 1): Euler-Maruyama against stochastic improved Euler with the
same noise, an error tolerance, and a step size per example."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from msdiff.samplers.base import Sampler, ScoreFn, check_x_T, checked_score, positive_int, tweedie
from msdiff.sde import SDE
from msdiff.utils import Generators, append_dims, randn_like

T_DONE = 1e-6  # an example is finished when t - eps <= T_DONE (the paper's stopping rule)


def _check_positive(name: str, value: float, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value <= upper):
        bound = "" if upper == math.inf else f" and <= {upper}"
        raise ValueError(f"{name}={value}: expected a number > 0{bound}")
    return float(value)


def error_ratio(x_low: Tensor, x_high: Tensor, x_low_prev: Tensor, eps_abs: float, eps_rel: float) -> Tensor:
    """E_n = || (x'' - x') / delta ||_2 / sqrt(n) per example (B,), with the mixed tolerance
    delta = max(eps_abs, eps_rel max(|x'|, |x'_prev|)) elementwise (Jolicoeur-Martineau et al., Sec. 3)."""
    delta = torch.maximum(x_low.abs(), x_low_prev.abs()).mul(eps_rel).clamp_min(eps_abs)
    return ((x_high - x_low) / delta).flatten(1).square().mean(1).sqrt()


class AdaptiveSDE(Sampler):
    """Jolicoeur-Martineau et al. 2021, Alg. 1 on the reverse-time SDE dx = [f x - g^2 score] dt + g dw_bar.

    Each example keeps its own time t and step h (from T, h = `h_init`). One iteration, z ~ N(0, I)
    drawn once: K1 = -h drift(x, t) + g(t) sqrt(h) z, K2 = -h drift(x + K1, t - h) + g(t - h) sqrt(h) z,
    x' = x + K1 (Euler-Maruyama), x'' = x + (K1 + K2) / 2 (improved Euler). With E_n = `error_ratio`,
    the step is accepted when E_n <= 1 (then x = x'', the extrapolation; x'_prev = x'; t -= h), and
    h <- min(t - eps, safety h E_n^(-exponent)) either way. At t = eps the step to sigma = 0 is Tweedie's
    x0_hat. Finished examples take steps of length 0 while the others go on.

    nfe = 2 iterations + 1, known after a run (the last run's count). Host reads: whether every example
    has finished is read back once every `check_every` iterations (a data-dependent stop cannot avoid
    it; the loop runs at most check_every - 1 iterations past the end) and the run stops after
    `max_iterations` in any case. Defaults: eps_abs = 1/256 for data in [0, 1] (the paper's VE
    setting), eps_rel = 0.05 (in the paper's sweep 0.01-0.1), h_init = 0.01, safety 0.9, exponent 0.9.
    The score must be deterministic in (x, t) (`adaptive` is True): a rejected step is retried.
    """

    adaptive = True

    def __init__(self, eps_rel: float = 0.05, eps_abs: float = 1 / 256, h_init: float = 0.01, safety: float = 0.9,
                 exponent: float = 0.9, check_every: int = 8, max_iterations: int = 2000):
        self.eps_rel = _check_positive("eps_rel", eps_rel)
        self.eps_abs = _check_positive("eps_abs", eps_abs)
        self.h_init = _check_positive("h_init", h_init)
        self.safety = _check_positive("safety", safety, upper=1.0)
        self.exponent = _check_positive("exponent", exponent)
        self.check_every = positive_int("check_every", check_every)
        self.max_iterations = positive_int("max_iterations", max_iterations)
        self.nfe: int | None = None

    def step(self, score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, h: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """(x', x''): one Euler-Maruyama and one improved-Euler step of length h (B,) from x at t (B,)."""
        hh = append_dims(h, x.ndim)

        def increment(x: Tensor, t: Tensor) -> Tensor:  # -h drift(x, t) + g(t) sqrt(h) z
            drift = sde.reverse_drift(x, t, checked_score(score_fn, x, t))
            return -hh * drift + append_dims(sde.diffusion(t), x.ndim) * hh.sqrt() * z

        k1 = increment(x, t)
        k2 = increment(x + k1, t - h)
        return x + k1, x + 0.5 * (k1 + k2)

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        check_x_T(x_T)
        b = x_T.shape[0]
        t = torch.full((b,), sde.T, device=x_T.device, dtype=x_T.dtype)
        eps = torch.full_like(t, sde.eps)
        h = torch.minimum(torch.full_like(t, self.h_init), t - eps)
        x, x_low_prev, iterations = x_T, x_T, 0
        while iterations < self.max_iterations:
            x_low, x_high = self.step(score_fn, sde, x, t, h, randn_like(x, generator))
            e_n = error_ratio(x_low, x_high, x_low_prev, self.eps_abs, self.eps_rel)
            accept = (e_n <= 1) & (h > 0)
            keep = append_dims(accept, x.ndim)
            x, x_low_prev = torch.where(keep, x_high, x), torch.where(keep, x_low, x_low_prev)
            t = torch.where(accept, t - h, t)
            h_new = self.safety * h * e_n.clamp_min(1e-10).pow(-self.exponent)
            h = torch.minimum(h_new, (t - eps).clamp_min(0))
            iterations += 1
            if iterations % self.check_every == 0 and bool((t - eps <= T_DONE).all()):
                break
        self.nfe = 2 * iterations + 1
        return tweedie(x, eps, checked_score(score_fn, x, eps), sde)
