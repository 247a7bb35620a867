"""msdiff.metrics against hand-computed values on tiny images (no pretrained weights needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from msdiff import metrics as M


def _const(v: float, shape=(1, 3, 16, 16)) -> torch.Tensor:
    return torch.full(shape, v, dtype=torch.float64)


def test_psnr_of_known_mse():
    x, x_hat = _const(0.0), _const(0.1)
    assert M.psnr(x_hat, x).item() == pytest.approx(20.0)              # mse 0.01 -> 20 dB
    assert M.psnr(x, x).item() == pytest.approx(100.0)                 # capped, not inf


@pytest.mark.parametrize("data_range", [1.0, 2.0, 255.0])
def test_psnr_at_several_data_ranges(data_range):
    """10 log10(L^2 / MSE) per image in float64 for images on [0, L] (numpy written here)."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(3, 3, 13, 21, generator=g) * data_range
    x_hat = (x + 0.05 * data_range * torch.randn(x.shape, generator=g)).clamp(0, data_range)
    a, b = x_hat.numpy().astype(np.float64), x.numpy().astype(np.float64)
    want = [10 * np.log10(data_range**2 / np.mean((a[i] - b[i]) ** 2)) for i in range(3)]
    got = M.psnr(x_hat, x, data_range=data_range)
    assert got.dtype == torch.float64 and np.allclose(got.numpy(), want, rtol=1e-12)
    assert 20 < float(got.mean()) < 30  # noise of 5% of the range: about 26 dB whatever the range


def test_ssim_identical_and_constant_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert torch.allclose(M.ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-6)
    # constant images: contrast/structure term is C2/C2 = 1, luminance (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    assert M.ssim(_const(a).float(), _const(b).float()).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_diversity_of_draws_with_known_std():
    base = torch.full((1, 2, 1, 4, 4), 128 / 255)
    d = 10 / 255
    draws = torch.cat([base - d, base + d])                             # (K=2, B=2, 1, 4, 4)
    # unbiased std of {-10, +10}: sqrt((100 + 100) / (2 - 1)) = 14.14 (the biased one would be 10)
    assert torch.allclose(M.diversity(draws), torch.full((2,), math.sqrt(200), dtype=torch.float64))


@pytest.mark.parametrize("k", [2, 5])
def test_diversity_is_the_unbiased_std_over_draws(k):
    """Per-pixel std over the K draws with ddof = 1 on 0-255, mean over pixels (numpy written here);
    the biased value is smaller by sqrt((K - 1) / K)."""
    g = torch.Generator().manual_seed(k)
    draws = torch.rand(k, 3, 3, 7, 9, generator=g)                      # (K, B, C, H, W)
    a = draws.numpy().astype(np.float64) * 255
    want = np.std(a, axis=0, ddof=1).reshape(3, -1).mean(1)
    got = M.diversity(draws).numpy()
    assert np.allclose(got, want, rtol=1e-12)
    biased = np.std(a, axis=0, ddof=0).reshape(3, -1).mean(1)
    assert not np.allclose(got, biased, rtol=1e-3)


