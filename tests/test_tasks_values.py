"""Tasks (msdiff.tasks) by value on non-square images: SR sizes and values, the inpainting hole's
sides, Sobel edge magnitudes where they do not saturate, the luma weights and the Gaussian blur."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msdiff.tasks import Edges, Inpainting, SuperResolution, luminance, masked_psnr, resize


def _images(b=2, c=3, h=8, w=12, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_super_resolution_non_square():
    x = _images(h=8, w=12)
    sr = SuperResolution(factor=2)
    low = sr.forward_operator(x)
    ref = F.interpolate(x, size=(4, 6), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(low, ref, rtol=1e-9, atol=1e-9)
    y = sr(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref.clamp(0, 1).repeat_interleave(2, -2).repeat_interleave(2, -1))
    torch.testing.assert_close(sr.low_res(y), ref.clamp(0, 1))
    # consistency: PSNR between A(sample) and the low-res condition, by hand
    other = _images(h=8, w=12, seed=3)
    mse = (sr.forward_operator(other).clamp(0, 1) - ref.clamp(0, 1)).square().flatten(1).mean(1)
    torch.testing.assert_close(sr.consistency(other, y), 10 * torch.log10(1 / mse))
    # resize itself on a non-square batch, both directions, against torch
    torch.testing.assert_close(resize(x, (5, 7), clamp=False),
                               F.interpolate(x, size=(5, 7), mode="bicubic", antialias=True), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="8x10"):
        SuperResolution(4)(_images(h=8, w=10))


def test_inpainting_non_square_hole_sides_and_positions():
    task = Inpainting(hole_fraction=0.25)
    assert task.hole_size(8, 16) == (4, 8) and task.hole_size(12, 4) == (6, 2)
    x = _images(b=200, h=8, w=16)
    mask = task.measure(x, torch.Generator().manual_seed(0))["mask"]
    hole = 1 - mask[:, 0]
    assert (hole.flatten(1).sum(1) == 32).all()
    rows, cols = hole.amax(2), hole.amax(1)  # (B, H), (B, W)
    assert (rows.sum(1) == 4).all() and (cols.sum(1) == 8).all()
    # a rectangle: every row of the hole spans the same 8 columns
    assert torch.equal(hole.sum(2).amax(1), torch.full((200,), 8.0, dtype=hole.dtype))
    tops, lefts = rows.argmax(1), cols.argmax(1)
    assert set(tops.tolist()) == set(range(5)) and set(lefts.tolist()) == set(range(9))  # every offset
    # the hole is exactly [top, top+4) x [left, left+8)
    for i in range(5):
        want = torch.ones(8, 16, dtype=mask.dtype)
        want[tops[i] : tops[i] + 4, lefts[i] : lefts[i] + 8] = 0
        assert torch.equal(mask[i, 0], want)


def test_inpainting_consistency_by_value():
    x = _images(b=2, h=6, w=10)
    task = Inpainting(0.25, fill=0.25)
    mask = torch.ones(2, 1, 6, 10, dtype=x.dtype)
    mask[0, :, 1:4, 2:7] = 0
    mask[1, :, 3:6, 0:5] = 0
    y = task(x, mask=mask)
    torch.testing.assert_close(y, torch.where(mask.bool(), x, torch.full_like(x, 0.25)))
    sample = x + 0.1 * _images(b=2, h=6, w=10, seed=5)
    err = ((sample - x) ** 2 * mask).flatten(1).sum(1) / (3 * mask.flatten(1).sum(1))
    torch.testing.assert_close(task.consistency(sample, y, mask), 10 * torch.log10(1 / err))
    torch.testing.assert_close(masked_psnr(sample, y, mask, data_range=2.0), 10 * torch.log10(4 / err))


def _ramps(h, w, c1, c2):
    """RGB: red ramps along columns (c1 per pixel), blue along rows (c2 per pixel), green constant."""
    cols = torch.arange(w, dtype=torch.float64).view(1, w).expand(h, w)
    rows = torch.arange(h, dtype=torch.float64).view(h, 1).expand(h, w)
    return torch.stack([0.1 + c1 * cols, torch.full((h, w), 0.4, dtype=torch.float64), 0.2 + c2 * rows])[None]


def test_luminance_weights():
    x = _ramps(3, 4, 0.1, 0.05)
    want = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(luminance(x)[:, 0], want)


def test_edge_magnitude_on_ramps_by_hand():
    """Interior of a linear luma ramp v = 0.1 + 0.299 c1 col + 0.114 c2 row: Sobel gives
    gx = 8 * 0.299 c1, gy = 8 * 0.114 c2, magnitude |g| / (4 sqrt 2); values far from saturation."""
    h, w, c1, c2 = 7, 11, 0.05, 0.08
    x = _ramps(h, w, c1, c2)
    m = Edges(threshold=None, sigma=0.0, invert=False, channels=1).forward_operator(x)
    assert m.shape == (1, 1, h, w)
    gx, gy = 8 * 0.299 * c1, 8 * 0.114 * c2
    want = math.sqrt(gx**2 + gy**2 + 1e-12) / (4 * math.sqrt(2))
    inner = m[0, 0, 1:-1, 1:-1]
    torch.testing.assert_close(inner, torch.full_like(inner, want), rtol=1e-9, atol=1e-12)
    # first column (replicate padding): gx is half as large
    want_edge = math.sqrt((gx / 2) ** 2 + gy**2 + 1e-12) / (4 * math.sqrt(2))
    torch.testing.assert_close(m[0, 0, 1:-1, 0], torch.full((h - 2,), want_edge, dtype=m.dtype), rtol=1e-9, atol=1e-12)
    # soft threshold and inversion, 3 channels
    e = Edges(threshold=want - 0.01, softness=0.02, sigma=0.0, invert=True, channels=3).forward_operator(x)
    assert e.shape == (1, 3, h, w)
    s = 1 - 1 / (1 + math.exp(-0.01 / 0.02))
    torch.testing.assert_close(e[0, :, 3, 5], torch.full((3,), s, dtype=e.dtype), rtol=1e-9, atol=1e-12)


def test_edge_blur_is_the_normalised_gaussian():
    """sigma = 1.3: radius ceil(2 sigma) = 3, taps exp(-k^2 / (2 sigma^2)) normalised, separable."""
    sigma = 1.3
    task = Edges(sigma=sigma)
    v = torch.zeros(1, 1, 9, 13, dtype=torch.float64)
    v[0, 0, 4, 6] = 1.0
    k = torch.exp(-0.5 * (torch.arange(-3, 4, dtype=torch.float64) / sigma) ** 2)
    k = k / k.sum()
    want = torch.zeros(9, 13, dtype=torch.float64)
    want[1:8, 3:10] = k[:, None] * k[None, :]
    torch.testing.assert_close(task._blur(v)[0, 0], want, rtol=1e-12, atol=1e-14)


def test_random_pixel_holes_on_non_square_images():
    task = Inpainting(hole_fraction=0.25, mode="random_pixels")
    mask = task.mask((5, 3, 8, 16), torch.Generator().manual_seed(0))
    assert mask.shape == (5, 1, 8, 16)
    assert ((1 - mask).flatten(1).sum(1) == 32).all()  # round(0.25 * 8 * 16)
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 5  # a different draw per image


def test_sr_consistency_clamps_the_sample_measurement():
    """A sharp sample makes bicubic downsampling overshoot [0, 1]; the consistency compares the
    clamped measurement (as y itself was clamped), not the overshooting one."""
    x = torch.zeros(1, 1, 8, 12, dtype=torch.float64)
    x[..., :, 5:] = 1.0
    x[..., 3:5, :] = 1 - x[..., 3:5, :]
    sr = SuperResolution(factor=2)
    low = sr.forward_operator(x)
    assert low.max() > 1.0 or low.min() < 0.0
    y = sr(_images(b=1, c=1, h=8, w=12, seed=4))
    want = 10 * torch.log10(1 / (low.clamp(0, 1) - sr.low_res(y)).square().mean())
    assert sr.consistency(x, y).item() == pytest.approx(want.item(), rel=1e-9)
    unclamped = 10 * torch.log10(1 / (low - sr.low_res(y)).square().mean())
    assert abs(unclamped.item() - want.item()) > 1e-4


def test_condition_protocol_by_value():
    """What `sample.py --input` and AGG's consistency loss ask of a task: the measurement's size, the
    condition from a measurement (and mask), the condition back in measurement space."""
    from msdiff.datasets.field import GaussianProblemTask
    from msdiff.gaussian import GaussianField, GaussianInverseProblem

    x = _images(1, 3, 8, 12)
    sr, inp, edges = SuperResolution(4), Inpainting(0.25), Edges(channels=1)
    assert sr.measurement_shape((3, 8, 12)) == (3, 2, 3) and edges.measurement_shape((3, 8, 12)) == (1, 8, 12)
    assert inp.measurement_shape((3, 8, 12)) == (3, 8, 12) and inp.needs_mask and not sr.needs_mask
    with pytest.raises(ValueError, match="not divisible by factor 4"):
        sr.measurement_shape((3, 8, 10))
    low = torch.tensor([[[[0.1, 0.9]]]], dtype=torch.float64)                    # (1, 1, 1, 2) -> 4x8 blocks
    y = sr.condition_from_measurement(low)["y"]
    assert y.shape == (1, 1, 4, 8) and torch.equal(y[..., :4], torch.full((1, 1, 4, 4), 0.1, dtype=torch.float64))
    assert torch.equal(sr.measurement(y), low) and torch.equal(edges.measurement(y), y)
    mask = torch.ones(1, 1, 8, 12, dtype=torch.float64)
    mask[..., 2:6, 3:9] = 0
    cond = inp.condition_from_measurement(x, mask)
    assert torch.equal(cond["y"], x * mask) and cond["mask"] is mask
    with pytest.raises(ValueError, match="needs the mask"):
        inp.condition_from_measurement(x)
    problem = GaussianInverseProblem.super_resolution(GaussianField(channels=1, size=4), factor=2, noise_std=0.1)
    assert GaussianProblemTask(problem).gaussian_problem() is problem and sr.gaussian_problem() is None
