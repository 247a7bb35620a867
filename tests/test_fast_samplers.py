"""The few-step samplers of issue 23 (EDMStochastic, DPMSolverPP, AdaptiveSDE), one step at a time in float64
against the papers' formulas written out by hand (the schedules and helpers of test_sampler_steps, which
do not read msdiff.sde), and on the Gaussian field against its exact posterior."""
from __future__ import annotations

import math

import pytest
import torch
from test_sampler_steps import KINDS, Hand, close, gen, karras_sigmas, noises, recording, score_of, tvec, x_T

from msdiff.samplers import (DDIM, DPMSolverPP, EDMStochastic, Heun, KarrasSigma, UniformTime, churn_sigmas,
                             multistep_coefficients)


def karras_times(hand, steps, rho=7.0):
    ts = [hand.t_of_sigma(v) for v in karras_sigmas(hand, steps - 1, rho)]
    ts[0], ts[-1] = hand.sde.T, hand.sde.eps
    return ts


def x0_of(hand, score, x, t):
    return (x + hand.s(t) ** 2 * score(x, tvec(t))) / hand.a(t)


# ---- EDM's stochastic sampler (Karras et al. 2022, Alg. 2) -----------------------------------------------
def test_churn_sigmas_by_hand():
    """gamma = min(S_churn / N, sqrt 2 - 1) inside [S_tmin, S_tmax], 0 outside."""
    sig = torch.tensor([20.0, 5.0, 1.0, 0.3, 0.04], dtype=torch.float64)
    got = churn_sigmas(sig, s_churn=1.0, s_tmin=0.05, s_tmax=2.0)
    assert got.tolist() == pytest.approx([20.0, 5.0, 1.2, 0.36, 0.04], rel=1e-14)
    got = churn_sigmas(sig, s_churn=80.0, s_tmin=0.0, s_tmax=100.0)  # clamped at sqrt(2) - 1
    assert got.tolist() == pytest.approx((sig * math.sqrt(2)).tolist(), rel=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_edm_stochastic_steps_by_hand(kind):
    """In x_hat = x / a: churn sigma_hat = sigma_i (1 + gamma_i), x_hat += sqrt(sigma_hat^2 - sigma_i^2) S_noise z,
    Heun from sigma_hat to sigma_{i+1} with x0_hat evaluated at the time of sigma_hat; Euler to sigma = 0."""
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    steps, churn, tmin, tmax, s_noise = 4, 2.0, 0.05, 2.0, 1.007
    fn, calls = recording(score)
    out = EDMStochastic(steps, s_churn=churn, s_tmin=tmin, s_tmax=tmax, s_noise=s_noise)(fn, sde, x_T(), gen(3))
    assert len(calls) == 2 * steps - 1
    ts = karras_times(hand, steps)
    sig = [hand.sigma(t) for t in ts]
    gamma = min(churn / steps, math.sqrt(2) - 1)
    z = noises(3, steps)
    xh, n = x_T() / hand.a(ts[0]), 0

    def slope(xh, t, sigma):
        nonlocal n
        x = hand.a(t) * xh
        close(calls[n][0], x, 1e-9)
        assert calls[n][1] == pytest.approx(t, rel=1e-9, abs=1e-12)
        n += 1
        return (xh - x0_of(hand, score, x, t)) / sigma

    assert any(tmin <= s <= tmax for s in sig) and any(not tmin <= s <= tmax for s in sig)
    for i in range(steps):
        s_hat = sig[i] * (1 + gamma) if tmin <= sig[i] <= tmax else sig[i]
        t_hat = hand.t_of_sigma(s_hat) if s_hat > sig[i] else ts[i]
        xh = xh + math.sqrt(s_hat**2 - sig[i] ** 2) * s_noise * z[i]
        d = slope(xh, t_hat, s_hat)
        if i == steps - 1:
            close(out, xh - s_hat * d, 1e-9)
            return
        h = sig[i + 1] - s_hat
        xh = xh + 0.5 * h * (d + slope(xh + h * d, ts[i + 1], sig[i + 1]))


@pytest.mark.parametrize("kind", KINDS)
def test_edm_without_churn_is_heun(kind):
    hand = Hand(kind)
    a = EDMStochastic(5, s_churn=0.0)(score_of(hand), hand.sde, x_T(), gen(0))
    b = Heun(5)(score_of(hand), hand.sde, x_T(), gen(0))
    close(a, b, 1e-12)
    assert EDMStochastic(5).nfe == Heun(5).nfe == 9


# ---- DPM-Solver++ (Lu et al. 2022b) ------------------------------------------------------------------------
def dpm_by_hand(hand, score, ts, order, stochastic, z, calls):
    """Alg. 2 of DPM-Solver++ with lambda = log(a / s), h_i = lambda_{i+1} - lambda_i, r = h_{i-1} / h_i:
    ODE  x' = (s'/s) x + a' (1 - e^{-h}) [(1 + 1/(2r)) D_i - D_{i-1} / (2r)];
    SDE  x' = (s'/s) e^{-h} x + a' (1 - e^{-2h}) D_i + a' (h - (1 - e^{-2h})/2) (D_i - D_{i-1}) / h_{i-1}
              + s' sqrt(1 - e^{-2h}) z;
    first step (and order 1) without the D_{i-1} terms; the last evaluation returns D (x0_hat)."""
    lam = [math.log(hand.a(t) / hand.s(t)) for t in ts]
    x, d_prev = x_T(), None
    for i, t in enumerate(ts):
        close(calls[i][0], x, 1e-9)
        d = x0_of(hand, score, x, t)
        if i == len(ts) - 1:
            return d
        h, a2, s2 = lam[i + 1] - lam[i], hand.a(ts[i + 1]), hand.s(ts[i + 1])
        second = order == 2 and d_prev is not None
        if stochastic:
            x = s2 / hand.s(t) * math.exp(-h) * x + a2 * (1 - math.exp(-2 * h)) * d + s2 * math.sqrt(
                1 - math.exp(-2 * h)) * z[i]
            if second:
                x = x + a2 * (h - (1 - math.exp(-2 * h)) / 2) * (d - d_prev) / (lam[i] - lam[i - 1])
        else:
            r = (lam[i] - lam[i - 1]) / h if second else None
            dd = (1 + 1 / (2 * r)) * d - d_prev / (2 * r) if second else d
            x = s2 / hand.s(t) * x + a2 * (1 - math.exp(-h)) * dd
        d_prev = d


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("grid", [KarrasSigma(7.0), UniformTime()], ids=repr)
def test_dpm_solver_pp_steps_by_hand(kind, stochastic, grid):
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    steps = 5
    fn, calls = recording(score)
    out = DPMSolverPP(steps, stochastic=stochastic, grid=grid)(fn, sde, x_T(), gen(11))
    if isinstance(grid, KarrasSigma):
        ts = karras_times(hand, steps)
    else:
        ts = [sde.T + (sde.eps - sde.T) * i / (steps - 1) for i in range(steps)]
    assert [t for _, t in calls] == pytest.approx(ts, rel=1e-9, abs=1e-12)
    close(out, dpm_by_hand(hand, score, ts, 2, stochastic, noises(11, steps), calls), 1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_solver_pp_first_order_is_ddim(kind, eta):
    """DPM-Solver++(1) is DDIM with eta = 0; its SDE variant is DDIM with eta = 1 (same noise draws)."""
    hand = Hand(kind)
    a = DPMSolverPP(6, order=1, stochastic=eta == 1.0, grid=UniformTime())(score_of(hand), hand.sde, x_T(), gen(2))
    b = DDIM(6, eta=eta)(score_of(hand), hand.sde, x_T(), gen(2))
    close(a, b, 1e-10)


def test_multistep_coefficients_second_order_term():
    """The weights of D_i - D_{i-1} on a VE grid by hand: ODE (1 - e^{-h}) h / (2 h_prev), SDE
    (h - (1 - e^{-2h}) / 2) / h_prev; none on the first step."""
    a = torch.ones(3, dtype=torch.float64)
    s = torch.tensor([1.0, 0.99, 0.98], dtype=torch.float64)
    ode, sde_ = multistep_coefficients(a, s, 2, False), multistep_coefficients(a, s, 2, True)
    h = math.log(0.99 / 0.98)
    h_prev = math.log(1.0 / 0.99)
    assert float(ode[1, 2]) == pytest.approx((1 - math.exp(-h)) * h / (2 * h_prev), rel=1e-12)
    assert float(sde_[1, 2]) == pytest.approx((h - (1 - math.exp(-2 * h)) / 2) / h_prev, rel=1e-12)
    assert float(ode[0, 2]) == 0.0 and float(sde_[0, 2]) == 0.0


# ---- bad input: one clear line ------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: EDMStochastic(s_tmin=2.0, s_tmax=1.0), "s_tmin=2.0, s_tmax=1.0: expected s_tmin <= s_tmax"),
    (lambda: EDMStochastic(s_churn=-1), "s_churn=-1: expected a number >= 0"),
    (lambda: EDMStochastic(s_noise=float("nan")), "s_noise=nan"),
    (lambda: DPMSolverPP(order=3), r"order=3: expected one of \(1, 2\)"),
    (lambda: DPMSolverPP(steps=0), "steps=0"),
])
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
