"""The estimator base class: time sampling, network I/O conventions, the weighted DSM loss and
the x-score for sampling (conventions in the package docstring, `msdiff.estimators`)."""
from __future__ import annotations

from typing import Callable, ClassVar, Union

import torch
from torch import Tensor, nn

from msdiff.estimators.noise_levels import NoiseLevels, UniformTimes
from msdiff.estimators.preconditioning import Preconditioning, ReferencePrecond
from msdiff.estimators.weighting import LikelihoodWeighting, Weighting
from msdiff.sde import SDE, MultiSpeedSDE
from msdiff.utils import Generators, append_dims, batch_mean, randn_like

ScoreFn = Callable[[Tensor, Tensor], Tensor]
HParam = Union[int, float, str, bool]


def _check_sde(name: str, sde, want_pair: bool) -> None:
    if want_pair and not isinstance(sde, MultiSpeedSDE):
        raise ValueError(f"{name}: expected a MultiSpeedSDE(x, y), got {type(sde).__name__}")
    if not want_pair and not isinstance(sde, SDE):
        hint = " (use CMDE for a multi-speed pair)" if isinstance(sde, MultiSpeedSDE) else ""
        raise ValueError(f"{name}: expected a single SDE such as VESDE or VPSDE, got {type(sde).__name__}{hint}")


