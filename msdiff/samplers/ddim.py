"""DDIM (Song, Meng & Ermon 2021) for any x_t = a(t) x_0 + s(t) eps: the one DDIM step `ddim_step`
(used by the DDIM sampler and by AGG's guided sampler and inversion) and the DDIM sampler."""
from __future__ import annotations

import torch
from torch import Tensor

from msdiff.samplers.base import GridSampler, ScoreFn, batch_time, checked_score
from msdiff.samplers.grids import TimeGrid, UniformTime
from msdiff.sde import SDE
from msdiff.utils import Generators, append_dims, randn_like


def _check_eta(eta: float) -> float:
    if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"eta={eta}: expected 0 <= eta <= 1")
    return float(eta)


def ddim_step(sde: SDE, x0_hat: Tensor, eps_hat: Tensor, t: Tensor, t_next: Tensor, eta: float,
              generator: Generators = None) -> Tensor:
    """One DDIM step t -> t' (Song, Meng & Ermon 2021, Eq. 12) in the general form x_t = a x_0 + s eps:

        x' = a' x0_hat + sqrt(s'^2 - c^2) eps_hat + c z,   c = eta s' sqrt(1 - (a s')^2 / (a' s)^2),

    with a = a(t), s = s(t), a' = a(t'), s' = s(t') and z ~ N(0, I) drawn from `generator` only when
    eta > 0. For VP (a^2 = abar), c is DDIM's sigma_t(eta) of Eq. 16; c^2 = eta^2 s'^2 G^2 / s^2 with
    G^2 = s^2 - (a/a')^2 s'^2 the forward transition variance t' -> t (sde.transition), so eta = 1 is
    the ancestral (DDPM posterior) step and eta = 0 the deterministic one, the probability-flow ODE's
    exponential-integrator step. With eta = 0 and t' > t it is the deterministic DDIM inversion step
    x' = a' x0_hat + s' eps_hat. t, t_next: (B,) (or 0-dim) times; x0_hat, eps_hat: (B, ...).
    """
    eta = _check_eta(eta)
    a, s = append_dims(sde.mean_coef(t), x0_hat.ndim), append_dims(sde.std(t), x0_hat.ndim)
    a2, s2 = append_dims(sde.mean_coef(t_next), x0_hat.ndim), append_dims(sde.std(t_next), x0_hat.ndim)
    c = eta * s2 * (1 - (a * s2 / (a2 * s)) ** 2).clamp_min(0).sqrt()
    x = a2 * x0_hat + (s2**2 - c**2).clamp_min(0).sqrt() * eps_hat
    if eta > 0:
        x = x + c * randn_like(x, generator)
    return x


class DDIM(GridSampler):
    """DDIM (Song, Meng & Ermon 2021, Eq. 12) for any x_t = a(t) x_0 + s(t) eps, VE and VP alike.

    At each time t of `grid`: eps_hat = -s score, x0_hat = (x - s eps_hat) / a (Tweedie), then
    `ddim_step` to the next time (eta = 0: deterministic, the probability-flow ODE's
    exponential-integrator step; eta = 1: the ancestral sampler). `steps` evaluations at the `steps`
    times of `grid` (by default uniform in t from T to eps; `KarrasSigma()` for EDM's); the last
    step goes to a = 1, s = 0, i.e. returns x0_hat at t = eps.
    """

    adaptive = False

    def __init__(self, steps: int = 50, eta: float = 0.0, grid: TimeGrid = UniformTime()):
        super().__init__(steps, grid)
        self.eta = _check_eta(eta)

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        ts = self.times(sde, x_T)
        x = x_T
        for i in range(self.steps):
            t = batch_time(ts[i], x)
            a, s = append_dims(sde.mean_coef(t), x.ndim), append_dims(sde.std(t), x.ndim)
            eps_hat = -s * checked_score(score_fn, x, t)
            x0_hat = (x - s * eps_hat) / a
            if i == self.steps - 1:
                return x0_hat
            x = ddim_step(sde, x0_hat, eps_hat, t, batch_time(ts[i + 1], x), self.eta, generator)
        return x
