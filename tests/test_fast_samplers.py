"""The few-step samplers of issue 23 (EDMStochastic, DPMSolverPP, AdaptiveSDE), one step at a time in float64
against the papers' formulas written out by hand (the schedules and helpers of test_sampler_steps, which
do not read msdiff.sde), and on the Gaussian field against its exact posterior."""
from __future__ import annotations

import math

import pytest
import torch
from test_sampler_steps import KINDS, Hand, close, gen, karras_sigmas, noises, recording, score_of, tvec, x_T

from msdiff.samplers import (DDIM, AdaptiveSDE, DPMSolverPC, DPMSolverPP, EDMStochastic, Heun, KarrasSigma, LogSigma,
                             PredictorCorrector, UniformTime, churn_sigmas, multistep_coefficients)
from msdiff.sde import VESDE, VPSDE


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
def dpm_by_hand(hand, score, ts, order, stochastic, z, calls, x=None, to_zero=True):
    """Alg. 2 of DPM-Solver++ with lambda = log(a / s), h_i = lambda_{i+1} - lambda_i, r = h_{i-1} / h_i:
    ODE  x' = (s'/s) x + a' (1 - e^{-h}) [(1 + 1/(2r)) D_i - D_{i-1} / (2r)];
    SDE  x' = (s'/s) e^{-h} x + a' (1 - e^{-2h}) D_i + a' (h - (1 - e^{-2h})/2) (D_i - D_{i-1}) / h_{i-1}
              + s' sqrt(1 - e^{-2h}) z;
    first step (and order 1) without the D_{i-1} terms; the last evaluation returns D (x0_hat)."""
    lam = [math.log(hand.a(t) / hand.s(t)) for t in ts]
    x, d_prev = x_T() if x is None else x, None
    for i, t in enumerate(ts):
        if not to_zero and i == len(ts) - 1:
            return x
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


@pytest.mark.parametrize("kind", KINDS)
def test_dpm_solver_pc_steps_by_hand(kind):
    """SDE-DPM-Solver++(2M) on the sigma^(1/7) grid from sigma(T) to sigma_switch (solver_steps + 1 times), then
    PC steps (LM corrector, snr 0.16 sqrt(500 / pc_steps)) at times uniform in log sigma from sigma_switch to eps,
    ending like PredictorCorrector."""
    from test_sampler_steps import pc_by_hand

    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    solver_steps, pc_steps, s_sw = 3, 3, 0.5
    fn, calls = recording(score)
    sampler = DPMSolverPC(solver_steps, pc_steps, sigma_switch=s_sw)
    out = sampler(fn, sde, x_T(), gen(4))
    assert len(calls) == sampler.nfe == solver_steps + 2 * pc_steps
    ts = [hand.t_of_sigma(v) for v in karras_sigmas(hand, solver_steps, 7.0, s_end=s_sw)]
    ts[0] = sde.T
    s_min = hand.sigma(sde.eps)
    tp = [hand.t_of_sigma(math.exp(math.log(s_sw) + i / (pc_steps - 1) * (math.log(s_min) - math.log(s_sw))))
          for i in range(pc_steps)]
    tp[-1] = sde.eps
    assert [t for _, t in calls] == pytest.approx(ts[:-1] + [t for t in tp for _ in (0, 1)], rel=1e-9, abs=1e-12)
    z = iter(noises(4, solver_steps + 2 * pc_steps + 1))
    x = dpm_by_hand(hand, score, ts, 2, True, [next(z) for _ in range(solver_steps)], calls, to_zero=False)
    snr = 0.16 * math.sqrt(500 / pc_steps)
    close(out, pc_by_hand(hand, score, x, tp, z, snr, 1, "lm", calls=calls[solver_steps:]), 1e-9)


