"""Samplers driven by the exact Gaussian posterior score reproduce the exact posterior (msdiff.samplers)."""
import math

import pytest
import torch
from conftest import watch_host_traffic

from msdiff.gaussian import GaussianField, GaussianInverseProblem, posterior_error
from msdiff.samplers import (DDIM, DPMSolverPC, DPMSolverPP, EDMStochastic, EulerMaruyama, Heun, HeunPC, KarrasSigma,
                             LogSigma, PredictorCorrector, ProbabilityFlowODE, Sampler, UniformTime, bits_per_dim)
from msdiff.sde import VESDE, VPSDE
from msdiff.utils import append_dims, make_generator

B, K = 4, 500  # conditions, draws per condition: 2000 samples of a 16-dim posterior
MEAN_TOL, COV_TOL = 0.08, 0.12  # Monte-Carlo noise alone gives about 0.02 and 0.06




@pytest.fixture(scope="module")
def problem():
    return GaussianInverseProblem.super_resolution(GaussianField(1, 4, length_scale=1.5), factor=2, noise_std=0.05)


@pytest.fixture(scope="module")
def y(problem):
    return problem.sample(B, make_generator(0))[1]


SDES = {"VE": VESDE(0.01, 50.0), "VP": VPSDE(0.1, 20.0)}


def run(sampler, sde, problem, y, score_scale=1.0, t_shift=0.0, seed=1):
    yy = y.repeat(K, 1, 1, 1)

    def score_fn(x, t):
        return score_scale * problem.conditional_score(x, yy, (t + t_shift).clamp(0, sde.T), sde)

    g = make_generator(seed)
    x_T = sde.prior_sampling(yy.shape, g)
    x_T0 = x_T.clone()
    x = sampler(score_fn, sde, x_T, g)
    assert torch.equal(x_T, x_T0) and not x.requires_grad
    return posterior_error(x.reshape(K, B, *problem.shape), y, problem)


def ok(err):
    return err["mean_error"] < MEAN_TOL and err["cov_error"] < COV_TOL


# uniform-t DDIM is first order and VP puts few of its steps at low noise: it needs more steps there
SAMPLERS = [EulerMaruyama(500), PredictorCorrector(300), DDIM(500), DDIM(1000, eta=1.0), Heun(50), ProbabilityFlowODE(),
            HeunPC()]


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: f"{type(s).__name__}-{getattr(s, 'eta', '')}")
def test_sampler_reproduces_posterior(problem, y, sde_name, sampler):
    err = run(sampler, SDES[sde_name], problem, y)
    assert ok(err), err


@pytest.mark.parametrize("sde_name", list(SDES))
def test_wrong_variants_fail(problem, y, sde_name):
    """The same tolerance rejects a wrong drift (score off by 15%), a wrong diffusion, and a time
    grid off by one step."""
    sde = SDES[sde_name]
    assert not ok(run(EulerMaruyama(500), sde, problem, y, score_scale=0.85))
    assert not ok(run(Heun(50), sde, problem, y, score_scale=1.15))

    class WrongDiffusion(type(sde)):
        def diffusion(self, t):
            return 1.15 * super().diffusion(t)

    assert not ok(run(EulerMaruyama(500), WrongDiffusion(**_params(sde)), problem, y))
    # score evaluated one grid step late (at t_{i+1} instead of t_i)
    assert not ok(run(DDIM(20), sde, problem, y, t_shift=-(sde.T - sde.eps) / 19))


def _params(sde):
    return {k: getattr(sde, k) for k in ("sigma_min", "sigma_max", "beta_min", "beta_max", "eps") if hasattr(sde, k)}


