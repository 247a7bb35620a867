"""Exact Gaussian ground truth (msdiff.gaussian) against brute-force formulas and autograd."""
import math

import pytest
import torch

from msdiff.gaussian import (GaussianField, GaussianInverseProblem, gaussian_w2, joint_frechet_distance,
                             posterior_error)
from msdiff.sde import VESDE, VPSDE, MultiSpeedSDE, SubVPSDE
from msdiff.utils import make_generator


@pytest.fixture(scope="module")
def field():
    return GaussianField(channels=2, size=4, length_scale=1.5, mean=0.5, std=0.2)


def _problems(field):
    return [GaussianInverseProblem.super_resolution(field, 2), GaussianInverseProblem.inpainting(field, 2)]


def test_field_moments_and_monte_carlo(field):
    assert field.shape == (2, 4, 4) and field.dim == 32
    assert torch.allclose(field.cov, field.cov.T) and torch.linalg.eigvalsh(field.cov).min() > 0
    x = field.sample(20000, make_generator(0)).reshape(20000, -1).double()
    assert (x.mean(0) - field.mean).abs().max() < 4 * 0.2 / math.sqrt(20000)
    emp = torch.cov(x.T)
    assert (emp - field.cov).norm() / field.cov.norm() < 0.03
    # neighbours are more correlated than distant pixels; the two channels correlate with rho = 0.5
    c = field.cov
    assert c[0, 1] > c[0, 5] > c[0, 15] > 0 and torch.isclose(c[0, 16], 0.5 * (c[0, 0] - 1e-4))


def test_operators(field):
    sr, inp = _problems(field)
    x = field.sample(3, make_generator(1))
    ax = sr.apply(x)
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    assert torch.allclose(ax, torch.nn.functional.interpolate(pooled, scale_factor=2, mode="nearest"), atol=1e-6)
    ax = inp.apply(x)
    assert (ax[:, :, 1:3, 1:3] == 0).all() and torch.equal(ax[:, :, 0], x[:, :, 0])


def test_posterior_brute_force(field):
    """Conditioning the joint Gaussian of (x, y) on y with the textbook formula."""
    for problem in _problems(field):
        D = field.dim
        mj, cj = problem.joint_moments()
        x, y = problem.sample(4, make_generator(2))
        m, C = problem.posterior(y)
        yf = y.reshape(4, -1).double()
        Syy_inv = torch.linalg.inv(cj[D:, D:])
        m_ref = mj[:D] + (yf - mj[D:]) @ (cj[:D, D:] @ Syy_inv).T
        C_ref = cj[:D, :D] - cj[:D, D:] @ Syy_inv @ cj[D:, :D]
        assert torch.allclose(m.reshape(4, -1), m_ref, atol=1e-10) and torch.allclose(C, C_ref, atol=1e-10)
        # and the joint moments themselves, by Monte Carlo
        xs, ys = problem.sample(20000, make_generator(3))
        z = torch.cat([xs.reshape(20000, -1), ys.reshape(20000, -1)], 1).double()
        assert (torch.cov(z.T) - cj).norm() / cj.norm() < 0.03


@pytest.mark.parametrize("sde", [VESDE(0.01, 5.0), VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)], ids=repr)
def test_scores_match_autograd(field, sde):
    g = make_generator(4)
    problem = _problems(field)[0]
    _, y = problem.sample(3, g)
    t = torch.tensor([0.05, 0.4, 0.9])
    x_t = torch.randn(3, *field.shape, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.autograd.grad(field.log_prob(x_t, t, sde).sum(), x_t)[0]
    assert torch.allclose(field.score(x_t, t, sde), ref, rtol=1e-8, atol=1e-8)
    ref = torch.autograd.grad(problem.posterior_log_prob(x_t, y, t, sde).sum(), x_t)[0]
    got = problem.conditional_score(x_t.detach(), y, t, sde)
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-8)
    # the perturbed log-densities are normalised Gaussians of the closed-form moments
    lam = torch.linalg.eigvalsh(problem.posterior(y)[1])
    a, s = sde.mean_coef(t.double()), sde.std(t.double())
    m = problem.posterior(y)[0].reshape(3, -1) * a[:, None]
    for i in range(3):
        P = a[i] ** 2 * problem.posterior(y)[1] + s[i] ** 2 * torch.eye(field.dim, dtype=torch.float64)
        ref = torch.distributions.MultivariateNormal(m[i], P).log_prob(x_t[i].detach().reshape(-1))
        assert torch.isclose(problem.posterior_log_prob(x_t[i : i + 1].detach(), y[i : i + 1], t[i : i + 1], sde)[0], ref)
    assert lam.min() > 0


