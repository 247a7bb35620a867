"""Evaluation metrics for conditional sampling (Batzolis et al. 2021, "Conditional Image Generation
with Score-Based Diffusion Models", Sec. 6: PSNR, SSIM, LPIPS, UFID, JFID, consistency, diversity).

Conventions, equal to the reference evaluation (the official MSDiff code's
`lightning_callbacks/evaluation_tools.py`) to float rounding, except where a defect of it is avoided:
- every sample is clamped to [0, 1] and quantised to 8 bits first (`msdiff.utils.quantize`), so the
  numbers are those of the PNGs on disk;
- PSNR (float64, data range 1), SSIM and LPIPS are per-image values averaged over EVERY draw of every
  condition (the reference kept only the last draw: a defect, not followed);
- SSIM is the reference's: per channel (on 0-255, the same as [0, 1] with data range 1), Gaussian
  11x11 window of sigma 1.5, K1 0.01, K2 0.03, filtered only where the window fits (the 5-pixel
  border is dropped), mean of that valid map, then mean over channels. (torchmetrics' SSIM
  reflect-pads and averages the full map: 0.01 different at 160 px, 0.03 at 64 px.)
- consistency is the task's own measurement (`task.consistency(x_sample, y)`, per-image PSNR): SR
  re-degrades the sample with the task's operator, inpainting compares outside the REAL hole,
  edges compares the sample's edge map with the input edge map (the reference used a fresh random
  mask, resp. the photo's edges: defects, not followed);
- diversity is the per-pixel standard deviation over the K draws with the unbiased estimator
  (ddof = 1, torch's default, as the reference) on the 0-255 scale, averaged over pixels and
  conditions;
- UFID (the paper's name) is the reference protocol: one Frechet distance per draw k (the k-th draw of
  every condition against the N test targets), then the mean over the K draws. JFID likewise on
  concatenated [features(y), features(x)] (each sample paired with its own y). Pooling all N*K
  samples into one distance gives a lower number; it is reported as `ufid_pooled` / `jfid_pooled`.

The feature networks are injectable (`features=`, `lpips=`): any module mapping (B, 3, H, W) images
in [0, 1] to (B, d) features, resp. an `LPIPS` with any backbone. The pretrained ones (FID
Inception-v3 through torch-fidelity, AlexNet for LPIPS) are looked up in `weights_dir` and the torch
hub cache; when missing, `load_inception` / `load_lpips` raise `WeightsUnavailable` with a one-line
hint and the metric is reported as unavailable, never invented.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from msdiff.gaussian import frechet_distance
from msdiff.metric_networks import (ALEXNET_FILE, INCEPTION_FILE, LPIPS, WEIGHT_SOURCES,  # noqa: F401 (re-exported)
                                    AlexNetFeatures, InceptionFeatures, WeightsUnavailable, find_weights,
                                    load_inception, load_lpips, weight_search_dirs)
from msdiff.utils import batch_mean, quantize

METRIC_NAMES = ("psnr", "ssim", "lpips", "ufid", "jfid", "consistency", "diversity", "ufid_pooled", "jfid_pooled")
PER_IMAGE_NAMES = ("psnr", "ssim", "lpips", "consistency")  # one value per (condition, draw)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5   # Gaussian window (Wang et al. 2004), as the reference
SSIM_K1, SSIM_K2 = 0.01, 0.03
MIN_MSE = 1e-10           # PSNR of identical images is capped at 100 dB instead of +inf


# ---- per-image metrics ------------------------------------------------------------------------
def psnr(x_hat: Tensor, x: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(range^2 / MSE), shape (B,)."""
    mse = batch_mean((x_hat.double() - x.double()).square()).clamp_min(MIN_MSE)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The normalised 1-d Gaussian taps exp(-(i - (size-1)/2)^2 / (2 sigma^2)) / sum, float64."""
    i = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-i.square() / (2 * sigma**2))
    return w / w.sum()


def _filter_valid(v: Tensor, w: Tensor) -> Tensor:
    """Separable Gaussian filter of (B, C, H, W) per channel, only where the window fits:
    (B, C, H - size + 1, W - size + 1) (the reference's filter2D(...)[5:-5, 5:-5])."""
    c = v.shape[1]
    v = torch.nn.functional.conv2d(v, w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return torch.nn.functional.conv2d(v, w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim(x_hat: Tensor, x: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity per image as the reference evaluation (Wang et al. 2004, Eq. 13), (B,).

    Per channel: local means mu, variances E[v^2] - mu^2 and covariance under a Gaussian 11x11 window
    of sigma 1.5, C1 = (K1 L)^2, C2 = (K2 L)^2 with L = data_range, K1 = 0.01, K2 = 0.03;
        SSIM map = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))
    on the valid window only (no padding: a border of 5 pixels is dropped), averaged over the map and
    then over channels. float64 throughout (in float32 the variances lose ~1e-4 of SSIM)."""
    if x_hat.shape != x.shape or x.ndim != 4:
        raise ValueError(f"ssim: expected two (B, C, H, W) tensors of one shape, got {tuple(x_hat.shape)} "
                         f"and {tuple(x.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images of {x.shape[-2]}x{x.shape[-1]} are smaller than the "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} window")
    a, b = x_hat.double(), x.double()
    w = gaussian_window().to(a.device)
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a.square()
    var_b = _filter_valid(b * b, w) - mu_b.square()
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    m = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return m.mean(dim=(2, 3)).mean(dim=1)


def diversity(samples: Tensor) -> Tensor:
    """Mean over pixels of the per-pixel standard deviation over the K draws (unbiased, ddof = 1, as the
    reference) on the 0-255 scale: (K, B, ...) -> (B,)."""
    if samples.shape[0] < 2:
        raise ValueError(f"diversity: needs at least 2 draws, got {samples.shape[0]}")
    return batch_mean(samples.double().mul(255.0).std(dim=0, correction=1))


# ---- the evaluator ----------------------------------------------------------------------------
def _as_rgb(v: Tensor) -> Tensor:
    """Images with 1 or 3 channels -> 3 channels (feature networks are RGB)."""
    return v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v


def merge_per_image(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-condition entries of several processes -> one list ordered by "index", each index once
    (a condition sampled twice, e.g. by padding, is kept once); NaN/inf values become None."""
    def clean(v: Any) -> Any:
        if isinstance(v, list):
            return [clean(u) for u in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    seen: dict[int, dict[str, Any]] = {}
    for part in parts:
        for entry in part:
            seen.setdefault(int(entry["index"]), {k: clean(v) for k, v in entry.items()})
    return [seen[i] for i in sorted(seen)]


class ConditionalSampleMetrics(Metric):
    """Accumulates the paper's metrics over batches of K draws (sums and per-image lists, so it syncs
    across devices like any torchmetrics `Metric`). `compute()` returns a dict {name: float or None}
    over METRIC_NAMES; `notes` says why a metric is None; `per_image()` gives this process's values per
    condition (plain Python lists, not synced: gather them with `merge_per_image`).

    task:      a `msdiff.tasks.Task` (its `consistency(x_sample, y, mask)`; None: no consistency)
    features:  (B, 3, H, W) in [0, 1] -> (B, d) for UFID/JFID (None: unavailable)
    lpips:     (a, b) -> (B,) (None: unavailable)
    condition_image: y -> (B, 1 or 3, h, w) image fed to `features` for JFID (default: y itself)
    unavailable: {metric: reason} for metrics whose networks could not be loaded
    draws:     K, the number of draws per condition every `update` brings (the per-draw FIDs need it)
    sync_on_compute: False for values of one process only (e.g. rank 0's validation grid in DDP,
               where the other ranks would never join the sync)

    Feature moments kept (d = feature size): targets x and conditions y (sums, second moments, the
    y-x cross moment) and, per draw k, the samples' sums, second moments and y-sample cross moment:
    (3 + 2K) d^2 float64 numbers (0.44 GB for Inception's d = 2048 and K = 5), whatever N.
    """

    full_state_update = False

    def __init__(
        self,
        task: Any = None,
        features: nn.Module | None = None,
        lpips: nn.Module | None = None,
        condition_image: Callable[[Tensor], Tensor] | None = None,
        unavailable: dict[str, str] | None = None,
        draws: int = 1,
        sync_on_compute: bool = True,
    ) -> None:
        super().__init__(sync_on_compute=sync_on_compute)
        if isinstance(draws, bool) or int(draws) != draws or draws < 1:
            raise ValueError(f"draws={draws}: expected an integer >= 1")
        self.task, self.features, self.lpips_net, self.draws = task, features, lpips, int(draws)
        self.condition_image = condition_image or (lambda y: y)
        self.notes: dict[str, str] = dict(unavailable or {})
        self.images: list[dict[str, Any]] = []  # per condition, this process's only (see per_image)
        for name in ("psnr", "ssim", "lpips", "consistency", "diversity"):
            self.add_state(f"{name}_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self._d = 0
        if features is not None:
            d, k = self._feature_dim(features), self.draws
            self._d = d
            for name, shape in (("real_sum", (d,)), ("real_outer", (d, d)), ("y_sum", (d,)), ("y_outer", (d, d)),
                                ("yreal_outer", (d, d)), ("fake_sum", (k, d)), ("fake_outer", (k, d, d)),
                                ("yfake_outer", (k, d, d))):
                self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("feat_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _feature_dim(features: nn.Module) -> int:
        if isinstance(features, InceptionFeatures):
            return features.num_features
        p = next(iter(features.parameters()), None)
        with torch.no_grad():
            return int(features(torch.zeros(1, 3, 32, 32, device=p.device if p is not None else None)).shape[-1])

    def _add(self, name: str, values: Tensor) -> None:
        setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + values.double().sum())
        setattr(self, f"{name}_n", getattr(self, f"{name}_n") + values.numel())

    def reset(self) -> None:
        super().reset()
        self.images = []

    @torch.no_grad()
    def update(self, samples: Tensor, y: Tensor, x: Tensor | None = None, index: Tensor | None = None,
               mask: Tensor | None = None) -> None:
        """samples: (K, B, C, H, W) draws for conditions y (B, ...); x: (B, C, H, W) targets or None;
        index: (B,) integer ids of the conditions (for `per_image`; default: running count);
        mask: (B, 1, H, W) the conditions' real inpainting masks (tasks with `needs_mask`), or None."""
        if samples.ndim != 5:
            raise ValueError(f"samples: expected shape (K, B, C, H, W), got {tuple(samples.shape)}")
        k, b = samples.shape[:2]
        if self.features is not None and k != self.draws:
            raise ValueError(f"samples: {k} draws per condition, but the metrics were built for draws={self.draws}")
        index = list(range(len(self.images), len(self.images) + b)) if index is None else \
            [int(i) for i in torch.as_tensor(index).reshape(b)]
        samples = quantize(samples)
        flat = samples.reshape(k * b, *samples.shape[2:])
        y_rep = y.unsqueeze(0).expand(k, *y.shape).reshape(k * b, *y.shape[1:])
        div = diversity(samples) if k >= 2 else None
        if div is not None:
            self._add("diversity", div)
        per: dict[str, Tensor | None] = dict.fromkeys(PER_IMAGE_NAMES)
        if self.task is not None:
            mask_rep = None if mask is None else mask.unsqueeze(0).expand(k, *mask.shape).reshape(k * b, *mask.shape[1:])
            per["consistency"] = self.task.consistency(flat, y_rep, mask=mask_rep)
        if x is not None:
            x = quantize(x)
            x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
            per["psnr"] = psnr(flat, x_rep)
            if min(x.shape[-2:]) >= SSIM_WINDOW:
                per["ssim"] = ssim(flat, x_rep)
            if self.lpips_net is not None:
                per["lpips"] = self.lpips_net(_as_rgb(flat), _as_rgb(x_rep))
            if self.features is not None:
                self._add_features(self.features(_as_rgb(flat)).reshape(k, b, -1), self.features(_as_rgb(x)),
                                   self.features(_as_rgb(self.condition_image(y))))
        for name, values in per.items():
            if values is not None:
                self._add(name, values)
        self._keep(index, div, per, k)

    def _keep(self, index: list[int], div: Tensor | None, per: dict[str, Tensor | None], k: int) -> None:
        """Append one entry per condition: {"index", "diversity", name: [K values]} (None: not computed)."""
        cols = {name: None if v is None else v.double().reshape(k, -1).T.tolist() for name, v in per.items()}
        div_list = None if div is None else div.double().tolist()
        for j, i in enumerate(index):
            entry: dict[str, Any] = {"index": i, "diversity": None if div_list is None else div_list[j]}
            entry.update({name: [None] * k if c is None else c[j] for name, c in cols.items()})
            self.images.append(entry)

    def _add_features(self, f_fake: Tensor, f_real: Tensor, f_y: Tensor) -> None:
        """f_fake (K, B, d), f_real and f_y (B, d): add their sums and (cross) second moments."""
        f_fake, f_real, f_y = f_fake.double(), f_real.double().reshape(f_real.shape[0], -1), f_y.double()
        f_y = f_y.reshape(f_y.shape[0], -1)
        self.real_sum = self.real_sum + f_real.sum(0)
        self.real_outer = self.real_outer + f_real.T @ f_real
        self.y_sum = self.y_sum + f_y.sum(0)
        self.y_outer = self.y_outer + f_y.T @ f_y
        self.yreal_outer = self.yreal_outer + f_y.T @ f_real
        self.fake_sum = self.fake_sum + f_fake.sum(1)
        self.fake_outer = self.fake_outer + f_fake.transpose(1, 2) @ f_fake
        self.yfake_outer = self.yfake_outer + f_y.T.unsqueeze(0) @ f_fake
        self.feat_n = self.feat_n + f_real.shape[0]

    @staticmethod
    def _gaussian(total: Tensor, outer: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Mean and unbiased covariance (ddof = 1, as numpy's np.cov in FID) from sums over n rows."""
        mu = total / n
        return mu, (outer - n * torch.outer(mu, mu)) / (n - 1)

    @staticmethod
    def _joint(y_sum: Tensor, y_outer: Tensor, v_sum: Tensor, v_outer: Tensor, yv_outer: Tensor) -> tuple[Tensor, Tensor]:
        """Sums and second moments of the concatenated rows [f_y, f_v] from their blocks."""
        outer = torch.cat([torch.cat([y_outer, yv_outer], 1), torch.cat([yv_outer.T, v_outer], 1)], 0)
        return torch.cat([y_sum, v_sum]), outer

    def _fids(self) -> dict[str, float | None]:
        """UFID / JFID: the mean over draws of per-draw Frechet distances (the reference protocol),
        and the pooled distances of all N*K samples at once."""
        n, k = int(self.feat_n), self.draws
        if n < 2:
            return dict.fromkeys(("ufid", "jfid", "ufid_pooled", "jfid_pooled"))
        real = self._gaussian(self.real_sum, self.real_outer, n)
        j_real = self._gaussian(*self._joint(self.y_sum, self.y_outer, self.real_sum, self.real_outer,
                                             self.yreal_outer), n)
        u, j = [], []
        for i in range(k):
            u.append(frechet_distance(*self._gaussian(self.fake_sum[i], self.fake_outer[i], n), *real))
            j.append(frechet_distance(*self._gaussian(*self._joint(self.y_sum, self.y_outer, self.fake_sum[i],
                                                                   self.fake_outer[i], self.yfake_outer[i]), n), *j_real))
        pooled_u = self._gaussian(self.fake_sum.sum(0), self.fake_outer.sum(0), n * k)
        pooled_j = self._gaussian(*self._joint(k * self.y_sum, k * self.y_outer, self.fake_sum.sum(0),
                                               self.fake_outer.sum(0), self.yfake_outer.sum(0)), n * k)
        return {"ufid": sum(u) / k, "jfid": sum(j) / k, "ufid_pooled": frechet_distance(*pooled_u, *real),
                "jfid_pooled": frechet_distance(*pooled_j, *j_real)}

    def compute(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name in ("psnr", "ssim", "lpips", "consistency", "diversity"):
            n = int(getattr(self, f"{name}_n"))
            out[name] = float(getattr(self, f"{name}_sum")) / n if n else None
        if self.features is not None:
            out.update(self._fids())
        else:
            out.update(dict.fromkeys(("ufid", "jfid", "ufid_pooled", "jfid_pooled")))
        for name, value in out.items():
            if value is not None and not math.isfinite(value):
                out[name] = None
                self.notes.setdefault(name, f"{name} is not finite (degenerate samples)")
        self._explain(out)
        return {name: out[name] for name in METRIC_NAMES}

    def per_image(self) -> list[dict[str, Any]]:
        """This process's per-condition values ordered by condition index, one entry per index
        (merge the lists of all processes with `merge_per_image`); non-finite values become None."""
        return merge_per_image([self.images])

    def _explain(self, out: dict[str, float | None]) -> None:
        """Fill `notes` with one line for each metric that came out None."""
        why = {
            "consistency": "the task has no consistency measurement",
            "diversity": "needs at least 2 draws per condition",
            "ssim": f"needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels and ground truth",
            "ufid": "needs at least 2 conditions with targets and a feature network",
            "jfid": "needs at least 2 conditions with targets and a feature network",
            "ufid_pooled": "needs at least 2 conditions with targets and a feature network",
            "jfid_pooled": "needs at least 2 conditions with targets and a feature network",
        }
        no_gt = int(self.psnr_n) == 0
        for name in ("ufid_pooled", "jfid_pooled"):  # unavailable together with the paper's names
            if name not in self.notes and name[:4] in self.notes:
                self.notes[name] = self.notes[name[:4]]
        for name, value in out.items():
            if value is None and name not in self.notes:
                self.notes[name] = "no ground truth (--input conditions)" if no_gt and name not in ("consistency", "diversity") else why.get(name, "not computed")