@pytest.mark.parametrize("sde_name", list(SDES))
def test_langevin_corrector_targets_p_t(problem, y, sde_name):
    """The corrector alone, at a fixed t, turns a 5x too narrow start into p_t(x | y) (Song Alg. 4):
    a missing or mis-scaled corrector step fails this."""
    sde, pc = SDES[sde_name], PredictorCorrector(snr=0.16)
    yy = y.repeat(K, 1, 1, 1)
    t = torch.full((B * K,), 0.5 if sde_name == "VE" else 0.2)
    m, C = problem.posterior(yy)
    a, s = sde.mean_coef(t[:1].double()), sde.std(t[:1].double())
    C_t = a**2 * C + s**2 * torch.eye(problem.dim, dtype=torch.float64)
    g = make_generator(2)
    x = (a * m + 0.2 * s * torch.randn(m.shape, generator=g, dtype=torch.float64)).float()  # 5x too narrow
    with torch.no_grad():
        for _ in range(400):
            x, _ = pc.langevin(lambda v, tt: problem.conditional_score(v, yy, tt, sde), x, t, generator=g)
    r = (x.double() - a * m).reshape(B * K, -1)
    emp = r.T @ r / (B * K)
    assert (emp - C_t).norm() / C_t.norm() < COV_TOL and r.mean(0).norm() / C_t.trace().sqrt() < MEAN_TOL


def langevin_chain_cov_error(problem, y, corrector: str, snr: float, steps: int = 300) -> float:
    """Relative covariance error after `steps` Langevin steps at fixed t on the VE field."""
    sde, pc = SDES["VE"], PredictorCorrector(snr=snr, corrector=corrector)
    yy = y.repeat(K, 1, 1, 1)
    t = torch.full((B * K,), 0.5)
    m, C = problem.posterior(yy)
    s = sde.std(t[:1].double())
    C_t = C + s**2 * torch.eye(problem.dim, dtype=torch.float64)
    g = make_generator(4)
    x, z = (m + s * torch.randn(m.shape, generator=g, dtype=torch.float64)).float(), None
    with torch.no_grad():
        for _ in range(steps):
            x, z = pc.langevin(lambda v, tt: problem.conditional_score(v, yy, tt, sde), x, t, generator=g, z_prev=z)
    r = (x.double() - m).reshape(B * K, -1)
    return float(((r.T @ r / (B * K)) - C_t).norm() / C_t.norm())


def test_leimkuhler_matthews_corrector_is_exact_where_euler_inflates(problem, y):
    # large steps (snr 0.5, e ~ sigma_t^2 / 2): Euler's stationary variance is ~1 / (1 - e / 2 sigma^2)
    # too large; the Leimkuhler-Matthews step keeps the exact Gaussian law
    assert langevin_chain_cov_error(problem, y, "lm", 0.5) < COV_TOL
    assert langevin_chain_cov_error(problem, y, "euler", 0.5) > 2 * COV_TOL


def test_nfe_determinism_and_dtype(problem, y):
    sde = SDES["VP"]
    yy = y.repeat(2, 1, 1, 1)
    score_fn = lambda x, t: problem.conditional_score(x, yy, t, sde)
    assert (EulerMaruyama(7).nfe, PredictorCorrector(7, corrector_steps=2).nfe, DDIM(7).nfe, Heun(7).nfe,
            HeunPC(3, 4, corrector_steps=2).nfe) == (7, 21, 7, 13, 18)
    calls = []
    counting = lambda x, t: calls.append(t) or score_fn(x, t)
    x_T = sde.prior_sampling(yy.shape, make_generator(3))
    for sampler in (EulerMaruyama(5), PredictorCorrector(5), DDIM(5, eta=0.5), Heun(5), HeunPC(3, 4),
                    HeunPC(0, 4), HeunPC(3, 4, sigma_switch=1e9)):
        calls.clear()
        a = sampler(counting, sde, x_T, make_generator(4))
        assert len(calls) == sampler.nfe and all(t.shape == (2 * B,) for t in calls)
        assert torch.equal(a, sampler(score_fn, sde, x_T, make_generator(4))) and a.dtype == torch.float32
    ode = ProbabilityFlowODE(rtol=1e-3, atol=1e-3)
    calls.clear()
    ode(counting, sde, x_T)
    assert ode.nfe == len(calls) > 2