def test_dpm_solver_pc_defaults():
    """The documented defaults: 10 SDE-DPM-Solver++(2M) steps to sigma 0.2, then 20 PC levels with one LM corrector
    step of snr 0.16 sqrt(500 / 20) = 0.8 each: 10 + 20 x 2 = 50 evaluations."""
    s = DPMSolverPC()
    assert (s.solver_steps, s.pc.steps, s.sigma_switch, s.pc.corrector_steps, s.pc.corrector) == (10, 20, 0.2, 1, "lm")
    assert s.pc.snr == pytest.approx(0.8, rel=1e-12) and s.nfe == 50 and s.solver.stochastic
    assert s.solver.grid == KarrasSigma(7.0) and s.pc.grid == LogSigma()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("corrector", ["euler", "lm"])
def test_sigma_step_corrector_by_hand(kind, corrector):
    """sigma_step: e = 2 alpha (snr s(t))^2, whatever the score's norm; PredictorCorrector(2, sigma_step=True)
    replayed: corrector at T (alpha = r^2 of the kernel eps -> T), predictor, corrector at eps (alpha = a(eps)^2),
    the last predictor's mean."""
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    fn, calls = recording(score)
    out = PredictorCorrector(2, snr=0.3, corrector=corrector, sigma_step=True)(fn, sde, x_T(), gen(6))
    z = iter(noises(6, 5))
    x, ts, z_prev = x_T(), [sde.T, sde.eps], None
    for i, t in enumerate(ts):
        last = i == 1
        r = hand.a(t) if last else hand.a(t) / hand.a(ts[1])
        G = hand.s(t) if last else math.sqrt(hand.s(t) ** 2 - r**2 * hand.s(ts[1]) ** 2)
        e = 2 * r**2 * (0.3 * hand.s(t)) ** 2
        zc = next(z)
        if corrector == "lm" and z_prev is None:
            z_prev = next(z)
        noise = math.sqrt(2 * e) * zc if corrector == "euler" else math.sqrt(e / 2) * (z_prev + zc)
        x = x + e * score(x, tvec(t)) + noise
        z_prev = zc
        mean = (2 - r) * x + G**2 * score(x, tvec(t))
        x = mean if last else mean + G * next(z)
    close(out, mean, 1e-9)
    assert len(calls) == 4


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


# ---- the adaptive SDE solver (Jolicoeur-Martineau et al. 2021, Alg. 1) --------------------------------------
def adaptive_by_hand(hand, score, x, z, eps_rel, eps_abs, h_init, iterations):
    """Per example (its own t and h): K1 = -h drift(x, t) + g(t) sqrt(h) z, K2 = -h drift(x + K1, t - h)
    + g(t - h) sqrt(h) z, x' = x + K1, x'' = x + (K1 + K2)/2, delta = max(eps_abs, eps_rel max(|x'|, |x'_prev|)),
    E = sqrt(mean(((x'' - x') / delta)^2)); accept if E <= 1 (x = x'', x'_prev = x', t -= h);
    h = min(t - eps, 0.9 h E^-0.9); then Tweedie's x0_hat at eps."""
    e = hand.sde.eps
    rows = []
    for b in range(x.shape[0]):
        xb, prev, t, h = x[b:b + 1], x[b:b + 1], 1.0, min(h_init, 1.0 - e)
        for k in range(iterations):
            zb = z[k][b:b + 1]

            def drift(v, tt):
                return hand.f(tt) * v - hand.g(tt) ** 2 * score(v, torch.full((1,), tt, dtype=torch.float64))

            if h > 0:
                k1 = -h * drift(xb, t) + hand.g(t) * math.sqrt(h) * zb
                k2 = -h * drift(xb + k1, t - h) + hand.g(t - h) * math.sqrt(h) * zb
                lo, hi = xb + k1, xb + 0.5 * (k1 + k2)
                delta = torch.maximum(lo.abs(), prev.abs()).mul(eps_rel).clamp_min(eps_abs)
                err = float(((hi - lo) / delta).square().mean().sqrt())
                if err <= 1:
                    xb, prev, t = hi, lo, t - h
                h = min(0.9 * h * max(err, 1e-10) ** -0.9, max(t - e, 0.0))
        rows.append(xb)
    x = torch.cat(rows)
    return (x + hand.s(e) ** 2 * score(x, tvec(e))) / hand.a(e)


