"""Samplers for linear SDEs x_t = a(t) x_0 + s(t) z, driven by any score_fn(x, t) with t of shape (B,).

    x0 = sampler(score_fn, sde, x_T, generator=None)

Every sampler reads the SDE only through its schedule methods (reverse_drift, diffusion,
transition, mean_coef, std, sigma, time_grid, sigma_grid), runs under torch.no_grad() (a guided
score_fn may re-enable gradients inside), never mutates x_T, is deterministic given the generator,
keeps no trajectory (memory is independent of the number of steps) and, apart from the scipy ODE
solver, never synchronises with the host inside its loop. `nfe` is the number of score evaluations
per sample (for ProbabilityFlowODE, the count of its last run). `adaptive` tells the caller
whether the sampler picks its steps by error control (ProbabilityFlowODE): its score must then be
deterministic in (x, t), e.g. `estimator.score_fn(..., fixed_y_noise=True)` for CDiffE/CMDE.

Final outputs: every sampler here finishes at sigma = 0, so no sample carries the noise of its
last time (std s(eps): sigma_min = 0.005 on the paper's VE SDE, 1.3/255). PredictorCorrector and
the PC part of HeunPC end as the reference (score_sde_pytorch's PC sampler with denoise=True):
their last reverse-diffusion step goes from t = eps (sigma_min for VE) to sigma = 0 and its mean
is returned; on a point-mass target that mean is the point itself up to float rounding.
EulerMaruyama, DDIM, Heun and ProbabilityFlowODE(denoise=True) end with the Tweedie estimate
x0_hat = (x + s^2 score) / a at their last time (for VE, a = 1, the same formula as the
reference's last PC step). ProbabilityFlowODE(denoise=False) is the one exception.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from scipy import integrate

from msdiff.sde import SDE
from msdiff.utils import append_dims, batch_sum, randn_like

ScoreFn = Callable[[Tensor, Tensor], Tensor]


class Sampler:
    """The one sampler signature (k-diffusion style): `x0 = sampler(score_fn, sde, x_T, generator)`.

    The base type of every sampler, so that a YAML/CLI `class_path` (`sample.py --sampler Heun`)
    can name any of them and `--help` lists them. `nfe` is the number of score evaluations per
    sample (None when it is only known after a run); `adaptive` is True when the sampler chooses its
    own steps by error control, so its score must be deterministic in (x, t).
    """

    adaptive: bool = False
    nfe: int | None = None  # subclasses: a property, or (ProbabilityFlowODE) the count of the last run

    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


def _positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name}={value}: expected an integer >= {minimum}")
    return int(value)


def _check_x_T(x_T: Tensor) -> None:
    if not isinstance(x_T, Tensor) or x_T.ndim < 2 or x_T.shape[0] < 1 or not x_T.is_floating_point():
        got = tuple(x_T.shape) if isinstance(x_T, Tensor) else type(x_T).__name__
        raise ValueError(f"x_T: expected a floating tensor of shape (B, ...) with B >= 1, got {got}")


def _at(t: Tensor, x: Tensor) -> Tensor:
    """A scalar time (0-dim tensor) broadcast to the (B,) vector score_fn expects."""
    return t.expand(x.shape[0])


def _score(score_fn: ScoreFn, x: Tensor, t: Tensor) -> Tensor:
    s = score_fn(x, t)
    if s.shape != x.shape:
        raise ValueError(f"score_fn: expected a score of shape {tuple(x.shape)}, got {tuple(s.shape)}")
    return s


def tweedie(x: Tensor, t: Tensor, score: Tensor, sde: SDE) -> Tensor:
    """x0_hat = E[x_0 | x_t] = (x_t + s(t)^2 score) / a(t) (Tweedie's formula; Efron 2011)."""
    a, s = append_dims(sde.mean_coef(t), x.ndim), append_dims(sde.std(t), x.ndim)
    return (x + s**2 * score) / a


class EulerMaruyama(Sampler):
    """Euler-Maruyama on the reverse-time SDE dx = [f x - g^2 score] dt + g dw_bar (Song et al. 2021,
    Eq. 6) over `steps` times uniform from T to eps (steps - 1 Euler-Maruyama steps), then the
    denoising step to sigma = 0 at eps: the Tweedie estimate x0_hat = (x + s^2 score) / a (for VE
    the reference PC sampler's last step). `steps` evaluations."""

    adaptive = False

    def __init__(self, steps: int = 1000):
        self.steps = _positive_int("steps", steps)

    @property
    def nfe(self) -> int:
        return self.steps

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_x_T(x_T)
        ts = torch.linspace(sde.T, sde.eps, self.steps, device=x_T.device, dtype=x_T.dtype)
        x = x_T
        for i in range(self.steps - 1):
            t = _at(ts[i], x)
            h = append_dims(t - ts[i + 1], x.ndim)  # positive step size
            x_mean = x - sde.reverse_drift(x, t, _score(score_fn, x, t)) * h
            x = x_mean + append_dims(sde.diffusion(t), x.ndim) * h.sqrt() * randn_like(x, generator)
        t = _at(ts[-1], x)
        return tweedie(x, t, _score(score_fn, x, t), sde)


class PredictorCorrector(Sampler):
    """Predictor-corrector sampler (Song et al. 2021, Alg. 2 / Alg. 4 for VE and VP alike).

    `steps` times t_0 = T > ... > t_{N-1} = eps, uniform in t (the reference's grid,
    linspace(T, eps, N)). At each t_i: `corrector_steps` Langevin steps, then the reverse-diffusion
    predictor (Song Eq. 46) built on the exact forward kernel x_{t_i} = r x_{t_{i+1}} + G z:
    x <- (2 - r) x + G^2 score + G z  (the SMLD update for VE, r = 1, G^2 = sigma_i^2 - sigma_{i+1}^2,
    and the DDPM-like one for VP, r = sqrt(1 - beta_i)). The LAST predictor step goes from
    t_{N-1} = eps to sigma = 0, on the kernel x_eps = a(eps) x_0 + s(eps) z (r = a(eps), G = s(eps)),
    and its mean (2 - a) x + s^2 score is returned without noise: as score_sde's VE predictor, whose
    last step goes from the first discrete level sigma_min to the "adjacent sigma" 0 (for VE this mean
    is x + sigma_min^2 score, Tweedie's x0_hat; msdiff's levels sigma(t_i) equal the reference's
    discrete levels up to a factor (sigma_max/sigma_min)^eps <= 1.0002). The VP analogue is the same
    step to a = 1, s = 0 (the DDPM chain's last step with beta_0). On a point-mass target the
    output is the point up to float rounding, not the point plus noise of std sigma_min. Langevin step size as the
    reference: e = 2 r^2 (snr |z| / |score|)^2, norms averaged over the batch (r^2 = alpha_i of the
    reference, 1 for VE). `corrector`:
      "euler" (the reference): x <- x + e score + sqrt(2 e) z;
      "lm": Leimkuhler-Matthews, x <- x + e score + sqrt(e / 2) (z_prev + z), each z used by two
        consecutive steps (Leimkuhler & Matthews 2013); its stationary law is exact for a Gaussian
        target at any stable step size, where Euler's inflates the variance by 1 / (1 - e / 2 sigma^2).
    nfe = steps * (1 + corrector_steps) (the reference: 1000 steps, 2000 evaluations).
    """

    adaptive = False

    def __init__(self, steps: int = 1000, snr: float = 0.16, corrector_steps: int = 1, corrector: str = "euler"):
        self.steps = _positive_int("steps", steps)
        self.corrector_steps = _positive_int("corrector_steps", corrector_steps, minimum=0)
        if not (isinstance(snr, (int, float)) and math.isfinite(snr) and snr > 0):
            raise ValueError(f"snr={snr}: expected a finite number > 0")
        if corrector not in ("euler", "lm"):
            raise ValueError(f"corrector={corrector!r}: expected 'euler' or 'lm'")
        self.snr, self.corrector = float(snr), corrector

    @property
    def nfe(self) -> int:
        return self.steps * (1 + self.corrector_steps)

    def langevin(self, score_fn: ScoreFn, x: Tensor, t: Tensor, alpha: Tensor | float = 1.0,
                 generator: torch.Generator | None = None, z_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One Langevin corrector step at time t (B,) targeting p_t (Song Alg. 4, lines 7-10).
        Returns (x, z): z is the `z_prev` of the next Leimkuhler-Matthews step."""
        score = _score(score_fn, x, t)
        z = randn_like(x, generator)
        score_norm = score.reshape(x.shape[0], -1).norm(dim=1).mean()
        z_norm = z.reshape(x.shape[0], -1).norm(dim=1).mean()
        # a zero score (e.g. an untrained network with its zero-initialised head) means no step
        e = torch.where(score_norm > 0, 2 * alpha * (self.snr * z_norm / score_norm) ** 2, 0.0)
        if self.corrector == "euler":
            return x + e * score + (2 * e).sqrt() * z, z
        z_prev = randn_like(x, generator) if z_prev is None else z_prev
        return x + e * score + (e / 2).sqrt() * (z_prev + z), z

    def run(self, score_fn: ScoreFn, sde: SDE, x: Tensor, ts: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The predictor-corrector loop over the decreasing times `ts` (one predictor step per time;
        the last one from ts[-1] to sigma = 0); returns the mean of that last step."""
        z = None
        for i in range(len(ts)):
            t = _at(ts[i], x)
            if i + 1 < len(ts):
                r, G = sde.transition(t, _at(ts[i + 1], x))  # forward kernel t_{i+1} -> t_i
            else:
                r, G = sde.mean_coef(t), sde.std(t)  # forward kernel 0 -> t: x_t = a x_0 + s z
            alpha = append_dims(r**2, x.ndim)
            for _ in range(self.corrector_steps):
                x, z = self.langevin(score_fn, x, t, alpha, generator, z)
            r, G = append_dims(r, x.ndim), append_dims(G, x.ndim)
            x_mean = (2 - r) * x + G**2 * _score(score_fn, x, t)
            if i + 1 < len(ts):
                x = x_mean + G * randn_like(x, generator)
        return x_mean

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_x_T(x_T)
        return self.run(score_fn, sde, x_T, torch.linspace(sde.T, sde.eps, self.steps, device=x_T.device,
                                                           dtype=x_T.dtype), generator)


class DDIM(Sampler):
    """DDIM (Song, Meng & Ermon 2021, Eq. 12) for any x_t = a(t) x_0 + s(t) eps, VE and VP alike.

    With eps_hat = -s score and x0_hat = (x - s eps_hat) / a (Tweedie), one step t -> t' is
        x' = a' x0_hat + sqrt(s'^2 - c^2) eps_hat + c z,   c = eta s' sqrt(1 - (a s')^2 / (a' s)^2)
    (eta = 0: deterministic, the probability-flow ODE's exponential-integrator step; eta = 1: the
    ancestral sampler). `steps` evaluations on the uniform grid T -> eps; the last step goes to
    a = 1, s = 0, i.e. returns x0_hat at t = eps.
    """

    adaptive = False

    def __init__(self, steps: int = 50, eta: float = 0.0):
        self.steps = _positive_int("steps", steps)
        if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
            raise ValueError(f"eta={eta}: expected 0 <= eta <= 1")
        self.eta = float(eta)

    @property
    def nfe(self) -> int:
        return self.steps

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_x_T(x_T)
        ts = torch.linspace(sde.T, sde.eps, self.steps, device=x_T.device, dtype=x_T.dtype)
        x = x_T
        for i in range(self.steps):
            t = _at(ts[i], x)
            a, s = append_dims(sde.mean_coef(t), x.ndim), append_dims(sde.std(t), x.ndim)
            eps_hat = -s * _score(score_fn, x, t)
            x0_hat = (x - s * eps_hat) / a
            if i == self.steps - 1:
                return x0_hat
            t_next = _at(ts[i + 1], x)
            a2, s2 = append_dims(sde.mean_coef(t_next), x.ndim), append_dims(sde.std(t_next), x.ndim)
            c = self.eta * s2 * (1 - (a * s2 / (a2 * s)) ** 2).clamp_min(0).sqrt()
            x = a2 * x0_hat + (s2**2 - c**2).clamp_min(0).sqrt() * eps_hat
            if self.eta > 0:
                x = x + c * randn_like(x, generator)
        return x


def heun_integrate(score_fn: ScoreFn, sde: SDE, x_hat: Tensor, ts: Tensor, to_zero: bool) -> Tensor:
    """Heun steps of dx_hat/dsigma = (x_hat - x0_hat) / sigma through the decreasing times `ts`
    (float64), x = a(t) x_hat; with `to_zero` a last Euler step from ts[-1] to sigma = 0 (x0_hat)."""
    sig = sde.sigma(ts).to(x_hat.dtype)
    ts = ts.to(x_hat.dtype)

    def slope(x_hat: Tensor, i: int) -> Tensor:
        t = _at(ts[i], x_hat)
        x = append_dims(sde.mean_coef(t), x_hat.ndim) * x_hat
        return (x_hat - tweedie(x, t, _score(score_fn, x, t), sde)) / sig[i]

    for i in range(len(ts) - 1):
        d = slope(x_hat, i)
        h = sig[i + 1] - sig[i]
        x_hat = x_hat + 0.5 * h * (d + slope(x_hat + h * d, i + 1))
    return x_hat - sig[-1] * slope(x_hat, len(ts) - 1) if to_zero else x_hat


class Heun(Sampler):
    """Heun's 2nd-order solver of the probability-flow ODE in the EDM parameterisation (Karras et al.
    2022, Alg. 1 with the general scaling of their Eq. 4 / Table 1).

    With x = a(t) x_hat and sigma(t) = s(t)/a(t), the ODE is dx_hat/dsigma = (x_hat - x0_hat)/sigma,
    x0_hat = (x + s^2 score(x, t)) / a. sigma runs over `steps` values uniform in sigma^(1/rho)
    (Karras Eq. 5, sde.sigma_grid) from sigma(T) to sigma(eps), then to 0; every step is Heun's but
    the last (to sigma = 0), which is Euler and returns x0_hat. nfe = 2 steps - 1.
    """

    adaptive = False

    def __init__(self, steps: int = 50, rho: float = 7.0):
        self.steps = _positive_int("steps", steps)
        if not (isinstance(rho, (int, float)) and rho > 0):
            raise ValueError(f"rho={rho}: expected > 0")
        self.rho = float(rho)

    @property
    def nfe(self) -> int:
        return 2 * self.steps - 1

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_x_T(x_T)
        if self.steps == 1:
            ts = torch.full((1,), sde.T, device=x_T.device, dtype=torch.float64)
        else:
            ts = sde.sigma_grid(self.steps - 1, self.rho, device=x_T.device, dtype=torch.float64)
        return heun_integrate(score_fn, sde, x_T / sde.mean_coef(ts[:1]).to(x_T.dtype), ts, to_zero=True)


class HeunPC(Sampler):
    """Heun where noise is high, predictor-corrector where it is low: a 100-evaluation stand-in for
    the reference PC sampler with 2,000 (benchmarks/RESULTS.md, "Samplers on a trained checkpoint").

    1. `heun_steps` Heun steps (Karras et al. 2022, Alg. 1) on the sigma^(1/rho) grid from sigma(T)
       down to `sigma_switch`: above it the Langevin corrector does not change what a trained
       network samples (measured on the quickstart checkpoint), so the cheap ODE gets there.
    2. `pc_steps` steps of `PredictorCorrector` (Song et al. 2021, Alg. 2) at times uniform in
       log sigma from there to eps, with the Leimkuhler-Matthews corrector (exact for Gaussian targets
       at large steps); as the reference PC sampler, the last predictor step goes from eps to
       sigma = 0 and its mean is returned (no leftover noise of std sigma_min).
       The reference spends 500 corrector steps of snr 0.16 below sigma = 0.5 (VE, 1000 steps); the
       default snr 0.55 gives 42 steps the same total Langevin time, sum of e ~ N snr^2:
       0.16 sqrt(500 / 42) = 0.552. (On an exact score the larger steps cost a little accuracy:
       there `Heun` is the sampler to use; figures in benchmarks/RESULTS.md.)
    nfe = 2 heun_steps + pc_steps (1 + corrector_steps).
    """

    adaptive = False

    def __init__(self, heun_steps: int = 8, pc_steps: int = 42, sigma_switch: float = 0.5, snr: float = 0.55,
                 corrector_steps: int = 1, corrector: str = "lm", rho: float = 7.0):
        self.heun_steps = _positive_int("heun_steps", heun_steps, minimum=0)
        if not (isinstance(sigma_switch, (int, float)) and math.isfinite(sigma_switch) and sigma_switch > 0):
            raise ValueError(f"sigma_switch={sigma_switch}: expected a finite number > 0")
        if not (isinstance(rho, (int, float)) and rho > 0):
            raise ValueError(f"rho={rho}: expected > 0")
        self.sigma_switch, self.rho = float(sigma_switch), float(rho)
        self.pc = PredictorCorrector(pc_steps, snr, corrector_steps, corrector)

    @property
    def nfe(self) -> int:
        return 2 * self.heun_steps + self.pc.nfe

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_x_T(x_T)
        ends = torch.tensor([sde.T, sde.eps], dtype=torch.float64)
        s_max, s_min = sde.sigma(ends).tolist()
        s_sw = min(max(self.sigma_switch, s_min), s_max)
        t_sw = float(sde.t_of_sigma(torch.tensor(s_sw, dtype=torch.float64)).clamp(sde.eps, sde.T))
        x = x_T
        if self.heun_steps:  # (steps of zero length when sigma_switch >= sigma(T): nfe stays exact)
            ts = sde.sigma_grid(self.heun_steps, self.rho, device=x_T.device, dtype=torch.float64, sigma_end=s_sw)
            ts[-1] = t_sw
            a = sde.mean_coef(ts[[0, -1]]).to(x_T.dtype)
            x = heun_integrate(score_fn, sde, x_T / a[0], ts, to_zero=False) * a[1]
        log_sig = torch.linspace(math.log(s_sw), math.log(s_min), self.pc.steps, dtype=torch.float64)
        ts = sde.t_of_sigma(log_sig.exp()).clamp(sde.eps, sde.T)
        ts[0] = t_sw
        if len(ts) > 1:
            ts[-1] = sde.eps
        return self.pc.run(score_fn, sde, x, ts.to(device=x_T.device, dtype=x_T.dtype), generator)


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
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_x_T(x_T)
        shape, dev, dt = x_T.shape, x_T.device, x_T.dtype

        def fun(t: float, y: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(y).to(device=dev, dtype=dt).reshape(shape)
            tv = torch.full((shape[0],), t, device=dev, dtype=dt)
            drift = sde.reverse_drift(x, tv, _score(score_fn, x, tv), probability_flow=True)
            return drift.double().cpu().numpy().ravel()

        y = self._solve(fun, x_T.detach().double().cpu().numpy().ravel(), sde.T, sde.eps)
        x = torch.from_numpy(y).to(device=dev, dtype=dt).reshape(shape)
        if self.denoise:
            t = torch.full((shape[0],), sde.eps, device=dev, dtype=dt)
            x = tweedie(x, t, _score(score_fn, x, t), sde)
            self.nfe += 1
        return x

    def log_likelihood(self, score_fn: ScoreFn, sde: SDE, x: Tensor, exact_trace: bool = False,
                       generator: torch.Generator | None = None, noise: str = "rademacher") -> Tensor:
        """log p_eps(x) in nats per example, (B,) float64 (Song et al. 2021, Eq. 39; Chen et al. 2018):

            log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt,  f~ = f x - g^2 score / 2,

        integrating x and the divergence together from eps to T. The divergence is exact (one
        autograd pass per dimension; small data only) or Hutchinson's estimate E[v^T J v] with one
        fixed Rademacher or Gaussian probe v per call (Grathwohl et al. 2019). x is data at time
        eps (no dequantisation here; see bits_per_dim).
        """
        _check_x_T(x)
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
                drift = sde.reverse_drift(xg, tv, _score(score_fn, xg, tv), probability_flow=True)
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