def _structured(h: int, w: int, seed: int, data_range: float) -> torch.Tensor:
    """A (2, 3, h, w) batch with edges, gradients and texture on [0, data_range]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([(xx > 0.4).float(), yy, 0.5 + 0.5 * torch.sin(9 * xx + 5 * yy)])
    img = torch.stack([base, base.flip(-1)]) + 0.1 * torch.randn(2, 3, h, w, generator=g)
    return img.clamp(0, 1).double() * data_range


def _ssim_reference(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """The reference evaluation's SSIM of one (C, H, W) pair, written independently with scipy:
    Gaussian filter (sigma 1.5, radius 5), crop the 5-pixel border, mean map, mean over channels."""
    from scipy.ndimage import gaussian_filter

    f = lambda v: gaussian_filter(v, 1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_channel = []
    for u, v in zip(a, b):
        mu_u, mu_v = f(u), f(v)
        s_uu, s_vv, s_uv = f(u * u) - mu_u**2, f(v * v) - mu_v**2, f(u * v) - mu_u * mu_v
        m = (2 * mu_u * mu_v + c1) * (2 * s_uv + c2) / ((mu_u**2 + mu_v**2 + c1) * (s_uu + s_vv + c2))
        per_channel.append(m.mean())
    return float(np.mean(per_channel))


@pytest.mark.parametrize("data_range", [1.0, 2.0, 255.0])
@pytest.mark.parametrize("hw", [(24, 37), (40, 17)])
def test_ssim_is_the_reference_valid_window_ssim(data_range, hw):
    x = _structured(*hw, seed=1, data_range=data_range)
    x_hat = (x + 0.08 * data_range * torch.randn(x.shape, generator=torch.Generator().manual_seed(2),
                                                 dtype=torch.float64)).clamp(0, data_range)
    got = M.ssim(x_hat, x, data_range=data_range)
    want = [_ssim_reference(x_hat[i].numpy(), x[i].numpy(), data_range) for i in range(2)]
    assert np.allclose(got.numpy(), want, rtol=0, atol=1e-12), (got, want)
    # torchmetrics' full reflect-padded map is a different number (0.01-0.03 on such images)
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    full = tm_ssim(x_hat, x, data_range=data_range, reduction="none")
    assert (full - got).abs().max() > 2e-3


def test_ssim_does_not_depend_on_the_scale_when_the_range_scales():
    x = _structured(20, 31, seed=3, data_range=1.0)
    x_hat = x.flip(0)
    assert torch.allclose(M.ssim(x_hat * 255, x * 255, 255.0), M.ssim(x_hat, x, 1.0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        M.ssim(x[..., :10], x[..., :10])


class _LinearFeatures(nn.Module):
    """Features = the per-channel means of the image and of its square: 6-d, exact by hand."""

    def forward(self, v):
        return torch.cat([v.mean((2, 3)), v.square().mean((2, 3))], 1)


def _sqrtm_roundoff(c1: torch.Tensor, c2: torch.Tensor, n: int) -> float:
    """How far two float64 paths to the same Frechet distance may differ: the trace term
    tr((c1^1/2 c2 c1^1/2)^1/2) sums the square roots of the eigenvalues lam of M = c1^1/2 c2 c1^1/2.
    Covariances accumulated over n rows in a different order (sums of outer products vs torch.cov,
    another BLAS) differ by about n eps |c|, so M by delta = D n eps ||c1|| ||c2|| (Weyl), and
    sqrt(lam) by at most min(sqrt(delta), delta / (2 sqrt(lam))): negligible for a well-conditioned M,
    but sqrt(delta) ~ 1e-9 for a null eigenvalue (a covariance of n <= D rows is singular). Counted
    twice (the trace term enters as -2 cross)."""
    eps = torch.finfo(torch.float64).eps
    vals, vecs = torch.linalg.eigh(c1)
    r1 = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    lam = torch.linalg.eigvalsh(r1 @ c2 @ r1).clamp_min(0)
    delta = c1.shape[0] * n * eps * float(torch.linalg.matrix_norm(c1, 2) * torch.linalg.matrix_norm(c2, 2))
    per_eigenvalue = torch.minimum(torch.full_like(lam, math.sqrt(delta)), delta / (2 * lam.sqrt()))
    return 2 * float(per_eigenvalue.sum())


def _fid_protocol_case(n: int):
    """n conditions, 3 draws each offset differently (per-draw means differ from the real mean,
    pooled they cancel out); returns the metric's output and per-draw / pooled (FID, tolerance)."""
    g = torch.Generator().manual_seed(5)
    k = 3
    x = torch.rand(n, 3, 12, 12, generator=g)
    y = torch.rand(n, 3, 12, 12, generator=g)
    draws = torch.stack([(x + o + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1) for o in (-0.15, 0.0, 0.15)])
    feats = _LinearFeatures()
    m = M.ConditionalSampleMetrics(features=feats, draws=k)
    m.update(draws[:, :5], y[:5], x[:5], index=torch.arange(5))
    m.update(draws[:, 5:], y[5:], x[5:], index=torch.arange(5, n))
    out = m.compute()
    f = lambda v: feats(M.quantize(v)).double()  # float32 features, as the evaluator computes them
    fr, fy = f(x), feats(y).double()             # (the conditions are not quantised)
    ff = [f(draws[i]) for i in range(k)]

    def fid(a, b):
        c1, c2 = torch.cov(a.T), torch.cov(b.T)
        return M.frechet_distance(a.mean(0), c1, b.mean(0), c2), _sqrtm_roundoff(c1, c2, len(a))

    want = {"ufid": [fid(f, fr) for f in ff], "jfid": [fid(torch.cat([fy, f], 1), torch.cat([fy, fr], 1)) for f in ff],
            "ufid_pooled": fid(torch.cat(ff), fr),
            "jfid_pooled": fid(torch.cat([torch.cat([fy, f], 1) for f in ff]), torch.cat([fy, fr], 1))}
    return m, out, draws, x, y, want