def per_row_score(hand):
    """score_of(hand) for a (B,) vector of different times: each example at its own t."""
    one = score_of(hand)

    def score(x, t):
        return torch.cat([one(x[b:b + 1], t[b:b + 1]) for b in range(x.shape[0])])

    return score


@pytest.mark.parametrize("kind", KINDS)
def test_adaptive_sde_by_hand(kind):
    """The whole run replayed example by example, accepted and rejected steps included (eps_rel = 0.02
    and a large h_init make the first step be rejected), with the sampler's noise draws."""
    hand = Hand(kind)
    sde, score = hand.sde, per_row_score(hand)
    sampler = AdaptiveSDE(eps_rel=0.02, eps_abs=0.004, h_init=0.5, check_every=4)
    calls = []
    out = sampler(lambda x, t: calls.append(t.clone()) or score(x, t), sde, x_T(), gen(13))
    iterations = (sampler.nfe - 1) // 2
    assert len(calls) == sampler.nfe and iterations % 4 == 0 and iterations > 8
    want = adaptive_by_hand(hand, score, x_T(), noises(13, iterations), 0.02, 0.004, 0.5, iterations)
    close(out, want, 1e-9)
    # a rejected first step: the second iteration starts again from T with a smaller step
    assert calls[2].tolist() == pytest.approx([1.0, 1.0]) and (calls[3] > 0.5).all()
    assert any(not torch.equal(c, c[:1].expand(2)) for c in calls)  # the examples went their own ways


# ---- every sampler against the exact Gaussian posterior ----------------------------------------------------
@pytest.fixture(scope="module")
def problem():
    from msdiff.gaussian import GaussianField, GaussianInverseProblem

    return GaussianInverseProblem.super_resolution(GaussianField(1, 4, length_scale=1.5), factor=2, noise_std=0.05)


@pytest.mark.parametrize("sde", [VESDE(0.01, 50.0), VPSDE(0.1, 20.0)], ids=["VE", "VP"])
@pytest.mark.parametrize("sampler", [EDMStochastic(50), DPMSolverPP(50), DPMSolverPP(200, stochastic=True),
                                     DPMSolverPP(100, stochastic=True, grid=LogSigma()), AdaptiveSDE(eps_rel=0.05),
                                     DPMSolverPC(20, 40)],
                         ids=["EDM", "DPM++2M", "DPM++2M-SDE", "DPM++2M-SDE-log", "AdaptiveSDE", "DPMSolverPC"])
def test_sampler_reproduces_the_exact_posterior(problem, sde, sampler):
    """2000 samples (4 conditions x 500 draws): mean and covariance errors within Monte-Carlo noise
    (tolerances of test_samplers: 0.08 / 0.12; a 15% error in the score fails them there)."""
    from msdiff.gaussian import posterior_error
    from msdiff.utils import make_generator

    k, b = 500, 4
    y = problem.sample(b, make_generator(0))[1]
    yy = y.repeat(k, 1, 1, 1)
    g = make_generator(1)
    x = sampler(lambda v, t: problem.conditional_score(v, yy, t, sde), sde, sde.prior_sampling(yy.shape, g), g)
    err = posterior_error(x.reshape(k, b, *problem.shape), y, problem)
    assert err["mean_error"] < 0.08 and err["cov_error"] < 0.12, err


