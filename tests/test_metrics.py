"""msdiff.metrics against hand-computed values on tiny images (no pretrained weights needed)."""
from __future__ import annotations

import math

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
    assert torch.allclose(M.diversity(draws), torch.full((2,), 10.0, dtype=torch.float64))


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

    def consistency(self, x_sample, y):
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
    m = M.ConditionalSampleMetrics(task=task, features=feats)
    m.update(draws[:, :2], y[:2], x[:2])                               # two batches
    m.update(draws[:, 2:], y[2:], x[2:])
    out = m.compute()
    both = (20 * math.log10(255 / 10) + 20 * math.log10(255 / 20)) / 2
    assert out["psnr"] == pytest.approx(both, rel=1e-6)               # not the last draw's 20log10(255/20)
    assert out["consistency"] == pytest.approx(both, rel=1e-6)
    assert out["diversity"] == pytest.approx(5.0, rel=1e-6)           # draws 10/255 apart: std 5
    assert task.calls[0] == (torch.Size([4, 3, 16, 16]), torch.Size([4, 3, 16, 16]))
    # UFID / JFID equal the Frechet distance of the features computed by hand
    with torch.no_grad():
        ff, fr, fy = feats(draws.reshape(6, 3, 16, 16)), feats(x), feats(y)
    want_u = M.frechet_distance(*_moments(ff), *_moments(fr))
    want_j = M.frechet_distance(*_moments(torch.cat([fy.repeat(2, 1), ff], 1)), *_moments(torch.cat([fy, fr], 1)))
    assert out["ufid"] == pytest.approx(want_u, rel=1e-6, abs=1e-9)
    assert out["jfid"] == pytest.approx(want_j, rel=1e-6, abs=1e-9)
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
