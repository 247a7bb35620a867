"""VS-CMDE (Batzolis et al. 2021, Sec. 4): CMDE whose y-speed follows a decreasing schedule during
training; the current value is checkpointed state."""
from __future__ import annotations

import math

import torch

from msdiff.estimators.base import HParam
from msdiff.estimators.variants import CMDE
from msdiff.sde import SDE, MultiSpeedSDE


class VSCMDE(CMDE):
    """CMDE with a variance-reduction schedule on y's speed (Batzolis et al. Sec. 4, "VS-CMDE").

    y starts as fast as x, speed y0 = sde.x.speed, and slows toward the target yk, reached at the
    optimizer step xk = `reach_target_steps`, with 1/speed linear in the step k (the reference):

        speed_y(k) = xk yk y0 / (k (y0 - yk) + xk yk).

    The speed is the SDE's `speed_name`: sigma_max for VE (the paper's sigma_max_y) and, our
    analogue for VP / sub-VP, beta_max (y's beta range [beta_min_y, beta_max_y] shrinks from x's
    toward [beta_min_y, target] by the same hyperbolic law). `sde.y` gives every other parameter
    of y's SDE (sigma_min_y, beta_min_y); its own speed is replaced by the schedule (the shipped
    configs give y x's SDE file, so the printed y-SDE shows the schedule's start, sigma_max_x).

    The reference does not clamp: after xk the speed keeps falling. `clamp=True` holds it at the
    target from xk on. The current value lives in the float64 buffer `speed_y` (saved in the
    state_dict, hence in checkpoints); `set_step(k)` updates it (the training system calls it
    every optimizer step) and sampling uses the value the buffer holds. Other options: `ConditionalEstimator`.
    """

    def __init__(self, sde: MultiSpeedSDE, sigma_max_y_target: float, reach_target_steps: int, clamp: bool = False,
                 **kwargs):
        super().__init__(sde, **kwargs)
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

    def check_schedule(self, last_step: int) -> None:
        """The speed only decreases, so the schedule is valid up to `last_step` if it is there."""
        self._y_sde_at(self.speed_y_at(last_step), f"step={last_step}")

    def _y_sde_at(self, value: float, where: str) -> SDE:
        try:
            return self.sde.y.with_speed(value)
        except ValueError as e:
            raise ValueError(f"VSCMDE {where}: the unclamped schedule gives {self.sde.y.speed_name}_y={value:.6g}, "
                             f"which y's SDE rejects ({e}); use clamp=True or a larger reach_target_steps") from None

    def _set_speed(self, value: float, where: str) -> None:
        self._y, self._speed = self._y_sde_at(value, where), float(value)
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

    def schedule_values(self) -> dict[str, float]:
        """{"sigma_max_y" (VE) or "beta_max_y" (VP): the speed of y in use now}."""
        return {f"{self.sde.y.speed_name}_y": self._speed}

    def hparams_summary(self) -> dict[str, HParam]:
        """As the base's, with y's speed at the START of the schedule ("sigma_max_y"), its target
        ("sigma_max_y_target"), "reach_target_steps" and "clamp"."""
        hp = super().hparams_summary()
        name = self.sde.y.speed_name
        hp[f"{name}_y"], hp[f"{name}_y_target"] = float(self.y0), float(self.yk)
        hp["reach_target_steps"], hp["clamp"] = int(self.xk), bool(self.clamp)
        return hp

    def extra_repr(self) -> str:
        return (f"sde={self.sde!r}, target={self.yk}, reach_target_steps={self.xk}, clamp={self.clamp}, "
                f"current={self._speed:.6g}")