class ConditionalEstimator(nn.Module):
    """Shared machinery of the estimators. Holds no parameters; subclasses take the SDE (and their
    own options) and pass these shared options on as keyword arguments.

    Args:
        p_uncond: probability of replacing y by the null condition (zeros) during training, for
            classifier-free guidance (CDE only; 0 disables).
        t_eps: smallest training time.
        centered: True if the data are already in [-1, 1]; False (the reference) maps the network
            input from [0, 1] by h -> 2 h - 1.
        weighting: the loss weighting (`msdiff.estimators.weighting`): `LikelihoodWeighting()`
            (g^2, Theorem 2; the reference) or `SimpleWeighting()` (plain eps-MSE).
        preconditioning: the network's input and output scalings (`msdiff.estimators.preconditioning`):
            `ReferencePrecond()` (the network sees 2 x_t - 1 and predicts -z) or
            `EDMPrecond(sigma_data)` (Karras et al. 2022, Table 1). Same loss, same score
            semantics; EDM keeps the network's input and target at unit scale at every noise level,
            which matters most for VE (|x_t| up to sigma_max) and short training runs.
        noise_levels: the distribution of the training times (`msdiff.estimators.noise_levels`):
            `UniformTimes()` (t ~ U(t_eps, T), the reference) or `LogNormalSigma(mean, std)` (EDM's).
    """

    #: whether y is diffused too (CDiffE, CMDE, VS-CMDE), which rules out condition dropout
    diffuses_y: ClassVar[bool] = False

    def __init__(self, p_uncond: float = 0.0, t_eps: float = 1e-5, centered: bool = False,
                 weighting: Weighting = LikelihoodWeighting(), preconditioning: Preconditioning = ReferencePrecond(),
                 noise_levels: NoiseLevels = UniformTimes()):
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond={p_uncond}: expected a probability in [0, 1)")
        if p_uncond != 0.0 and self.diffuses_y:
            raise ValueError(f"p_uncond={p_uncond}: condition dropout is supported for CDE only (expected 0)")
        if not isinstance(weighting, Weighting):
            raise ValueError(f"weighting={weighting!r}: expected a msdiff.estimators.Weighting such as "
                             f"LikelihoodWeighting() or SimpleWeighting()")
        if not isinstance(preconditioning, Preconditioning):
            raise ValueError(f"preconditioning={preconditioning!r}: expected a msdiff.estimators.Preconditioning "
                             f"such as ReferencePrecond() or EDMPrecond(sigma_data=0.5)")
        self.p_uncond, self.t_eps, self.centered = float(p_uncond), float(t_eps), bool(centered)
        if not isinstance(noise_levels, NoiseLevels):
            raise ValueError(f"noise_levels={noise_levels!r}: expected a msdiff.estimators.NoiseLevels such as "
                             f"UniformTimes() or LogNormalSigma()")
        self.weighting, self.preconditioning, self.noise_levels = weighting, preconditioning, noise_levels

    def _set_sde(self, sde, want_pair: bool) -> None:
        _check_sde("sde", sde, want_pair)
        self.sde = sde
        self._check_t_eps()

    def extra_repr(self) -> str:
        return (f"sde={self.sde!r}, p_uncond={self.p_uncond}, weighting={self.weighting!r}, "
                f"preconditioning={self.preconditioning!r}, noise_levels={self.noise_levels!r}")

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
    def null_condition(self, like: Tensor) -> Tensor:
        """The null condition of classifier-free guidance: zeros in the data range."""
        return torch.zeros_like(like)

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None,
                 dtype=torch.float32) -> Tensor:
        """The training times, one per example, shape (batch,), from `noise_levels` (default
        t ~ U(t_eps, T))."""
        return self.noise_levels.sample_t(self.sampling_sde, batch, self.t_eps, self.centered, generator, device, dtype)

    def _run(self, net: nn.Module, x_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        """The prediction of -z (x channels, then y channels when y is diffused) for the input
        (x_t, cond) at time t; score = output / std. Each part is preconditioned on its own
        (`msdiff.estimators.preconditioning`); the clean y of CDE has a = 1, s = 0."""
        pre = self.preconditioning
        parts = []
        for v, sde in ((x_t, self.sampling_sde), (cond, self.y_sde)):
            if sde is None:
                a, s = v.new_ones(()), v.new_zeros(())
            else:
                a, s = append_dims(sde.mean_coef(t), v.ndim), append_dims(sde.std(t), v.ndim)
            parts.append(pre.units(v, a, s, self.centered))
        h = torch.cat([pre.net_input(u, sigma) for u, sigma in parts], dim=1)
        f = self._checked(net(h, pre.c_noise(t)), x_t, cond)
        fs = f.split([x_t.shape[1]] + ([] if self.y_sde is None else [cond.shape[1]]), dim=1)
        return torch.cat([pre.neg_z(u, sigma, fi) for fi, (u, sigma) in zip(fs, parts)], dim=1)

    def _checked(self, out: Tensor, x_t: Tensor, cond: Tensor) -> Tensor:
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
            loss_x = self.weighting(sde_x, t) * batch_mean((out + z_x) ** 2)
            return {"loss": loss_x, "loss_x": loss_x}
        z_y = randn_like(y, generator)
        y_t = append_dims(sde_y.mean_coef(t), y.ndim) * y + append_dims(sde_y.std(t), y.ndim) * z_y
        out = self._run(net, x_t, y_t, t)
        out_x, out_y = out[:, : x.shape[1]], out[:, x.shape[1]:]
        loss_x = self.weighting(sde_x, t) * batch_mean((out_x + z_x) ** 2)
        loss_y = self.weighting(sde_y, t) * batch_mean((out_y + z_y) ** 2)
        n_x, n_y = x[0].numel(), y[0].numel()
        return {"loss": (n_x * loss_x + n_y * loss_y) / (n_x + n_y), "loss_x": loss_x, "loss_y": loss_y}

    def loss(self, net: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-example training loss, shape (B,) (see `loss_terms`)."""
        return self.loss_terms(net, x, y, generator)["loss"]

    # ---- sampling --------------------------------------------------------------------------------
    def score_fn(self, net: nn.Module, y: Tensor, generator: Generators = None, *,
                 fixed_y_noise: bool = False) -> ScoreFn:
        """`score(x_t, t)`: the estimate of grad_x log p_t(x_t | y) that a sampler integrates.

        CDE feeds the clean y at every call. The diffusive estimators draw a fresh
        y_t = a_y(t) y + std_y(t) z at EVERY call (with `generator`), feed (x_t, y_t) and keep only
        the x part of the joint score; y itself is never reverse-diffused (the reference).
        `fixed_y_noise=True` draws z once and reuses it at every t, which makes the score a
        deterministic function of (x_t, t): adaptive ODE solvers need that (with a fresh draw per
        call their error control rejects step after step)."""
        return self._score_fn(net, y, generator, fixed_y_noise)

    def unconditional_score_fn(self, net: nn.Module, like: Tensor) -> ScoreFn:
        """`score(x_t, t)` with the null condition, grad_x log p_t(x_t) (for classifier-free
        guidance); only meaningful for a network trained with p_uncond > 0."""
        if not self.trained_for_cfg:
            raise ValueError(f"p_uncond={self.p_uncond}: an unconditional score needs training with condition "
                             f"dropout (p_uncond > 0)")
        return self._score_fn(net, self.null_condition(like), None, False)

    def _score_fn(self, net: nn.Module, y: Tensor, generator: Generators, fixed_y_noise: bool) -> ScoreFn:
        z = randn_like(y, generator) if fixed_y_noise and self.y_sde is not None else None

        def score(x: Tensor, t: Tensor) -> Tensor:
            cond, t = self.prepare(x, y, t)
            return self.x_score(net, x, self.network_condition(cond, t, generator, z), t)

        return score

    # ---- training-step schedules (VS-CMDE's; no-ops here) ------------------------------------------
    def set_step(self, step: int) -> None:
        """Move any schedule to optimizer step `step` (the training system calls it every step)."""

    def check_schedule(self, last_step: int) -> None:
        """Raise ValueError before training if a schedule turns invalid by step `last_step`."""

    def schedule_values(self) -> dict[str, float]:
        """{name: value} of the scheduled quantities now, which the training system logs as
        "train/<name>" every step (VS-CMDE: its sigma_max_y or beta_max_y); none here."""
        return {}

    def hparams_summary(self) -> dict[str, HParam]:
        """Flat values that tell runs apart (TensorBoard's HPARAMS tab): "sde_x", "sde_y" (reprs),
        the SDEs' speed parameters ("sigma_max_x", "sigma_max_y"; beta_max for VP), "weighting",
        "preconditioning" and "noise_levels" (reprs)."""
        sde_x, sde_y = self.sampling_sde, self.y_sde
        hp: dict[str, HParam] = {"sde_x": repr(sde_x), f"{sde_x.speed_name}_x": float(sde_x.speed),
                                 "sde_y": repr(sde_y) if sde_y is not None else "clean y (CDE)"}
        if sde_y is not None:
            hp[f"{sde_y.speed_name}_y"] = float(sde_y.speed)
        hp["weighting"], hp["preconditioning"] = repr(self.weighting), repr(self.preconditioning)
        hp["noise_levels"] = repr(self.noise_levels)
        return hp

    # ---- building blocks of score_fn (public so guidance can share one y_t between branches) ----
    def prepare(self, x: Tensor, y: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Check y against x and return (y on x's device and dtype, t as a (B,) tensor)."""
        t = self._time(t, x)
        self._check_pair(x, y)
        return y.to(device=x.device, dtype=x.dtype), t

    def network_condition(self, y: Tensor, t: Tensor, generator: Generators = None,
                          z: Tensor | None = None) -> Tensor:
        """What the network sees next to x_t at time t: the clean y (CDE), or
        y_t = a_y(t) y + std_y(t) z with ONE fresh z from `generator` unless z is given (CDiffE,
        CMDE, VS-CMDE)."""
        sde_y = self.y_sde
        if sde_y is None:
            return y
        z = randn_like(y, generator) if z is None else z.to(y)
        return append_dims(sde_y.mean_coef(t), y.ndim) * y + append_dims(sde_y.std(t), y.ndim) * z

    def x_score(self, net: nn.Module, x_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        """The x part of the network's score at (x_t, cond, t): output_x / std_x(t)."""
        out = self._run(net, x_t, cond, t)[:, : x_t.shape[1]]
        return out / append_dims(self.sampling_sde.std(t), x_t.ndim)