def _check_fid_protocol(out: dict, want: dict) -> None:
    for name in ("ufid", "jfid"):
        # the mean over draws; the per-draw round-off bounds add up, divided by k
        per_draw = want[name]
        assert out[name] == pytest.approx(np.mean([v for v, _ in per_draw]), rel=1e-9,
                                          abs=np.mean([t for _, t in per_draw])), name
    for name in ("ufid_pooled", "jfid_pooled"):
        value, tol = want[name]
        assert out[name] == pytest.approx(value, rel=1e-9, abs=tol), name


def test_fid_protocol_is_the_mean_of_per_draw_distances():
    """UFID/JFID = mean over draws k of FID(draw k of every condition, targets), as the reference;
    the pooled value (all N*K samples at once) is different (lower here) and kept as *_pooled.
    12 conditions: the 12-d joint covariances of 12 rows are singular, so JFID's matrix square root
    holds only sqrt(eps)-scale agreement across paths (1.3e-10 of 0.056 measured on an AMD EPYC, bound
    1e-8: _sqrtm_roundoff)."""
    m, out, draws, x, y, want = _fid_protocol_case(12)
    _check_fid_protocol(out, want)
    value, tol = want["jfid_pooled"]
    assert 1e-11 < tol < 1e-6 * value  # sqrt(eps) scale: far below what a wrong formula changes (> 1e-3)
    assert out["ufid"] > 1.2 * out["ufid_pooled"]  # 0.0755 vs 0.0556
    with pytest.raises(ValueError, match="draws=3"):
        m.update(draws[:2], y, x)


def test_per_draw_fid_mean_by_value_on_well_conditioned_covariances():
    """40 conditions (more rows than the 12 joint dimensions): every covariance is well conditioned,
    the per-draw distances agree across paths to 1e-9, and UFID / JFID are their mean -- not the
    first draw's, not the pooled value, not a sum over k - 1."""
    _, out, _, _, _, want = _fid_protocol_case(40)
    assert all(t < 1e-10 for _, t in [*want["ufid"], *want["jfid"], want["ufid_pooled"], want["jfid_pooled"]])
    _check_fid_protocol(out, want)
    for name in ("ufid", "jfid"):
        per_draw = [v for v, _ in want[name]]
        assert max(per_draw) > 1.5 * min(per_draw)  # the draws' distances differ: a wrong mean shows
        assert out[name] > 1.1 * out[f"{name}_pooled"]


