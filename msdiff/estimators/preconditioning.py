"""How the network's input and output relate to x_t: the preconditioning of Karras et al. 2022
("Elucidating the Design Space of Diffusion-Based Generative Models", Eq. 7 and Table 1),

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise),

applied to each part of the network input (x_t, and y_t or the clean y) on its own. A part
v = a v_0 + s z of an SDE with mean coefficient a and std s is first put in the preconditioning's
units (`units`: its variable x and noise level sigma there). The estimators train F to predict -z,
the negated standard-normal noise, so what they take from a preconditioning is

    neg_z = (D(x; sigma) - x) / sigma

(`neg_z`), which every estimator divides by std(t) to get the score. Two preconditionings:

* `ReferencePrecond`: the reference code's (score_sde, MSDiff): F sees the part mapped to [-1, 1]
  (2 v - 1 for [0, 1] data) and its output is the prediction of -z: Table 1's VE column,
  c_skip = 1, c_out = sigma, c_in = 1.
* `EDMPrecond`: Table 1's EDM column, c_skip = sd^2 / (sigma^2 + sd^2),
  c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), with sd = sigma_data;
  F's input and target have unit scale at every noise level.

c_noise: both feed the network the time label 999 t (DDPM's discrete-time scale), not Table 1's
functions of sigma (EDM's ln(sigma) / 4): under CMDE x and y have different sigmas at the same t,
and only the time means the same for both.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from msdiff.utils import to_symmetric_range


def centered_units(centered: bool) -> tuple[float, float]:
    """(k, m) of the map u = k (v - m) from data units to [-1, 1]: (2, 0.5) for [0, 1] data, (1, 0)
    when the data are already centered."""
    return (1.0, 0.0) if centered else (2.0, 0.5)


class Preconditioning(ABC):
    """Karras et al. 2022, Eq. 7: the scalings c_skip, c_out, c_in and c_noise of one part of the
    network input, and the prediction of -z they compose to (module docstring)."""

    @abstractmethod
    def units(self, v: Tensor, a: Tensor, s: Tensor, centered: bool) -> tuple[Tensor, Tensor]:
        """(x, sigma): the part v = a v_0 + s z in this preconditioning's units, and its noise level
        there. a and s broadcast against v; a clean condition has a = 1, s = 0."""

    @abstractmethod
    def c_skip(self, sigma: Tensor) -> Tensor:
        """Weight of the skip connection x in D."""

    @abstractmethod
    def c_out(self, sigma: Tensor) -> Tensor:
        """Scale of the network output F in D."""

    @abstractmethod
    def c_in(self, sigma: Tensor) -> Tensor:
        """Scale of the network input: F sees c_in(sigma) x."""

    @staticmethod
    def c_noise(t: Tensor) -> Tensor:
        """The (B,) label the network receives at time t: 999 t (module docstring)."""
        return 999.0 * t

    def net_input(self, x: Tensor, sigma: Tensor) -> Tensor:
        """What F sees of this part: c_in(sigma) x."""
        return self.c_in(sigma) * x

    @abstractmethod
    def neg_z(self, x: Tensor, sigma: Tensor, f: Tensor) -> Tensor:
        """The prediction of -z, (D - x) / sigma with D = c_skip x + c_out f (f: F's output for
        this part). Subclasses write it in closed form, which stays exact as sigma -> 0."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


class ReferencePrecond(Preconditioning):
    """The reference parameterisation (Song et al. 2021 score_sde, Batzolis et al. 2021 MSDiff):
    the network sees x = 2 v - 1 (v itself when `centered`) and predicts -z; the score is its
    output over std(t). In Table 1's terms (its VE column) c_skip = 1, c_out = sigma, c_in = 1 with
    sigma = k s, the noise std in those units, so (D - x) / sigma is the output F itself."""

    def units(self, v: Tensor, a: Tensor, s: Tensor, centered: bool) -> tuple[Tensor, Tensor]:
        k, _ = centered_units(centered)
        return (v if centered else to_symmetric_range(v)), k * s

    def c_skip(self, sigma: Tensor) -> Tensor:
        return sigma.new_ones(()).expand_as(sigma)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma

    def c_in(self, sigma: Tensor) -> Tensor:
        return sigma.new_ones(()).expand_as(sigma)

    def net_input(self, x: Tensor, sigma: Tensor) -> Tensor:
        return x  # c_in = 1

    def neg_z(self, x: Tensor, sigma: Tensor, f: Tensor) -> Tensor:
        return f  # (x + sigma f - x) / sigma


class EDMPrecond(Preconditioning):
    """EDM preconditioning (Karras et al. 2022, Table 1, EDM column; their `EDMPrecond`).

    In centered units u = k (v - a m) (k = 2, m = 0.5 for [0, 1] data; k = 1, m = 0 when
    centered) each part is scaled back to unit signal, x = u / a = k (v / a - m), with noise level
    sigma = k s / a (sigma = 0 for the clean condition of CDE). A network that outputs zeros is
    the exact Bayes denoiser of x_0 ~ N(0, sigma_data^2 I).

    Args:
        sigma_data: the data's standard deviation in [-1, 1] units (EDM's 0.5).
    """

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data}: expected a positive standard deviation")
        self.sigma_data = float(sigma_data)

    def units(self, v: Tensor, a: Tensor, s: Tensor, centered: bool) -> tuple[Tensor, Tensor]:
        k, m = centered_units(centered)
        return k * (v / a - m), k * (s / a)

    def c_skip(self, sigma: Tensor) -> Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma * self.sigma_data * (sigma**2 + self.sigma_data**2).rsqrt()

    def c_in(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + self.sigma_data**2).rsqrt()

    def neg_z(self, x: Tensor, sigma: Tensor, f: Tensor) -> Tensor:
        """(c_skip - 1) / sigma = -sigma c_in^2 and c_out / sigma = sigma_data c_in, hence
        (D - x) / sigma = c_in (sigma_data f - sigma c_in x), free of the cancellation in D - x."""
        c_in = self.c_in(sigma)
        return c_in * (self.sigma_data * f - sigma * c_in * x)

    def __repr__(self) -> str:
        return f"EDMPrecond(sigma_data={self.sigma_data})"
