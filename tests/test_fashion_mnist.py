"""Fashion-MNIST: the IDX reader, data/prepare_fashion_mnist.py and the dataset on tiny IDX files
written here (gzip and plain), one fast_dev_run step of every configs/fmnist_*.yaml on that data, and
the one-channel (grey) path through tasks, metrics and grids, checked by value against the same
computation on the image repeated to RGB."""
from __future__ import annotations

import gzip
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import CONFIGS, REPO, resolved_config, run_train
from msdiff.datasets import FashionMNIST, Shapes
from msdiff.datasets.fashion_mnist import pad_to, read_idx
from msdiff.images import sample_grid
from msdiff.metrics import diversity, psnr, ssim
from msdiff.tasks import Edges, Inpainting, SuperResolution, luminance

sys.path.insert(0, str(REPO / "data"))
import prepare_fashion_mnist  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|LeafSpec|litlogger|ckpt_path|no pre-optimization state).*")

N_TRAIN, N_TEST, HOLDOUT = 24, 10, 10
FMNIST_CONFIGS = sorted(p.stem for p in CONFIGS.glob("fmnist_*.yaml"))


def idx_bytes(a: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: (n, 28, 28) images (magic 2051) or (n,) labels (2049)."""
    magic = 2051 if a.ndim == 3 else 2049
    return b"".join(int(v).to_bytes(4, "big") for v in (magic, *a.shape)) + a.astype(np.uint8).tobytes()


def tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"train-images-idx3-ubyte": g.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
            "train-labels-idx1-ubyte": (np.arange(N_TRAIN) % 10).astype(np.uint8),
            "t10k-images-idx3-ubyte": g.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": (np.arange(N_TEST) % 10).astype(np.uint8)}


def write_tiny(folder: Path, gz: set[str] | None = None) -> dict[str, np.ndarray]:
    """Write the four tiny IDX files; names in `gz` gzip-compressed (default: the training pair)."""
    gz = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte"} if gz is None else gz
    folder.mkdir(parents=True, exist_ok=True)
    arrays = tiny_arrays()
    for name, a in arrays.items():
        if name in gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(idx_bytes(a))
        else:
            (folder / name).write_bytes(idx_bytes(a))
    return arrays


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """data/prepare_fashion_mnist.py's output for the tiny files (gzip training pair, plain test pair)."""
    src, dst = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("fm") / "fashion_mnist"
    arrays = write_tiny(src)
    assert prepare_fashion_mnist.main(["--src", str(src), "--dst", str(dst), "--holdout", str(HOLDOUT)]) == 0
    return dst, arrays


# ---- IDX files and the preparation script ------------------------------------------------------------
@pytest.mark.parametrize("compressed", [True, False])
def test_read_idx_gzip_and_plain(tmp_path, compressed):
    arrays = write_tiny(tmp_path, gz=set(tiny_arrays()) if compressed else set())
    suffix = ".gz" if compressed else ""
    images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    labels = read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert images.shape == (N_TRAIN, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(labels, np.arange(N_TRAIN) % 10)


@pytest.mark.parametrize("raw, expected", [
    (b"\x00\x00\x08", "too short"),
    ((2052).to_bytes(4, "big") + bytes(12), "magic 2052"),
    ((2051).to_bytes(4, "big") + (2).to_bytes(4, "big"), "too short for the 16-byte IDX header"),
    (idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-5], "1568 values, the file holds 1563"),
])
def test_read_idx_malformed_names_the_file(tmp_path, raw, expected):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=expected) as e:
        read_idx(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="unreadable") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_prepare_writes_files_and_cut_folders(tiny_root):
    dst, arrays = tiny_root
    # the four files copied unchanged (compression kept), readable again
    np.testing.assert_array_equal(read_idx(dst / "train-images-idx3-ubyte.gz"), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(read_idx(dst / "t10k-labels-idx1-ubyte"), arrays["t10k-labels-idx1-ubyte"])
    # CUT domains: sneakers (7) -> A, ankle boots (9) -> B, train split = first N_TRAIN - HOLDOUT images
    expected = {"trainA": [7], "trainB": [9], "testA": [7], "testB": [9]}  # labels are index % 10
    for folder, idx in expected.items():
        files = sorted((dst / folder).glob("*.png"))
        assert [int(f.stem) for f in files] == idx, folder
        official = arrays["train-images-idx3-ubyte" if folder.startswith("train") else "t10k-images-idx3-ubyte"]
        png = np.asarray(Image.open(files[0]))
        assert png.shape == (32, 32)
        np.testing.assert_array_equal(png, np.pad(official[idx[0]], 2))  # 2 black pixels each side, no resampling


def test_prepare_missing_file_one_line(tmp_path, capsys):
    write_tiny(tmp_path / "src")
    (tmp_path / "src" / "t10k-images-idx3-ubyte").unlink()
    assert prepare_fashion_mnist.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "t10k-images-idx3-ubyte" in err and "not found" in err


def test_prepare_malformed_file_one_line(tmp_path, capsys):
    write_tiny(tmp_path / "src")
    bad = tmp_path / "src" / "t10k-labels-idx1-ubyte"
    bad.write_bytes(idx_bytes(np.zeros(N_TEST - 1, np.uint8)))  # one label short of the images
    assert prepare_fashion_mnist.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "9 labels for the 10 images" in err


# ---- the dataset -------------------------------------------------------------------------------------
def test_dataset_splits_padding_and_classes(tiny_root):
    dst, arrays = tiny_root
    kw = dict(root=str(dst), holdout=HOLDOUT, flip=False)
    train, val, test = (FashionMNIST(s, SuperResolution(4), **kw) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (N_TRAIN - HOLDOUT, HOLDOUT, N_TEST)
    item = val[2]  # the official training image N_TRAIN - HOLDOUT + 2
    want = np.pad(arrays["train-images-idx3-ubyte"][N_TRAIN - HOLDOUT + 2], 2).astype(np.float64) / 255.0
    assert item["x"].shape == (1, 32, 32)
    np.testing.assert_allclose(item["x"][0].numpy(), want, atol=1e-7)
    assert torch.equal(item["y"], SuperResolution(4)(item["x"][None])[0])
    shoes = FashionMNIST("train", None, classes=[5, 7, 9], **kw)
    assert [shoes.label(i) for i in range(len(shoes))] == [5, 7, 9]  # labels of the first 14 are i % 10
    assert [int(i) for i in shoes.indices] == [5, 7, 9]
    assert FashionMNIST("val", None, image_size=30, **kw).load(2, None)[0].shape == (1, 30, 30)  # 1 pixel each side
    for bad in (31, 26):  # odd margin, smaller than 28
        with pytest.raises(ValueError, match=f"image_size={bad}"):
            FashionMNIST("train", None, image_size=bad, **kw)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FashionMNIST("train", None, root=str(dst / "nowhere"))


@pytest.mark.parametrize("split, official, lo, hi", [("train", "train", 0, N_TRAIN - HOLDOUT),
                                                    ("val", "train", N_TRAIN - HOLDOUT, N_TRAIN),
                                                    ("test", "t10k", 0, N_TEST)])
def test_class_subsets_on_every_split_by_value(tiny_root, split, official, lo, hi):
    """`classes` selects within each split's own range of its official file (labels are index % 10):
    the footwear images of train 0..13, val 14..23 (15, 17, 19) and test 0..9, with their pixels."""
    dst, arrays = tiny_root
    shoes = FashionMNIST(split, None, classes=[5, 7, 9], root=str(dst), holdout=HOLDOUT, flip=False)
    want = [i for i in range(lo, hi) if i % 10 in (5, 7, 9)]
    assert [int(i) for i in shoes.indices] == want and len(shoes) == len(want)
    assert [shoes.label(i) for i in range(len(shoes))] == [i % 10 for i in want]
    images = arrays[f"{official}-images-idx3-ubyte"]
    for k, i in enumerate(want):
        # uint8 / 255 in float32 against float64: one float32 rounding, 6e-8 at most
        np.testing.assert_allclose(shoes.load(k, None)[0][0].numpy(), np.pad(images[i], 2) / 255.0, rtol=0, atol=1e-7)


def test_pad_to_keeps_pixels():
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).view(2, 28, 28)
    p = pad_to(x, 32)
    assert torch.equal(p[:, 2:30, 2:30], x) and p.sum() == x.sum()


# ---- every new config, one step on the tiny data -----------------------------------------------------
def tiny_fmnist_config(name: str, root: Path, out: Path) -> Path:
    cfg = resolved_config(name)
    data, model = cfg["data"]["init_args"], cfg["model"]["init_args"]
    if "CUTSystem" in cfg["model"]["class_path"]:
        model.update(ngf=8, ndf=8, n_blocks=2, num_patches=16, netf_nc=16)
        data.update(root=str(root), batch_size=1, num_val_images=1)
    else:
        data["dataset"]["init_args"].update(root=str(root), holdout=HOLDOUT)
        data.update(batch_size=2, val_batch_size=2, val_size=2)
        model["net"]["init_args"].update(ch=32, ch_mult=[1], num_res_blocks=1, attn_resolutions=[])
        model.update(sampler={"class_path": "msdiff.samplers.DDIM", "init_args": {"steps": 2}}, sample_grid_size=2)
    cfg["trainer"].update(enable_progress_bar=False, enable_model_summary=False, logger=False)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_all_fmnist_configs_listed():
    assert FMNIST_CONFIGS == sorted(
        ["fmnist_sr4x_cde", "fmnist_sr4x_cdiffe", "fmnist_sr4x_cmde", "fmnist_sr4x_vscmde", "fmnist_inpaint_cde",
         "fmnist_inpaint_cmde", "fmnist_edges_cde", "fmnist_edges_cmde", "fmnist_cut", "fmnist_fastcut"])


@pytest.mark.parametrize("name", FMNIST_CONFIGS)
def test_fmnist_config_fast_dev_run(name, tiny_root, tmp_path):
    cfg = tiny_fmnist_config(name, tiny_root[0], tmp_path)
    assert run_train(["--config", cfg, "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", tmp_path / "runs"]) == 0


@pytest.mark.parametrize("name", [n for n in FMNIST_CONFIGS if "cut" not in n])
def test_fmnist_config_values(name):
    """One grey channel end to end, sigma_max_x = sqrt(1 * 32 * 32), and the paper's sigma_max_y."""
    cfg = resolved_config(name)
    m = cfg["model"]["init_args"]
    net, est = m["net"]["init_args"], m["estimator"]
    joint = est["class_path"].rsplit(".", 1)[-1] != "CDE"
    assert m["x_channels"] == 1 and net["in_channels"] == 2 and net["out_channels"] == (2 if joint else 1)
    sde = est["init_args"]["sde"]["init_args"]
    x_sde = sde.get("x", {}).get("init_args", sde)
    assert x_sde["sigma_max"] == pytest.approx(math.sqrt(32 * 32))
    if est["class_path"].endswith(".CMDE"):
        want = {"sr4x": 0.5, "inpaint": 1.0, "edges": 1.0}[name.split("_")[1]]
        assert sde["y"]["init_args"]["sigma_max"] == want
    if est["class_path"].endswith(".VSCMDE"):
        assert est["init_args"]["sigma_max_y_target"] == 0.5
        assert est["init_args"]["reach_target_steps"] == cfg["trainer"]["max_steps"] // 5


# ---- the grey path: tasks, metrics, grids ------------------------------------------------------------
def grey_batch(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_tasks_on_one_channel_equal_the_rgb_replicate():
    x, s = grey_batch(0), grey_batch(1)
    rgb, s_rgb = x.expand(-1, 3, -1, -1), s.expand(-1, 3, -1, -1)
    sr = SuperResolution(4)
    y = sr(x)
    assert y.shape == (3, 1, 32, 32)
    torch.testing.assert_close(y, sr(rgb)[:, :1], rtol=0, atol=0)
    # PSNR averages the squared error over channels: three equal channels give the same value
    torch.testing.assert_close(sr.consistency(s, y), sr.consistency(s_rgb, sr(rgb)))
    inp = Inpainting(0.25)
    meas = inp.measure(x, torch.Generator().manual_seed(3))
    mask = meas["mask"]
    assert mask.shape == (3, 1, 32, 32) and int(mask[0].sum()) == 32 * 32 - 16 * 16
    torch.testing.assert_close(meas["y"], x * mask, rtol=0, atol=0)
    mse = ((s - x).square() * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
    torch.testing.assert_close(inp.consistency(s, meas["y"], mask), 10 * torch.log10(1 / mse))
    e1, e3 = Edges(channels=1), Edges(channels=3)
    torch.testing.assert_close(e1(x), e3(rgb)[:, :1], rtol=0, atol=1e-6)  # luma of equal channels = the grey
    torch.testing.assert_close(e1.consistency(s, e1(x)), e3.consistency(s_rgb, e3(rgb)), rtol=0, atol=1e-3)


def test_metrics_on_one_channel_equal_the_rgb_replicate():
    x, s = grey_batch(0), grey_batch(1)
    rgb = lambda v: v.expand(-1, 3, -1, -1)  # noqa: E731
    torch.testing.assert_close(psnr(s, x), psnr(rgb(s), rgb(x)))
    mse = (s.double() - x.double()).square().flatten(1).mean(1)
    torch.testing.assert_close(psnr(s, x), 10 * torch.log10(1 / mse))
    torch.testing.assert_close(ssim(s, x), ssim(rgb(s), rgb(x)))
    draws = torch.stack([s, x])  # (K=2, B, 1, H, W): unbiased std over two draws = |a - b| / sqrt(2)
    torch.testing.assert_close(diversity(draws), (s - x).double().abs().mul(255 / 2**0.5).flatten(1).mean(1))
    torch.testing.assert_close(diversity(draws), diversity(torch.stack([rgb(s), rgb(x)])))


def test_grids_of_one_channel(tmp_path):
    x, y, s = grey_batch(0), grey_batch(1), grey_batch(2)
    g = sample_grid(y, s[None], x, pad=2)  # [y | sample | x] with a 2-pixel white border
    assert g.shape == (3, 3 * 34, 3 * 34)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])  # grey shown as equal RGB channels
    assert torch.equal(g[0, 34:66, 0:32], y[1, 0]) and torch.equal(g[0, 34:66, 34:66], s[1, 0])
    assert torch.equal(g[0, 34:66, 68:100], x[1, 0]) and torch.equal(g[0, 32:34], torch.ones(2, 102))


def test_score_system_grid_keeps_one_channel():
    """ScoreSystem's TensorBoard grid at x_channels 1: sample.py's padded [y | draw | x] grid, grey shown
    as equal RGB channels, with the y and x columns exact."""
    from msdiff.estimators import CDE
    from msdiff.nn.unet import UNet
    from msdiff.samplers import DDIM
    from msdiff.sde import VESDE
    from msdiff.systems.score import ScoreSystem

    net = UNet(in_channels=2, out_channels=1, ch=32, ch_mult=[1], num_res_blocks=1, attn_resolutions=[], image_size=32)
    system = ScoreSystem(net=net, estimator=CDE(VESDE(0.005, 32.0)), sampler=DDIM(steps=2), x_channels=1)
    x = grey_batch(0)[:2]
    y = SuperResolution(4)(x)
    grid = system.log_sample_grid(x, y)
    assert grid.shape == (3, 2 * 34, 3 * 34)  # 2-pixel padding, as test_grids_of_one_channel
    assert torch.equal(grid[0], grid[1]) and torch.equal(grid[1], grid[2])
    assert torch.equal(grid[0, 34:66, 0:32], y[1, 0]) and torch.equal(grid[0, 34:66, 68:100], x[1, 0])
    s = grid[0, 34:66, 34:66]
    assert 0 <= s.min() and s.max() <= 1 and s.std() > 0


def test_shapes_grey_is_the_luma():
    rgb = Shapes("val", None, image_size=16, length=2)
    grey = Shapes("val", None, image_size=16, length=2, channels=1)
    a, b = rgb.load(1, None)[0], grey.load(1, None)[0]
    assert b.shape == (1, 16, 16)
    w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    torch.testing.assert_close(b, (a * w).sum(0, keepdim=True))
    torch.testing.assert_close(b, luminance(a[None])[0])
