"""The weighting lambda(t) of the denoising score-matching loss (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", Eq. 7), written per example on the eps-MSE: with the network
predicting -z and the score out / std(t),

    lambda(t) || score + z / std ||^2 = (lambda(t) / std(t)^2) || out + z ||^2,

so a weighting returns w(t) = lambda(t) / std(t)^2 for the SDE of the part it weights (x, or y
for the diffusive estimators: Batzolis et al. 2021, Theorem 2 weights each by its own SDE).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from msdiff.sde import SDE


class Weighting(ABC):
    """w(t) = lambda(t) / std(t)^2, the per-example weight of the eps-MSE, shape (B,)."""

    @abstractmethod
    def __call__(self, sde: SDE, t: Tensor) -> Tensor:
        """The (B,) weight of a part diffused by `sde` at times t."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class LikelihoodWeighting(Weighting):
    """lambda(t) = g(t)^2, the maximum-likelihood weighting (Song et al. 2021b, Theorem 1;
    Batzolis et al. 2021, Theorem 2; the reference): w = (g / std)^2. For VE it is the constant
    2 ln(sigma_max / sigma_min)."""

    def __call__(self, sde: SDE, t: Tensor) -> Tensor:
        return (sde.diffusion(t) / sde.std(t)) ** 2


class SimpleWeighting(Weighting):
    """lambda(t) = std(t)^2: the plain eps-MSE of Ho et al. 2020 ("L_simple"), w = 1; better
    conditioned than the likelihood weighting for VP, whose g^2 / std^2 ~ 1 / t near t = 0."""

    def __call__(self, sde: SDE, t: Tensor) -> Tensor:
        return torch.ones_like(t)
