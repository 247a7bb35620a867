"""Tasks (msdiff.tasks): operators, masks, consistency; tiny shapes, seeded generators."""
import pytest
import torch
import torch.nn.functional as F

from msdiff.tasks import Edges, Inpainting, SuperResolution, masked_psnr


def _images(b=2, c=3, h=16, w=16, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_masked_psnr_matches_definition():
    a, b = _images(seed=1), _images(seed=2)
    mse = (a - b).square().flatten(1).mean(1)
    torch.testing.assert_close(masked_psnr(a, b), 10 * torch.log10(1 / mse))
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., :4, :] = 1
    mse_in = (a - b)[..., :4, :].square().flatten(1).mean(1)
    torch.testing.assert_close(masked_psnr(a, b, mask), 10 * torch.log10(1 / mse_in))


def test_super_resolution_is_blockwise_constant_and_antialiased():
    x = _images(h=32, w=32)
    sr = SuperResolution(factor=4)
    y = sr(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    low = sr.forward_operator(x)
    torch.testing.assert_close(low, F.interpolate(x, size=(8, 8), mode="bicubic", antialias=True), rtol=1e-5, atol=1e-6)
    # nearest-neighbour up: every 4x4 block of y is one low-res pixel
    torch.testing.assert_close(y, low.repeat_interleave(4, -2).repeat_interleave(4, -1))
    torch.testing.assert_close(sr.low_res(y), low)
    # antialiased: a pixel-scale checkerboard averages to ~0.5, plain subsampling would keep 0 or 1
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float().expand(1, 3, 32, 32)
    assert (sr.forward_operator(checker) - 0.5).abs().max() < 0.05
    # a constant image is left unchanged
    const = torch.full((1, 3, 32, 32), 0.3)
    torch.testing.assert_close(sr(const), const)


def test_super_resolution_consistency():
    x = _images(h=32, w=32)
    sr = SuperResolution(factor=4)
    y = sr(x)
    assert (sr.consistency(x, y) == 100.0).all()  # the ground truth is perfectly consistent
    # a sample with the right low-res content but different high frequencies is still consistent
    detail = x + 0.05 * (torch.arange(32) % 2).float()  # a Nyquist-rate pattern the low-pass removes
    assert (sr.consistency(detail.clamp(0, 1), y) > 28).all()
    assert (sr.consistency(torch.zeros_like(x), y) < 10).all()
    with pytest.raises(ValueError, match="not divisible"):
        sr(_images(h=30, w=30))


def test_inpainting_square_hole_has_exact_area_and_reproducible_position():
    task = Inpainting(hole_fraction=0.25)
    x = _images(b=64, h=16, w=16)
    out = task.measure(x, torch.Generator().manual_seed(3))
    mask = out["mask"]
    assert mask.shape == (64, 1, 16, 16)
    assert ((1 - mask).flatten(1).sum(1) == 64).all()  # 8x8 hole = exactly 25% of 16x16
    hole = (1 - mask)[:, 0]
    rows, cols = hole.amax(2), hole.amax(1)
    assert ((rows.sum(1) == 8) & (cols.sum(1) == 8)).all()  # one square, not scattered pixels
    tops = rows.argmax(1)
    assert tops.min() == 0 and tops.max() == 8 and len(tops.unique()) > 5  # uniform over all offsets
    torch.testing.assert_close(out["y"], x * mask)  # hole filled with 0, no mask channel
    again = task.measure(x, torch.Generator().manual_seed(3))["mask"]
    assert torch.equal(again, mask)
    # an explicit mask is honoured
    torch.testing.assert_close(task(x, mask=mask), out["y"])


def test_inpainting_random_pixels_and_consistency_use_the_real_mask():
    x = _images(b=3, h=16, w=16)
    task = Inpainting(hole_fraction=0.25, mode="random_pixels", fill=0.5)
    out = task.measure(x, torch.Generator().manual_seed(0))
    assert ((1 - out["mask"]).flatten(1).sum(1) == 64).all()
    hole = out["mask"] == 0
    assert torch.all(out["y"].masked_select(hole.expand_as(x)) == 0.5)
    # a sample equal to x outside the hole but anything inside it is perfectly consistent
    sample = torch.where(hole, torch.rand_like(x), x)
    assert (task.consistency(sample, out["y"], out["mask"]) == 100.0).all()
    other = task.mask(x.shape, torch.Generator().manual_seed(1))
    wrong = task.consistency(sample, out["y"], other)  # a fresh mask would count the hole's noise
    torch.testing.assert_close(wrong, masked_psnr(sample, out["y"], other))
    assert (wrong < 30).all()
    with pytest.raises(ValueError, match="mask"):
        task.consistency(sample, out["y"])


def test_edges_detects_a_step_and_is_differentiable():
    x = torch.zeros(1, 3, 16, 16)
    x[..., :, 8:] = 1.0  # a vertical step edge between columns 7 and 8
    task = Edges(threshold=0.1, sigma=0.0)
    e = task(x)
    assert e.shape == (1, 3, 16, 16) and e.min() >= 0 and e.max() <= 1
    # dark edges on white: low values at the step, ~1 in flat regions
    assert e[0, 0, :, 7:9].max() < 0.1 and e[0, 0, :, :5].min() > 0.99 and e[0, 0, :, 11:].min() > 0.99
    # differentiable: the gradient is the finite-difference directional derivative (float64)
    x2 = _images(b=1).double().requires_grad_(True)
    Edges()(x2).sum().backward()
    v = _images(b=1, seed=9).double()
    h = 1e-6
    fd = (Edges()(x2.detach() + h * v).sum() - Edges()(x2.detach() - h * v).sum()) / (2 * h)
    assert (x2.grad * v).sum().item() == pytest.approx(fd.item(), rel=1e-5)
    torch.testing.assert_close(Edges(threshold=0.1, sigma=0.0, channels=1)(x), e[:, :1])


def test_edges_consistency_compares_with_the_input_edge_map():
    x = _images(b=2, h=16, w=16)
    task = Edges()
    y = task(x)
    assert (task.consistency(x, y) == 100.0).all()
    blurred = F.avg_pool2d(x, 3, 1, 1)
    assert (task.consistency(blurred, y) < task.consistency(x, y)).all()
    torch.testing.assert_close(task.consistency(blurred, y), masked_psnr(task(blurred), y))


def test_sr_operator_keeps_its_gradient_out_of_range():
    # AGG's consistency loss differentiates A(x0_hat) where x0_hat leaves [0, 1]: no clamp inside A
    sr = SuperResolution(factor=2)
    x = torch.full((1, 1, 4, 4), 1.2, requires_grad=True)
    sr.forward_operator(x).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    F.interpolate(ref, size=(2, 2), mode="bicubic", antialias=True).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)  # the unclamped operator's gradient
    assert x.grad.abs().min() > 0
    assert sr.measure(x.detach())["y"].max() <= 1.0
