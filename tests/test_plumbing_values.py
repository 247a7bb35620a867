"""Small conversions by value (msdiff.utils, msdiff.images, msdiff.checkpoint_file, msdiff.gaussian):
ranges, 8-bit quantisation, the seed mixer, the sample grid's layout, PNG round trips, image listing
and reading, resizing, the checkpoint loader's errors (the per-example noise streams: test_example_noise.py)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import pytest
import torch.nn.functional as F

from msdiff.checkpoint_file import CorruptCheckpointError, load_checkpoint
from msdiff.images import IMAGE_EXTENSIONS, list_images, read_image, resize, sample_grid, write_png
from msdiff.utils import (append_dims, batch_mean, batch_sum, example_noise, image_to_tensor, make_generator,
                          mix_seed, quantize, tensor_to_uint8, to_symmetric_range, to_unit_range)


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


def test_grid_layout_by_value():
    b, k, h, w, pad = 2, 3, 4, 6, 2
    y = torch.rand(b, 1, 2, 3)  # a low-resolution, one-channel condition: nearest-upsampled, greyscale to RGB
    samples = torch.rand(k, b, 3, h, w) * 1.4 - 0.2  # out of range: clamped
    x = torch.rand(b, 3, h, w)
    grid = sample_grid(y, samples, x, pad=pad)
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
    write_png(img, tmp_path / "a.png")
    back = image_to_tensor(Image.open(tmp_path / "a.png"))
    torch.testing.assert_close(back, quantize(img))
    grey = torch.rand(1, 4, 3)
    write_png(grey, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "L"
    torch.testing.assert_close(image_to_tensor(Image.open(tmp_path / "g.png")), quantize(grey))


def test_mix_seed_is_seedsequence_read_as_one_63_bit_word():
    """The 64-bit word of SeedSequence's state, split into its two 32-bit halves by hand (little-endian):
    seed = (low << 31) ^ high. Pinned values: the training noise of old checkpoints and sample.py's
    per-condition noise come from these seeds."""
    for keys in [(0, 1, 2), (123, 4, 0), (2**40, 7), (5,)]:
        word = int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])
        assert mix_seed(*keys) == ((word & 0xFFFFFFFF) << 31) ^ (word >> 32)
        assert 0 <= mix_seed(*keys) < 2**63
    assert mix_seed(0, 1, 2) == 8340944691342176559
    assert mix_seed(-1, 5) == mix_seed(2**63 - 1, 5)  # keys modulo 2^63
    assert mix_seed(1, 2) != mix_seed(2, 1) and mix_seed(5) == mix_seed(5, 0)  # SeedSequence pads with zeros
    noise = example_noise(7, [3, 9], 2, "cpu")
    assert noise.keys.tolist() == [mix_seed(7, 3, 2), mix_seed(7, 9, 2)]


def test_image_files_round_trip_exactly_and_read_as_pil_converts(tmp_path):
    rng = np.random.default_rng(0)
    rgb, grey = rng.integers(0, 256, (5, 7, 3), np.uint8), rng.integers(0, 256, (4, 6), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    Image.fromarray(grey).save(tmp_path / "g.png")
    for name in ("c.png", "c.bmp"):  # torchvision's decoder and PIL's
        got = read_image(tmp_path / name)
        assert got.shape == (3, 5, 7) and np.array_equal((got * 255).round().byte().permute(1, 2, 0).numpy(), rgb)
        luma = np.asarray(Image.fromarray(rgb).convert("L"))
        assert torch.equal((read_image(tmp_path / name, channels=1)[0] * 255).round().byte(), torch.from_numpy(luma.copy()))
    g = read_image(tmp_path / "g.png")
    assert g.shape == (1, 4, 6) and torch.equal((g[0] * 255).round().byte(), torch.from_numpy(grey))
    assert torch.equal(read_image(tmp_path / "g.png", channels=3), g.expand(3, -1, -1))
    write_png(g, tmp_path / "g2.png")
    assert (tmp_path / "g2.png").read_bytes() and torch.equal(read_image(tmp_path / "g2.png"), g)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        read_image(tmp_path / "bad.png")


def test_list_images_sorted_filtered_and_one_line_errors(tmp_path):
    assert ".gif" in IMAGE_EXTENSIONS and ".tif" in IMAGE_EXTENSIONS  # the union of the two earlier sets
    for name in ("b.PNG", "a.jpg", "notes.txt", "sub/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.jpg", "b.PNG", "c.png"]
    with pytest.raises(ValueError, match=r"^--input_dir=.*nowhere: no such folder$"):
        list_images(tmp_path / "nowhere", "--input_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="root=.*empty: holds no images"):
        list_images(tmp_path / "empty", "root")


def test_resize_is_clamped_antialiased_bicubic():
    x = torch.rand(2, 3, 12, 10, generator=make_generator(0)).double()
    ref = F.interpolate(x, size=(5, 7), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(resize(x, (5, 7), clamp=False), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(resize(x, (5, 7)), ref.clamp(0, 1), rtol=1e-12, atol=1e-12)
    assert resize(x[0], 12).shape == (3, 12, 12) and resize(x, (12, 10)) is x


def test_load_checkpoint_errors_name_the_flag_and_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 3, "w": torch.arange(4.0)}, good)
    assert load_checkpoint(good)["global_step"] == 3
    torch.testing.assert_close(load_checkpoint(good, mmap=False)["w"], torch.arange(4.0))
    with pytest.raises(ValueError, match=r"^--ckpt_path .*nowhere.ckpt: no such checkpoint file$"):
        load_checkpoint(tmp_path / "nowhere.ckpt")
    data = bytearray(good.read_bytes())
    i = data.index(torch.arange(4.0).numpy().tobytes())  # a byte inside the tensor's storage
    data[i] ^= 0xFF
    (tmp_path / "flip.ckpt").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"^--resume .*flip.ckpt: corrupt checkpoint \(CRC-32"):
        load_checkpoint(tmp_path / "flip.ckpt", "--resume")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(ValueError, match=r"text.ckpt: corrupt or truncated"):
        load_checkpoint(tmp_path / "text.ckpt")
    with pytest.raises(ValueError, match=r"text.ckpt: not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "text.ckpt", verify=False)
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match=r"list.ckpt: not a checkpoint \(holds a list"):
        load_checkpoint(tmp_path / "list.ckpt")
