"""One sampler step at a time (msdiff.samplers): every update is compared with the same step written out
by hand from the papers' formulas, on a known score and a replayed noise draw, in float64; and the
times at which each sampler calls the score are compared with its intended grid.

The SDE schedules are written out here again (not read from msdiff.sde), so a wrong schedule or
transition in the library cannot cancel out:
    VE  (Song et al. 2021, Eq. 30): sigma(t) = smin (smax/smin)^t, a = 1, s = sigma, f = 0,
        g = sigma sqrt(2 ln(smax/smin));
    VP  (Song Eq. 32-33): beta(t) = b0 + t (b1 - b0), B(t) = b0 t + (b1 - b0) t^2 / 2,
        a = exp(-B/2), s = sqrt(1 - exp(-B)), f = -beta/2, g = sqrt(beta).
Every stochastic step is replayed with the sampler's own noise draws (same generator, same order).
"""
from __future__ import annotations

import math

import pytest
import torch

from msdiff.samplers import (DDIM, EulerMaruyama, Heun, HeunPC, KarrasSigma, LogSigma, PredictorCorrector,
                             ProbabilityFlowODE, UniformTime, ddim_step, tweedie)
from msdiff.sde import VESDE, VPSDE, SubVPSDE

SMIN, SMAX = 0.01, 5.0
B0, B1 = 0.1, 20.0
SHAPE = (2, 1, 2, 3)  # batch 2, non-square images


class Hand:
    """Closed-form schedules of one SDE (float64 python scalars)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.sde = VESDE(SMIN, SMAX) if kind == "VE" else VPSDE(B0, B1)

    def a(self, t):
        return 1.0 if self.kind == "VE" else math.exp(-0.5 * (B0 * t + 0.5 * (B1 - B0) * t * t))

    def s(self, t):
        if self.kind == "VE":
            return SMIN * (SMAX / SMIN) ** t
        return math.sqrt(1.0 - math.exp(-(B0 * t + 0.5 * (B1 - B0) * t * t)))

    def f(self, t):
        return 0.0 if self.kind == "VE" else -0.5 * (B0 + t * (B1 - B0))

    def g(self, t):
        if self.kind == "VE":
            return self.s(t) * math.sqrt(2 * math.log(SMAX / SMIN))
        return math.sqrt(B0 + t * (B1 - B0))

    def sigma(self, t):
        return self.s(t) / self.a(t)

    def t_of_sigma(self, sig):
        if self.kind == "VE":
            return math.log(sig / SMIN) / math.log(SMAX / SMIN)
        b = math.log1p(sig * sig)  # B(t) = ln(1 + sigma^2): solve b0 t + (b1 - b0) t^2 / 2 = b
        d = B1 - B0
        return (-B0 + math.sqrt(B0 * B0 + 2 * d * b)) / d


KINDS = ["VE", "VP"]
M0 = torch.tensor([0.3, -0.2, 0.1, 0.5, 0.0, -0.4], dtype=torch.float64).reshape(1, 1, 2, 3)


def score_of(hand: Hand):
    """A known, x- and t-dependent score: that of N(a m0, (a^2 0.25 + s^2) I)."""

    def score(x, t):
        tt = float(t[0])
        return -(x - hand.a(tt) * M0) / (hand.a(tt) ** 2 * 0.25 + hand.s(tt) ** 2)

    return score


def recording(score_fn):
    calls = []

    def fn(x, t):
        assert t.shape == (x.shape[0],) and bool((t == t[0]).all())
        calls.append((x.clone(), float(t[0])))
        return score_fn(x, t)

    return fn, calls


def x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def noises(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(n)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tvec(t):
    return torch.full((SHAPE[0],), t, dtype=torch.float64)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- Euler-Maruyama --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_euler_maruyama_steps_by_hand(kind):
    """x <- x - [f x - g^2 score] h + g sqrt(h) z over `steps` times linspace(T, eps, steps), then the
    denoising step at eps to sigma = 0: Tweedie's (x + s^2 score) / a."""
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    fn, calls = recording(score)
    steps = 4
    out = EulerMaruyama(steps)(fn, sde, x_T(), gen(5))
    ts = [sde.T + (sde.eps - sde.T) * i / (steps - 1) for i in range(steps)]
    assert [t for _, t in calls] == pytest.approx(ts, abs=1e-12)
    z = noises(5, steps - 1)
    x = x_T()
    for i in range(steps - 1):
        t, h = ts[i], ts[i] - ts[i + 1]
        close(calls[i][0], x)
        mean = x - (hand.f(t) * x - hand.g(t) ** 2 * score(x, tvec(t))) * h
        x = mean + hand.g(t) * math.sqrt(h) * z[i]
    close(calls[-1][0], x)
    e = sde.eps
    close(out, (x + hand.s(e) ** 2 * score(x, tvec(e))) / hand.a(e))


