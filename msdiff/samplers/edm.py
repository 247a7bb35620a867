"""EDM's stochastic sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 2) for any x_t = a(t) x_0 + s(t) z."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from msdiff.samplers.base import GridSampler, ScoreFn, batch_time, checked_score, tweedie
from msdiff.samplers.grids import KarrasSigma, TimeGrid
from msdiff.sde import SDE
from msdiff.utils import Generators, append_dims, randn_like


def _check_nonnegative(name: str, value: float) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0 and not math.isnan(value)):
        raise ValueError(f"{name}={value}: expected a number >= 0")
    return float(value)


def churn_sigmas(sigmas: Tensor, s_churn: float, s_tmin: float, s_tmax: float) -> Tensor:
    """Karras Alg. 2, lines 4-5 for every step at once: sigma_hat_i = sigma_i (1 + gamma_i) with
    gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0 (N = len(sigmas))."""
    gamma = min(s_churn / len(sigmas), math.sqrt(2) - 1)
    inside = (sigmas >= s_tmin) & (sigmas <= s_tmax)
    return sigmas * (1 + gamma * inside.to(sigmas.dtype))


class EDMStochastic(GridSampler):
    """Karras et al. 2022, Algorithm 2, in the state x_hat = x / a(t) with noise level
    sigma(t) = s(t) / a(t) (their Eq. 4 with the scaling a(t); for VE x_hat = x).

    At each of the `steps` times t_i of `grid` (by default uniform in sigma^(1/rho), Eq. 5, rho = 7):
      1. churn: sigma_hat = sigma_i (1 + gamma_i), gamma_i = min(S_churn / N, sqrt(2) - 1) when
         S_tmin <= sigma_i <= S_tmax (else 0); x_hat <- x_hat + sqrt(sigma_hat^2 - sigma_i^2) S_noise z;
      2. Heun's step of dx_hat/dsigma = (x_hat - x0_hat) / sigma from sigma_hat to sigma_{i+1},
         x0_hat = Tweedie's estimate at the time t_hat of sigma_hat (clamped to [eps, T]);
         the step from the last time goes to sigma = 0 and is Euler's (it returns x0_hat).
    A churned level above sigma(T) is clamped to sigma(T) (no noise beyond the prior's; so the first
    step is never churned). Defaults: the EDM-trained ImageNet-64 settings of Karras Table 5 (S_churn 40,
    S_tmin 0.05, S_tmax 50, S_noise 1.003) in sigma units of x / a.
    N = steps; nfe = 2 steps - 1, as Heun, which S_churn = 0 reproduces exactly. The churned levels are
    computed once before the loop (they depend on the grid only), so the loop reads nothing back.
    """

    adaptive = False

    def __init__(self, steps: int = 13, s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0,
                 s_noise: float = 1.003, grid: TimeGrid = KarrasSigma(rho=7.0)):
        super().__init__(steps, grid)
        self.s_churn = _check_nonnegative("s_churn", s_churn)
        self.s_tmin = _check_nonnegative("s_tmin", s_tmin)
        self.s_tmax = _check_nonnegative("s_tmax", s_tmax)
        if self.s_tmin > self.s_tmax:
            raise ValueError(f"s_tmin={s_tmin}, s_tmax={s_tmax}: expected s_tmin <= s_tmax")
        self.s_noise = _check_nonnegative("s_noise", s_noise)

    @property
    def nfe(self) -> int:
        return 2 * self.steps - 1

    def schedule(self, sde: SDE, x_T: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(t_i, sigma_i, t_hat_i, sigma_hat_i) in float64 on x_T's device: the grid and its churned levels."""
        ts = self.times(sde, x_T, torch.float64)
        sig = sde.sigma(ts)
        sig_hat = churn_sigmas(sig, self.s_churn, self.s_tmin, self.s_tmax)
        t_hat = torch.where(sig_hat > sig, sde.t_of_sigma(sig_hat).clamp(sde.eps, sde.T), ts)
        return ts, sig, t_hat, sde.sigma(t_hat)

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        ts, sig, t_hat, sig_hat = (v.to(x_T.dtype) for v in self.schedule(sde, x_T))

        def slope(x_hat: Tensor, t: Tensor, sigma: Tensor) -> Tensor:
            t = batch_time(t, x_hat)
            x = append_dims(sde.mean_coef(t), x_hat.ndim) * x_hat
            return (x_hat - tweedie(x, t, checked_score(score_fn, x, t), sde)) / sigma

        x_hat = x_T / sde.mean_coef(ts[:1])
        for i in range(self.steps):
            if self.s_churn > 0:
                x_hat = x_hat + (sig_hat[i] ** 2 - sig[i] ** 2).clamp_min(0).sqrt() * self.s_noise * randn_like(
                    x_hat, generator)
            d = slope(x_hat, t_hat[i], sig_hat[i])
            if i == self.steps - 1:
                return x_hat - sig_hat[i] * d
            h = sig[i + 1] - sig_hat[i]
            x_hat = x_hat + 0.5 * h * (d + slope(x_hat + h * d, ts[i + 1], sig[i + 1]))
        return x_hat
