"""Linear SDEs with Gaussian marginals (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", Eqs. 5-6, 9-11, 29-34) and the multi-speed pair of Batzolis et al.
2021 ("Conditional Image Generation with Score-Based Diffusion Models", Sec. 4).

Every SDE here has the form

    dx = f(t) x dt + g(t) dw,                                                      (Song Eq. 5)

whose perturbation kernel is Gaussian, x_t = a(t) x_0 + s(t) z with z ~ N(0, I). A subclass gives
four scalar schedules of t, all shaped like t = (B,):

    drift_coef(t) = f(t)     diffusion(t) = g(t)     mean_coef(t) = a(t)     std(t) = s(t)

plus the prior scale and the inverse of the noise-to-signal ratio sigma(t) = s(t)/a(t). Everything
the samplers and estimators need (forward drift, reverse drift, transition kernels, DDIM
coefficients, prior log-density) is derived from these in the base class, so a new SDE is one
class and nobody dispatches on SDE types. (Time grids live with the samplers, msdiff.samplers.grids.)
"""
from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from msdiff.utils import Generators, append_dims, batch_sum, randn


def _check_range(name_lo: str, lo: float, name_hi: str, hi: float, *, strict_lo: bool) -> None:
    bad_lo = lo <= 0 if strict_lo else lo < 0
    if not math.isfinite(lo) or not math.isfinite(hi) or bad_lo or hi <= lo:
        need = "0 <" if strict_lo else "0 <="
        raise ValueError(f"{name_lo}={lo}, {name_hi}={hi}: expected {need} {name_lo} < {name_hi} (finite)")


