"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2) and its SDE variant, in data prediction: the model's output is
Tweedie's x0_hat = (x_t + s^2 score) / a, for any x_t = a(t) x_0 + s(t) z."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from msdiff.samplers.base import (GridSampler, Sampler, ScoreFn, batch_time, check_x_T, checked_score, positive_float,
                                  positive_int, tweedie)
from msdiff.samplers.grids import KarrasSigma, LogSigma, TimeGrid, check_grid, sigma_in_range
from msdiff.samplers.reverse_sde import PredictorCorrector
from msdiff.sde import SDE
from msdiff.utils import Generators, randn_like

ORDERS = (1, 2)


def multistep_coefficients(a: Tensor, s: Tensor, order: int, stochastic: bool) -> Tensor:
    """Per step i (from time i to i + 1 of a grid with a = a(t_i), s = s(t_i) and log-SNRs
    lam = log(a / s), increasing), the
    weights (c_x, c_0, c_1, c_z) of x_{i+1} = c_x x_i + a_{i+1} (c_0 D_i + c_1 (D_i - D_{i-1})) + s_{i+1} c_z z,
    with h = lam_{i+1} - lam_i and r = h_{i-1} / h (float64, shape (len(lam) - 1, 4)):
      ODE (Lu et al. 2022b, Alg. 2): c_x = s_{i+1}/s_i, c_0 = 1 - e^{-h}, c_1 = (1 - e^{-h}) / (2 r), c_z = 0;
      SDE: c_x = (s_{i+1}/s_i) e^{-h}, c_0 = 1 - e^{-2h}, c_1 = (h - (1 - e^{-2h}) / 2) / h_{i-1}
        (the exact integral 2 int_0^h e^{-2(h-u)} u du of D's linear extrapolation in lambda),
        c_z = sqrt(1 - e^{-2h}).
    c_1 = 0 for the first step and for order 1 (order 1: DDIM with eta = 0 / eta = 1)."""
    lam = (a / s).log()
    h = lam[1:] - lam[:-1]
    c = torch.zeros(len(h), 4, dtype=torch.float64, device=lam.device)
    e1, e2 = torch.expm1(-h).neg(), torch.expm1(-2 * h).neg()  # 1 - e^{-h}, 1 - e^{-2h}
    c[:, 0] = s[1:] / s[:-1] * ((-h).exp() if stochastic else 1.0)
    c[:, 1] = e2 if stochastic else e1
    c[:, 3] = e2.sqrt() if stochastic else 0.0
    if order == 2 and len(h) > 1:
        h_prev = h[:-1]
        c[1:, 2] = (h[1:] - e2[1:] / 2) / h_prev if stochastic else e1[1:] * h[1:] / (2 * h_prev)
    return c


class DPMSolverPP(GridSampler):
    """DPM-Solver++(`order` M) of the diffusion ODE, or with `stochastic` its SDE variant (SDE-DPM-Solver++),
    multistep in data prediction D = x0_hat (Lu et al. 2022b, Alg. 2; `multistep_coefficients` gives the
    updates).

    One score evaluation at each of the `steps` times of `grid` (by default uniform in sigma^(1/rho),
    Karras et al. 2022 Eq. 5, as k-diffusion runs it), a multistep update to the next time with
    lambda = log(a / s); from the last time (eps) the step to sigma = 0 is first order, i.e. returns
    x0_hat there (lambda = inf), as DDIM does. Order 1 is DDIM (eta = 0 for the ODE, eta = 1 for the
    SDE); the SDE variant draws one N(0, I) per step but the last. nfe = steps.
    """

    adaptive = False

    def __init__(self, steps: int = 25, order: int = 2, stochastic: bool = False,
                 grid: TimeGrid = KarrasSigma(rho=7.0)):
        super().__init__(steps, grid)
        if isinstance(order, bool) or order not in ORDERS:
            raise ValueError(f"order={order}: expected one of {ORDERS} (DPM-Solver++ 1 or 2M)")
        self.order, self.stochastic = int(order), bool(stochastic)

    def integrate(self, score_fn: ScoreFn, sde: SDE, x: Tensor, ts: Tensor, generator: Generators = None,
                  to_zero: bool = True) -> Tensor:
        """The multistep updates through the decreasing float64 times `ts`, one evaluation at each time
        but the last; with `to_zero` that last time is evaluated too and x0_hat there returned."""
        a, s = sde.mean_coef(ts), sde.std(ts)
        coef = multistep_coefficients(a, s, self.order, self.stochastic)
        coef, a, s, ts = coef.to(x.dtype), a.to(x.dtype), s.to(x.dtype), ts.to(x.dtype)
        d_prev = None
        for i in range(len(ts) if to_zero else len(ts) - 1):
            t = batch_time(ts[i], x)
            d = tweedie(x, t, checked_score(score_fn, x, t), sde)
            if i == len(ts) - 1:
                return d
            c_x, c_0, c_1, c_z = coef[i]
            drift = c_0 * d if d_prev is None else c_0 * d + c_1 * (d - d_prev)
            x = c_x * x + a[i + 1] * drift
            if self.stochastic:
                x = x + s[i + 1] * c_z * randn_like(x, generator)
            d_prev = d
        return x

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        return self.integrate(score_fn, sde, x_T, self.times(sde, x_T, torch.float64), generator)


