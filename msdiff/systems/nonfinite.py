"""The non-finite guard of a training step, without a host-device synchronisation per step.

A step whose loss or gradient norm is not finite must never change the weights, and training must
stop before such a state could be saved. Reading the flag on the host every step would stall a GPU
(one synchronisation per step), so the guard works in two halves:

* on the device, every step: ``skip_if_nonfinite`` sets the optimizer's ``found_inf`` flag, the
  mechanism ``torch.amp.GradScaler`` uses: the fused Adam kernel then leaves weights, moments and
  step counts untouched. The first bad step, its loss and its gradient norm are kept in device
  tensors (``torch.where``, no synchronisation).
* on the host, rarely: ``check`` reads the flag (one synchronisation) and raises
  :class:`NonFiniteLossError`. The system calls it every ``trainer.log_every_n_steps`` steps, before
  every checkpoint is written and at the end of training; in DDP the ranks agree first (one
  all-reduce), so they stop together.
"""
from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the step was skipped on the device and the
    error is raised on every rank before the next checkpoint, so no weight (and no checkpoint)
    ever becomes non-finite."""


class NonFiniteGuard:
    """Device-side record of the first non-finite step (module doc)."""

    def __init__(self) -> None:
        self.first_step: Tensor | None = None  # -1 while every step was finite
        self.loss: Tensor | None = None
        self.grad_norm: Tensor | None = None

    def skip_if_nonfinite(self, optimizer: torch.optim.Optimizer, loss: Tensor, grad_norm: Tensor, step: int) -> None:
        """Mark this step for skipping when ``loss`` or ``grad_norm`` is not finite, and remember the
        first such step. ``optimizer`` must be a fused optimizer (it reads ``found_inf``)."""
        bad = ~(torch.isfinite(loss.detach().float()) & torch.isfinite(grad_norm.detach().float()))
        optimizer.found_inf = bad.float()
        if self.first_step is None or self.first_step.device != bad.device:
            self.first_step = torch.full((), -1, dtype=torch.long, device=bad.device)
            self.loss = torch.zeros((), device=bad.device)
            self.grad_norm = torch.zeros((), device=bad.device)
        first = bad & (self.first_step < 0)
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.loss = torch.where(first, loss.detach().float(), self.loss)
        self.grad_norm = torch.where(first, grad_norm.detach().float(), self.grad_norm)

    def check(self) -> None:
        """Raise NonFiniteLossError if any step so far was not finite (one host synchronisation; in
        DDP one all-reduce first, so that every rank raises)."""
        if self.first_step is None:
            return
        seen = (self.first_step >= 0).long()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
        if not bool(seen):
            return
        step = int(self.first_step)
        where = (f"at step {step} (loss={float(self.loss):.4g}, grad norm={float(self.grad_norm):.4g})" if step >= 0
                 else "on another rank")
        raise NonFiniteLossError(
            f"non-finite training loss {where}: that step did not update the weights, training stopped and no "
            "checkpoint was written after it (try a lower model.init_args.lr or check the data)")
