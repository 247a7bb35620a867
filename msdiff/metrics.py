"""Evaluation metrics for conditional sampling (Batzolis et al. 2021, "Conditional Image Generation
with Score-Based Diffusion Models", Sec. 6: PSNR, SSIM, LPIPS, UFID, JFID, consistency, diversity).

Conventions (and the reference evaluation's defects they avoid, REFERENCE.md Sec. 1):
- every sample is clamped to [0, 1] and quantised to 8 bits first (`msdiff.utils.quantize`), so the
  numbers are those of the PNGs on disk;
- PSNR, SSIM and LPIPS are per-image values averaged over EVERY draw of every condition (the
  reference kept only the last draw);
- consistency is the task's own measurement (`task.consistency(x_sample, y)`, per-image PSNR): SR
  re-degrades the sample with the task's operator, inpainting compares outside the REAL hole,
  edges compares the sample's edge map with the input edge map;
- diversity is the per-pixel standard deviation over the K draws (population std, ddof = 0) on the
  0-255 scale, averaged over pixels and conditions;
- UFID is the Frechet distance between features of all N*K samples and of the N test targets;
  JFID the same on concatenated [features(y), features(x)] (each sample paired with its own y).

The feature networks are injectable (`features=`, `lpips=`): any module mapping (B, 3, H, W) images
in [0, 1] to (B, d) features, resp. an `LPIPS` with any backbone. The pretrained ones (FID
Inception-v3 through torch-fidelity, AlexNet for LPIPS) are looked up in `weights_dir` and the torch
hub cache; when missing, `load_inception` / `load_lpips` raise `WeightsUnavailable` with a one-line
hint and the metric is reported as unavailable, never invented.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure

from msdiff.utils import batch_mean, quantize

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"                      # torchvision's ImageNet AlexNet
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"   # torch-fidelity's FID Inception-v3
METRIC_NAMES = ("psnr", "ssim", "lpips", "ufid", "jfid", "consistency", "diversity")
SSIM_WINDOW = 11          # Gaussian window of sigma 1.5 (Wang et al. 2004), torchmetrics' default
MIN_MSE = 1e-10           # PSNR of identical images is capped at 100 dB instead of +inf


class WeightsUnavailable(RuntimeError):
    """Pretrained weights for a metric network are not on this machine (message: how to get them)."""


# ---- per-image metrics ------------------------------------------------------------------------
def psnr(x_hat: Tensor, x: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(range^2 / MSE), shape (B,)."""
    mse = batch_mean((x_hat.double() - x.double()).square()).clamp_min(MIN_MSE)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(x_hat: Tensor, x: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity per image (Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03), (B,).

    Computed in float64: in float32 the E[x^2] - E[x]^2 variances lose ~1e-4 of SSIM."""
    return structural_similarity_index_measure(
        x_hat.double(), x.double(), data_range=data_range, reduction="none"
    ).reshape(-1)


def diversity(samples: Tensor) -> Tensor:
    """Mean over pixels of the per-pixel std over draws on the 0-255 scale: (K, B, ...) -> (B,)."""
    if samples.shape[0] < 2:
        raise ValueError(f"diversity: needs at least 2 draws, got {samples.shape[0]}")
    return batch_mean(samples.double().mul(255.0).std(dim=0, unbiased=False))


# ---- Frechet distance -------------------------------------------------------------------------
def _sqrtm_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau 1982; FID, Heusel 2017):
    ||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2)."""
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    s1 = _sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2.0 * cross)


# ---- LPIPS ------------------------------------------------------------------------------------
class AlexNetFeatures(nn.Module):
    """The five ReLU outputs of AlexNet's convolutional trunk (the LPIPS 'alex' backbone)."""

    def __init__(self, state_dict: dict[str, Tensor] | None = None) -> None:
        """`state_dict`: torchvision's AlexNet checkpoint (only its `features.*` entries are used)."""
        super().__init__()
        relu, pool = (lambda: nn.ReLU(inplace=True)), (lambda: nn.MaxPool2d(3, 2))
        f = nn.Sequential(  # torchvision's AlexNet.features, same indices
            nn.Conv2d(3, 64, 11, 4, 2), relu(), pool(), nn.Conv2d(64, 192, 5, padding=2), relu(), pool(),
            nn.Conv2d(192, 384, 3, padding=1), relu(), nn.Conv2d(384, 256, 3, padding=1), relu(),
            nn.Conv2d(256, 256, 3, padding=1), relu(),
        )
        if state_dict is not None:
            f.load_state_dict({k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")})
        cuts = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]  # conv1..conv5, each ending after its ReLU
        self.slices = nn.ModuleList(nn.Sequential(OrderedDict((str(i), f[i]) for i in range(a, b))) for a, b in cuts)
        self.channels = (64, 192, 384, 256, 256)
        self.requires_grad_(False).eval()

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x.clone())  # the next slice's ReLU(inplace) must not touch what we keep
        return out