class SDE(ABC):
    """Base class: a linear SDE on [0, T] with Gaussian marginals x_t = a(t) x_0 + s(t) z.

    `eps` is the smallest time the samplers integrate down to (the reference's sampling eps).
    `speed_name` names the constructor argument that sets how fast the SDE diffuses (VS-CMDE
    schedules it): sigma_max for VE, beta_max for VP and sub-VP.
    """

    T: float = 1.0
    eps: float = 1e-5
    speed_name: str = ""

    # ---- the four schedules a subclass defines -------------------------------------------------
    @abstractmethod
    def drift_coef(self, t: Tensor) -> Tensor:
        """f(t) in dx = f(t) x dt + g(t) dw, shape (B,)."""

    @abstractmethod
    def diffusion(self, t: Tensor) -> Tensor:
        """g(t), shape (B,)."""

    @abstractmethod
    def mean_coef(self, t: Tensor) -> Tensor:
        """a(t) = E[x_t | x_0] / x_0, shape (B,)."""

    @abstractmethod
    def std(self, t: Tensor) -> Tensor:
        """s(t), the standard deviation of p_t(x_t | x_0), shape (B,)."""

    @property
    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) at t = T."""

    @abstractmethod
    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """Inverse of sigma(t) = s(t) / a(t) (used to place time grids uniformly in noise level)."""

    # ---- derived quantities ----------------------------------------------------------------------
    @property
    def speed(self) -> float:
        """Current value of the speed parameter (`speed_name`)."""
        return float(getattr(self, self.speed_name))

    def with_speed(self, value: float) -> "SDE":
        """A copy of this SDE whose speed parameter (sigma_max or beta_max) is `value`."""
        new = copy.copy(self)
        setattr(new, self.speed_name, float(value))
        new._validate()
        return new

    def _validate(self) -> None:  # overridden by subclasses with parameter checks
        pass

    def sigma(self, t: Tensor) -> Tensor:
        """Noise-to-signal ratio s(t)/a(t) (the EDM sigma; equals s(t) for VE)."""
        return self.std(t) / self.mean_coef(t)

    def check_t(self, x: Tensor, t: Tensor, name: str = "t") -> None:
        """Raise ValueError if t is not a (B,) tensor matching x, or (on CPU) lies outside [0, T].

        The range check reads values, so it is done only for CPU tensors: on an accelerator it
        would be a host-device synchronisation in every sampler step.
        """
        if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] != x.shape[0]:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a tensor of shape ({x.shape[0]},) matching x's batch, got {shape}")
        if t.device.type == "cpu" and t.numel() and (bool((t < 0).any()) or bool((t > self.T).any())):
            raise ValueError(f"{name}: values must lie in [0, T={self.T}], got [{t.min().item():.4g}, {t.max().item():.4g}]")

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Forward drift f(t) x (shaped like x) and diffusion g(t) (shaped (B,)). Song Eq. 5."""
        self.check_t(x, t)
        return append_dims(self.drift_coef(t), x.ndim) * x, self.diffusion(t)

    def marginal_prob(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean a(t) x_0 (shaped like x_0) and std s(t) (broadcastable to x_0) of p_t(x_t | x_0)."""
        self.check_t(x0, t)
        return append_dims(self.mean_coef(t), x0.ndim) * x0, append_dims(self.std(t), x0.ndim)

    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor, probability_flow: bool = False) -> Tensor:
        """Drift of the reverse-time SDE, f x - g^2 score (Song Eq. 6), or of the probability-flow
        ODE, f x - g^2 score / 2 (Song Eq. 13)."""
        f = append_dims(self.drift_coef(t), x.ndim)
        g2 = append_dims(self.diffusion(t) ** 2, x.ndim)
        return f * x - (0.5 if probability_flow else 1.0) * g2 * score

    def transition(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Exact forward kernel from time s to t > s: x_t = r x_s + G z with r = a(t)/a(s) and
        G^2 = s(t)^2 - r^2 s(s)^2 (shapes (B,)). For VE this is the SMLD discretisation
        G^2 = sigma_t^2 - sigma_s^2, for VP the DDPM one with r = sqrt(1 - beta_i)."""
        r = self.mean_coef(t) / self.mean_coef(s)
        g2 = self.std(t) ** 2 - (r * self.std(s)) ** 2
        return r, g2.clamp_min(0.0).sqrt()

    def prior_sampling(self, shape, generator: Generators = None, device=None, dtype=None) -> Tensor:
        """Draw x_T ~ N(0, prior_std^2 I) (generator: one for the batch, an ExampleNoise with a stream per row, or None)."""
        return randn(shape, generator, device=device, dtype=dtype) * self.prior_std

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I) per example, shape (B,)."""
        n = z[0].numel()
        var = self.prior_std**2
        return -0.5 * n * math.log(2 * math.pi * var) - batch_sum(z.double() ** 2).to(z.dtype) / (2 * var)


class VESDE(SDE):
    """Variance-exploding SDE (SMLD; Song Eq. 9 and 30).

    sigma(t) = sigma_min (sigma_max / sigma_min)^t,   f = 0,
    g(t) = sigma(t) sqrt(2 ln(sigma_max / sigma_min)),   a(t) = 1,   s(t) = sigma(t).

    As the reference code, the marginal std is sigma(t) itself (std(0) = sigma_min: the data are
    taken as already carrying sigma_min noise), and the prior is N(0, sigma_max^2 I).
    """

    speed_name = "sigma_max"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, eps: float = 1e-5):
        self.sigma_min, self.sigma_max, self.eps = float(sigma_min), float(sigma_max), float(eps)
        self._validate()

    def _validate(self) -> None:
        _check_range("sigma_min", self.sigma_min, "sigma_max", self.sigma_max, strict_lo=True)
        if not 0 < self.eps < self.T:
            raise ValueError(f"eps={self.eps}: expected 0 < eps < T={self.T}")

    @property
    def log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def std(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def mean_coef(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def drift_coef(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.std(t) * math.sqrt(2 * self.log_ratio)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        return torch.log(sigma / self.sigma_min) / self.log_ratio

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class _LinearBetaSDE(SDE):
    """Shared schedule of VP and sub-VP: beta(t) = beta_min + t (beta_max - beta_min) and its
    integral B(t) = beta_min t + (beta_max - beta_min) t^2 / 2 (Song Eq. 32-33)."""

    speed_name = "beta_max"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3):
        self.beta_min, self.beta_max, self.eps = float(beta_min), float(beta_max), float(eps)
        self._validate()

    def _validate(self) -> None:
        _check_range("beta_min", self.beta_min, "beta_max", self.beta_max, strict_lo=False)
        if not 0 < self.eps < self.T:
            raise ValueError(f"eps={self.eps}: expected 0 < eps < T={self.T}")

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def beta_integral(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def t_of_beta_integral(self, b: Tensor) -> Tensor:
        """Solve B(t) = b for t >= 0 (a quadratic; stable form of its positive root)."""
        d = self.beta_max - self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * b))

    def mean_coef(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.beta_integral(t))

    def drift_coef(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    @property
    def prior_std(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VPSDE(_LinearBetaSDE):
    """Variance-preserving SDE (DDPM; Song Eq. 11 and 32):

    dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw,   a(t) = exp(-B(t)/2),   s(t) = sqrt(1 - exp(-B(t))).
    """

    def std(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self.beta_integral(t)))

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        # sigma^2 = s^2 / a^2 = exp(B) - 1
        return self.t_of_beta_integral(torch.log1p(sigma**2))


class SubVPSDE(_LinearBetaSDE):
    """Sub-VP SDE (Song Eq. 34): dx = -beta x / 2 dt + sqrt(beta (1 - exp(-2 B(t)))) dw,
    a(t) = exp(-B(t)/2),   s(t) = 1 - exp(-B(t)) (its variance is below the VP one)."""

    def std(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.beta_integral(t))

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.beta_integral(t)))

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        # sigma = (1 - e^{-B}) / e^{-B/2} = 2 sinh(B/2)
        return self.t_of_beta_integral(2 * torch.asinh(sigma / 2))


class MultiSpeedSDE:
    """The multi-speed diffusion of Batzolis et al. (Sec. 4): x and y diffuse independently, each
    with its own SDE, at a shared time t. With two VE SDEs of equal sigma_min,
    sigma_y(t) = sigma_min (sigma_x(t) / sigma_min)^kappa with
    kappa = ln(sigma_max_y / sigma_min) / ln(sigma_max_x / sigma_min).

    `x` is used for sampling (its prior, its reverse SDE); `y` only perturbs the condition.
    Any pair works (VE/VE, VP/VP with different beta ranges, ...) as long as both share T.
    """

    def __init__(self, x: SDE, y: SDE):
        if not isinstance(x, SDE) or not isinstance(y, SDE):
            raise ValueError(f"MultiSpeedSDE(x, y): both must be SDE instances, got {type(x).__name__}, {type(y).__name__}")
        if x.T != y.T:
            raise ValueError(f"MultiSpeedSDE: x.T={x.T} and y.T={y.T} must be equal (a shared time)")
        self.x, self.y = x, y

    @property
    def T(self) -> float:
        return self.x.T

    def with_y(self, y: SDE) -> "MultiSpeedSDE":
        return MultiSpeedSDE(self.x, y)

    def marginal_prob(self, x0: Tensor, y0: Tensor, t: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """((mean_x, std_x), (mean_y, std_y)) of the independent perturbation kernels at time t."""
        return self.x.marginal_prob(x0, t), self.y.marginal_prob(y0, t)

    def __repr__(self) -> str:
        return f"MultiSpeedSDE(x={self.x!r}, y={self.y!r})"
