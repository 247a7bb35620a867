"""Time grids, built here and handed to the samplers (k-diffusion style), so that any sampler runs on
any grid: `DDIM(steps=50, grid=KarrasSigma())`, `Heun(steps=50, grid=UniformTime())`, or from the
command line `--sampler DDIM --sampler.grid KarrasSigma --sampler.grid.rho 5`.

    ts = grid(sde, n, device, dtype)          # n times, T = ts[0] > ts[1] > ... > ts[-1] = eps

The convention, one for every sampler. A grid of n points holds the times at which a sampler
evaluates the score (k-diffusion's sigmas without the appended sigma = 0). The sampler takes one
step from each grid time to the next and, from the last one (eps), one step to sigma = 0, so
`steps` steps need n = steps points: EulerMaruyama, PredictorCorrector, DDIM and Heun all ask for
n = steps (their step counts agree with each other and with k-diffusion's `n` sigmas + 0). A
stretch of the trajectory that ends at a time instead of at sigma = 0 (HeunPC's Heun part, which
ends at sigma_switch; AGG's DDIM inversion, which ends at its t_start) takes n = steps + 1 points,
as did the SDEs' former `time_grid(steps)` / `sigma_grid(steps)`. So DDIM's `steps` points against
the others' `steps + 1` was a difference in what was counted (whether sigma = 0 is a point), not in
the number of steps: DDIM(N) takes N steps, as EulerMaruyama(N), PredictorCorrector(N) and Heun(N)
do, and needs no change.

The two ends. The first time is exactly sde.T and the last exactly sde.eps; `sigma_start` /
`sigma_end` move them to the times where sigma(t) = s(t)/a(t) takes those values (clamped to
[eps, T]), which is how HeunPC splits its trajectory at sigma_switch. With n = 1 the grid is its
first time alone. Grids defined in sigma (KarrasSigma, LogSigma) are computed in float64 and
rounded to `dtype`; UniformTime is torch.linspace in `dtype` itself (the reference's grid).

Each grid is a small frozen dataclass, so its arguments are typed for LightningCLI/jsonargparse and
a default instance serialises into a resolved config.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from msdiff.sde import SDE


def sigma_ends(sde: SDE) -> tuple[float, float]:
    """(sigma(T), sigma(eps)) in float64."""
    s_T, s_eps = sde.sigma(torch.tensor([sde.T, sde.eps], dtype=torch.float64)).tolist()
    return s_T, s_eps


def sigma_in_range(sde: SDE, sigma: float) -> float:
    """`sigma` clamped to [sigma(eps), sigma(T)] (where a sampler switches from one method to another)."""
    s_max, s_min = sigma_ends(sde)
    return min(max(sigma, s_min), s_max)


def time_of_sigma(sde: SDE, sigma: float) -> float:
    """The time t in [eps, T] with sigma(t) = `sigma` (clamped to that interval), in float64."""
    return float(sde.t_of_sigma(torch.tensor(sigma, dtype=torch.float64)).clamp(sde.eps, sde.T))


def _check_n(n: int) -> int:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n={n}: expected an integer >= 1 (the number of grid times)")
    return int(n)


def _check_sigma(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value}: expected a finite sigma > 0 (or None)")


class TimeGrid(ABC):
    """n decreasing times from T (or the time of `sigma_start`) to eps (or the time of `sigma_end`);
    see the module docstring for the convention."""

    @abstractmethod
    def __call__(self, sde: SDE, n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 *, sigma_start: float | None = None, sigma_end: float | None = None) -> Tensor:
        ...


@dataclass(frozen=True)
class UniformTime(TimeGrid):
    """Times uniform in t, linspace(T, eps, n) (Song et al. 2021's samplers and their reference code;
    DDIM's "uniform" skip of Song, Meng & Ermon 2021, Sec. 4.2, on a continuous time axis)."""

    def __call__(self, sde: SDE, n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 *, sigma_start: float | None = None, sigma_end: float | None = None) -> Tensor:
        n = _check_n(n)
        _check_sigma("sigma_start", sigma_start)
        _check_sigma("sigma_end", sigma_end)
        t_hi = sde.T if sigma_start is None else time_of_sigma(sde, sigma_start)
        t_lo = sde.eps if sigma_end is None else time_of_sigma(sde, sigma_end)
        return torch.linspace(t_hi, t_lo, n, device=device, dtype=dtype)


class SigmaGrid(TimeGrid):
    """A grid given by n decreasing sigma values from sigma_hi to sigma_lo, mapped back to times
    t = t_of_sigma(sigma) (float64), with the two ends placed exactly at T / eps or at the times of
    `sigma_start` / `sigma_end`."""

    @abstractmethod
    def sigmas(self, sigma_hi: float, sigma_lo: float, n: int) -> Tensor:
        """n float64 sigmas from sigma_hi down to sigma_lo."""

    def __call__(self, sde: SDE, n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 *, sigma_start: float | None = None, sigma_end: float | None = None) -> Tensor:
        n = _check_n(n)
        _check_sigma("sigma_start", sigma_start)
        _check_sigma("sigma_end", sigma_end)
        s_T, s_eps = sigma_ends(sde)
        s_hi = s_T if sigma_start is None else float(sigma_start)
        s_lo = s_eps if sigma_end is None else float(sigma_end)
        t = sde.t_of_sigma(self.sigmas(s_hi, s_lo, n)).clamp(sde.eps, sde.T)
        t[0] = sde.T if sigma_start is None else time_of_sigma(sde, s_hi)
        if n > 1:
            t[-1] = sde.eps if sigma_end is None else time_of_sigma(sde, s_lo)
        return t.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class KarrasSigma(SigmaGrid):
    """sigma uniform in sigma^(1/rho) (Karras et al. 2022, Eq. 5):
    sigma_i = (sigma_hi^(1/rho) + i/(n-1) (sigma_lo^(1/rho) - sigma_hi^(1/rho)))^rho,
    which puts the steps at low noise, where a deterministic solver needs them (rho = 7 in EDM)."""

    rho: float = 7.0

    def __post_init__(self):
        if isinstance(self.rho, bool) or not (isinstance(self.rho, (int, float)) and math.isfinite(self.rho)
                                              and self.rho > 0):
            raise ValueError(f"rho={self.rho}: expected a finite number > 0")
        object.__setattr__(self, "rho", float(self.rho))

    def sigmas(self, sigma_hi: float, sigma_lo: float, n: int) -> Tensor:
        rho = self.rho
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        return (sigma_hi ** (1 / rho) + ramp * (sigma_lo ** (1 / rho) - sigma_hi ** (1 / rho))) ** rho


@dataclass(frozen=True)
class LogSigma(SigmaGrid):
    """sigma uniform in log sigma (the geometric noise levels of SMLD, Song & Ermon 2019; for the VE
    SDE the same as uniform in t)."""

    def sigmas(self, sigma_hi: float, sigma_lo: float, n: int) -> Tensor:
        return torch.linspace(math.log(sigma_hi), math.log(sigma_lo), n, dtype=torch.float64).exp()


def check_grid(name: str, grid: TimeGrid) -> TimeGrid:
    """`grid`, or a ValueError naming the argument when it is not a TimeGrid."""
    if not isinstance(grid, TimeGrid):
        raise ValueError(f"{name}={grid!r}: expected a TimeGrid (UniformTime(), KarrasSigma(rho), LogSigma())")
    return grid