@pytest.mark.parametrize("sde", [VESDE(0.01, 50.0), VPSDE(0.1, 20.0)], ids=["VE", "VP"])
def test_log_likelihood_exact_trace(sde):
    """log p_eps(x) from the probability-flow ODE equals the exact Gaussian log-density."""
    field = GaussianField(1, 3, length_scale=1.5)
    x = field.sample(4, make_generator(5)).double()
    t = torch.full((4,), sde.eps, dtype=torch.float64)
    exact = field.log_prob(x, t, sde)
    score_fn = lambda v, tt: field.score(v, tt, sde)
    ode = ProbabilityFlowODE(rtol=1e-6, atol=1e-6)
    logp = ode.log_likelihood(score_fn, sde, x, exact_trace=True)
    assert (logp - exact).abs().max() < 0.1, (logp, exact)
    # Hutchinson: unbiased, so the mean over probes agrees within its standard error
    hutch = torch.stack([ode.log_likelihood(score_fn, sde, x, generator=make_generator(i)) for i in range(8)])
    assert ((hutch.mean(0) - exact).abs() < 3 * hutch.std(0) / math.sqrt(8) + 0.1).all()
    assert hutch.std(0).min() > 0  # the probes differ
    bpd = bits_per_dim(logp, x, bin_width=1 / 256)
    assert torch.allclose(bpd, -logp / (9 * math.log(2)) + 8)


def test_bad_input(problem):
    with pytest.raises(ValueError, match="steps"):
        EulerMaruyama(0)
    with pytest.raises(ValueError, match="snr"):
        PredictorCorrector(snr=0.0)
    with pytest.raises(ValueError, match="corrector_steps"):
        PredictorCorrector(corrector_steps=-1)
    with pytest.raises(ValueError, match="eta"):
        DDIM(10, eta=1.5)
    with pytest.raises(ValueError, match="rho"):
        Heun(10, grid=KarrasSigma(rho=0))
    with pytest.raises(ValueError, match="rtol"):
        ProbabilityFlowODE(rtol=0)
    with pytest.raises(ValueError, match="x_T"):
        Heun(3)(lambda x, t: x, VPSDE(), torch.zeros(4))
    with pytest.raises(ValueError, match="score_fn"):
        DDIM(3)(lambda x, t: x[:1], VPSDE(), torch.zeros(2, 1, 4, 4))


