"""Where training spends its steps: the distribution of the training time t (equivalently of the
noise level sigma(t)) from which `ConditionalEstimator.loss` draws one t per example.

* `UniformTimes()`: t ~ U(t_eps, T), the reference (Song et al. 2021; Batzolis et al. 2021).
* `LogNormalSigma(mean, std)`: EDM's training distribution (Karras et al. 2022, Table 1,
  "p_train": ln(sigma) ~ N(P_mean, P_std^2), P_mean = -1.2, P_std = 1.2), with sigma in the units of
  data in [-1, 1] as in EDM; t = t_of_sigma(sigma), clipped to [t_eps, T]. It spends the steps on
  the middle noise levels, where a short run learns the most (the quickstart: benchmarks/RESULTS.md).

Each is a small frozen dataclass, so its arguments are typed for LightningCLI/jsonargparse and a
config names it with a class_path (`noise_levels: {class_path: msdiff.estimators.LogNormalSigma}`).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from msdiff.sde import SDE


class NoiseLevels(ABC):
    """Draws the (batch,) training times of `sde` in [t_eps, T]."""

    @abstractmethod
    def sample_t(self, sde: SDE, batch: int, t_eps: float, centered: bool, generator: torch.Generator | None = None,
                 device=None, dtype=torch.float32) -> Tensor:
        """One training time per example; `centered` says whether the data live in [-1, 1]."""


@dataclass(frozen=True)
class UniformTimes(NoiseLevels):
    """t ~ U(t_eps, T) (the reference)."""

    def sample_t(self, sde: SDE, batch: int, t_eps: float, centered: bool, generator: torch.Generator | None = None,
                 device=None, dtype=torch.float32) -> Tensor:
        u = torch.rand(batch, generator=generator, device=device, dtype=dtype)
        return t_eps + (sde.T - t_eps) * u


@dataclass(frozen=True)
class LogNormalSigma(NoiseLevels):
    """ln(sigma_[-1,1]) ~ N(mean, std^2) (Karras et al. 2022, Table 1: P_mean = -1.2, P_std = 1.2);
    for data in [0, 1] (centered=False) sigma(t) = sigma_[-1,1] / 2, then t = t_of_sigma(sigma)."""

    mean: float = -1.2
    std: float = 1.2

    def __post_init__(self) -> None:
        if not math.isfinite(self.mean):
            raise ValueError(f"LogNormalSigma.mean={self.mean}: expected a finite number")
        if not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"LogNormalSigma.std={self.std}: expected a finite number > 0")

    def sample_t(self, sde: SDE, batch: int, t_eps: float, centered: bool, generator: torch.Generator | None = None,
                 device=None, dtype=torch.float32) -> Tensor:
        n = torch.randn(batch, generator=generator, device=device, dtype=dtype)
        units = 1.0 if centered else 2.0  # [0, 1] data: sigma in [-1, 1] units is 2 sigma(t)
        sigma = torch.exp(self.mean + self.std * n) / units
        return sde.t_of_sigma(sigma).clamp(t_eps, sde.T)
