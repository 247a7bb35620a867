"""Tests of msdiff.estimators (CDE, CDiffE, CMDE, VS-CMDE; Batzolis et al. 2021)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from msdiff.estimators import CDE, CMDE, VSCMDE, CDiffE, EDMPrecond, LogNormalSigma, SimpleWeighting
from msdiff.sde import MultiSpeedSDE, SubVPSDE, VESDE, VPSDE
from msdiff.utils import make_generator

# SR-160 sigmas of the reference
SIGMA_MIN, SIGMA_MAX_X, SIGMA_MAX_Y = 5e-3, 277.128, 0.5




def ve_x():
    return VESDE(SIGMA_MIN, SIGMA_MAX_X)


def ve_pair(sigma_max_y=SIGMA_MAX_Y):
    return MultiSpeedSDE(ve_x(), VESDE(SIGMA_MIN, sigma_max_y))


def all_estimators(**kw):
    return {
        "CDE": CDE(ve_x(), **kw),
        "CDiffE": CDiffE(ve_x(), **kw),
        "CMDE": CMDE(ve_pair(), **kw),
        "VSCMDE": VSCMDE(ve_pair(), sigma_max_y_target=SIGMA_MAX_Y, reach_target_steps=10, **kw),
    }


class Constant(nn.Module):
    """Outputs `value` in every channel; records the last input and label."""

    def __init__(self, channels: int, value: float = 0.0):
        super().__init__()
        self.channels, self.value = channels, value
        self.h = self.label = None

    def forward(self, h, label):
        self.h, self.label = h.clone(), label.clone()
        return torch.full((h.shape[0], self.channels) + h.shape[2:], self.value, dtype=h.dtype)


def data(b=64, cx=3, cy=3, size=8, seed=0):
    g = make_generator(seed)
    return torch.rand(b, cx, size, size, generator=g), 0.1 + 0.9 * torch.rand(b, cy, size, size, generator=g)


# ---- loss constants and weighting --------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [("CDE", 21.85), ("CDiffE", 21.85), ("CMDE", 15.53)])
def test_zero_output_loss_is_reference_constant(name, expected):
    est = all_estimators()[name]
    x, y = data(b=256)
    loss = est.loss(Constant(est.out_channels(3, 3)), x, y, make_generator(1))
    assert loss.shape == (256,)
    # 2 ln(smax/smin) * mean(z^2) over 256 * 192 x elements: relative MC error 0.64%, 4 sigma
    assert loss.mean().item() == pytest.approx(expected, rel=0.025)


def test_cmde_component_weights_and_reduction():
    est = CMDE(ve_pair())
    x, y = data(b=512, cx=3, cy=1)  # MC: x 0.45%, y 0.8% relative error
    terms = est.loss_terms(Constant(4), x, y, make_generator(2))
    assert set(terms) == {"loss", "loss_x", "loss_y"}
    assert terms["loss_x"].mean().item() == pytest.approx(2 * math.log(SIGMA_MAX_X / SIGMA_MIN), rel=0.02)
    assert terms["loss_y"].mean().item() == pytest.approx(2 * math.log(SIGMA_MAX_Y / SIGMA_MIN), rel=0.03)
    # mean over all x and y elements: x has 3 channels, y has 1
    torch.testing.assert_close(terms["loss"], (3 * terms["loss_x"] + terms["loss_y"]) / 4)
    assert set(CDE(ve_x()).loss_terms(Constant(3), x, y, make_generator(2))) == {"loss", "loss_x"}


@pytest.mark.parametrize("sde_cls", [VPSDE, SubVPSDE])
def test_likelihood_weight_is_g2_over_std2_for_vp(sde_cls):
    sde = sde_cls(0.1, 20.0)
    x, y = data(b=1024, size=4)  # MC error < 0.65% relative
    t = torch.full((1024,), 0.3)
    beta, big_b = 0.1 + 0.3 * 19.9, 0.1 * 0.3 + 19.9 * 0.3**2 / 2
    if sde_cls is VPSDE:
        w = beta / (1 - math.exp(-big_b))
    else:
        w = beta * (1 - math.exp(-2 * big_b)) / (1 - math.exp(-big_b)) ** 2
    loss = CDiffE(sde).loss_terms(Constant(6), x, y, make_generator(3), t=t)["loss"]
    assert loss.mean().item() == pytest.approx(w, rel=0.02)
    simple = CDiffE(sde, weighting=SimpleWeighting()).loss_terms(Constant(6), x, y, make_generator(3), t=t)["loss"]
    assert simple.mean().item() == pytest.approx(1.0, rel=0.02)  # plain eps-MSE of a zero output
    # a constant output c gives weight * (c^2 + 1)
    loss_c = CDE(sde).loss_terms(Constant(3, 0.5), x, y, make_generator(3), t=t)["loss"]
    assert loss_c.mean().item() == pytest.approx(w * 1.25, rel=0.02)


def test_time_is_uniform_on_t_eps_T_and_shared():
    est = CMDE(ve_pair(), t_eps=0.2)
    net = Constant(2)
    x, y = data(b=20000, cx=1, cy=1, size=1)
    est.loss(net, x, y, make_generator(4))
    t = net.label / 999.0
    assert t.min() >= 0.2 and t.max() <= 1.0
    assert t.mean().item() == pytest.approx(0.6, abs=0.008)  # U(0.2, 1); MC sd 0.0016
    assert t.var().item() == pytest.approx(0.8**2 / 12, rel=0.08)


@pytest.mark.parametrize("sde,centered", [(ve_pair(), False), (ve_pair(), True),
                                          (MultiSpeedSDE(VPSDE(), VPSDE(beta_max=2.0)), False)])
def test_log_normal_noise_levels_are_edm_sigma_in_centered_units(sde, centered):
    """LogNormalSigma: ln(k sigma(t)) ~ N(P_mean, P_std^2), k = 2 for [0, 1] data, 1 when centered."""
    est = CMDE(sde, centered=centered, noise_levels=LogNormalSigma(mean=-1.2, std=0.8))
    t = est.sample_t(20000, make_generator(5), dtype=torch.float64)
    assert t.min() >= est.t_eps and t.max() <= 1.0
    log_sigma = torch.log((1.0 if centered else 2.0) * est.sampling_sde.sigma(t))
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.02)  # MC sd 0.006
    assert log_sigma.std().item() == pytest.approx(0.8, rel=0.03)
    with pytest.raises(ValueError, match=r"LogNormalSigma.std=0.0: expected a finite number > 0"):
        LogNormalSigma(mean=-1.2, std=0.0)
    with pytest.raises(ValueError, match="noise_levels='lognormal': expected a msdiff.estimators.NoiseLevels"):
        CMDE(sde, noise_levels="lognormal")


# ---- network I/O conventions --------------------------------------------------------------------------
@pytest.mark.parametrize("centered", [False, True])
def test_network_input_and_label(centered):
    x, y = data(b=2048, cx=2, cy=1, size=4)
    t = torch.linspace(0.1, 0.9, 2048)
    scale = (lambda v: v) if centered else (lambda v: 2 * v - 1)
    net = Constant(2)
    CDE(ve_x(), centered=centered).loss_terms(net, x, y, make_generator(5), t=t)
    torch.testing.assert_close(net.label, 999 * t)
    torch.testing.assert_close(net.h[:, 2:], scale(y))  # clean y
    z = (net.h[:, :2] - scale(x)) / (1 if centered else 2) / ve_x().std(t)[:, None, None, None]
    assert z.mean().abs() < 0.02 and z.std().item() == pytest.approx(1.0, rel=0.02)
    net = Constant(3)
    CMDE(ve_pair(), centered=centered).loss_terms(net, x, y, make_generator(5), t=t)
    z_y = (net.h[:, 2:] - scale(y)) / (1 if centered else 2) / VESDE(SIGMA_MIN, SIGMA_MAX_Y).std(t)[:, None, None, None]
    assert z_y.std().item() == pytest.approx(1.0, rel=0.03)


def test_score_is_output_over_std_x_part_only():
    x, y = data(b=5, cx=3, cy=2, size=4)
    t = torch.linspace(0.1, 0.9, 5)
    for est in all_estimators().values():
        net = Constant(est.out_channels(3, 2), 2.0)
        s = est.score_fn(net, y, make_generator(0))(x, t)
        assert s.shape == x.shape
        torch.testing.assert_close(s, 2.0 / ve_x().std(t)[:, None, None, None].expand_as(x))
        assert est.in_channels(3, 2) == 5
    assert CDE(ve_x()).out_channels(3, 2) == 3 and CMDE(ve_pair()).out_channels(3, 2) == 5


def test_diffusive_estimators_draw_fresh_y_t_per_call():
    x, y = data(b=3, size=4)
    t = torch.full((3,), 0.5)
    for name, est in all_estimators().items():
        net = Constant(est.out_channels(3, 3))
        fn = est.score_fn(net, y, make_generator(7))
        fn(x, t)
        h1 = net.h
        fn(x, t)
        h2 = net.h
        torch.testing.assert_close(h1[:, :3], h2[:, :3])
        if name == "CDE":
            torch.testing.assert_close(h1[:, 3:], 2 * y - 1)
            torch.testing.assert_close(h2[:, 3:], 2 * y - 1)
            continue
        # each call draws its own z from the generator: y_t = a_y y + s_y z1, then z2
        g = make_generator(7)
        z1, z2 = (torch.randn(y.shape, generator=g) for _ in range(2))
        a_y, s_y = est.y_sde.mean_coef(t).view(-1, 1, 1, 1), est.y_sde.std(t).view(-1, 1, 1, 1)
        torch.testing.assert_close(h1[:, 3:], 2 * (a_y * y + s_y * z1) - 1)
        torch.testing.assert_close(h2[:, 3:], 2 * (a_y * y + s_y * z2) - 1)
        est.score_fn(net, y, make_generator(7))(x, t)  # same seed: same first draw
        assert torch.equal(net.h, h1)
        # fixed_y_noise: one z for every call, so the score is a deterministic function of (x, t)
        # (adaptive ODE solvers need this); y_t = a_y(t) y + std_y(t) z follows t
        fixed = est.score_fn(net, y, make_generator(7), fixed_y_noise=True)
        fixed(x, t)
        h3 = net.h
        fixed(x, t)
        assert torch.equal(net.h, h3)
        fixed(x, torch.full((3,), 0.9))
        z = ((net.h[:, 3:] + 1) / 2 - y) / est.y_sde.std(torch.tensor(0.9))
        z3 = ((h3[:, 3:] + 1) / 2 - y) / est.y_sde.std(torch.tensor(0.5))
        torch.testing.assert_close(z, z3, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_value_error():
    x, y = data(b=2, size=4)
    with pytest.raises(ValueError, match="p_uncond"):
        CDE(ve_x(), p_uncond=1.0)
    with pytest.raises(ValueError, match="p_uncond"):
        CMDE(ve_pair(), p_uncond=0.1)
    with pytest.raises(ValueError, match="weighting"):
        CDE(ve_x(), weighting="foo")
    with pytest.raises(ValueError, match="MultiSpeedSDE"):
        CMDE(ve_x())
    with pytest.raises(ValueError, match="CMDE"):
        CDE(ve_pair())
    with pytest.raises(ValueError, match="y: expected"):
        CDE(ve_x()).loss(Constant(3), x, y[:, :, :2])
    with pytest.raises(ValueError, match="net: expected"):
        CMDE(ve_pair()).loss(Constant(3), x, y)


# ---- classifier-free guidance training (CDE) ------------------------------------------------------------
def test_condition_dropout_fraction_and_null_condition():
    est = CDE(ve_x(), p_uncond=0.3)
    assert est.trained_for_cfg and not CDE(ve_x()).trained_for_cfg
    x, y = data(b=20000, cx=1, cy=1, size=1)
    net = Constant(1)
    est.loss(net, x, y, make_generator(8))
    cond = net.h[:, 1:]
    dropped = (cond == -1.0).flatten()  # the null condition y = 0, mapped by 2y - 1
    kept = torch.isclose(cond, 2 * y - 1).flatten()
    assert bool((dropped ^ kept).all())
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.02)  # MC sd 0.0032
    # the unconditional score sees the null condition; it needs dropout training
    un = est.unconditional_score_fn(net, like=y[:3])(x[:3], torch.full((3,), 0.5))
    assert un.shape == (3, 1, 1, 1) and bool((net.h[:, 1:] == -1.0).all())
    with pytest.raises(ValueError, match="p_uncond"):
        CDE(ve_x()).unconditional_score_fn(net, like=y)


# ---- VS-CMDE schedule ------------------------------------------------------------------------------------
def test_vscmde_schedule_values_and_linear_inverse():
    est = VSCMDE(ve_pair(), sigma_max_y_target=0.5, reach_target_steps=100)
    assert est.sigma_max_y_at(0) == pytest.approx(SIGMA_MAX_X)
    assert est.sigma_max_y_at(100) == pytest.approx(0.5)
    inv = torch.tensor([1 / est.sigma_max_y_at(k) for k in range(0, 400, 7)], dtype=torch.float64)
    second_diff = inv[2:] - 2 * inv[1:-1] + inv[:-2]
    assert second_diff.abs().max() < 1e-12  # 1/sigma linear in k
    assert est.sigma_max_y_at(200) < 0.5  # the reference keeps falling after the target
    clamped = VSCMDE(ve_pair(), sigma_max_y_target=0.5, reach_target_steps=100, clamp=True)
    assert clamped.sigma_max_y_at(50) == est.sigma_max_y_at(50)
    assert clamped.sigma_max_y_at(100) == clamped.sigma_max_y_at(10_000) == 0.5
    # initial state: y as fast as x
    assert est.current_speed_y == pytest.approx(SIGMA_MAX_X) and est.y_sde.sigma_max == pytest.approx(SIGMA_MAX_X)


def test_vscmde_buffer_travels_in_state_dict_and_drives_sampling():
    est = VSCMDE(ve_pair(), sigma_max_y_target=0.5, reach_target_steps=100)
    value = est.set_step(37)
    state = est.state_dict()
    assert state["speed_y"].dtype == torch.float64 and state["speed_y"].item() == pytest.approx(value)
    fresh = VSCMDE(ve_pair(), sigma_max_y_target=0.5, reach_target_steps=100)
    fresh.load_state_dict(state)
    assert fresh.current_speed_y == pytest.approx(value) and fresh.y_sde.sigma_max == pytest.approx(value)
    # sampling perturbs y with the loaded speed: std of y_t - y is sigma_y(t)
    x, y = data(b=1024, cx=1, cy=1, size=8)
    net = Constant(2)
    t = torch.full((1024,), 0.8)
    fresh.score_fn(net, y, make_generator(9))(x, t)
    spread = ((net.h[:, 1:] + 1) / 2 - y).std().item()
    assert spread == pytest.approx(SIGMA_MIN * (value / SIGMA_MIN) ** 0.8, rel=0.03)
    # and the loss weights y by the current speed
    terms = fresh.loss_terms(net, x, y, make_generator(9))
    assert terms["loss_y"].mean().item() == pytest.approx(2 * math.log(value / SIGMA_MIN), rel=0.03)


def test_vscmde_vp_analogue_schedules_beta_max():
    sde = MultiSpeedSDE(VPSDE(0.1, 20.0), VPSDE(0.1, 5.0))
    est = VSCMDE(sde, sigma_max_y_target=2.0, reach_target_steps=50)
    assert est.speed_y_at(0) == pytest.approx(20.0) and est.speed_y_at(50) == pytest.approx(2.0)
    assert 1 / est.speed_y_at(25) == pytest.approx((1 / 20 + 1 / 2) / 2)
    est.set_step(50)
    assert est.y_sde.beta_max == pytest.approx(2.0) and est.y_sde.beta_min == 0.1
    assert est.sampling_sde.beta_max == 20.0
    # the loss uses the scheduled y SDE: zero output at fixed t gives (g_y/s_y)^2 for beta_max_y = 2
    x, y = data(b=4096, cx=1, cy=1, size=4)
    t = torch.full((4096,), 0.5)
    terms = est.loss_terms(Constant(2), x, y, make_generator(10), t=t)
    beta, big_b = 0.1 + 0.5 * 1.9, 0.1 * 0.5 + 1.9 * 0.25 / 2
    assert terms["loss_y"].mean().item() == pytest.approx(beta / (1 - math.exp(-big_b)), rel=0.03)
    # unclamped, beta_max_y eventually drops below beta_min: a clear error
    with pytest.raises(ValueError, match="clamp=True"):
        est.set_step(10_000)
    with pytest.raises(ValueError, match="step=10000.*clamp=True"):  # what the system checks at fit start
        est.check_schedule(10_000)
    est.check_schedule(50)
    VSCMDE(sde, sigma_max_y_target=2.0, reach_target_steps=50, clamp=True).check_schedule(10_000)
    with pytest.raises(ValueError, match="sigma_max_y_target"):
        VSCMDE(sde, sigma_max_y_target=30.0, reach_target_steps=50)
    with pytest.raises(ValueError, match="speed parameter"):
        VSCMDE(MultiSpeedSDE(VPSDE(), VESDE()), sigma_max_y_target=1.0, reach_target_steps=5)


# ---- exact Gaussian posteriors ---------------------------------------------------------------------------
from msdiff.gaussian import GaussianField, GaussianInverseProblem, posterior_error  # noqa: E402
from msdiff.samplers import EulerMaruyama  # noqa: E402

G_SDE = VESDE(1e-2, 3.0)  # sigma_max ~ the largest distance between 4x4 field samples


def sr_problem():
    return GaussianInverseProblem.super_resolution(GaussianField(1, 4), factor=2, noise_std=0.05)


def joint_sde(est):
    return MultiSpeedSDE(est.sampling_sde, est.y_sde)


def gaussian_estimators(sde=G_SDE, sigma_max_y=0.1):
    y_sde = sde.with_speed(sigma_max_y)  # sigma_max_y for VE, beta_max_y for VP
    return {
        "CDE": CDE(sde),
        "CDiffE": CDiffE(sde),
        "CMDE": CMDE(MultiSpeedSDE(sde, y_sde)),
        "VSCMDE": VSCMDE(MultiSpeedSDE(sde, y_sde), sigma_max_y_target=sigma_max_y, reach_target_steps=100, clamp=True),
    }


class Oracle(nn.Module):
    """The exact score as a network: decodes t = label / 999 and the input from 2 v - 1, returns
    score * std (x channels by std_x, y channels by std_y), what a perfect network outputs."""

    def __init__(self, problem, sde, joint: bool):
        super().__init__()
        self.problem, self.sde, self.joint = problem, sde, joint

    def forward(self, h, label):
        t, v = label / 999.0, (h + 1) / 2
        x_t, y = v[:, :1], v[:, 1:]
        if not self.joint:
            return self.problem.conditional_score(x_t, y, t, self.sde) * self.sde.std(t)[:, None, None, None]
        s_x, s_y = self.problem.joint_score(x_t, y, t, self.sde)
        return torch.cat([s_x * self.sde.x.std(t)[:, None, None, None], s_y * self.sde.y.std(t)[:, None, None, None]], 1)


def oracle(est, problem):
    if est.y_sde is None:
        return Oracle(problem, est.sampling_sde, joint=False)
    return Oracle(problem, joint_sde(est), joint=True)


class Shifted(nn.Module):
    def __init__(self, net, delta):
        super().__init__()
        self.net, self.delta = net, delta

    def forward(self, h, label):
        return self.net(h, label) + self.delta


def test_cde_with_exact_network_returns_exact_conditional_score():
    problem = sr_problem()
    x, y = (v.double() for v in problem.sample(64, make_generator(11)))
    t = torch.linspace(0.02, 0.98, 64, dtype=torch.float64)
    x_t = x + G_SDE.std(t)[:, None, None, None] * torch.randn(x.shape, generator=make_generator(12), dtype=torch.float64)
    est = CDE(G_SDE)
    got = est.score_fn(oracle(est, problem), y)(x_t, t)
    torch.testing.assert_close(got, problem.conditional_score(x_t, y, t, G_SDE), rtol=1e-8, atol=1e-8)


def test_cmde_x_score_tends_to_conditional_score_as_sigma_y_shrinks():
    """Theorem 3: E|grad_x log p(x_t | y_t) - grad_x log p(x_t | y)|^2 -> 0 as sigma_y -> 0. The error
    (eps scale, s_x^2 |.|^2) is measured relative to the part of the score that y contributes."""
    problem = sr_problem()
    x, y = (v.double() for v in problem.sample(256, make_generator(13)))
    t = torch.linspace(0.0, 1.0, 16, dtype=torch.float64).repeat(16)
    s_x = G_SDE.std(t)[:, None, None, None]
    x_t = x + s_x * torch.randn(x.shape, generator=make_generator(15), dtype=torch.float64)
    exact = problem.conditional_score(x_t, y, t, G_SDE)
    from_y = ((s_x * (exact - problem.field.score(x_t, t, G_SDE))) ** 2).sum()
    errors = []
    for y_sde in (G_SDE, VESDE(1e-3, 0.3), VESDE(1e-3, 0.03)):  # G_SDE: y as fast as x (CDiffE)
        est = CMDE(MultiSpeedSDE(G_SDE, y_sde))
        got = est.score_fn(oracle(est, problem), y, make_generator(16))(x_t, t)
        errors.append(((s_x * (got - exact)) ** 2).sum().item() / from_y.item())
    assert errors[0] > 0.3  # CDiffE loses a large part of the information in y
    assert errors[0] > 3 * errors[1] > 9 * errors[2] and errors[2] < 0.01


@pytest.mark.parametrize("name", ["CDE", "CDiffE", "CMDE", "VSCMDE"])
@pytest.mark.parametrize("sde", [G_SDE, VPSDE(0.1, 20.0)], ids=["VE", "VP"])
def test_exact_score_has_lower_loss_than_perturbed_scores(name, sde):
    problem = sr_problem()
    est = gaussian_estimators(sde, sigma_max_y=0.1 if sde is G_SDE else 2.0)[name]
    if name == "VSCMDE":
        est.set_step(100)  # at the target speed
    x, y = (v.double() for v in problem.sample(512, make_generator(17)))
    exact = oracle(est, problem)
    # 16 distinct times (the exact joint score factorises one covariance per distinct t), away
    # from t = 0 where VP's likelihood weight g^2/s^2 ~ 1/t makes the Monte-Carlo estimate heavy-tailed
    t = torch.linspace(0.05, 1.0, 16, dtype=torch.float64).repeat(32)

    def loss(net):  # common random numbers: the same t and noise for every network
        return est.loss_terms(net, x, y, make_generator(18), t=t)["loss"].mean().item()

    base = loss(exact)
    for delta in (0.2, -0.2):
        assert base < loss(Shifted(exact, delta))
    if est.y_sde is not None and est.y_sde is not est.sampling_sde:
        # the exact joint score of the WRONG pair (y as fast as x, CDiffE's target) loses too
        wrong = Oracle(problem, MultiSpeedSDE(est.sampling_sde, est.sampling_sde), joint=True)
        assert base < loss(wrong)


class TinyScoreMLP(nn.Module):
    """A small MLP score network: flattened input + Fourier features of t = label / 999."""

    def __init__(self, in_channels: int, out_channels: int, size: int, hidden: int = 128, freqs: int = 8):
        super().__init__()
        self.out_shape = (out_channels, size, size)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs))
        self.body = nn.Sequential(nn.Linear(in_channels * size * size + 2 * freqs, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_channels * size * size))

    def forward(self, h, label):
        a = (label / 999.0)[:, None] * self.freqs
        return self.body(torch.cat([h.flatten(1), a.sin(), a.cos()], 1)).view(-1, *self.out_shape)


def train_and_measure(est, steps: int, problem) -> tuple[float, float]:
    """(posterior W2 of a tiny MLP's samples before, after `steps` Adam steps with `est`'s loss)."""
    torch.manual_seed(0)
    net = TinyScoreMLP(2, est.out_channels(1, 1), 4)
    y_eval = problem.sample(64, make_generator(19))[1]

    def w2():
        score = est.score_fn(net, y_eval.repeat(8, 1, 1, 1), make_generator(20))
        x_T = est.sampling_sde.prior_sampling((512, 1, 4, 4), make_generator(21))
        x = EulerMaruyama(100)(score, est.sampling_sde, x_T, make_generator(22))
        return posterior_error(x.view(8, 64, 1, 4, 4), y_eval, problem)["w2"]

    untrained = w2()
    g = make_generator(23)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(steps):
        est.set_step(step)  # VS-CMDE's schedule; a no-op for the others
        x, y = problem.sample(128, g)
        opt.zero_grad()
        est.loss(net, x, y, g).mean().backward()
        opt.step()
    return untrained, w2()


@pytest.mark.parametrize("name", ["CDE", "CDiffE", "CMDE", "VSCMDE"])
def test_short_training_learns_the_posterior(name):
    """500 Adam steps on the 1x4x4 Gaussian SR problem: samples get far closer to the exact posterior
    than an untrained network's, and closer than exact PRIOR samples (so the condition is used)."""
    problem = sr_problem()
    untrained, trained = train_and_measure(gaussian_estimators()[name], 500, problem)
    y_eval = problem.sample(64, make_generator(19))[1]
    prior = posterior_error(problem.field.sample(512, make_generator(24)).view(8, 64, 1, 4, 4), y_eval, problem)["w2"]
    # measured (seeded): untrained ~19, trained 0.15 (CDE, CMDE, VS-CMDE) and 0.39 (CDiffE), prior 1.0
    assert trained < 0.05 * untrained
    assert trained < 0.6 * prior