def test_grid_is_a_typed_class_path_argument():
    """jsonargparse (sample.py, LightningCLI) builds a sampler on any grid from the command line, and a
    resolved config with the default grids dumps and parses back to the same grids."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(exit_on_error=False)
    p.add_subclass_arguments(Sampler, "sampler")
    cfg = p.parse_args(["--sampler", "DDIM", "--sampler.steps", "7", "--sampler.grid", "KarrasSigma",
                        "--sampler.grid.rho", "5"])
    s = p.instantiate(cfg).sampler
    assert isinstance(s, DDIM) and s.steps == 7 and s.grid == KarrasSigma(rho=5.0)
    s = p.instantiate(p.parse_args(["--sampler", "Heun", "--sampler.grid", "UniformTime"])).sampler
    assert isinstance(s, Heun) and s.grid == UniformTime()
    dumped = p.dump(p.parse_args(["--sampler", "HeunPC", "--sampler.heun_grid.rho", "3"]))
    s = p.instantiate(p.parse_string(dumped)).sampler
    assert isinstance(s, HeunPC) and (s.heun_grid, s.pc_grid) == (KarrasSigma(rho=3.0), LogSigma())


def test_corrector_with_a_zero_score_takes_no_step():
    # an untrained U-Net (zero-initialised head) gives an exactly zero score: no NaN, no step
    pc = PredictorCorrector(steps=2, snr=0.16, corrector_steps=1)
    x = torch.randn(2, 1, 4, 4)
    for corrector in ("euler", "lm"):
        pc.corrector = corrector
        out, _ = pc.langevin(lambda x, t: torch.zeros_like(x), x, torch.full((2,), 0.5),
                             generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, x)


# ---- the final denoising step (score_sde's PC sampler with denoise=True) -------------------------
def _point_mass_score(c: float, sde):
    """The exact score of p_t = N(a(t) c, s(t)^2 I), the marginals of the point mass x_0 = c."""
    def score_fn(x, t):
        a, s = append_dims(sde.mean_coef(t), x.ndim), append_dims(sde.std(t), x.ndim)
        return -(x - a * c) / s**2
    return score_fn


def _narrow_gaussian_score(c: float, tau: float, sde):
    """The exact score of p_t = N(a c, (a^2 tau^2 + s^2) I), the marginals of x_0 ~ N(c, tau^2 I)."""
    def score_fn(x, t):
        a, s = append_dims(sde.mean_coef(t), x.ndim), append_dims(sde.std(t), x.ndim)
        return -(x - a * c) / (a**2 * tau**2 + s**2)
    return score_fn


PAPER_VE = VESDE(0.005, 10.0)  # the paper's sigma_min; a small sigma_max keeps the test fast
ENDING_AT_ZERO = [PredictorCorrector(100), PredictorCorrector(60, corrector="lm"), HeunPC(4, 20), EulerMaruyama(200),
                  EDMStochastic(30), DPMSolverPP(30, stochastic=True)]


@pytest.mark.parametrize("sde", [PAPER_VE, VPSDE(0.1, 20.0)], ids=["VE", "VP"])
@pytest.mark.parametrize("sampler", ENDING_AT_ZERO, ids=lambda s: type(s).__name__)
def test_point_mass_target_returns_the_point(sde, sampler):
    """On a point-mass target the samplers return the point up to float rounding (reference: spread
    ~1e-6); returning the mean at t = eps instead would leave noise of std s(eps) (0.005 for VE,
    0.0105 for VP). (For VP the reverse-diffusion mean (2 - a) x + s^2 score differs from Tweedie's
    by (1 - a(eps))^2 x: its spread is 5.5e-5 times that of x at eps, still ~1e-6.)"""
    x_T = sde.prior_sampling((256, 1, 2, 2), make_generator(7))
    x = sampler(_point_mass_score(0.3, sde), sde, x_T, make_generator(8))
    assert (x - 0.3).abs().max() < 5e-5 and x.std() < 1e-5, (x.std(), (x - 0.3).abs().max())


@pytest.mark.parametrize("sampler", [PredictorCorrector(150), HeunPC(4, 30)], ids=lambda s: type(s).__name__)
def test_narrow_gaussian_target_sets_the_spread(sampler):
    """x_0 ~ N(c, tau^2) with tau = 1e-3 < sigma_min: the final step returns E[x_0 | x_eps], whose
    spread tau^2 / sqrt(tau^2 + sigma(eps)^2) = 1.96e-4 is set by the target (-> 0 with tau), where
    the mean at t = eps has spread sqrt(tau^2 + sigma_min^2) = 5.1e-3."""
    sde, tau = PAPER_VE, 1e-3
    x_T = sde.prior_sampling((4000, 1, 1, 1), make_generator(9))
    x = sampler(_narrow_gaussian_score(0.5, tau, sde), sde, x_T, make_generator(10))
    s_eps = float(sde.std(torch.tensor(sde.eps, dtype=torch.float64)))
    expected = tau**2 / math.sqrt(tau**2 + s_eps**2)
    assert abs(float(x.double().std()) / expected - 1) < 0.1 and abs(float(x.mean()) - 0.5) < 1e-4


def _linear_score(sde):
    """Score of p_t = N(0, (a^2 + s^2) I), data N(0, I): linear in x, so the steps are easy by hand."""
    def score_fn(x, t):
        a, s = append_dims(sde.mean_coef(t), x.ndim), append_dims(sde.std(t), x.ndim)
        return -x / (a**2 + s**2)
    return score_fn


@pytest.mark.parametrize("sde", [PAPER_VE, VPSDE(0.1, 20.0)], ids=["VE", "VP"])
def test_pc_two_steps_by_hand(sde):
    """PredictorCorrector(2, corrector_steps=0): a predictor step T -> eps with noise, then the final
    step eps -> sigma = 0, whose mean (2 - a) x + s^2 score is returned (no noise added)."""
    seen = []
    score = _linear_score(sde)
    x_T = torch.tensor([[1.5, -0.7]], dtype=torch.float64)
    out = PredictorCorrector(2, corrector_steps=0)(lambda x, t: seen.append(float(t[0])) or score(x, t), sde, x_T,
                                                  make_generator(3))
    z = torch.randn(x_T.shape, generator=make_generator(3), dtype=torch.float64)
    T, e = torch.tensor([sde.T], dtype=torch.float64), torch.tensor([sde.eps], dtype=torch.float64)
    a_T, s_T, a_e, s_e = (float(f(v)) for f, v in ((sde.mean_coef, T), (sde.std, T), (sde.mean_coef, e), (sde.std, e)))
    r = a_T / a_e
    G2 = s_T**2 - r**2 * s_e**2
    x1 = (2 - r) * x_T + G2 * (-x_T / (a_T**2 + s_T**2)) + math.sqrt(G2) * z
    expected = (2 - a_e) * x1 + s_e**2 * (-x1 / (a_e**2 + s_e**2))
    assert seen == pytest.approx([sde.T, sde.eps], rel=1e-12)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    if isinstance(sde, VESDE):  # for VE the last step is Tweedie's x + sigma_min^2 score with sigma(eps) = sigma_min
        assert s_e == pytest.approx(0.005, rel=2e-4)


def test_pc_one_step_goes_from_T_to_zero():
    """steps=1: a single predictor step from T straight to sigma = 0: x_T + sigma_max^2 score (VE)."""
    sde, x_T = PAPER_VE, torch.tensor([[2.0, -3.0]], dtype=torch.float64)
    out = PredictorCorrector(1, corrector_steps=0)(_linear_score(sde), sde, x_T)
    assert torch.allclose(out, x_T - 10.0**2 * x_T / (1 + 10.0**2), rtol=1e-12)


def test_euler_maruyama_two_steps_by_hand():
    """EulerMaruyama(2): one Euler-Maruyama step T -> eps, then Tweedie's x0_hat at eps (VP)."""
    sde, score = VPSDE(0.1, 20.0), _linear_score(VPSDE(0.1, 20.0))
    x_T = torch.tensor([[0.4, -1.1]], dtype=torch.float64)
    out = EulerMaruyama(2)(score, sde, x_T, make_generator(5))
    z = torch.randn(x_T.shape, generator=make_generator(5), dtype=torch.float64)
    T = torch.tensor([1.0], dtype=torch.float64)
    h = 1.0 - sde.eps
    beta_T = sde.beta_min + (sde.beta_max - sde.beta_min)
    x1 = x_T - (-0.5 * beta_T * x_T - beta_T * score(x_T, T)) * h + math.sqrt(beta_T * h) * z
    e = torch.tensor([sde.eps], dtype=torch.float64)
    a, s = float(sde.mean_coef(e)), float(sde.std(e))
    assert torch.allclose(out, (x1 + s**2 * score(x1, e)) / a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [lambda n: PredictorCorrector(n), lambda n: PredictorCorrector(n, corrector="lm"),
                                  lambda n: EulerMaruyama(n), lambda n: Heun(n), lambda n: DDIM(n, eta=0.5),
                                  lambda n: HeunPC(n, n), lambda n: EDMStochastic(n), lambda n: DPMSolverPP(n),
                                  lambda n: DPMSolverPP(n, stochastic=True), lambda n: DPMSolverPC(n, n)],
                         ids=["PC", "PC-lm", "EM", "Heun", "DDIM", "HeunPC", "EDM", "DPM++2M", "DPM++2M-SDE",
                              "DPMSolverPC"])