class DPMSolverPC(Sampler):
    """SDE-DPM-Solver++(2M) where noise is high, predictor-corrector where it is low: HeunPC's split
    (benchmarks/RESULTS.md, "HeunPC") with one evaluation per step above `sigma_switch` instead of Heun's two.

    1. `solver_steps` steps of `DPMSolverPP(order=2, stochastic)` on `solver_grid` (solver_steps + 1 times)
       from sigma(T) down to `sigma_switch`;
    2. `PredictorCorrector(pc_steps, snr, corrector_steps, corrector)` at the pc_steps times of `pc_grid`
       (uniform in log sigma) from there to eps, ending like it (eps -> sigma = 0, its mean returned).
    `snr` None: 0.16 sqrt(500 / (pc_steps corrector_steps)), the reference's Langevin time below sigma 0.5
    (500 corrector steps of snr 0.16, sum of e ~ N snr^2), HeunPC's rule.
    `sigma_step`: the corrector's step from s(t) instead of the norms (PredictorCorrector).
    nfe = solver_steps + pc_steps (1 + corrector_steps). The defaults (10 + 20 x 2 = 50 evaluations, switch at
    sigma 0.2): within 0.2 dB of PC-2000's PSNR and consistency, TV and diversity within 10%, on the quickstart
    and the Fashion-MNIST 4x SR (CDE, CMDE) and edges checkpoints; on inpainting 0.8 dB of PSNR below
    (benchmarks/RESULTS.md, "Few-step samplers against PC-2000").
    """

    adaptive = False

    def __init__(self, solver_steps: int = 10, pc_steps: int = 20, sigma_switch: float = 0.2,
                 snr: Optional[float] = None, corrector_steps: int = 1, corrector: str = "lm", stochastic: bool = True,
                 solver_grid: TimeGrid = KarrasSigma(rho=7.0), pc_grid: TimeGrid = LogSigma(),
                 sigma_step: bool = False):
        self.solver = DPMSolverPP(max(1, solver_steps), order=2, stochastic=stochastic, grid=solver_grid)
        self.solver_steps = positive_int("solver_steps", solver_steps, minimum=0)
        self.sigma_switch = positive_float("sigma_switch", sigma_switch)
        n = positive_int("pc_steps", pc_steps) * positive_int("corrector_steps", corrector_steps)
        self.pc = PredictorCorrector(pc_steps, 0.16 * math.sqrt(500 / n) if snr is None else snr, corrector_steps,
                                     corrector, grid=check_grid("pc_grid", pc_grid), sigma_step=sigma_step)

    @property
    def nfe(self) -> int:
        return self.solver_steps + self.pc.nfe

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        check_x_T(x_T)
        s_sw = sigma_in_range(sde, self.sigma_switch)
        x = x_T
        if self.solver_steps:
            ts = self.solver.grid(sde, self.solver_steps + 1, x_T.device, torch.float64, sigma_end=s_sw)
            x = self.solver.integrate(score_fn, sde, x, ts, generator, to_zero=False)
        ts = self.pc.grid(sde, self.pc.steps, x_T.device, x_T.dtype, sigma_start=s_sw)
        return self.pc.run(score_fn, sde, x, ts, generator)
