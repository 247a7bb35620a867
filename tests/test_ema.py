"""The EMA: the reference's update, bit for bit, and the checkpoints' keys (net.*, num_updates)."""
from __future__ import annotations

import torch
from torch import nn

from msdiff.systems.ema import EMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_update_is_the_reference_lerp_bit_for_bit_and_copies_buffers():
    net = _net()
    ema = EMA(net, decay=0.999)
    want = [p.detach().clone() for p in net.parameters()]
    for n in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.5).add_(0.25)
        net.train()(torch.randn(5, 3))  # BatchNorm: running stats and its integer counter move
        d = min(0.999, (2 + n) / (11 + n))  # the reference's counter is n + 1 at update n
        want = [w.lerp(p.detach(), 1 - d) for w, p in zip(want, net.parameters())]
        ema.update(net)
    assert all(torch.equal(a, b) for a, b in zip(ema.net.parameters(), want))
    assert all(torch.equal(a, b) for a, b in zip(ema.net.buffers(), net.buffers()))
    assert int(ema.net[1].num_batches_tracked) == 3 and int(ema.num_updates) == 3


def test_state_dict_keys_are_the_former_ones():
    """Checkpoints written before (keys net.*, num_updates) load, and new ones have the
    same keys: the averaged weights under net., the counter as num_updates, nothing else."""
    net = _net()
    old = {f"net.{k}": v.clone() + 1 for k, v in net.state_dict().items()}
    old["num_updates"] = torch.tensor(41)
    ema = EMA(net, decay=0.999)
    assert sorted(ema.state_dict()) == sorted(old)
    ema.load_state_dict(old)  # strict
    assert int(ema.num_updates) == 41 and ema.current_decay() == min(0.999, 43 / 52)
    assert all(torch.equal(v, old[f"net.{k}"]) for k, v in ema.net.state_dict().items())
    assert not ema.net.training
