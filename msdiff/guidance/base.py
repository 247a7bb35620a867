"""The `Guidance` base type and THE composition prior -> score_fn -> sampler (layer 2, plain torch).

Sampling a batch of conditions y is, for every guidance and every sampler,

    score_fn = guidance.score_fn(estimator, net, y, generator, fixed_y_noise=sampler.adaptive)
    x_T      = sde.prior_sampling((B, C_x, H, W), generator)                 the SDE's prior
    x_0      = sampler(score_fn, sde, x_T, generator)                         any `msdiff.samplers.Sampler`

`Guidance.sample` is that composition, written once; the validation grids of training
(`ScoreSystem.sample`) and sample.py (`msdiff.sampling.loop.SamplingJob.draw`) both call it.
A guidance changes the score (`score_fn`: CFG, ASAG, PAG, SEG wrap the estimator's score) or, like
AGG (which inverts the condition instead of starting from the prior), the whole of `sample`.
`Unguided` is the estimator's own score.

`fixed_y_noise`: an adaptive sampler (the probability-flow ODE) needs a score that is a
deterministic function of (x, t); for the diffusive estimators (CDiffE, CMDE, VS-CMDE) every
`score_fn` then draws the y_t noise z once and reuses it at every call (see
`msdiff.estimators.base.ConditionalScoreEstimator.score_fn`).

As the base type of `sample.py --guidance` (a jsonargparse `class_path` argument), its subclasses
are the choices `--help` lists: `--guidance PAG --guidance.scale 3`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from msdiff.estimators import ConditionalEstimator
from msdiff.samplers import Sampler
from msdiff.tasks import Task
from msdiff.utils import Generators

__all__ = ["Guidance", "Unguided", "ScoreFn"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


class Guidance:
    """Guidance, the base type of sample.py's --guidance: how conditions become samples.

    Subclasses override `score_fn` (score-wrapping guidance) or `sample` (a guidance that replaces
    the prior and the sampler); module doc."""

    #: network evaluations, in units of the batch, of one call of the score this guidance returns
    evaluations: int = 1
    #: whether `sample` ignores the sampler (AGG runs its own inversion and reverse pass)
    replaces_sampler: bool = False

    def record(self, estimator: ConditionalEstimator) -> dict[str, str]:
        """Choices made while sampling, for metrics.json's settings (AGG: the prior it resolved)."""
        return {}

    def score_fn(self, estimator: ConditionalEstimator, net: nn.Module, y: Tensor, generator: Generators = None,
                 fixed_y_noise: bool = False) -> ScoreFn:
        """The x-score `score(x_t, t)` the sampler integrates; here the estimator's own."""
        return estimator.score_fn(net, y, generator=generator, fixed_y_noise=fixed_y_noise)

    def nfe(self, sampler: Sampler) -> Optional[int]:
        """Network evaluations (forward passes of the batch) per sample with `sampler`; None when
        only known after the run (an adaptive sampler)."""
        return None if sampler.nfe is None else int(sampler.nfe) * self.evaluations

    def sample(self, estimator: ConditionalEstimator, net: nn.Module, y: Tensor, sampler: Sampler, x_channels: int,
               generator: Generators = None, task: Optional[Task] = None,
               mask: Optional[Tensor] = None) -> Tensor:
        """Raw samples x (not clamped) for the conditions y (B, C_y, H, W): x_T from the SDE's prior,
        this guidance's score (with fixed y_t noise for an adaptive sampler), then `sampler`.
        `task` and `mask` (the condition's degradation and, for inpainting, its real mask) are not
        needed here; guidances that use the measurement (AGG) read them."""
        sde = estimator.sampling_sde
        score_fn = self.score_fn(estimator, net, y, generator, fixed_y_noise=sampler.adaptive)  # (draws a fixed z first)
        x_T = sde.prior_sampling((y.shape[0], x_channels, *y.shape[2:]), generator=generator, device=y.device,
                                 dtype=y.dtype)
        return sampler(score_fn, sde, x_T, generator=generator)


class Unguided(Guidance):
    """No guidance: the sampler integrates the estimator's conditional score (sample.py's default)."""

    def __repr__(self) -> str:
        return "Unguided()"
