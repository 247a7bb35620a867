"""AGG (Kwon & Ye, Eq. 13-16) and its guidance losses on an exact Gaussian prior score: no training.

The prior is msdiff.gaussian.GaussianField (a correlated Gaussian field, exact grad log p_t for any SDE);
8x8 one-channel images keep every run to milliseconds.
"""
from __future__ import annotations

import pytest
import torch

from msdiff.gaussian import GaussianField, GaussianInverseProblem
from msdiff.guidance import (AGGSampler, ClipDirectionalLoss, ConsistencyLoss, DinoClsLoss, L1Loss, MSELoss, RangeLoss,
                             StatisticsLoss, build_agg, load_image)
from msdiff.guidance.losses import l1
from msdiff.sde import VESDE, VPSDE

SDES = {"ve": VESDE(sigma_min=0.01, sigma_max=20.0), "vp": VPSDE()}


@pytest.fixture(scope="module")
def field():
    return GaussianField(channels=1, size=8, std=0.2)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def score_of(field, sde):
    return lambda x, t: field.score(x, t, sde)


def reference_ddim(score_fn, sde, x, grid):
    """Independent DDIM along `grid` (any direction), eta = 0: x' = a' x0_hat + s' eps_hat."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        tb = t.expand(x.shape[0])
        a, s = sde.mean_coef(tb).view(-1, 1, 1, 1), sde.std(tb).view(-1, 1, 1, 1)
        score = score_fn(x, tb)
        x0_hat, eps = (x + s**2 * score) / a, -s * score
        tn = t_next.expand(x.shape[0])
        x = sde.mean_coef(tn).view(-1, 1, 1, 1) * x0_hat + sde.std(tn).view(-1, 1, 1, 1) * eps
    return x


# ---- zero weights: DDIM inversion + DDIM reconstruction --------------------------------------------------
@pytest.mark.parametrize("name", ["ve", "vp"])
def test_zero_weights_is_ddim_inversion_then_reconstruction(field, name):
    sde, x_src = SDES[name], field.sample(2, _gen(0))
    score_fn = score_of(field, sde)
    zero = MSELoss(field.sample(2, _gen(1)), weight=0.0)  # runs the guided path with zero gradients
    errors = {}
    for steps in (30, 60):
        agg = AGGSampler(steps=steps, t_edit=steps // 3, lambda_reg=0.0, losses=(zero,), adam_steps=2)
        out = agg(score_fn, sde, x_src)
        grid = agg.time_grid(sde)
        ref = reference_ddim(score_fn, sde, reference_ddim(score_fn, sde, x_src, grid), grid.flip(0))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        errors[steps] = (out - x_src).abs().max().item()
    # DDIM inversion is first order: halving the step halves the error. Tolerance at 60 steps for data of
    # std 0.2: 0.05 (VE) / 0.1 (VP, whose x0_hat changes faster near T); measured 0.03 / 0.06.
    assert errors[60] < 0.6 * errors[30]
    assert errors[60] < {"ve": 0.05, "vp": 0.1}[name]


def test_no_loss_means_no_guided_steps(field):
    sde = SDES["vp"]
    calls = []

    def score_fn(x, t):
        calls.append(x.requires_grad)
        return field.score(x, t, sde)

    AGGSampler(steps=6, t_edit=3, lambda_reg=0.0)(score_fn, sde, field.sample(1, _gen(0)))
    assert len(calls) == 12 and not any(calls)


# ---- one guided step ---------------------------------------------------------------------------------------
def _one_step(field, name, **kw):
    sde = SDES[name]
    score_fn = score_of(field, sde)
    x0_star = field.sample(2, _gen(2))
    agg = AGGSampler(steps=10, t_edit=5, eta=0.0, lambda_reg=0.5, losses=(MSELoss(field.sample(2, _gen(3)), 5.0),), **kw)
    t, t_next = torch.full((2,), 0.6), torch.full((2,), 0.5)
    x = sde.mean_coef(t).view(-1, 1, 1, 1) * field.sample(2, _gen(4)) + sde.std(t).view(-1, 1, 1, 1) * torch.randn(2, 1, 8, 8, generator=_gen(5))
    return sde, score_fn, agg, x, t, t_next, x0_star, agg.guided_step(score_fn, sde, x, t, t_next, x0_star)


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_asymmetric_update_is_ddim_plus_shifted_x0(field, name):
    sde, score_fn, agg, x, t, t_next, x0_star, step = _one_step(field, name)
    plain = reference_ddim(score_fn, sde, x, torch.stack([t[0], t_next[0]]))
    a_next = sde.mean_coef(t_next).view(-1, 1, 1, 1)
    torch.testing.assert_close(step.x_next - plain, a_next * (step.x0_final - step.x0_hat), rtol=1e-4, atol=1e-6)
    assert (step.x0_final - step.x0_hat).abs().max() > 1e-3  # the guidance did something

    # MCG: x0' = x0_hat - (s^2 / a) g with g the gradient through the score; for VP s^2/a = (1-abar)/sqrt(abar)
    xv = x.clone().requires_grad_(True)
    a, s = sde.mean_coef(t).view(-1, 1, 1, 1), sde.std(t).view(-1, 1, 1, 1)
    x0_hat = (xv + s**2 * score_fn(xv, t)) / a
    (g,) = torch.autograd.grad(agg.loss(x0_hat, x0_star).sum(), xv)
    coef = (1 - a**2) / a if name == "vp" else s**2
    torch.testing.assert_close(step.x0_mcg, step.x0_hat - coef * g, rtol=1e-4, atol=1e-6)
    assert (agg.loss(step.x0_mcg, x0_star) < agg.loss(step.x0_hat, x0_star)).all()


def test_one_adam_step_moves_each_element_by_at_most_lr(field):
    *_, x0_star, step = _one_step(field, "vp", adam_steps=1, lr=0.02)
    moved = (step.x0_final - step.x0_mcg).abs()
    assert moved.max() <= 0.02 * (1 + 1e-5)
    assert moved.max() > 0.019  # the first Adam step is lr * g / (|g| + 1e-8): ~lr wherever g is not tiny


def test_adam_offset_matches_torch_adam(field):
    *_, agg, _, _, _, x0_star, step = _one_step(field, "ve", adam_steps=3, lr=0.02)
    b = torch.zeros_like(step.x0_mcg, requires_grad=True)
    opt = torch.optim.Adam([b], lr=0.02)
    for _ in range(3):
        opt.zero_grad()
        agg.loss(step.x0_mcg + b, x0_star).sum().backward()
        opt.step()
    torch.testing.assert_close(step.x0_final - step.x0_mcg, b.detach(), rtol=1e-4, atol=1e-7)
    assert (agg.loss(step.x0_final, x0_star) < agg.loss(step.x0_mcg, x0_star)).all()


def test_code_compat_makes_the_adam_step_a_no_op(field):
    *_, step = _one_step(field, "vp", adam_steps=1, code_compat=True)
    assert torch.equal(step.x0_final, step.x0_mcg)
    sde, x_src = SDES["vp"], field.sample(2, _gen(0))
    losses = (MSELoss(field.sample(2, _gen(1)), 10.0),)
    run = lambda **kw: AGGSampler(steps=8, t_edit=4, lambda_reg=1.0, losses=losses, **kw)(score_of(field, sde), sde, x_src)
    assert torch.equal(run(adam_steps=1, code_compat=True), run(adam_steps=0))
    assert not torch.allclose(run(adam_steps=1), run(adam_steps=0))


# ---- the whole sampler ----------------------------------------------------------------------------------
@pytest.mark.parametrize("t_edit", [0, 1, 4, 8])
def test_number_of_guided_steps_is_t_edit(field, t_edit):
    sde = SDES["ve"]
    calls = []

    def score_fn(x, t):
        calls.append(torch.is_grad_enabled() and x.requires_grad)
        return field.score(x, t, sde)

    with torch.no_grad():  # the sampler must enable grad itself for the MCG step
        out = AGGSampler(steps=8, t_edit=t_edit, lambda_reg=1.0)(score_fn, sde, field.sample(1, _gen(0)))
    assert sum(calls) == t_edit and len(calls) == 16 and not out.requires_grad
    assert not any(calls[:8]) and all(calls[8:8 + t_edit])  # inversion first, then the first t_edit reverse steps


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_regulariser_keeps_the_source_structure(field, name):
    sde, x_src = SDES[name], field.sample(2, _gen(0))
    style = (MSELoss(field.sample(2, _gen(1)), weight=100.0),)
    dist = {}
    for lam in (0.0, 10.0):
        out = AGGSampler(steps=30, t_edit=10, lambda_reg=lam, losses=style)(score_of(field, sde), sde, x_src)
        dist[lam] = (out - x_src).pow(2).mean().sqrt().item()
    assert dist[10.0] < 0.9 * dist[0.0]  # measured ratios 0.79 (VE), 0.81 (VP)


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_consistency_loss_moves_measurements_towards_y(field, name):
    sde = SDES[name]
    problem = GaussianInverseProblem.super_resolution(field, factor=2)
    _, y = problem.sample(2, _gen(6))
    x_src = field.sample(2, _gen(7))  # an unrelated prior draw: only the guidance can bring A(x) to y
    agg = AGGSampler(steps=20, t_edit=20, lambda_reg=0.0, losses=(ConsistencyLoss(problem.apply, y, 1.0),))
    out = agg(score_of(field, sde), sde, x_src)
    before, after = (problem.apply(x_src) - y).norm(), (problem.apply(out) - y).norm()
    assert after < 0.35 * before  # measured 0.13 (VE), 0.18 (VP)


def test_eta_draws_noise_from_the_generator(field):
    sde, x_src = SDES["vp"], field.sample(1, _gen(0))
    agg = AGGSampler(steps=6, t_edit=2, eta=0.8, lambda_reg=1.0)
    run = lambda seed: agg(score_of(field, sde), sde, x_src, generator=_gen(seed))
    assert torch.equal(run(1), run(1))
    # replayed by hand: inversion, then the guided and plain steps, each drawing from the generator
    score_fn, g = score_of(field, sde), _gen(2)
    x, stored = agg.invert(score_fn, sde, x_src)
    grid = agg.time_grid(sde)
    for k in range(agg.steps):
        t, t_next = grid[agg.steps - k].expand(1), grid[agg.steps - k - 1].expand(1)
        if k < agg.guided_steps:
            x = agg.guided_step(score_fn, sde, x, t, t_next, stored.pop() if k > 0 else None, g).x_next
        else:
            x = agg.ddim_step(score_fn, sde, x, t, t_next, g)
    torch.testing.assert_close(run(2), x)
    assert (run(1) - run(2)).abs().max() > 1e-3


# ---- losses -----------------------------------------------------------------------------------------------
def test_builtin_losses_values(field):
    x, other = field.sample(3, _gen(0)), field.sample(3, _gen(1))
    torch.testing.assert_close(l1(x, other), (x - other).abs().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(L1Loss(other, 2.0)(x), 2 * (x - other).abs().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(MSELoss(other[:1], 3.0)(x), 3 * (x - other[:1]).pow(2).mean(dim=(1, 2, 3)))
    style = StatisticsLoss(x[:1], weight=1.0, gram_weight=1.0)
    assert style(x[:1]).abs().max() < 1e-10 and (style(other) > 0).all() and style(other).shape == (3,)
    shifted = x[:1] + 0.3  # mean off by 0.3, same std: loss = 0.3^2 per channel
    torch.testing.assert_close(StatisticsLoss(x[:1])(shifted), torch.tensor([0.09]), rtol=1e-4, atol=1e-6)
    rng = RangeLoss(0.0, 1.0, weight=1.0)
    inside, outside = torch.full((1, 1, 2, 2), 0.5), torch.tensor([[[[1.5, -0.5], [0.5, 0.5]]]])
    assert rng(inside).item() == 0.0 and rng(outside).item() == pytest.approx(0.125)
    cons = ConsistencyLoss(lambda v: 2 * v, 2 * other, weight=0.5)
    torch.testing.assert_close(cons(x), 0.5 * (2 * x - 2 * other).pow(2).sum(dim=(1, 2, 3)))


@pytest.mark.parametrize("cls, kwargs", [
    (ClipDirectionalLoss, dict(target_text="a dog", source_text="a cat", source_image=torch.rand(1, 3, 8, 8))),
    (DinoClsLoss, dict(target_image=torch.rand(1, 3, 8, 8))),
])
def test_feature_losses_fail_at_construction(tmp_path, cls, kwargs):
    with pytest.raises(ValueError, match="weights") as err:
        cls(weights=tmp_path / "missing.pt", **kwargs)
    assert "\n" not in str(err.value)
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as err:  # package missing here, or weights that do not load
        cls(weights=bogus, **kwargs)
    assert "\n" not in str(err.value) and ("not installed" in str(err.value) or "could not load" in str(err.value))


@pytest.mark.parametrize("kwargs, word", [
    (dict(steps=0), "steps"), (dict(t_edit=5, steps=4), "t_edit"), (dict(eta=1.5), "eta"),
    (dict(lambda_reg=-1.0), "lambda_reg"), (dict(losses=(3,)), "losses"), (dict(adam_steps=-1), "adam_steps"),
    (dict(lr=0.0), "lr"), (dict(t_start=-0.5), "t_start"),
])
def test_bad_arguments_name_themselves(kwargs, word):
    with pytest.raises(ValueError, match=word):
        AGGSampler(**kwargs)


def test_build_agg_from_options(field, tmp_path):
    from PIL import Image

    path = tmp_path / "target.png"
    Image.fromarray((torch.rand(6, 6, 3) * 255).byte().numpy()).save(path)
    img = load_image(path, image_size=4, data_range=(-1.0, 1.0))
    import numpy as np

    pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(pixels, size=(4, 4), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(img, ref * 2 - 1)                       # msdiff.images: antialiased bicubic
    y = torch.zeros(1, 3, 4, 4)
    agg = build_agg(steps=10, t_edit=3, target=path, image_size=4, style=img, operator=lambda v: v, y=y, range_weight=1.0)
    kinds = [type(loss).__name__ for loss in agg.losses]
    assert kinds == ["MSELoss", "StatisticsLoss", "ConsistencyLoss", "RangeLoss"] and agg.t_edit == 3
    with pytest.raises(ValueError, match="operator, y"):
        build_agg(operator=lambda v: v)
    with pytest.raises(ValueError, match="target"):
        build_agg(target=tmp_path / "nope.png")
    with pytest.raises(ValueError, match="t_start"):
        AGGSampler(steps=4, t_edit=1, t_start=2.0)(lambda x, t: -x, SDES["vp"], torch.zeros(1, 1, 2, 2))