def test_per_image_values_follow_the_condition_index():
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    draws = torch.stack([(x + 0.1).clamp(0, 1), (x - 0.1).clamp(0, 1)])
    m = M.ConditionalSampleMetrics(task=_FakeTask(), draws=2)
    m.update(draws[:, 2:], x[2:], x[2:], index=torch.tensor([7]))      # out of order on purpose
    m.update(draws[:, :2], x[:2], x[:2], index=torch.tensor([3, 5]))
    out = m.compute()
    rows = m.per_image()
    assert [r["index"] for r in rows] == [3, 5, 7]
    q = M.quantize
    for r, i in zip(rows, [0, 1, 2]):
        want = [float(M.psnr(q(draws[d, i:i + 1]), q(x[i:i + 1]))) for d in range(2)]
        assert r["psnr"] == pytest.approx(want, rel=1e-12) and len(r["ssim"]) == 2 and r["lpips"] == [None, None]
        assert r["diversity"] == pytest.approx(float(M.diversity(q(draws[:, i:i + 1]))), rel=1e-12)
    assert out["psnr"] == pytest.approx(np.mean([v for r in rows for v in r["psnr"]]), rel=1e-12)
    # two processes' lists: merged in index order, a condition sampled twice (padding) kept once
    merged = M.merge_per_image([rows[1:], rows[:2]])
    assert [r["index"] for r in merged] == [3, 5, 7] and merged[1] == rows[1]
    m.reset()
    assert m.per_image() == []


def test_frechet_distance_of_known_gaussians():
    # 1-d: N(0, 1) vs N(1, 4): 1 + 1 + 4 - 2 * 2 = 2
    assert M.frechet_distance(torch.zeros(1), torch.eye(1), torch.ones(1), 4 * torch.eye(1)) == pytest.approx(2.0)
    # diagonal: sum (mu1 - mu2)^2 + sum (s1 - s2)^2
    s1, s2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    want = (mu1 - mu2).square().sum() + (s1 - s2).square().sum()
    assert M.frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2)) == pytest.approx(float(want))
    # non-commuting covariances: tr sqrt(C1 C2) from the eigenvalues of C1 C2 (which are real, >= 0)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    c1, c2 = a @ a.T + 0.1 * torch.eye(4), b @ b.T + 0.1 * torch.eye(4)
    tr_sqrt = torch.linalg.eigvals(c1 @ c2).real.clamp_min(0).sqrt().sum()
    assert M.frechet_distance(torch.zeros(4), c1, torch.zeros(4), c2) == pytest.approx(float(c1.trace() + c2.trace() - 2 * tr_sqrt))


