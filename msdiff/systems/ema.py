"""Exponential moving average of a network's weights, with the reference's warm-up (plain PyTorch,
no Lightning).

The reference (score_sde / MSDiff) keeps an EMA with decay 0.999 and the warm-up

    decay_n = min(decay, (1 + n) / (10 + n)),      n = number of updates including this one,

and evaluates and samples with the averaged weights (docs/reference.md, "Training"). An update is
one fused lerp over the parameters (``torch._foreach_lerp_``, as ema-pytorch does it) and a copy of
the buffers; a host mirror of the counter avoids reading it back from the device at every update.
Unlike the reference, the average is a registered sub-module, so it lives in the checkpoint's
``state_dict`` (the averaged weights under ``net.``, the counter n as ``num_updates``) and a
resume continues the very same average. `ScoreSystem` (``ema``) and `CUTSystem` (``G_ema``) both
hold it as an ordinary child module.
The reference increments its counter before computing the decay, so its first update uses 2/11;
``num_updates`` counts the updates made.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """An averaged copy of ``net``: call :meth:`update` after every optimizer step.

    Args:
        net: the trained network; it is deep-copied, the copy never receives gradients.
        decay: the asymptotic decay (0 <= decay < 1); 0 makes the copy track ``net`` exactly.
    """

    def __init__(self, net: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"ema_decay={decay}: expected 0 <= ema_decay < 1")
        self.decay = float(decay)
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.tensor(0))
        self._n: int | None = 0  # host mirror of num_updates

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

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * net for parameters; buffers are copied. ``net`` must have
        the averaged copy's parameter names."""
        ours, theirs = list(self.net.named_parameters()), list(net.named_parameters())
        if [n for n, _ in theirs] != [n for n, _ in ours]:
            raise ValueError("EMA.update: the network's parameters do not match the averaged copy's")
        d = self.current_decay()
        if ours:
            torch._foreach_lerp_([p for _, p in ours], [p.detach() for _, p in theirs], 1.0 - d)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1
        self._n += 1

    def train(self, mode: bool = True) -> "EMA":
        """The averaged network always stays in eval mode (no dropout)."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)
