"""Exponential moving average of a network's weights: ema-pytorch's ``EMA`` with the reference's
warm-up (plain PyTorch, no Lightning).

The reference (score_sde / MSDiff) keeps an EMA with decay 0.999 and the warm-up

    decay_n = min(decay, (1 + n) / (10 + n)),      n = number of updates including this one,

and evaluates and samples with the averaged weights (docs/reference.md, "Training").
ema-pytorch keeps the averaged copy and does the averaging (``update_moving_average``: one fused
lerp over the parameters, a copy of the buffers); this subclass replaces its schedule (a plain
copy for ``update_after_step`` steps, then an inverse-gamma warm-up, every ``update_every`` steps)
with the reference's on every step, and keeps a host mirror of the counter (ema-pytorch reads its counter back with ``.item()``, a device
sync per update). Unlike the reference, the average is a registered sub-module, so it lives in the
checkpoint's ``state_dict`` with its counter and a resume continues the very same average.

The state dict keeps the names msdiff's checkpoints have always had: the averaged weights under
``net.`` (ema-pytorch's ``ema_model``) and the counter n as ``num_updates`` (its ``step``);
ema-pytorch's ``initted`` flag is not saved (it is unused here). The reference increments its counter
before computing the decay, so its first update uses 2/11; ``num_updates`` counts the updates made.
"""
from __future__ import annotations

import torch
from ema_pytorch import EMA as _LibraryEMA
from torch import nn


class EMA(_LibraryEMA):
    """An averaged copy of ``net``: call :meth:`update` after every optimizer step.

    Args:
        net: the trained network; it is deep-copied, the copy never receives gradients.
        decay: the asymptotic decay (0 <= decay < 1); 0 makes the copy track ``net`` exactly.
    """

    def __init__(self, net: nn.Module, decay: float = 0.999):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"ema_decay={decay}: expected 0 <= ema_decay < 1")
        float_buffers = {n for n, b in net.named_buffers() if torch.is_floating_point(b) or torch.is_complex(b)}
        super().__init__(net, beta=float(decay), update_after_step=0, update_every=1, include_online_model=False,
                         use_foreach=True, param_or_buffer_names_no_ema=float_buffers)
        self.decay = float(decay)
        self.net.eval().requires_grad_(False)
        self._n: int | None = 0  # host mirror of num_updates

    # ---- the state dict names of msdiff's checkpoints ---------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        super().__setattr__("net" if name == "ema_model" else name, value)

    @property
    def ema_model(self) -> nn.Module:
        """ema-pytorch's name of the averaged network, registered here as ``net``."""
        return self.net

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        if name == "step":  # ema-pytorch's counter: n
            name = "num_updates"
        elif name == "initted":
            persistent = False
        super().register_buffer(name, tensor, persistent)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._n = None  # re-read the loaded counter once

    # ---- the reference's schedule -------------------------------------------------------------------
    def current_decay(self) -> float:
        """The decay the next update uses: min(decay, (1 + n) / (10 + n)) with n = num_updates + 1."""
        if self._n is None:
            self._n = int(self.num_updates)
        n = self._n + 1  # the reference counts the update being made: 2/11 at the first
        return min(self.decay, (1.0 + n) / (10.0 + n))

    get_current_decay = current_decay  # ema-pytorch's name for the schedule

    @torch.no_grad()
    def update(self, net: nn.Module | None = None) -> None:
        """ema <- decay * ema + (1 - decay) * net for parameters; buffers are copied. ``net`` (the
        network given at construction when omitted) must have the averaged copy's parameter names."""
        net = self.model if net is None else net
        if [n for n, _ in net.named_parameters()] != [n for n, _ in self.net.named_parameters()]:
            raise ValueError("EMA.update: the network's parameters do not match the averaged copy's")
        d = self.current_decay()
        self.update_moving_average(self.net, net, d)
        for (_, b_ema), (name, b) in zip(self.net.named_buffers(), net.named_buffers()):
            if name not in self.buffer_names:  # integer buffers (e.g. BatchNorm's counter)
                b_ema.copy_(b)
        self.num_updates += 1
        self._n += 1

    def train(self, mode: bool = True) -> "EMA":
        """The averaged network always stays in eval mode (no dropout)."""
        super().train(mode)
        self.net.eval()
        return self

    def eval(self) -> "EMA":  # ema-pytorch's eval() returns the copy; nn.Module's returns the module
        return self.train(False)

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)