@pytest.mark.parametrize("sde_cls", [VESDE, VPSDE])
def test_edm_preconditioning_zero_network_is_the_gaussian_bayes_score(sde_cls):
    """EDM preconditioning (Karras et al. 2022): with F = 0 the denoiser is the Bayes denoiser of
    x0 ~ N(m, (sigma_data / k)^2) in data units (m = 0.5, k = 2 for [0, 1] data), so the x-score is
    -(x_t - a m) / (a^2 (sigma_data / k)^2 + s^2) exactly, for CDE and for the x part of CMDE."""
    sde_x = sde_cls() if sde_cls is VPSDE else VESDE(0.01, 50.0)
    ests = {"CDE": CDE(sde_x, preconditioning=EDMPrecond()),
            "CMDE": CMDE(MultiSpeedSDE(sde_x, sde_x.with_speed(sde_x.speed / 4)), preconditioning=EDMPrecond())}
    x, y = data(b=6, size=4)
    t = torch.linspace(0.05, 0.95, 6)
    a, s = sde_x.mean_coef(t)[:, None, None, None], sde_x.std(t)[:, None, None, None]
    x_t = a * x + s * torch.randn(x.shape, generator=make_generator(3))
    expected = -(x_t - a * 0.5) / (a**2 * 0.25**2 + s**2)
    for est in ests.values():
        score = est.score_fn(Constant(est.out_channels(3, 3)), y, make_generator(0))(x_t, t)
        torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4)
    # the network input is unit-scale at every noise level, unlike the reference's 2 x_t - 1
    net = Constant(3)
    ests["CDE"].score_fn(net, y)(x_t, t)
    assert net.h[:, :3].std() < 3.0
    if sde_cls is VESDE:
        assert (2 * x_t - 1).std() > 10.0
    with pytest.raises(ValueError, match="preconditioning"):
        CDE(sde_x, preconditioning="karras")


def test_edm_preconditioning_trains_on_the_gaussian_field():
    est = CMDE(MultiSpeedSDE(G_SDE, G_SDE.with_speed(0.1)), preconditioning=EDMPrecond(), centered=True)
    untrained, trained = train_and_measure(est, 300, sr_problem())
    assert trained < 0.1 * untrained
