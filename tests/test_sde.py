"""SDE library (msdiff.sde): closed forms, Monte-Carlo forward simulation, kernels, priors, bad input."""
import math

import pytest
import torch

from msdiff.sde import VESDE, VPSDE, MultiSpeedSDE, SubVPSDE
from msdiff.utils import make_generator

SDES = [VESDE(0.01, 5.0), VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)]


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_closed_forms(sde):
    t = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    a, s = sde.mean_coef(t), sde.std(t)
    if isinstance(sde, VESDE):  # test-side closed forms (Song Eqs. 30-34)
        ref_a, ref_s = torch.ones_like(t), 0.01 * 500.0**t
    else:
        B = 0.1 * t + 0.5 * 19.9 * t**2
        ref_a = torch.exp(-B / 2)
        ref_s = torch.sqrt(1 - torch.exp(-B)) if type(sde) is VPSDE else 1 - torch.exp(-B)
    assert torch.allclose(a, ref_a) and torch.allclose(s, ref_s)
    x0 = torch.randn(4, 2, 3, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0, t)
    assert torch.allclose(mean, ref_a[:, None, None] * x0) and torch.allclose(std.expand_as(x0), ref_s[:, None, None].expand_as(x0))
    # the schedules are consistent with the SDE: d a/dt = f a and d s^2/dt = 2 f s^2 + g^2
    tt, h = torch.tensor([0.2, 0.6], dtype=torch.float64), 1e-6
    da = (sde.mean_coef(tt + h) - sde.mean_coef(tt - h)) / (2 * h)
    ds2 = (sde.std(tt + h) ** 2 - sde.std(tt - h) ** 2) / (2 * h)
    f, g = sde.drift_coef(tt), sde.diffusion(tt)
    assert torch.allclose(da, f * sde.mean_coef(tt))
    assert torch.allclose(ds2, 2 * f * sde.std(tt.detach()) ** 2 + g**2)


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_monte_carlo_forward_simulation(sde):
    """Euler-Maruyama on the SDE's own sde() reproduces marginal_prob (VE starts at x0 + sigma_min z)."""
    g = make_generator(0)
    n, steps, t_end = 20000, 200, 0.6
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    zero = torch.zeros(n, dtype=torch.float64)
    x = x0 + sde.std(zero)[:, None] * torch.randn(n, 1, generator=g, dtype=torch.float64)
    h = t_end / steps
    for i in range(steps):
        t = torch.full((n,), i * h, dtype=torch.float64)
        drift, diff = sde.sde(x, t)
        x = x + drift * h + diff[:, None] * math.sqrt(h) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0[:1], torch.full((1,), t_end, dtype=torch.float64))
    assert abs(x.mean() - mean.item()) < 4 * std.item() / math.sqrt(n) + 0.01 * abs(mean.item())
    assert abs(x.std() / std.item() - 1) < 0.02


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_prior_logp_and_sampling(sde):
    z = sde.prior_sampling((3, 2, 4, 4), make_generator(1), dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z).sum((1, 2, 3))
    assert torch.allclose(sde.prior_logp(z), ref)
    z = sde.prior_sampling((5000, 8), make_generator(2))
    assert abs(z.std() / sde.prior_std - 1) < 0.02


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_sigma_round_trip_and_transition(sde):
    t = torch.tensor([1e-3, 0.2, 0.5, 0.99], dtype=torch.float64)
    assert torch.allclose(sde.t_of_sigma(sde.sigma(t)), t, rtol=1e-9, atol=1e-12)
    s, u, tt = torch.tensor([0.1]), torch.tensor([0.4]), torch.tensor([0.9])
    s, u, tt = s.double(), u.double(), tt.double()
    r1, G1 = sde.transition(u, s)
    r2, G2 = sde.transition(tt, u)
    r, G = sde.transition(tt, s)
    assert torch.allclose(r2 * r1, r) and torch.allclose(r2**2 * G1**2 + G2**2, G**2)
    # kernel 0 -> t is the marginal (up to VE's std(0) = sigma_min, which adds in quadrature)
    r0, G0 = sde.transition(tt, torch.zeros(1, dtype=torch.float64))
    assert torch.allclose(G0**2 + (r0 * sde.std(torch.zeros(1, dtype=torch.float64))) ** 2, sde.std(tt) ** 2)


def test_multi_speed():
    msde = MultiSpeedSDE(VESDE(0.01, 50.0), VESDE(0.01, 0.5))
    x0, y0 = torch.randn(3, 2), torch.randn(3, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    (mx, sx), (my, sy) = msde.marginal_prob(x0, y0, t)
    assert torch.allclose(sx[:, 0], msde.x.std(t)) and torch.allclose(sy[:, 0], msde.y.std(t))
    kappa = math.log(0.5 / 0.01) / math.log(50.0 / 0.01)
    assert torch.allclose(sy[:, 0], 0.01 * (sx[:, 0] / 0.01) ** kappa)
    assert msde.T == 1.0 and msde.with_y(VESDE(0.01, 1.0)).y.sigma_max == 1.0
    assert VESDE(0.01, 50.0).with_speed(3.0).sigma_max == 3.0 and VPSDE().with_speed(10.0).beta_max == 10.0


def test_bad_input():
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_max"):
        VESDE(1.0, 0.5)
    with pytest.raises(ValueError, match="beta_max"):
        VPSDE(5.0, 1.0)
    with pytest.raises(ValueError, match="beta_min"):
        SubVPSDE(-1.0, 1.0)
    with pytest.raises(ValueError, match="t"):
        VPSDE().marginal_prob(torch.zeros(2, 3), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="t"):
        VPSDE().sde(torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="MultiSpeedSDE"):
        MultiSpeedSDE(VESDE(), "fast")
    with pytest.raises(ValueError, match="sigma_max"):
        VESDE(0.01, 50.0).with_speed(-1.0)
