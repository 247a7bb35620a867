"""The probability-flow ODE (Song et al. 2021, Eq. 13) solved by scipy's adaptive integrators, its
log-likelihood (Eq. 39) and bits per dimension."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import integrate
from torch import Tensor

from msdiff.samplers.base import Sampler, ScoreFn, check_x_T, checked_score, tweedie
from msdiff.sde import SDE
from msdiff.utils import Generators, batch_sum, randn_like


class ProbabilityFlowODE(Sampler):
    """The probability-flow ODE dx/dt = f x - g^2 score / 2 (Song et al. 2021, Eq. 13) integrated from
    T to eps by scipy.integrate.solve_ivp (float64 state), then (denoise=True) one Tweedie step to
    x0_hat. `nfe` holds the evaluations of the last call (per sample)."""

    adaptive = True  # step sizes chosen by error control: the score must be deterministic in (x, t)

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45", denoise: bool = True):
        if not rtol > 0:
            raise ValueError(f"rtol={rtol}: expected > 0")
        if not atol > 0:
            raise ValueError(f"atol={atol}: expected > 0")
        if method not in ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA"):
            raise ValueError(f"method={method!r}: expected one of scipy's solve_ivp methods (RK45, RK23, DOP853, ...)")
        self.rtol, self.atol, self.method, self.denoise = float(rtol), float(atol), method, bool(denoise)
        self.nfe = 0

    def _solve(self, fun, y0: np.ndarray, t0: float, t1: float) -> np.ndarray:
        sol = integrate.solve_ivp(fun, (t0, t1), y0, rtol=self.rtol, atol=self.atol, method=self.method)
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed: {sol.message}")
        self.nfe = int(sol.nfev)
        return sol.y[:, -1]

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        check_x_T(x_T)
        shape, dev, dt = x_T.shape, x_T.device, x_T.dtype

        def fun(t: float, y: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(y).to(device=dev, dtype=dt).reshape(shape)
            tv = torch.full((shape[0],), t, device=dev, dtype=dt)
            drift = sde.reverse_drift(x, tv, checked_score(score_fn, x, tv), probability_flow=True)
            return drift.double().cpu().numpy().ravel()

        y = self._solve(fun, x_T.detach().double().cpu().numpy().ravel(), sde.T, sde.eps)
        x = torch.from_numpy(y).to(device=dev, dtype=dt).reshape(shape)
        if self.denoise:
            t = torch.full((shape[0],), sde.eps, device=dev, dtype=dt)
            x = tweedie(x, t, checked_score(score_fn, x, t), sde)
            self.nfe += 1
        return x

    def log_likelihood(self, score_fn: ScoreFn, sde: SDE, x: Tensor, exact_trace: bool = False,
                       generator: Generators = None, noise: str = "rademacher") -> Tensor:
        """log p_eps(x) in nats per example, (B,) float64 (Song et al. 2021, Eq. 39; Chen et al. 2018):

            log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt,  f~ = f x - g^2 score / 2,

        integrating x and the divergence together from eps to T. The divergence is exact (one
        autograd pass per dimension; small data only) or Hutchinson's estimate E[v^T J v] with one
        fixed Rademacher or Gaussian probe v per call (Grathwohl et al. 2019). x is data at time
        eps (no dequantisation here; see bits_per_dim).
        """
        check_x_T(x)
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise={noise!r}: expected 'rademacher' or 'gaussian'")
        shape, dev, dt, B = x.shape, x.device, x.dtype, x.shape[0]
        n = x[0].numel()
        v = randn_like(x, generator)
        if noise == "rademacher":
            v = v.sign()

        def drift_and_div(xt: Tensor, tv: Tensor) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                xg = xt.detach().requires_grad_(True)
                drift = sde.reverse_drift(xg, tv, checked_score(score_fn, xg, tv), probability_flow=True)
                if exact_trace:
                    flat = drift.reshape(B, n)
                    div = torch.zeros(B, device=dev, dtype=dt)
                    for k in range(n):
                        gk = torch.autograd.grad(flat[:, k].sum(), xg, retain_graph=k < n - 1)[0]
                        div = div + gk.reshape(B, n)[:, k]
                else:
                    div = batch_sum(torch.autograd.grad((drift * v).sum(), xg)[0] * v)
            return drift.detach(), div.detach()

        def fun(t: float, y: np.ndarray) -> np.ndarray:
            xt = torch.from_numpy(y[: B * n]).to(device=dev, dtype=dt).reshape(shape)
            tv = torch.full((B,), t, device=dev, dtype=dt)
            drift, div = drift_and_div(xt, tv)
            return np.concatenate([drift.double().cpu().numpy().ravel(), div.double().cpu().numpy()])

        y0 = np.concatenate([x.detach().double().cpu().numpy().ravel(), np.zeros(B)])
        y = self._solve(fun, y0, sde.eps, sde.T)
        z = torch.from_numpy(y[: B * n]).reshape(shape)
        return sde.prior_logp(z.double()) + torch.from_numpy(y[B * n :])


def bits_per_dim(logp: Tensor, x: Tensor, bin_width: float | None = None) -> Tensor:
    """Bits per dimension -logp / (D ln 2) for log-densities logp (B,) of data x (B, ...).

    For discrete data, pass the quantisation bin width: a density on bins of width w gives the
    discrete likelihood P(bin) ~ p(x) w^D, adding -log2(w) bits per dimension. Data in [0, 1] with
    256 levels: bin_width = 1/256, offset +8 bits (Song et al.'s offset for uncentred data); data in
    [-1, 1]: bin_width = 2/256, offset +7.
    """
    if bin_width is not None and not bin_width > 0:
        raise ValueError(f"bin_width={bin_width}: expected > 0")
    bpd = -logp / (x[0].numel() * math.log(2))
    return bpd - math.log2(bin_width) if bin_width is not None else bpd
