"""The few-step samplers of issue 23 (EDMStochastic, DPMSolverPP, AdaptiveSDE), one step at a time in float64
against the papers' formulas written out by hand (the schedules and helpers of test_sampler_steps, which
do not read msdiff.sde), and on the Gaussian field against its exact posterior."""
from __future__ import annotations

import math

import pytest
import torch
from test_sampler_steps import KINDS, Hand, close, gen, karras_sigmas, noises, recording, score_of, tvec, x_T

from msdiff.samplers import EDMStochastic, Heun, churn_sigmas


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


# ---- bad input: one clear line ------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: EDMStochastic(s_tmin=2.0, s_tmax=1.0), "s_tmin=2.0, s_tmax=1.0: expected s_tmin <= s_tmax"),
    (lambda: EDMStochastic(s_churn=-1), "s_churn=-1: expected a number >= 0"),
    (lambda: EDMStochastic(s_noise=float("nan")), "s_noise=nan"),
])
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