# ---- predictor-corrector: interior steps and the Langevin corrector --------------------------------
def langevin_by_hand(x, score, z, snr, alpha, corrector="euler", z_prev=None):
    """Song et al. 2021, Alg. 4: e = 2 alpha (snr |z| / |score|)^2, norms averaged over the batch."""
    zn = z.reshape(z.shape[0], -1).norm(dim=1).mean()
    sn = score.reshape(z.shape[0], -1).norm(dim=1).mean()
    e = 2 * alpha * (snr * zn / sn) ** 2
    if corrector == "euler":
        return x + e * score + (2 * e).sqrt() * z
    return x + e * score + (e / 2).sqrt() * (z_prev + z)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("corrector", ["euler", "lm"])
def test_langevin_step_size_by_hand(kind, corrector):
    hand = Hand(kind)
    score = score_of(hand)
    pc = PredictorCorrector(snr=0.2, corrector=corrector)
    x, t, alpha = x_T(1), 0.4, 0.9
    z_prev = x_T(2) if corrector == "lm" else None
    out, z = pc.langevin(score, x, tvec(t), alpha, gen(3), z_prev)
    zz = noises(3, 1)[0]
    close(z, zz)
    close(out, langevin_by_hand(x, score(x, tvec(t)), zz, 0.2, alpha, corrector, z_prev))
    if corrector == "lm":  # without z_prev the first step draws it after z
        out, _ = pc.langevin(score, x, tvec(t), alpha, gen(3))
        z1, z0 = noises(3, 2)
        close(out, langevin_by_hand(x, score(x, tvec(t)), z1, 0.2, alpha, "lm", z0))


