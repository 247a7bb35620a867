"""Exponential moving average of a network's weights: ema-pytorch's ``EMA`` with the reference's
warm-up (plain PyTorch, no Lightning).

The reference (score_sde / MSDiff) keeps an EMA with decay 0.999 and the warm-up

    decay_n = min(decay, (1 + n) / (10 + n)),      n = number of updates so far,

and evaluates and samples with the averaged weights. ema-pytorch keeps the averaged copy
(``ema_model``) and does the averaging (``update_moving_average``: one fused lerp over the
parameters); this subclass replaces its schedule (a copy for ``update_after_step`` steps, then an
inverse-gamma warm-up, every ``update_every`` steps) with the reference's on every step, copies
buffers instead of averaging them, and keeps a host mirror of the counter (ema-pytorch reads
``step.item()``, a device sync per update). Unlike the reference, the average lives in the
checkpoint's ``state_dict`` with its counter, so a resume continues the very same average.

State dict keys (under the EMA's prefix): ``ema_model.<name>`` (the averaged weights), ``step``
(n) and ``initted`` (ema-pytorch's flag, unused here). Checkpoints written before this module used
ema-pytorch (``net.<name>``, ``num_updates``) still load: :func:`rename_legacy_keys`.
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
        self.ema_model.eval().requires_grad_(False)
        self.initted.fill_(True)
        self._n: int | None = 0  # host mirror of `step`
        self.register_load_state_dict_pre_hook(_rename_legacy_keys_hook)

    @property
    def net(self) -> nn.Module:
        """The averaged network (evaluate and sample with it)."""
        return self.ema_model

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._n = None  # re-read the loaded counter once

    def num_updates(self) -> int:
        """n, the number of updates so far (the ``step`` buffer, read once after a load)."""
        if self._n is None:
            self._n = int(self.step)
        return self._n

    def current_decay(self) -> float:
        """The decay the next update uses: min(decay, (1 + n) / (10 + n))."""
        n = self.num_updates()
        return min(self.decay, (1.0 + n) / (10.0 + n))

    get_current_decay = current_decay  # ema-pytorch's name for the schedule

    @torch.no_grad()
    def update(self, net: nn.Module | None = None) -> None:
        """ema <- decay * ema + (1 - decay) * net for parameters; buffers are copied. ``net`` (the
        network given at construction when omitted) must have the same parameter names."""
        net = self.model if net is None else net
        names = [n for n, _ in net.named_parameters()]
        if names != [n for n, _ in self.ema_model.named_parameters()]:
            raise ValueError("EMA.update: the network's parameters do not match the averaged copy's")
        self.update_moving_average(self.ema_model, net, self.current_decay())
        for (_, b_ema), (name, b) in zip(self.ema_model.named_buffers(), net.named_buffers()):
            if name not in self.buffer_names:  # integer buffers (e.g. BatchNorm's counter)
                b_ema.copy_(b)
        self._n = self.num_updates() + 1
        self.step += 1

    def train(self, mode: bool = True) -> "EMA":
        """The averaged network always stays in eval mode (no dropout)."""
        super().train(mode)
        self.ema_model.eval()
        return self

    def eval(self) -> "EMA":  # ema-pytorch's eval() returns the copy; nn.Module's returns the module
        return self.train(False)

    def forward(self, *args, **kwargs):
        return self.ema_model(*args, **kwargs)


def rename_legacy_keys(state_dict: dict, prefix: str = "") -> None:
    """Rename, in place, the keys of an EMA at ``prefix`` written before ema-pytorch was used
    (``net.<name>`` -> ``ema_model.<name>``, ``num_updates`` -> ``step``, plus ``initted``)."""
    if f"{prefix}num_updates" not in state_dict:
        return
    old = f"{prefix}net."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[f"{prefix}ema_model.{key[len(old):]}"] = state_dict.pop(key)
    state_dict[f"{prefix}step"] = state_dict.pop(f"{prefix}num_updates")
    state_dict.setdefault(f"{prefix}initted", torch.tensor(True))


def _rename_legacy_keys_hook(module: EMA, state_dict: dict, prefix: str, *args) -> None:
    rename_legacy_keys(state_dict, prefix)
