"""The sampler base types (`Sampler`; `GridSampler`, a sampler of `steps` evaluations on a time
grid) and the small pieces every sampler family shares: the score-function type, Tweedie's
formula, and the checks of arguments and inputs."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

from msdiff.samplers.grids import TimeGrid, check_grid
from msdiff.sde import SDE
from msdiff.utils import Generators, append_dims

ScoreFn = Callable[[Tensor, Tensor], Tensor]


class Sampler(ABC):
    """The one sampler signature (k-diffusion style): `x0 = sampler(score_fn, sde, x_T, generator)`.

    The base type of every sampler, so that a YAML/CLI `class_path` (`sample.py --sampler Heun`)
    can name any of them and `--help` lists them. `nfe` is the number of score evaluations per
    sample (None when it is only known after a run); `adaptive` is True when the sampler chooses its
    own steps by error control, so its score must be deterministic in (x, t). Abstract, so that
    `--help` lists only the samplers that run.
    """

    adaptive: bool = False
    nfe: int | None = None  # subclasses: a property, or (ProbabilityFlowODE) the count of the last run

    @abstractmethod
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        """The sample drawn from x_T (at time T) with score_fn; the package docstring says where each
        sampler ends (sigma = 0 for all but ProbabilityFlowODE(denoise=False))."""


def tweedie(x: Tensor, t: Tensor, score: Tensor, sde: SDE) -> Tensor:
    """x0_hat = E[x_0 | x_t] = (x_t + s(t)^2 score) / a(t) (Tweedie's formula; Efron 2011)."""
    a, s = append_dims(sde.mean_coef(t), x.ndim), append_dims(sde.std(t), x.ndim)
    return (x + s**2 * score) / a


def positive_int(name: str, value: int, minimum: int = 1) -> int:
    """`value` as an int, or a ValueError naming `name` when it is not an integer >= `minimum`."""
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name}={value}: expected an integer >= {minimum}")
    return int(value)


def positive_float(name: str, value: float) -> float:
    """`value` as a float, or a ValueError naming `name` when it is not a finite number > 0."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value}: expected a finite number > 0")
    return float(value)


def check_x_T(x_T: Tensor) -> None:
    """A ValueError unless x_T is a floating (B, ...) tensor with B >= 1."""
    if not isinstance(x_T, Tensor) or x_T.ndim < 2 or x_T.shape[0] < 1 or not x_T.is_floating_point():
        got = tuple(x_T.shape) if isinstance(x_T, Tensor) else type(x_T).__name__
        raise ValueError(f"x_T: expected a floating tensor of shape (B, ...) with B >= 1, got {got}")


def batch_time(t: Tensor, x: Tensor) -> Tensor:
    """A scalar time (0-dim tensor) broadcast to the (B,) vector score_fn expects."""
    return t.expand(x.shape[0])


def checked_score(score_fn: ScoreFn, x: Tensor, t: Tensor) -> Tensor:
    """score_fn(x, t), or a ValueError when its shape is not x's."""
    s = score_fn(x, t)
    if s.shape != x.shape:
        raise ValueError(f"score_fn: expected a score of shape {tuple(x.shape)}, got {tuple(s.shape)}")
    return s


class GridSampler(Sampler):
    """A sampler that evaluates the score once at each of the `steps` times of its `grid` (from T to
    eps; the step from the last one goes to sigma = 0, see msdiff.samplers.grids). Subclasses keep
    their own typed constructor (LightningCLI reads it) and call this one."""

    def __init__(self, steps: int, grid: TimeGrid):
        self.steps = positive_int("steps", steps)
        self.grid = check_grid("grid", grid)

    @property
    def nfe(self) -> int:
        return self.steps

    def times(self, sde: SDE, x_T: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The grid's `steps` times for a run from x_T (checked), on x_T's device, in `dtype` (x_T's
        by default)."""
        check_x_T(x_T)
        return self.grid(sde, self.steps, x_T.device, x_T.dtype if dtype is None else dtype)