def test_joint_score_matches_autograd(field):
    msde = MultiSpeedSDE(VESDE(0.01, 5.0), VESDE(0.01, 0.5))
    problem = _problems(field)[1]
    g = make_generator(5)
    x_t = torch.randn(4, *field.shape, generator=g, dtype=torch.float64).requires_grad_(True)
    y_t = torch.randn(4, *field.shape, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.tensor([0.3, 0.7, 0.3, 0.02])  # repeated t exercises the per-time grouping
    gx, gy = torch.autograd.grad(problem.joint_log_prob(x_t, y_t, t, msde).sum(), (x_t, y_t))
    sx, sy = problem.joint_score(x_t.detach(), y_t.detach(), t, msde)
    assert torch.allclose(sx, gx, rtol=1e-7, atol=1e-7) and torch.allclose(sy, gy, rtol=1e-7, atol=1e-7)
    # float32 in -> float32 out
    sx32, _ = problem.joint_score(x_t.detach().float(), y_t.detach().float(), t, msde)
    assert sx32.dtype == torch.float32


def test_w2_closed_forms():
    g = make_generator(6)
    B = torch.randn(5, 5, generator=g, dtype=torch.float64)
    C = B @ B.T + 0.1 * torch.eye(5, dtype=torch.float64)
    m = torch.randn(5, generator=g, dtype=torch.float64)
    shift = torch.tensor([3.0, 0, -4.0, 0, 0], dtype=torch.float64)
    assert gaussian_w2(m, C, m, C) < 1e-6
    assert abs(gaussian_w2(m, C, m + shift, C) - 5.0) < 1e-6
    # isotropic scales: W2 = sqrt(D) |s1 - s2|
    I = torch.eye(5, dtype=torch.float64)
    assert abs(gaussian_w2(m, 4 * I, m, 9 * I) - math.sqrt(5)) < 1e-9


def test_posterior_error_and_jfid(field):
    problem = _problems(field)[0]
    g = make_generator(7)
    _, y = problem.sample(4, g)
    m, C = problem.posterior(y)
    L = torch.linalg.cholesky(C)
    exact = m + (torch.randn(2000, 4, field.dim, generator=g, dtype=torch.float64) @ L.T).reshape(2000, 4, *field.shape)
    err = posterior_error(exact, y, problem)
    assert err["mean_error"] < 0.03 and err["cov_error"] < 0.06
    wrong = posterior_error(m + 1.3 * (exact - m), y, problem)  # 30% too wide
    assert wrong["cov_error"] > 0.5 and wrong["w2"] > 3 * err["w2"]
    x, yy = problem.sample(20000, g)
    good = joint_frechet_distance(x, yy, problem)
    bad = joint_frechet_distance(x, problem.sample(20000, g)[1], problem)  # x, y independent
    assert good < 0.02 * bad


def test_bad_input(field):
    with pytest.raises(ValueError, match="operator"):
        GaussianInverseProblem(field, torch.eye(3))
    with pytest.raises(ValueError, match="noise_std"):
        GaussianInverseProblem.inpainting(field, noise_std=0.0)
    with pytest.raises(ValueError, match="factor"):
        GaussianInverseProblem.super_resolution(field, 3)
    with pytest.raises(ValueError, match="x_t"):
        field.score(torch.zeros(2, 1, 4, 4), torch.zeros(2), VESDE())
    with pytest.raises(ValueError, match="length_scale"):
        GaussianField(length_scale=0.0)