@pytest.mark.parametrize("kind", KINDS)
def pc_by_hand(hand, score, x, ts, z, snr, corrector_steps, corrector="euler", calls=None):
    """Song et al. 2021, Alg. 2/4 over the times ts: at each t_i `corrector_steps` Langevin steps
    (alpha = r^2), then the reverse-diffusion predictor x <- (2 - r) x + G^2 score + G z (Eq. 46) with
    r = a(t_i)/a(t_{i+1}), G^2 = s(t_i)^2 - r^2 s(t_{i+1})^2; the last predictor step goes from ts[-1]
    to sigma = 0 (r = a, G = s) and its mean is returned. `z` yields the noise in the sampler's order
    (corrector z, then for the first LM step its z_prev, then the predictor's). With `calls`, each
    score input is compared with the replayed state."""
    k, z_prev, n = 0, None, 0
    for i, t in enumerate(ts):
        last = i + 1 == len(ts)
        if last:
            r, G = hand.a(t), hand.s(t)
        else:
            r = hand.a(t) / hand.a(ts[i + 1])
            G = math.sqrt(hand.s(t) ** 2 - r**2 * hand.s(ts[i + 1]) ** 2)
        for _ in range(corrector_steps):
            if calls is not None:
                close(calls[n][0], x, 1e-9)
                assert calls[n][1] == pytest.approx(t, rel=1e-9, abs=1e-12)
            n += 1
            zc = next(z)
            if corrector == "lm" and z_prev is None:
                z_prev = next(z)
            x = langevin_by_hand(x, score(x, tvec(t)), zc, snr, r**2, corrector, z_prev)
            z_prev = zc
        if calls is not None:
            close(calls[n][0], x, 1e-9)
            assert calls[n][1] == pytest.approx(t, rel=1e-9, abs=1e-12)
        n += 1
        mean = (2 - r) * x + G**2 * score(x, tvec(t))
        x = mean if last else mean + G * next(z)
    return mean


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("corrector_steps", [0, 1, 2])
def test_pc_steps_by_hand(kind, corrector_steps):
    """PredictorCorrector on linspace(T, eps, steps): every score input, the last step to sigma = 0
    (with its corrector at alpha = a(eps)^2) and the returned mean, replayed by hand."""
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    steps, snr = 4, 0.16
    fn, calls = recording(score)
    out = PredictorCorrector(steps, snr=snr, corrector_steps=corrector_steps)(fn, sde, x_T(), gen(7))
    assert len(calls) == steps * (1 + corrector_steps)
    ts = [sde.T + (sde.eps - sde.T) * i / (steps - 1) for i in range(steps)]
    z = iter(noises(7, steps * (1 + corrector_steps)))
    close(out, pc_by_hand(hand, score, x_T(), ts, z, snr, corrector_steps, calls=calls), 1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_pc_leimkuhler_matthews_steps_by_hand(kind):
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    fn, calls = recording(score)
    out = PredictorCorrector(3, snr=0.3, corrector_steps=1, corrector="lm")(fn, sde, x_T(), gen(8))
    ts = [sde.T + (sde.eps - sde.T) * i / 2 for i in range(3)]
    z = iter(noises(8, 8))
    close(out, pc_by_hand(hand, score, x_T(), ts, z, 0.3, 1, "lm", calls=calls), 1e-9)


# ---- DDIM --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_steps_by_hand(kind, eta):
    """DDIM Eq. 12 in x_t = a x0 + s eps form: x' = a' x0_hat + sqrt(s'^2 - c^2) eps_hat + c z with
    c = eta s' sqrt(1 - (a s')^2 / (a' s)^2); `steps` evaluations at linspace(T, eps, steps); the
    last one returns x0_hat at t = eps."""
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    steps = 4
    fn, calls = recording(score)
    out = DDIM(steps, eta=eta)(fn, sde, x_T(), gen(9))
    ts = [sde.T + (sde.eps - sde.T) * i / (steps - 1) for i in range(steps)]
    assert [t for _, t in calls] == pytest.approx(ts, abs=1e-12)
    z = noises(9, steps)
    x = x_T()
    for i in range(steps):
        t = ts[i]
        a, s = hand.a(t), hand.s(t)
        close(calls[i][0], x)
        eps_hat = -s * score(x, tvec(t))
        x0 = (x - s * eps_hat) / a
        if i == steps - 1:
            break
        a2, s2 = hand.a(ts[i + 1]), hand.s(ts[i + 1])
        c = eta * s2 * math.sqrt(1 - (a * s2 / (a2 * s)) ** 2)
        x = a2 * x0 + math.sqrt(s2**2 - c**2) * eps_hat + c * z[i]
    close(out, x0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_the_transition_form(kind, eta):
    """ddim_step's c = eta s' sqrt(1 - (a s')^2 / (a' s)^2) equals AGG's form c = eta s' G / s with G
    from the forward transition t' -> t (sde.transition), per example (times differ by row), with the
    same noise draw; and eta = 0 with t' > t is the inversion step a' x0_hat + s' eps_hat."""
    sde = Hand(kind).sde
    x0, eps = x_T(4), x_T(5)
    t = torch.tensor([0.7, 0.5], dtype=torch.float64)
    tn = torch.tensor([0.4, 0.05], dtype=torch.float64)
    got = ddim_step(sde, x0, eps, t, tn, eta, gen(6))
    _, G = sde.transition(t, tn)
    view = (-1, 1, 1, 1)
    a2, s2 = sde.mean_coef(tn).reshape(view), sde.std(tn).reshape(view)
    c = eta * s2 * G.reshape(view) / sde.std(t).reshape(view)
    want = a2 * x0 + (s2**2 - c**2).sqrt() * eps + (c * noises(6, 1)[0] if eta > 0 else 0.0)
    close(got, want, 1e-12)
    close(ddim_step(sde, x0, eps, tn, t, 0.0), sde.mean_coef(t).reshape(view) * x0 + sde.std(t).reshape(view) * eps)


def test_ddim_eta_one_is_the_ancestral_variance():
    """eta = 1: c^2 = s'^2 (1 - (a s')^2 / (a' s)^2), the DDPM posterior variance (VP closed form)."""
    hand = Hand("VP")
    t, tn = 0.6, 0.3
    a, s, a2, s2 = hand.a(t), hand.s(t), hand.a(tn), hand.s(tn)
    abar, abar2 = a * a, a2 * a2
    beta_tilde = (1 - abar2) / (1 - abar) * (1 - abar / abar2)  # Ho et al. 2020, Eq. 7
    c = s2 * math.sqrt(1 - (a * s2 / (a2 * s)) ** 2)
    assert c**2 == pytest.approx(beta_tilde, rel=1e-12)


# ---- Heun --------------------------------------------------------------------------------------------
def karras_sigmas(hand, n, rho, s_end=None):
    s_max, s_min = hand.sigma(1.0), hand.sigma(hand.sde.eps) if s_end is None else s_end
    return [(s_max ** (1 / rho) + i / n * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(n + 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_heun_steps_and_grid_by_hand(kind):
    """Karras et al. 2022, Alg. 1 in x_hat = x / a: sigmas uniform in sigma^(1/rho) from sigma(T) to
    sigma(eps) (Eq. 5), Heun steps of dx_hat/dsigma = (x_hat - x0_hat) / sigma, a last Euler step to
    sigma = 0; score calls at the grid's times (each interior time twice)."""
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    steps, rho = 4, 7.0
    fn, calls = recording(score)
    out = Heun(steps, grid=KarrasSigma(rho))(fn, sde, x_T(), gen(0))
    sig = karras_sigmas(hand, steps - 1, rho)
    ts = [hand.t_of_sigma(v) for v in sig]
    ts[0], ts[-1] = sde.T, sde.eps
    want_t = [ts[0]] + [t for t in ts[1:] for _ in (0, 1)]
    assert [t for _, t in calls] == pytest.approx(want_t, rel=1e-9, abs=1e-12)
    sig = [hand.sigma(t) for t in ts]

    def slope(xh, i):
        t = ts[i]
        x = hand.a(t) * xh
        x0 = (x + hand.s(t) ** 2 * score(x, tvec(t))) / hand.a(t)
        return (xh - x0) / sig[i]

    xh = x_T() / hand.a(ts[0])
    for i in range(steps - 1):
        close(calls[2 * i][0], hand.a(ts[i]) * xh)
        d = slope(xh, i)
        h = sig[i + 1] - sig[i]
        xh = xh + 0.5 * h * (d + slope(xh + h * d, i + 1))
    close(calls[2 * steps - 2][0], hand.a(ts[-1]) * xh)
    close(out, xh - sig[-1] * slope(xh, steps - 1))


def test_heun_single_step_is_tweedie_at_T():
    hand = Hand("VE")
    sde, score = hand.sde, score_of(hand)
    x = x_T()
    out = Heun(1)(score, sde, x, gen(0))
    close(out, x + hand.s(1.0) ** 2 * score(x, tvec(1.0)))


def test_tweedie_by_hand():
    hand = Hand("VP")
    x, t = x_T(3), 0.37
    sc = score_of(hand)(x, tvec(t))
    close(tweedie(x, tvec(t), sc, hand.sde), (x + hand.s(t) ** 2 * sc) / hand.a(t))


# ---- HeunPC ------------------------------------------------------------------------------------------
def test_heunpc_defaults():
    """The documented defaults: 8 Heun steps to sigma 0.5, then 42 PC steps with one
    Leimkuhler-Matthews corrector step of snr 0.55 each (2 * 8 + 42 * 2 = 100 evaluations)."""
    s = HeunPC()
    assert (s.heun_steps, s.pc.steps, s.sigma_switch, s.pc.snr, s.pc.corrector_steps, s.pc.corrector,
            s.heun_grid.rho) == (8, 42, 0.5, 0.55, 1, "lm", 7.0)
    assert s.heun_grid == KarrasSigma(7.0) and s.pc_grid == LogSigma() and Heun().grid == KarrasSigma(7.0)
    assert EulerMaruyama().grid == PredictorCorrector().grid == DDIM().grid == UniformTime()
    assert s.nfe == 100
    assert PredictorCorrector().corrector == "euler" and PredictorCorrector().snr == 0.16


@pytest.mark.parametrize("kind", KINDS)
def test_heunpc_steps_and_grid_by_hand(kind):
    """Heun on the sigma^(1/rho) grid from sigma(T) to sigma_switch, then PC steps at times uniform
    in log sigma from sigma_switch to sigma(eps) with the default Leimkuhler-Matthews corrector,
    ending like PC (eps -> sigma = 0, its mean returned)."""
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    heun_steps, pc_steps, s_sw, rho, snr = 2, 3, 0.5, 7.0, 0.55
    fn, calls = recording(score)
    out = HeunPC(heun_steps, pc_steps, sigma_switch=s_sw, heun_grid=KarrasSigma(rho))(fn, sde, x_T(), gen(4))
    assert len(calls) == 2 * heun_steps + 2 * pc_steps
    sig_h = karras_sigmas(hand, heun_steps, rho, s_end=s_sw)
    th = [hand.t_of_sigma(v) for v in sig_h]
    th[0] = sde.T
    s_min = hand.sigma(sde.eps)
    sig_p = [math.exp(math.log(s_sw) + i / (pc_steps - 1) * (math.log(s_min) - math.log(s_sw))) for i in range(pc_steps)]
    tp = [hand.t_of_sigma(v) for v in sig_p]
    tp[-1] = sde.eps
    want = [th[0], th[1], th[1], th[2]] + [t for t in tp for _ in (0, 1)]
    assert [t for _, t in calls] == pytest.approx(want, rel=1e-9, abs=1e-12)
    # replay: Heun to the switch, then LM corrector + predictor at tp[0]; compare the next inputs
    sig = [hand.sigma(t) for t in th]

    def slope(xh, i):
        x = hand.a(th[i]) * xh
        return (xh - (x + hand.s(th[i]) ** 2 * score(x, tvec(th[i]))) / hand.a(th[i])) / sig[i]

    xh = x_T() / hand.a(th[0])
    for i in range(heun_steps):
        d = slope(xh, i)
        h = sig[i + 1] - sig[i]
        xh = xh + 0.5 * h * (d + slope(xh + h * d, i + 1))
    x = hand.a(th[-1]) * xh
    z = iter(noises(4, 2 * pc_steps + 1))
    close(out, pc_by_hand(hand, score, x, tp, z, snr, 1, "lm", calls=calls[2 * heun_steps:]), 1e-9)


# ---- the time grids (msdiff.samplers.grids) ----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_grids_by_hand(kind):
    """UniformTime: n times uniform from T to eps; KarrasSigma: uniform in sigma^(1/rho) from sigma(T)
    to sigma(eps) (or to sigma_end), mapped back to t (Karras et al. 2022, Eq. 5); LogSigma: uniform in
    log sigma (here from sigma_start); the ends placed exactly at T / eps or at the given sigmas' times."""
    hand = Hand(kind)
    sde = hand.sde
    got = UniformTime()(sde, 6, dtype=torch.float64)
    assert got.tolist() == pytest.approx([1.0 + (sde.eps - 1.0) * i / 5 for i in range(6)], abs=1e-15)
    got = KarrasSigma(rho=5.0)(sde, 5, dtype=torch.float64)
    want = [hand.t_of_sigma(v) for v in karras_sigmas(hand, 4, 5.0)]
    want[0], want[-1] = sde.T, sde.eps
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got[0].item() == sde.T and got[-1].item() == sde.eps
    got = KarrasSigma(rho=7.0)(sde, 4, dtype=torch.float64, sigma_end=0.3)
    want = [hand.t_of_sigma(v) for v in karras_sigmas(hand, 3, 7.0, s_end=0.3)]
    want[0] = sde.T
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert hand.sigma(got[-1].item()) == pytest.approx(0.3, rel=1e-9)
    got = LogSigma()(sde, 4, dtype=torch.float64, sigma_start=0.5)
    s_eps = hand.sigma(sde.eps)
    want = [hand.t_of_sigma(math.exp(math.log(0.5) + i / 3 * (math.log(s_eps) - math.log(0.5)))) for i in range(4)]
    want[-1] = sde.eps
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    got = UniformTime()(sde, 3, dtype=torch.float64, sigma_start=0.5, sigma_end=0.3)
    lo, hi = hand.t_of_sigma(0.3), hand.t_of_sigma(0.5)
    assert got.tolist() == pytest.approx([hi, (hi + lo) / 2, lo], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("sde", [VESDE(SMIN, SMAX), VPSDE(B0, B1), SubVPSDE(B0, B1)], ids=repr)
@pytest.mark.parametrize("grid", [UniformTime(), KarrasSigma(), KarrasSigma(rho=2.0), LogSigma()], ids=repr)
def test_grids_decrease_from_T_to_eps(sde, grid):
    """n strictly decreasing times, exactly T first and eps last, on the requested device and dtype;
    n = 1 is T alone."""
    for n in (2, 3, 11):
        ts = grid(sde, n, "cpu", torch.float32)
        assert ts.shape == (n,) and ts.dtype == torch.float32 and (ts.diff() < 0).all()
        assert ts[0].item() == torch.tensor(sde.T).item() and ts[-1].item() == torch.tensor(sde.eps).item()
    assert grid(sde, 1, dtype=torch.float64).tolist() == [sde.T]


def test_grid_bad_input():
    with pytest.raises(ValueError, match="n=0"):
        UniformTime()(VESDE(), 0)
    with pytest.raises(ValueError, match="rho=0"):
        KarrasSigma(rho=0)
    with pytest.raises(ValueError, match="sigma_end=-1"):
        LogSigma()(VESDE(), 3, sigma_end=-1.0)
    with pytest.raises(ValueError, match="grid='KarrasSigma'"):
        DDIM(10, grid="KarrasSigma")
    with pytest.raises(ValueError, match="pc_grid"):
        HeunPC(pc_grid=7.0)


# ---- the probability-flow ODE ------------------------------------------------------------------------
def ode_solution(hand, x, t):
    """The probability-flow ODE's solution from x at T to time t for data N(m0, 0.25 I):
    x_t = a m0 + v(t) (x_T - a(T) m0) / v(T), v^2 = 0.25 a^2 + s^2 (the flow keeps quantiles)."""
    v = lambda u: math.sqrt(0.25 * hand.a(u) ** 2 + hand.s(u) ** 2)  # noqa: E731
    return hand.a(t) * M0 + v(t) / v(1.0) * (x - hand.a(1.0) * M0)


@pytest.mark.parametrize("kind", KINDS)
def test_probability_flow_ode_solution_and_final_tweedie(kind):
    """For Gaussian data N(m0, 0.25 I) the probability-flow ODE (Song Eq. 13) moves each point along
    x_t = a m0 + v(t) (x_T - a(T) m0) / v(T), v^2 = 0.25 a^2 + s^2 (the flow keeps quantiles); with
    denoise=True one Tweedie step at eps follows."""
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    x = x_T(2)
    plain = ProbabilityFlowODE(rtol=1e-8, atol=1e-8, denoise=False)(score, sde, x)
    e = sde.eps
    torch.testing.assert_close(plain, ode_solution(hand, x, e), rtol=1e-5, atol=1e-6)
    ode = ProbabilityFlowODE(rtol=1e-8, atol=1e-8)
    out = ode(score, sde, x)
    close(out, (plain + hand.s(e) ** 2 * score(plain, tvec(e))) / hand.a(e), 1e-9)
    assert ode.nfe > 2


@pytest.mark.parametrize("kind", KINDS)
def test_any_sampler_on_any_grid_converges_to_the_ode_solution(kind):
    """DDIM (eta = 0) on the Karras grid and Heun on the uniform grid evaluate the score at exactly
    their grid's times and converge to the exact answer for data N(m0, 0.25 I), Tweedie's x0_hat of
    the probability-flow ODE's solution at eps, at their orders: doubling the steps halves DDIM's error
    (first order) and quarters Heun's (second order)."""
    hand = Hand(kind)
    sde, score = hand.sde, score_of(hand)
    x, e = x_T(2), sde.eps
    x_e = ode_solution(hand, x, e)
    exact = (x_e + hand.s(e) ** 2 * score(x_e, tvec(e))) / hand.a(e)
    n = 20
    fn, calls = recording(score)
    ddim = DDIM(n, grid=KarrasSigma(rho=7.0))
    out = ddim(fn, sde, x)
    ts = [hand.t_of_sigma(v) for v in karras_sigmas(hand, n - 1, 7.0)]
    ts[0], ts[-1] = sde.T, sde.eps
    assert [t for _, t in calls] == pytest.approx(ts, rel=1e-9, abs=1e-12)
    err = [(s(score, sde, x) - exact).abs().max().item() for s in (ddim, DDIM(2 * n, grid=KarrasSigma()))]
    assert (out - exact).abs().max().item() == err[0] and 0.4 < err[1] / err[0] < 0.6
    assert err[1] < {"VE": 8e-3, "VP": 6e-2}[kind], err
    fn, calls = recording(score)
    Heun(n, grid=UniformTime())(fn, sde, x)
    ts = [sde.T + (sde.eps - sde.T) * i / (n - 1) for i in range(n)]
    assert [t for _, t in calls] == pytest.approx([ts[0]] + [t for t in ts[1:] for _ in (0, 1)], abs=1e-12)
    err = [(Heun(m, grid=UniformTime())(score, sde, x) - exact).abs().max().item() for m in (n, 2 * n)]
    assert 0.15 < err[1] / err[0] < 0.3 and err[1] < {"VE": 1e-3, "VP": 5e-3}[kind], err