# ---- bad input: one clear line ------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: AdaptiveSDE(eps_rel=-0.1), "eps_rel=-0.1: expected a number > 0"),
    (lambda: AdaptiveSDE(eps_abs=0), "eps_abs=0: expected a number > 0"),
    (lambda: AdaptiveSDE(safety=1.5), "safety=1.5: expected a number > 0 and <= 1"),
    (lambda: AdaptiveSDE(check_every=0), "check_every=0"),
    (lambda: EDMStochastic(s_tmin=2.0, s_tmax=1.0), "s_tmin=2.0, s_tmax=1.0: expected s_tmin <= s_tmax"),
    (lambda: EDMStochastic(s_churn=-1), "s_churn=-1: expected a number >= 0"),
    (lambda: EDMStochastic(s_noise=float("nan")), "s_noise=nan"),
    (lambda: DPMSolverPP(order=3), r"order=3: expected one of \(1, 2\)"),
    (lambda: DPMSolverPP(steps=0), "steps=0"),
    (lambda: DPMSolverPC(pc_steps=0), "pc_steps=0: expected an integer >= 1"),
    (lambda: DPMSolverPC(sigma_switch=-0.5), "sigma_switch=-0.5: expected a finite number > 0"),
])
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---- host traffic -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["CDE", "CDiffE", "CMDE", "VSCMDE"])
def test_adaptive_sde_reads_the_device_once_per_check_every(estimator, monkeypatch):
    """AdaptiveSDE's stop is data-dependent: whether every example has finished is read back once every
    `check_every` iterations, and nothing else inside the loop (the other samplers: test_samplers'
    test_no_host_device_traffic_inside_the_step_loop). With each estimator's score of a tiny U-Net
    (fixed y noise, as sample.py gives an adaptive sampler), the reads beyond the set-up are exactly
    iterations / check_every."""
    from conftest import watch_host_traffic

    from msdiff import estimators
    from msdiff.nn.unet import UNet
    from msdiff.sde import MultiSpeedSDE
    from msdiff.utils import example_noise

    torch.manual_seed(0)
    joint = estimator != "CDE"
    net = UNet(in_channels=2, out_channels=2 if joint else 1, ch=32, ch_mult=[1], num_res_blocks=1,
               attn_resolutions=[], image_size=8, dropout=0.0).eval()
    ms = MultiSpeedSDE(VESDE(0.01, 5.0), VESDE(0.01, 0.5))
    est = {"CDE": lambda: estimators.CDE(sde=VESDE(0.01, 5.0)),
           "CDiffE": lambda: estimators.CDiffE(sde=VESDE(0.01, 5.0)),
           "CMDE": lambda: estimators.CMDE(sde=ms), "VSCMDE": lambda: estimators.VSCMDE(ms, 0.2, 10)}[estimator]()
    sde, y = est.sampling_sde, torch.rand(2, 1, 8, 8)
    traffic = []
    watch_host_traffic(monkeypatch, lambda: traffic.append(1))
    counts = []
    for check_every in (1, 4):
        traffic.clear()
        noise = example_noise(0, range(2), 0, "cpu")
        x_T = sde.prior_sampling((2, 1, 8, 8), generator=noise)
        sampler = AdaptiveSDE(eps_rel=1e-3, eps_abs=1e-4, check_every=check_every, max_iterations=8)
        sampler(est.score_fn(net, y, generator=noise, fixed_y_noise=True), sde, x_T, generator=noise)
        assert sampler.nfe == 17
        counts.append(len(traffic))
    assert counts[0] - counts[1] == 8 - 2


def test_new_samplers_are_typed_class_path_arguments():
    """sample.py / LightningCLI build each new sampler from the command line, and a resolved config dumps and
    parses back to the same settings."""
    from jsonargparse import ArgumentParser

    from msdiff.samplers import Sampler

    p = ArgumentParser(exit_on_error=False)
    p.add_subclass_arguments(Sampler, "sampler")
    cases = {"EDMStochastic": (["--sampler.s_churn", "10", "--sampler.s_tmax", "0.5"], ("s_churn", 10.0)),
             "DPMSolverPP": (["--sampler.stochastic", "true", "--sampler.grid", "LogSigma"], ("stochastic", True)),
             "DPMSolverPC": (["--sampler.pc_steps", "8", "--sampler.snr", "0.9"], ("solver_steps", 10)),
             "AdaptiveSDE": (["--sampler.eps_rel", "0.1"], ("eps_rel", 0.1))}
    for name, (argv, (key, value)) in cases.items():
        cfg = p.parse_args(["--sampler", name] + argv)
        s = p.instantiate(p.parse_string(p.dump(cfg))).sampler
        assert type(s).__name__ == name and getattr(s, key) == value
    assert s.adaptive and not DPMSolverPC().adaptive
