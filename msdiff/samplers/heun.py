"""Heun's second-order solver of the probability-flow ODE (Karras et al. 2022), and HeunPC: Heun
where noise is high, predictor-corrector where it is low."""
from __future__ import annotations

import torch
from torch import Tensor

from msdiff.samplers.base import (GridSampler, Sampler, ScoreFn, batch_time, check_x_T, checked_score, positive_float,
                                  positive_int, tweedie)
from msdiff.samplers.grids import KarrasSigma, LogSigma, TimeGrid, check_grid, sigma_in_range
from msdiff.samplers.reverse_sde import PredictorCorrector
from msdiff.sde import SDE
from msdiff.utils import Generators, append_dims


def heun_integrate(score_fn: ScoreFn, sde: SDE, x_hat: Tensor, ts: Tensor, to_zero: bool) -> Tensor:
    """Heun steps of dx_hat/dsigma = (x_hat - x0_hat) / sigma through the decreasing times `ts`
    (float64), x = a(t) x_hat; with `to_zero` a last Euler step from ts[-1] to sigma = 0 (x0_hat)."""
    sig = sde.sigma(ts).to(x_hat.dtype)
    ts = ts.to(x_hat.dtype)

    def slope(x_hat: Tensor, i: int) -> Tensor:
        t = batch_time(ts[i], x_hat)
        x = append_dims(sde.mean_coef(t), x_hat.ndim) * x_hat
        return (x_hat - tweedie(x, t, checked_score(score_fn, x, t), sde)) / sig[i]

    for i in range(len(ts) - 1):
        d = slope(x_hat, i)
        h = sig[i + 1] - sig[i]
        x_hat = x_hat + 0.5 * h * (d + slope(x_hat + h * d, i + 1))
    return x_hat - sig[-1] * slope(x_hat, len(ts) - 1) if to_zero else x_hat


class Heun(GridSampler):
    """Heun's 2nd-order solver of the probability-flow ODE in the EDM parameterisation (Karras et al.
    2022, Alg. 1 with the general scaling of their Eq. 4 / Table 1).

    With x = a(t) x_hat and sigma(t) = s(t)/a(t), the ODE is dx_hat/dsigma = (x_hat - x0_hat)/sigma,
    x0_hat = (x + s^2 score(x, t)) / a. sigma runs over the `steps` times of `grid` from T to eps
    (by default uniform in sigma^(1/rho), Karras Eq. 5 with rho = 7), then to 0; every step is
    Heun's but the last (to sigma = 0), which is Euler and returns x0_hat. nfe = 2 steps - 1.
    """

    adaptive = False

    def __init__(self, steps: int = 50, grid: TimeGrid = KarrasSigma(rho=7.0)):
        super().__init__(steps, grid)

    @property
    def nfe(self) -> int:
        return 2 * self.steps - 1

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        ts = self.times(sde, x_T, torch.float64)
        return heun_integrate(score_fn, sde, x_T / sde.mean_coef(ts[:1]).to(x_T.dtype), ts, to_zero=True)


class HeunPC(Sampler):
    """Heun where noise is high, predictor-corrector where it is low: a 100-evaluation stand-in for
    the reference PC sampler with 2,000 (benchmarks/RESULTS.md, "Samplers on a trained checkpoint").

    1. `heun_steps` Heun steps (Karras et al. 2022, Alg. 1) on `heun_grid` (heun_steps + 1 times; by
       default uniform in sigma^(1/7)) from sigma(T) down to `sigma_switch`: above it the Langevin
       corrector does not change what a trained network samples (measured on the quickstart
       checkpoint), so the cheap ODE gets there.
    2. `pc_steps` steps of `PredictorCorrector` (Song et al. 2021, Alg. 2) at the pc_steps times of
       `pc_grid` (by default uniform in log sigma) from there to eps, with the Leimkuhler-Matthews
       corrector (exact for Gaussian targets at large steps); as the reference PC sampler, the last
       predictor step goes from eps to sigma = 0 and its mean is returned (no leftover noise of std
       sigma_min).
       The reference spends 500 corrector steps of snr 0.16 below sigma = 0.5 (VE, 1000 steps); the
       default snr 0.55 gives 42 steps the same total Langevin time, sum of e ~ N snr^2:
       0.16 sqrt(500 / 42) = 0.552. (On an exact score the larger steps cost a little accuracy:
       there `Heun` is the sampler to use; figures in benchmarks/RESULTS.md.)
    nfe = 2 heun_steps + pc_steps (1 + corrector_steps).
    """

    adaptive = False

    def __init__(self, heun_steps: int = 8, pc_steps: int = 42, sigma_switch: float = 0.5, snr: float = 0.55,
                 corrector_steps: int = 1, corrector: str = "lm", heun_grid: TimeGrid = KarrasSigma(rho=7.0),
                 pc_grid: TimeGrid = LogSigma()):
        self.heun_steps = positive_int("heun_steps", heun_steps, minimum=0)
        self.sigma_switch = positive_float("sigma_switch", sigma_switch)
        self.heun_grid = check_grid("heun_grid", heun_grid)
        self.pc_grid = check_grid("pc_grid", pc_grid)
        self.pc = PredictorCorrector(pc_steps, snr, corrector_steps, corrector, grid=self.pc_grid)

    @property
    def nfe(self) -> int:
        return 2 * self.heun_steps + self.pc.nfe

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        check_x_T(x_T)
        s_sw = sigma_in_range(sde, self.sigma_switch)
        x = x_T
        if self.heun_steps:  # (steps of zero length when sigma_switch >= sigma(T): nfe stays exact)
            ts = self.heun_grid(sde, self.heun_steps + 1, x_T.device, torch.float64, sigma_end=s_sw)
            a = sde.mean_coef(ts[[0, -1]]).to(x_T.dtype)
            x = heun_integrate(score_fn, sde, x_T / a[0], ts, to_zero=False) * a[1]
        ts = self.pc_grid(sde, self.pc.steps, x_T.device, x_T.dtype, sigma_start=s_sw)
        return self.pc.run(score_fn, sde, x, ts, generator)