def test_no_host_device_traffic_inside_the_step_loop(make, monkeypatch):
    """The step loop neither reads a device value back nor makes a tensor from host numbers (on a
    GPU each would stall every step): with CMDE's score of a tiny U-Net and sample.py's noise (one
    stream per condition), the Tensor -> Python conversions and the torch.tensor/as_tensor calls on
    host data of a sample (the grid's set-up) do not grow with the steps."""
    from msdiff.estimators import CMDE
    from msdiff.nn.unet import UNet
    from msdiff.sde import MultiSpeedSDE
    from msdiff.utils import example_noise

    torch.manual_seed(0)
    net = UNet(in_channels=2, out_channels=2, ch=32, ch_mult=[1], num_res_blocks=1, attn_resolutions=[],
               image_size=8, dropout=0.0).eval()
    est = CMDE(sde=MultiSpeedSDE(VESDE(0.01, 5.0), VESDE(0.01, 0.5)))
    sde, y = est.sampling_sde, torch.rand(2, 1, 8, 8)
    traffic = []
    watch_host_traffic(monkeypatch, lambda: traffic.append(1))
    counts = []
    for steps in (3, 6):
        traffic.clear()
        noise = example_noise(0, range(2), 0, "cpu")
        x_T = sde.prior_sampling((2, 1, 8, 8), generator=noise)
        make(steps)(est.score_fn(net, y, generator=noise), sde, x_T, generator=noise)
        counts.append(len(traffic))
    assert counts[0] == counts[1]
