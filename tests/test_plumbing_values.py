"""Small conversions by value (msdiff.utils, msdiff.export): ranges, 8-bit quantisation, the sample
grid's layout, PNG round trips, per-row generators."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from msdiff.export import make_grid, save_png
from msdiff.utils import (append_dims, batch_mean, batch_sum, image_to_tensor, make_generator, quantize, randn,
                          tensor_to_uint8, to_symmetric_range, to_unit_range)


def test_ranges_and_quantisation():
    x = torch.tensor([-0.2, 0.0, 0.25, 0.5, 1.0, 1.3])
    torch.testing.assert_close(to_symmetric_range(x), 2 * x - 1)
    torch.testing.assert_close(to_unit_range(to_symmetric_range(x)), x)
    torch.testing.assert_close(quantize(x), torch.tensor([0.0, 0.0, 64 / 255, 128 / 255, 1.0, 1.0]))
    img = torch.tensor([[[0.0, 0.5], [0.999, 1.2]], [[0.1, 0.2], [0.3, -1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    a = tensor_to_uint8(img)
    assert a.shape == (2, 2, 3) and a.dtype == np.uint8
    assert a[:, :, 0].tolist() == [[0, 128], [255, 255]] and a[1, 0].tolist() == [255, 76, 0]
    torch.testing.assert_close(image_to_tensor(a), quantize(img))


def test_batch_helpers():
    v = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(batch_sum(v), torch.tensor([66.0, 210.0]))
    torch.testing.assert_close(batch_mean(v), torch.tensor([5.5, 17.5]))
    assert append_dims(torch.ones(2), 4).shape == (2, 1, 1, 1)


def test_per_row_generators_draw_each_row_from_its_own_stream():
    gens = [make_generator(3), make_generator(7)]
    out = randn((2, 5), gens)
    torch.testing.assert_close(out[0], torch.randn(5, generator=make_generator(3)))
    torch.testing.assert_close(out[1], torch.randn(5, generator=make_generator(7)))


def test_grid_layout_by_value():
    b, k, h, w, pad = 2, 3, 4, 6, 2
    y = torch.rand(b, 1, 2, 3)  # a low-resolution, one-channel condition: nearest-upsampled, greyscale to RGB
    samples = torch.rand(k, b, 3, h, w) * 1.4 - 0.2  # out of range: clamped
    x = torch.rand(b, 3, h, w)
    grid = make_grid(y, samples, x, pad=pad)
    assert grid.shape == (3, b * (h + pad), (k + 2) * (w + pad))
    for i in range(b):
        r0 = i * (h + pad)
        cell = lambda j: grid[:, r0 : r0 + h, j * (w + pad) : j * (w + pad) + w]  # noqa: E731
        up = y[i].repeat_interleave(2, -2).repeat_interleave(2, -1).expand(3, -1, -1)
        torch.testing.assert_close(cell(0), up)
        for j in range(k):
            torch.testing.assert_close(cell(j + 1), samples[j, i].clamp(0, 1))
        torch.testing.assert_close(cell(k + 1), x[i])
        assert (grid[:, r0 + h : r0 + h + pad] == 1).all()  # white separators
    assert (grid[:, :, w : w + pad] == 1).all()


def test_png_round_trip(tmp_path):
    img = torch.rand(3, 5, 7)
    save_png(img, tmp_path / "a.png")
    back = image_to_tensor(Image.open(tmp_path / "a.png"))
    torch.testing.assert_close(back, quantize(img))
    grey = torch.rand(1, 4, 3)
    save_png(grey, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "L"
    torch.testing.assert_close(image_to_tensor(Image.open(tmp_path / "g.png")), quantize(grey))