class LPIPS(nn.Module):
    """Learned perceptual image patch similarity (Zhang et al. 2018, Eq. 1): per layer l, unit-normalise
    the channel vectors, weight their squared difference with w_l (1x1 conv), average over space, sum
    over layers. `backbone` maps (B, 3, H, W) in [-1, 1] (after LPIPS' channel scaling) to a list of
    feature maps; `lin_weights` holds one (1, C_l, 1, 1) tensor per map."""

    def __init__(self, backbone: nn.Module, lin_weights: list[Tensor]) -> None:
        super().__init__()
        self.backbone = backbone
        self.lin = nn.ParameterList(nn.Parameter(w.detach().clone(), requires_grad=False) for w in lin_weights)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS distance between image batches in [0, 1], shape (B,)."""
        fa, fb = (self.backbone((2 * v - 1 - self.shift) / self.scale) for v in (a, b))
        d = 0.0
        for u, v, w in zip(fa, fb, self.lin):
            u = u / (u.square().sum(1, keepdim=True) + 1e-8).sqrt()  # LPIPS' eps inside the root
            v = v / (v.square().sum(1, keepdim=True) + 1e-8).sqrt()
            d = d + ((u - v).square() * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return d


# ---- pretrained weights -----------------------------------------------------------------------
def weight_search_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where pretrained metric weights are looked for: `weights_dir` (and its checkpoints/), then the
    torch hub cache ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints), which is
    where torchvision and torch-fidelity keep their downloads."""
    dirs = []
    if weights_dir is not None:
        dirs += [Path(weights_dir), Path(weights_dir) / "checkpoints"]
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_weights(filename: str, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """First existing `filename` in `weight_search_dirs(weights_dir)`, or None."""
    return next((d / filename for d in weight_search_dirs(weights_dir) if (d / filename).is_file()), None)


def _missing(filename: str, what: str, weights_dir: str | os.PathLike | None) -> WeightsUnavailable:
    where = " or ".join(str(d) for d in weight_search_dirs(weights_dir)[-2:])
    return WeightsUnavailable(f"{what} unavailable: put {filename} in {where} (or pass --weights_dir DIR)")


def load_lpips(weights_dir: str | os.PathLike | None = None) -> LPIPS:
    """LPIPS with the ImageNet AlexNet backbone and the LPIPS v0.1 linear weights shipped with torchmetrics."""
    path = find_weights(ALEXNET_FILE, weights_dir)
    if path is None:
        raise _missing(ALEXNET_FILE, "LPIPS (AlexNet)", weights_dir)
    import torchmetrics.functional.image.lpips as tm_lpips  # the package ships the linear layers

    lin_file = Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth"
    lin = torch.load(lin_file, map_location="cpu", weights_only=True)
    backbone = AlexNetFeatures(torch.load(path, map_location="cpu", weights_only=True))
    return LPIPS(backbone, [lin[f"lin{i}.model.1.weight"] for i in range(5)])


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception-v3 (TF 2015-12-05 weights, via torch-fidelity through
    torchmetrics), taking images in [0, 1]; it resizes to 299 itself."""

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.mul(255).round().to(torch.uint8)).reshape(x.shape[0], -1)


def load_inception(weights_dir: str | os.PathLike | None = None) -> InceptionFeatures:
    """The FID feature extractor, or `WeightsUnavailable` saying what to install / where to put weights."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise WeightsUnavailable("UFID/JFID unavailable: pip install torch-fidelity (FID Inception-v3)") from None
    path = find_weights(INCEPTION_FILE, weights_dir)
    if path is None:
        raise _missing(INCEPTION_FILE, "UFID/JFID (Inception-v3)", weights_dir)
    return InceptionFeatures(path)


# ---- the evaluator ----------------------------------------------------------------------------
def _as_rgb(v: Tensor) -> Tensor:
    """Images with 1 or 3 channels -> 3 channels (feature networks are RGB)."""
    return v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v


class ConditionalSampleMetrics(Metric):
    """Accumulates the paper's metrics over batches of K draws (sums only, so it syncs across devices
    like any torchmetrics `Metric`). `compute()` returns a dict {name: float or None}; `notes` says
    why a metric is None.

    task:      object with `consistency(x_sample, y) -> (B,)` (None: no consistency)
    features:  (B, 3, H, W) in [0, 1] -> (B, d) for UFID/JFID (None: unavailable)
    lpips:     (a, b) -> (B,) (None: unavailable)
    condition_image: y -> (B, 1 or 3, h, w) image fed to `features` for JFID (default: y itself)
    unavailable: {metric: reason} for metrics whose networks could not be loaded
    """

    full_state_update = False

    def __init__(
        self,
        task: Any = None,
        features: nn.Module | None = None,
        lpips: nn.Module | None = None,
        condition_image: Callable[[Tensor], Tensor] | None = None,
        unavailable: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.task, self.features, self.lpips_net = task, features, lpips
        self.condition_image = condition_image or (lambda y: y)
        self.notes: dict[str, str] = dict(unavailable or {})
        for name in ("psnr", "ssim", "lpips", "consistency", "diversity"):
            self.add_state(f"{name}_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self._d = 0
        if features is not None:
            self._d = int(getattr(features, "num_features", 0)) or self._probe_dim(features)
            for name, dim in (("u_real", self._d), ("u_fake", self._d), ("j_real", 2 * self._d), ("j_fake", 2 * self._d)):
                self.add_state(f"{name}_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
                self.add_state(f"{name}_outer", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
                self.add_state(f"{name}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _probe_dim(features: nn.Module) -> int:
        p = next(iter(features.parameters()), None)
        with torch.no_grad():
            return int(features(torch.zeros(1, 3, 32, 32, device=p.device if p is not None else None)).shape[-1])

    def _add(self, name: str, values: Tensor) -> None:
        setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + values.double().sum())
        setattr(self, f"{name}_n", getattr(self, f"{name}_n") + values.numel())

    def _add_features(self, name: str, f: Tensor) -> None:
        f = f.double().reshape(f.shape[0], -1)
        setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + f.sum(0))
        setattr(self, f"{name}_outer", getattr(self, f"{name}_outer") + f.T @ f)
        setattr(self, f"{name}_n", getattr(self, f"{name}_n") + f.shape[0])

    @torch.no_grad()
    def update(self, samples: Tensor, y: Tensor, x: Tensor | None = None) -> None:
        """samples: (K, B, C, H, W) draws for conditions y (B, ...); x: (B, C, H, W) targets or None."""
        if samples.ndim != 5:
            raise ValueError(f"samples: expected shape (K, B, C, H, W), got {tuple(samples.shape)}")
        k, b = samples.shape[:2]
        samples = quantize(samples)
        flat = samples.reshape(k * b, *samples.shape[2:])
        y_rep = y.unsqueeze(0).expand(k, *y.shape).reshape(k * b, *y.shape[1:])
        if k >= 2:
            self._add("diversity", diversity(samples))
        if self.task is not None:
            self._add("consistency", self.task.consistency(flat, y_rep))
        if x is None:
            return
        x = quantize(x)
        x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        self._add("psnr", psnr(flat, x_rep))
        if min(x.shape[-2:]) >= SSIM_WINDOW:
            self._add("ssim", ssim(flat, x_rep))
        if self.lpips_net is not None:
            self._add("lpips", self.lpips_net(_as_rgb(flat), _as_rgb(x_rep)))
        if self.features is not None:
            f_fake, f_real = self.features(_as_rgb(flat)), self.features(_as_rgb(x))
            f_y = self.features(_as_rgb(self.condition_image(y)))
            self._add_features("u_fake", f_fake)
            self._add_features("u_real", f_real)
            self._add_features("j_fake", torch.cat([f_y.repeat(k, 1), f_fake], dim=1))
            self._add_features("j_real", torch.cat([f_y, f_real], dim=1))

    def _moments(self, name: str) -> tuple[Tensor, Tensor, int]:
        n = int(getattr(self, f"{name}_n"))
        mu = getattr(self, f"{name}_sum") / n
        cov = (getattr(self, f"{name}_outer") - n * torch.outer(mu, mu)) / (n - 1)
        return mu, cov, n

    def _fid(self, real: str, fake: str) -> float | None:
        mu_r, cov_r, n_r = self._moments(real)
        mu_f, cov_f, n_f = self._moments(fake)
        if min(n_r, n_f) < 2:
            return None
        return frechet_distance(mu_f, cov_f, mu_r, cov_r)

    def compute(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name in ("psnr", "ssim", "lpips", "consistency", "diversity"):
            n = int(getattr(self, f"{name}_n"))
            out[name] = float(getattr(self, f"{name}_sum")) / n if n else None
        if self.features is not None:
            out["ufid"] = self._fid("u_real", "u_fake")
            out["jfid"] = self._fid("j_real", "j_fake")
        else:
            out["ufid"] = out["jfid"] = None
        for name, value in out.items():
            if value is not None and not math.isfinite(value):
                out[name] = None
                self.notes.setdefault(name, f"{name} is not finite (degenerate samples)")
        self._explain(out)
        return {name: out[name] for name in METRIC_NAMES}

    def _explain(self, out: dict[str, float | None]) -> None:
        """Fill `notes` with one line for each metric that came out None."""
        why = {
            "consistency": "the task has no consistency measurement",
            "diversity": "needs at least 2 draws per condition",
            "ssim": f"needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels and ground truth",
            "ufid": "needs at least 2 samples and 2 targets with a feature network",
            "jfid": "needs at least 2 samples and 2 targets with a feature network",
        }
        no_gt = int(self.psnr_n) == 0
        for name, value in out.items():
            if value is None and name not in self.notes:
                self.notes[name] = "no ground truth (--input conditions)" if no_gt and name not in ("consistency", "diversity") else why.get(name, "not computed")