class _RandomConvFeatures(nn.Module):
    """A fixed random conv net: weights-free stand-in for Inception."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, d, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean((2, 3))


class _FakeTask:
    """consistency = PSNR to y after identity degradation; records what it was called with."""

    def __init__(self):
        self.calls = []

    def consistency(self, x_sample, y, mask=None):
        self.calls.append((x_sample.shape, y.shape))
        return M.psnr(x_sample, y)


def _moments(f: torch.Tensor):
    f = f.double()
    return f.mean(0), torch.cov(f.T)


def test_evaluator_averages_every_draw_and_plumbs_fid():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(40, 200, (3, 3, 16, 16), generator=g).float() / 255
    y = x.clone()
    draws = torch.stack([x + 10 / 255, x + 20 / 255])                 # (K=2, B=3, ...)
    feats, task = _RandomConvFeatures(), _FakeTask()
    m = M.ConditionalSampleMetrics(task=task, features=feats, draws=2)
    m.update(draws[:, :2], y[:2], x[:2])                               # two batches
    m.update(draws[:, 2:], y[2:], x[2:])
    out = m.compute()
    both = (20 * math.log10(255 / 10) + 20 * math.log10(255 / 20)) / 2
    assert out["psnr"] == pytest.approx(both, rel=1e-6)               # not the last draw's 20log10(255/20)
    assert out["consistency"] == pytest.approx(both, rel=1e-6)
    assert out["diversity"] == pytest.approx(10 / math.sqrt(2), rel=1e-6)  # draws 10/255 apart: unbiased std
    assert task.calls[0] == (torch.Size([4, 3, 16, 16]), torch.Size([4, 3, 16, 16]))
    # UFID / JFID equal the Frechet distance of the features computed by hand
    with torch.no_grad():
        ff, fr, fy = feats(draws.reshape(6, 3, 16, 16)), feats(x), feats(y)
    want_u = M.frechet_distance(*_moments(ff), *_moments(fr))
    want_j = M.frechet_distance(*_moments(torch.cat([fy.repeat(2, 1), ff], 1)), *_moments(torch.cat([fy, fr], 1)))
    assert out["ufid_pooled"] == pytest.approx(want_u, rel=1e-6, abs=1e-9)
    assert out["jfid_pooled"] == pytest.approx(want_j, rel=1e-6, abs=1e-9)
    assert out["ufid"] > 0 and out["jfid"] > 0
    assert out["lpips"] is None and "lpips" in m.notes


def test_evaluator_quantises_and_clamps_samples():
    x = torch.full((2, 3, 16, 16), 0.5)
    draws = torch.stack([torch.full_like(x, 1.7), torch.full_like(x, 0.5 + 0.4 / 255)])
    m = M.ConditionalSampleMetrics()
    m.update(draws, x, x)
    out = m.compute()
    q = round(0.5 * 255) / 255                                          # the target is quantised too
    p1 = 10 * math.log10(1 / (1 - q) ** 2)                              # 1.7 clamps to 1
    assert out["psnr"] == pytest.approx((p1 + 100.0) / 2, rel=1e-6)     # 0.5 + 0.4/255 rounds onto x
    assert out["ufid"] is None and out["consistency"] is None


def test_evaluator_without_ground_truth_reports_why():
    m = M.ConditionalSampleMetrics(task=_FakeTask())
    y = torch.rand(2, 3, 16, 16)
    m.update(torch.stack([y, y]), y)
    out = m.compute()
    assert out["psnr"] is None and out["consistency"] is not None and out["diversity"] == 0.0
    assert "ground truth" in m.notes["psnr"]


def test_lpips_matches_torchmetrics_implementation_with_same_weights():
    from torchmetrics.functional.image.lpips import _LPIPS

    ref = _LPIPS(pretrained=True, net="alex", pnet_rand=True)           # random AlexNet, shipped linear layers
    trunk = {}
    for i, s in enumerate([ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5]):
        trunk.update({f"features.{k}": v for k, v in s.state_dict().items()})
    lins = [getattr(ref, f"lin{i}").model[-1].weight for i in range(5)]
    mine = M.LPIPS(M.AlexNetFeatures(trunk), lins)
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        want = ref(a, b, normalize=True).reshape(-1)
        got = mine(a, b)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert torch.allclose(mine(a, a), torch.zeros(2), atol=1e-6)


def test_pretrained_weights_lookup(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(M.WeightsUnavailable, match=M.ALEXNET_FILE):
        M.load_lpips(tmp_path / "w")
    with pytest.raises(M.WeightsUnavailable, match="torch-fidelity|" + M.INCEPTION_FILE):
        M.load_inception(tmp_path / "w")
    (tmp_path / "w").mkdir()
    trunk = M.AlexNetFeatures().slices.state_dict()                    # keys "slice.index.weight"
    torch.save({f"features.{k.split('.', 1)[1]}": v for k, v in trunk.items()}, tmp_path / "w" / M.ALEXNET_FILE)
    assert M.find_weights(M.ALEXNET_FILE, tmp_path / "w") == tmp_path / "w" / M.ALEXNET_FILE
    net = M.load_lpips(tmp_path / "w")
    a = torch.rand(1, 3, 32, 32)
    assert net(a, a.flip(-1)).item() > 0
