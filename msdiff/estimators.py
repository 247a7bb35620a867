"""Conditional score estimators of Batzolis et al. 2021, "Conditional Image Generation with
Score-Based Diffusion Models" (MSDiff): CDE, CDiffE, CMDE and VS-CMDE.

Each estimator turns a plain network `net(h, noise_label)` into a training loss and, for sampling
from p(x | y), into an x-score `score(x_t, t)` that any sampler in `msdiff.samplers` integrates
with `estimator.sampling_sde`. Conventions (those of the paper's reference code):

* Time: t ~ U(t_eps, T) with t_eps = 1e-5, ONE t per example, shared by x and y.
* Network input: h = concat(x_t, y) (CDE, clean y) or concat(x_t, y_t) (diffusive estimators)
  along channels, mapped by h -> 2 h - 1 when the data live in [0, 1] (`centered=False`).
* Network output: divided by the marginal std it is the score (x channels by std_x(t), y channels
  by std_y(t)), i.e. the network predicts -z, the negated standard-normal noise.
* Noise label: the network receives `999 * t` (`noise_label(t)`). The reference fed its VE model
  the std sigma(t); we use the SDE-agnostic time label of DDPM, which is also the only label that
  means the same for x and y when they diffuse at different speeds (CMDE).
* Loss: denoising score matching with the maximum-likelihood weighting of Theorem 2 (Song et al.
  2021b, Eq. 7 with lambda(t) = g(t)^2): weight g_x(t)^2 on the x components and g_y(t)^2 on the
  y components, averaged over ALL x and y elements of an example (the reference's reduce_mean):

      L = mean_i  g_i(t)^2 || out_i / std_i(t) + z_i / std_i(t) ||^2
        = mean_i  (g_i(t) / std_i(t))^2 || out_i + z_i ||^2.

  For VE, (g/std)^2 = 2 ln(sigma_max / sigma_min) is constant: a network that outputs zeros gets
  2 ln(277.128 / 0.005) = 21.85 (CDE, CDiffE at the SR-160 sigmas) and (21.85 + 9.21) / 2 = 15.53
  (CMDE with sigma_max_y = 0.5, x and y of equal size). `weighting="simple"` drops the weight
  (plain eps-MSE, Ho et al. 2020), which is better conditioned for VP near t = 0.

Every quantity comes from the SDE's schedules (mean_coef, std, diffusion, with_speed), so VE, VP
and sub-VP SDEs, and any multi-speed pair of them, work alike.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from msdiff.sde import SDE, MultiSpeedSDE
from msdiff.utils import append_dims, batch_mean, randn_like, to_symmetric_range

ScoreFn = Callable[[Tensor, Tensor], Tensor]
WEIGHTINGS = ("likelihood", "simple")


def _check_sde(name: str, sde, want_pair: bool) -> None:
    if want_pair and not isinstance(sde, MultiSpeedSDE):
        raise ValueError(f"{name}: expected a MultiSpeedSDE(x, y), got {type(sde).__name__}")
    if not want_pair and not isinstance(sde, SDE):
        hint = " (use CMDE for a multi-speed pair)" if isinstance(sde, MultiSpeedSDE) else ""
        raise ValueError(f"{name}: expected a single SDE such as VESDE or VPSDE, got {type(sde).__name__}{hint}")


class ConditionalEstimator(nn.Module):
    """Shared machinery of the estimators. Holds no parameters; subclasses say which SDE diffuses
    y (none for CDE) and which output channels are trained.

    Args:
        p_uncond: probability of replacing y by the null condition (zeros) during training, for
            classifier-free guidance (CDE only; 0 disables).
        t_eps: smallest training time, t ~ U(t_eps, T).
        centered: True if the data are already in [-1, 1]; False (the reference) maps the network
            input from [0, 1] by h -> 2 h - 1.
        weighting: "likelihood" (g^2, Theorem 2; the reference) or "simple" (plain eps-MSE).
    """

    def __init__(self, p_uncond: float = 0.0, t_eps: float = 1e-5, centered: bool = False,
                 weighting: str = "likelihood"):
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond={p_uncond}: expected a probability in [0, 1)")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
        self.p_uncond, self.t_eps, self.centered, self.weighting = float(p_uncond), float(t_eps), bool(centered), weighting

    def _check_t_eps(self) -> None:
        if not 0.0 <= self.t_eps < self.sampling_sde.T:
            raise ValueError(f"t_eps={self.t_eps}: expected 0 <= t_eps < T={self.sampling_sde.T}")

    # ---- what subclasses define ------------------------------------------------------------------
    @property
    def sampling_sde(self) -> SDE:
        """The SDE of x, which the sampler integrates (prior, reverse drift)."""
        raise NotImplementedError

    @property
    def y_sde(self) -> SDE | None:
        """The SDE that diffuses y, or None when y stays clean (CDE)."""
        raise NotImplementedError

    # ---- sizes -----------------------------------------------------------------------------------
    def in_channels(self, x_channels: int, y_channels: int) -> int:
        """Channels of the network input: x_t and y (or y_t) concatenated."""
        return x_channels + y_channels

    def out_channels(self, x_channels: int, y_channels: int) -> int:
        """Channels of the network output: the x-score (CDE) or the joint (x, y) score."""
        return x_channels + (0 if self.y_sde is None else y_channels)

    @property
    def trained_for_cfg(self) -> bool:
        """Whether training drops the condition, so that an unconditional score exists."""
        return self.p_uncond > 0.0

    # ---- building blocks -------------------------------------------------------------------------
    @staticmethod
    def noise_label(t: Tensor) -> Tensor:
        """The (B,) label the network receives for time t: 999 t (DDPM's discrete-time scale)."""
        return 999.0 * t

    def null_condition(self, like: Tensor) -> Tensor:
        """The null condition of classifier-free guidance: zeros in the data range."""
        return torch.zeros_like(like)

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None,
                 dtype=torch.float32) -> Tensor:
        """t ~ U(t_eps, T), one per example, shape (batch,)."""
        T = self.sampling_sde.T
        u = torch.rand(batch, generator=generator, device=device, dtype=dtype)
        return self.t_eps + (T - self.t_eps) * u

    def _weight(self, sde: SDE, t: Tensor) -> Tensor:
        """Per-example weight of the eps-MSE, (B,): (g / std)^2 for likelihood weighting, else 1."""
        if self.weighting == "simple":
            return torch.ones_like(t)
        return (sde.diffusion(t) / sde.std(t)) ** 2

    def _run(self, net: nn.Module, x_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        """Network output for input concat(x_t, cond) at time t, shape-checked."""
        h = torch.cat([x_t, cond], dim=1)
        if not self.centered:
            h = to_symmetric_range(h)
        out = net(h, self.noise_label(t))
        want = self.out_channels(x_t.shape[1], cond.shape[1])
        if out.shape != (x_t.shape[0], want) + x_t.shape[2:]:
            raise ValueError(f"net: expected an output of shape {(x_t.shape[0], want) + tuple(x_t.shape[2:])}, "
                             f"got {tuple(out.shape)} (size the network with estimator.out_channels)")
        return out

    @staticmethod
    def _check_pair(x: Tensor, y: Tensor) -> None:
        if x.ndim < 2 or y.ndim != x.ndim or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
            raise ValueError(f"y: expected shape ({x.shape[0]}, C_y, {', '.join(map(str, x.shape[2:]))}) "
                             f"matching x {tuple(x.shape)} except in channels, got {tuple(y.shape)}")

    @staticmethod
    def _time(t: Tensor | float, x: Tensor) -> Tensor:
        """Accept a (B,) tensor, a 0-d tensor or a float, return (B,) in x's dtype (no sync)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            return t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},) matching x's batch, got {tuple(t.shape)}")
        return t

    # ---- training --------------------------------------------------------------------------------
    def loss_terms(self, net: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                   t: Tensor | None = None) -> dict[str, Tensor]:
        """Denoising score-matching loss per example (Batzolis et al. Eq. 8 for CDE, Eq. 9 with the
        weighting of Theorem 2 for CDiffE/CMDE). Returns (B,) tensors: "loss" (what is optimised),
        "loss_x" (weighted eps-MSE over the x elements) and, when y is diffused, "loss_y";
        loss = (n_x loss_x + n_y loss_y) / (n_x + n_y). `t` may be given instead of drawn."""
        self._check_pair(x, y)
        B = x.shape[0]
        t = self.sample_t(B, generator, x.device, x.dtype) if t is None else self._time(t, x)
        sde_x, sde_y = self.sampling_sde, self.y_sde
        if self.p_uncond > 0.0:
            drop = torch.rand(B, generator=generator, device=x.device) < self.p_uncond
            y = torch.where(append_dims(drop, y.ndim), self.null_condition(y), y)
        z_x = randn_like(x, generator)
        x_t = append_dims(sde_x.mean_coef(t), x.ndim) * x + append_dims(sde_x.std(t), x.ndim) * z_x
        if sde_y is None:
            out = self._run(net, x_t, y, t)
            loss_x = self._weight(sde_x, t) * batch_mean((out + z_x) ** 2)
            return {"loss": loss_x, "loss_x": loss_x}
        z_y = randn_like(y, generator)
        y_t = append_dims(sde_y.mean_coef(t), y.ndim) * y + append_dims(sde_y.std(t), y.ndim) * z_y
        out = self._run(net, x_t, y_t, t)
        out_x, out_y = out[:, : x.shape[1]], out[:, x.shape[1]:]
        loss_x = self._weight(sde_x, t) * batch_mean((out_x + z_x) ** 2)
        loss_y = self._weight(sde_y, t) * batch_mean((out_y + z_y) ** 2)
        n_x, n_y = x[0].numel(), y[0].numel()
        return {"loss": (n_x * loss_x + n_y * loss_y) / (n_x + n_y), "loss_x": loss_x, "loss_y": loss_y}

    def loss(self, net: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-example training loss, shape (B,) (see `loss_terms`)."""
        return self.loss_terms(net, x, y, generator)["loss"]

    # ---- sampling --------------------------------------------------------------------------------
    def score_fn(self, net: nn.Module, y: Tensor, generator: torch.Generator | None = None) -> ScoreFn:
        """`score(x_t, t)`: the estimate of grad_x log p_t(x_t | y) that a sampler integrates.

        CDE feeds the clean y at every call. The diffusive estimators draw a fresh
        y_t = a_y(t) y + std_y(t) z at EVERY call (with `generator`), feed (x_t, y_t) and keep only
        the x part of the joint score; y itself is never reverse-diffused (the reference)."""
        return self._score_fn(net, y, generator)

    def unconditional_score_fn(self, net: nn.Module, like: Tensor) -> ScoreFn:
        """`score(x_t, t)` with the null condition, grad_x log p_t(x_t) (for classifier-free
        guidance); only meaningful for a network trained with p_uncond > 0."""
        if not self.trained_for_cfg:
            raise ValueError(f"p_uncond={self.p_uncond}: an unconditional score needs training with condition "
                             f"dropout (p_uncond > 0)")
        return self._score_fn(net, self.null_condition(like), None)

    def _score_fn(self, net: nn.Module, y: Tensor, generator: torch.Generator | None) -> ScoreFn:
        def score(x: Tensor, t: Tensor) -> Tensor:
            cond, t = self.prepare(x, y, t)
            return self.x_score(net, x, self.network_condition(cond, t, generator), t)

        return score

    # ---- building blocks of score_fn (public so guidance can share one y_t between branches) ----
    def prepare(self, x: Tensor, y: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Check y against x and return (y on x's device and dtype, t as a (B,) tensor)."""
        t = self._time(t, x)
        self._check_pair(x, y)
        return y.to(device=x.device, dtype=x.dtype), t

    def network_condition(self, y: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What the network sees next to x_t at time t: the clean y (CDE), or ONE fresh draw
        y_t = a_y(t) y + std_y(t) z from `generator` (CDiffE, CMDE, VS-CMDE)."""
        sde_y = self.y_sde
        if sde_y is None:
            return y
        z = randn_like(y, generator)
        return append_dims(sde_y.mean_coef(t), y.ndim) * y + append_dims(sde_y.std(t), y.ndim) * z

    def x_score(self, net: nn.Module, x_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        """The x part of the network's score at (x_t, cond, t): output_x / std_x(t)."""
        out = self._run(net, x_t, cond, t)[:, : x_t.shape[1]]
        return out / append_dims(self.sampling_sde.std(t), x_t.ndim)


class CDE(ConditionalEstimator):
    """Conditional denoising estimator (Batzolis et al. Sec. 3.1, Eq. 8; SR3-style): only x is
    diffused; the network sees (x_t, y) with the clean y and outputs the x-score. Optional
    condition dropout (`p_uncond`) trains the null-condition score for classifier-free guidance."""

    def __init__(self, sde: SDE, p_uncond: float = 0.0, t_eps: float = 1e-5, centered: bool = False,
                 weighting: str = "likelihood"):
        super().__init__(p_uncond, t_eps, centered, weighting)
        _check_sde("sde", sde, want_pair=False)
        self.sde = sde
        self._check_t_eps()

    @property
    def sampling_sde(self) -> SDE:
        return self.sde

    @property
    def y_sde(self) -> None:
        return None

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, p_uncond={self.p_uncond}, weighting={self.weighting!r}"


class _DiffusiveEstimator(ConditionalEstimator):
    """Base of the estimators that diffuse y as well and learn the joint score of (x_t, y_t)."""

    def __init__(self, p_uncond: float, t_eps: float, centered: bool, weighting: str):
        if p_uncond != 0.0:
            raise ValueError(f"p_uncond={p_uncond}: condition dropout is supported for CDE only (expected 0)")
        super().__init__(p_uncond, t_eps, centered, weighting)


class CDiffE(_DiffusiveEstimator):
    """Conditional diffusive estimator (Batzolis et al. Sec. 3.2, Eq. 9): x and y diffuse with
    independent noise under the SAME SDE; the network learns the joint score of (x_t, y_t) and
    sampling uses its x part with y_t ~ p_t(y_t | y) drawn afresh at every call."""

    def __init__(self, sde: SDE, p_uncond: float = 0.0, t_eps: float = 1e-5, centered: bool = False,
                 weighting: str = "likelihood"):
        super().__init__(p_uncond, t_eps, centered, weighting)
        _check_sde("sde", sde, want_pair=False)
        self.sde = sde
        self._check_t_eps()

    @property
    def sampling_sde(self) -> SDE:
        return self.sde

    @property
    def y_sde(self) -> SDE:
        return self.sde

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, weighting={self.weighting!r}"


class CMDE(_DiffusiveEstimator):
    """Conditional multi-speed diffusive estimator (Batzolis et al. Sec. 4, Theorem 2): as CDiffE
    but y diffuses with its own, slower SDE (`sde.y`), and the loss weights x components by
    g_x(t)^2 and y components by g_y(t)^2 (the maximum-likelihood weighting matrix). As
    sigma_y -> 0 the x part of the joint score tends to the CDE target (Theorem 3)."""

    def __init__(self, sde: MultiSpeedSDE, p_uncond: float = 0.0, t_eps: float = 1e-5, centered: bool = False,
                 weighting: str = "likelihood"):
        super().__init__(p_uncond, t_eps, centered, weighting)
        _check_sde("sde", sde, want_pair=True)
        self.sde = sde
        self._check_t_eps()

    @property
    def sampling_sde(self) -> SDE:
        return self.sde.x

    @property
    def y_sde(self) -> SDE:
        return self.sde.y

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, weighting={self.weighting!r}"


class VSCMDE(CMDE):
    """CMDE with a variance-reduction schedule on y's speed (Batzolis et al. Sec. 4, "VS-CMDE").

    y starts as fast as x, speed y0 = sde.x.speed, and slows toward the target yk, reached at the
    optimizer step xk = `reach_target_steps`, with 1/speed linear in the step k (the reference):

        speed_y(k) = xk yk y0 / (k (y0 - yk) + xk yk).

    The speed is the SDE's `speed_name`: sigma_max for VE (the paper's sigma_max_y) and, our
    analogue for VP / sub-VP, beta_max (y's beta range [beta_min_y, beta_max_y] shrinks from x's
    toward [beta_min_y, target] by the same hyperbolic law). `sde.y` gives every other parameter
    of y's SDE (sigma_min_y, beta_min_y); its own speed is replaced by the schedule.

    The reference does not clamp: after xk the speed keeps falling. `clamp=True` holds it at the
    target from xk on. The current value lives in the float64 buffer `speed_y` (saved in the
    state_dict, hence in checkpoints); `set_step(k)` updates it (the training system calls it
    every optimizer step) and sampling uses the value the buffer holds.
    """

    def __init__(self, sde: MultiSpeedSDE, sigma_max_y_target: float, reach_target_steps: int, clamp: bool = False,
                 p_uncond: float = 0.0, t_eps: float = 1e-5, centered: bool = False, weighting: str = "likelihood"):
        super().__init__(sde, p_uncond, t_eps, centered, weighting)
        if sde.x.speed_name != sde.y.speed_name:
            raise ValueError(f"sde: x and y must have the same speed parameter for VS-CMDE, got "
                             f"{sde.x.speed_name!r} and {sde.y.speed_name!r}")
        self.y0, self.yk = sde.x.speed, float(sigma_max_y_target)
        if not (math.isfinite(self.yk) and 0.0 < self.yk <= self.y0):
            raise ValueError(f"sigma_max_y_target={sigma_max_y_target}: expected 0 < target <= "
                             f"{sde.x.speed_name} of x = {self.y0}")
        if int(reach_target_steps) != reach_target_steps or reach_target_steps < 1:
            raise ValueError(f"reach_target_steps={reach_target_steps}: expected a positive integer")
        self.xk, self.clamp = int(reach_target_steps), bool(clamp)
        sde.y.with_speed(self.yk)  # the target must be a valid speed for y's SDE (raises ValueError)
        self.register_buffer("speed_y", torch.tensor(self.y0, dtype=torch.float64))
        self._speed = self.y0  # host copy of the buffer: reading the buffer on a GPU would sync
        self._y = sde.y.with_speed(self.y0)
        self.register_load_state_dict_post_hook(VSCMDE._after_load)

    def speed_y_at(self, step: int) -> float:
        """The scheduled speed of y (sigma_max_y for VE, beta_max_y for VP) at optimizer step `step`."""
        if step < 0:
            raise ValueError(f"step={step}: expected a non-negative optimizer step")
        if self.clamp and step >= self.xk:
            return self.yk
        return self.xk * self.yk * self.y0 / (step * (self.y0 - self.yk) + self.xk * self.yk)

    sigma_max_y_at = speed_y_at  # the paper's name (VE); for VP it returns beta_max_y

    def set_step(self, step: int) -> float:
        """Move the schedule to optimizer step `step`: store speed_y_at(step) in the buffer."""
        value = self.speed_y_at(step)
        self._set_speed(value, f"step={step}")
        return value

    update = set_step

    def _set_speed(self, value: float, where: str) -> None:
        try:
            y = self.sde.y.with_speed(value)
        except ValueError as e:
            raise ValueError(f"VSCMDE {where}: the unclamped schedule gives {self.sde.y.speed_name}_y={value:.6g}, "
                             f"which y's SDE rejects ({e}); use clamp=True or a larger reach_target_steps") from None
        self._speed, self._y = float(value), y
        self.speed_y.fill_(value)

    @staticmethod
    def _after_load(module: "VSCMDE", incompatible_keys) -> None:
        module._set_speed(float(module.speed_y), "checkpoint")

    @property
    def current_speed_y(self) -> float:
        """The speed of y in use now (the buffer's value)."""
        return self._speed

    @property
    def y_sde(self) -> SDE:
        return self._y

    @property
    def current_sde(self) -> MultiSpeedSDE:
        """The multi-speed SDE with y at the current speed."""
        return self.sde.with_y(self._y)

    def extra_repr(self) -> str:
        return (f"sde={self.sde!r}, target={self.yk}, reach_target_steps={self.xk}, clamp={self.clamp}, "
                f"current={self._speed:.6g}")
