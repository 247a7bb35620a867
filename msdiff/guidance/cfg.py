"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Eq. 6) for
the conditional score estimators, and the branch evaluation it shares with attention guidance.

A CDE trained with condition dropout (`p_uncond > 0`) learns both the conditional score s_c and,
with the null condition, the unconditional score s_u. CFG samples with

    s_w(x_t, t) = s_u + w (s_c - s_u),

in score form (the same combination as eps_u + w (eps_c - eps_u), since eps = -std * s is linear
in s). Convention: w = 1 is the plain conditional score (and skips the unconditional pass), w = 0
the unconditional one, w > 1 strengthens the condition (Ho & Salimans' w is our w - 1).

For CFG combined with ASAG / PAG / SEG use their `cfg_scale` (`msdiff.guidance.attention`).

Branches (conditional, unconditional, perturbed) are evaluated at the SAME x_t, t and, for the
diffusive estimators, the SAME y_t: `network_condition` draws y_t once per score call and
`x_scores` evaluates any number of conditions in one batched network call.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from msdiff.estimators import ConditionalEstimator
from msdiff.guidance.base import Guidance, ScoreFn
from msdiff.utils import Generators, randn_like

__all__ = ["CFG", "network_condition", "fixed_noise", "x_scores", "require_cfg", "check_scale"]


def check_scale(name: str, value: float) -> float:
    """A guidance scale as float: finite and >= 0, else ValueError naming `name`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}") from None
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return v


def require_cfg(estimator: ConditionalEstimator) -> None:
    """ValueError unless the estimator was trained with condition dropout (an unconditional score exists)."""
    if not estimator.trained_for_cfg:
        raise ValueError(f"estimator: classifier-free guidance needs a CDE trained with condition dropout "
                         f"(p_uncond > 0); got {type(estimator).__name__} with p_uncond={estimator.p_uncond}")


def fixed_noise(estimator: ConditionalEstimator, y: Tensor, generator: Generators, fixed_y_noise: bool
                ) -> Tensor | None:
    """The y_t noise z drawn ONCE for a score that must be deterministic in (x, t) (an adaptive
    sampler: `fixed_y_noise=True`), exactly as `estimator.score_fn` draws it; None otherwise (and
    for CDE, which feeds the clean y)."""
    return randn_like(y, generator) if fixed_y_noise and estimator.y_sde is not None else None


def network_condition(estimator: ConditionalEstimator, y: Tensor, x: Tensor, t: Tensor,
                      generator: Generators = None, z: Tensor | None = None) -> Tensor:
    """What the estimator's network sees next to x_t at time t (B,): the clean y for CDE, else
    y_t = a_y(t) y + std_y(t) z with ONE fresh z from `generator` per call, or the fixed z given
    (`fixed_noise`) (CDiffE, CMDE, VS-CMDE), the same operations, in the same order, as
    `estimator.score_fn`. Every guidance branch reuses it."""
    return estimator.network_condition(y.to(device=x.device, dtype=x.dtype), t, generator, z)


def x_scores(estimator: ConditionalEstimator, net: nn.Module, x: Tensor, t: Tensor, conds: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The estimator's x-score at (x_t, t) for each condition in `conds`, in ONE network call on
    the batch [x; x; ...] next to [cond_0; cond_1; ...]. Returns one (B, ...) tensor per condition;
    with a single condition it is bitwise `estimator.score_fn` at the same condition."""
    n = len(conds)
    xs = x if n == 1 else torch.cat([x] * n)
    ts = t if n == 1 else torch.cat([t] * n)
    cs = conds[0] if n == 1 else torch.cat(list(conds))
    score = estimator.x_score(net, xs, cs, ts)
    return score.chunk(n) if n > 1 else (score,)


class CFG(Guidance):
    """Classifier-free guidance, s_u + w (s_c - s_u) (Ho & Salimans 2022, Eq. 6; module doc).

    Args:
        scale: the guidance weight w >= 0 (1: conditional score, no extra pass).
        batched: evaluate the conditional and unconditional branches in one network call of
            twice the batch (faster); False runs two calls of the batch (less memory).
    """

    def __init__(self, scale: float = 2.0, batched: bool = True) -> None:
        self.scale = check_scale("scale", scale)
        self.batched = bool(batched)

    @property
    def evaluations(self) -> int:
        """Network evaluations (in units of the batch) per score call: 2, or 1 when w = 1."""
        return 1 if self.scale == 1.0 else 2

    def score_fn(self, estimator: ConditionalEstimator, net: nn.Module, y: Tensor,
                 generator: Generators = None, fixed_y_noise: bool = False) -> ScoreFn:
        """The guided x-score `score(x_t, t)`; ValueError if the estimator was not trained for CFG.
        fixed_y_noise: one y_t noise for every call (adaptive samplers; `msdiff.guidance.base`)."""
        require_cfg(estimator)
        if self.scale == 1.0:
            return estimator.score_fn(net, y, generator, fixed_y_noise=fixed_y_noise)
        w, batched = self.scale, self.batched
        z = fixed_noise(estimator, y, generator, fixed_y_noise)

        def score(x: Tensor, t: Tensor) -> Tensor:
            _, t = estimator.prepare(x, y, t)
            cond = network_condition(estimator, y, x, t, generator, z)
            null = estimator.null_condition(cond)
            if batched:
                s_c, s_u = x_scores(estimator, net, x, t, (cond, null))
            else:
                (s_c,), (s_u,) = x_scores(estimator, net, x, t, (cond,)), x_scores(estimator, net, x, t, (null,))
            return s_u + w * (s_c - s_u)

        return score

    def __repr__(self) -> str:
        return f"CFG(scale={self.scale}, batched={self.batched})"
