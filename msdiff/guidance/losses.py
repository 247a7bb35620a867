"""Guidance losses for AGG (Kwon & Ye, Eq. 15 and App. B, Eqs. 21-23): callables x0 -> (B,) per-example
loss on a clean-image estimate x0 (B, C, H, W) in the model's data range ([0, 1] in msdiff).

Built in and offline: the L1 regulariser, pixel MSE to a target, colour statistics (channel means/stds,
optionally channel Gram matrices) of a style image, measurement consistency ||A(x0) - y||^2 for any
operator A (zero-shot SR, inpainting, edges), and a soft range penalty. Optional extras that need
pretrained weights from a local file: CLIP directional text loss (open_clip) and DINO ViT [CLS] loss
(timm); a missing package or file raises a one-line ValueError when the loss is constructed.

Reductions: the L1 / MSE / statistics / range losses are means per example (the official code's mean
reductions for a batch of one); the consistency loss is the literal squared norm (a per-example sum),
so its MCG step does not shrink with the image size. Targets are buffers: `.to(device)` the loss with
the model (a target on another device is copied at each call).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msdiff.utils import batch_mean, batch_sum


def l1(x: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error per example, (B,): AGG's regulariser d(x0*, x0) (Sec. 4.3)."""
    return batch_mean((x - target).abs())


def _check_weight(weight: float) -> float:
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight={weight}: expected a finite value >= 0")
    return float(weight)


def _check_image(name: str, img: Tensor) -> Tensor:
    if not isinstance(img, Tensor) or img.ndim != 4 or not img.is_floating_point():
        got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"{name}: expected a float tensor (1 or B, C, H, W), got {got}")
    return img.detach()


class L1Loss(nn.Module):
    """weight * mean |x0 - target| per example (the regulariser against a fixed image)."""

    def __init__(self, target: Tensor, weight: float = 1.0):
        super().__init__()
        self.weight = _check_weight(weight)
        self.register_buffer("target", _check_image("target", target))

    def forward(self, x0: Tensor) -> Tensor:
        return self.weight * l1(x0, self.target.to(x0))


class MSELoss(nn.Module):
    """weight * mean (x0 - target)^2 per example (App. B Eq. 23's pixel term, squared)."""

    def __init__(self, target: Tensor, weight: float = 1.0):
        super().__init__()
        self.weight = _check_weight(weight)
        self.register_buffer("target", _check_image("target", target))

    def forward(self, x0: Tensor) -> Tensor:
        return self.weight * batch_mean((x0 - self.target.to(x0)) ** 2)


def channel_statistics(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel means (B, C), stds (B, C) and the channel Gram matrix of the centred pixels
    (B, C, C), normalised by the number of pixels (the covariance of the colours)."""
    flat = x.flatten(2)
    mean = flat.mean(dim=2)
    centred = flat - mean.unsqueeze(2)
    gram = centred @ centred.transpose(1, 2) / flat.shape[2]
    std = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(1e-12).sqrt()
    return mean, std, gram


class StatisticsLoss(nn.Module):
    """Colour/statistics matching to a style image: weight * (|mu - mu_s|^2 + |sd - sd_s|^2) / C per
    example, plus gram_weight * mean (G - G_s)^2 over the C x C channel Gram (covariance) matrices."""

    def __init__(self, style: Tensor, weight: float = 1.0, gram_weight: float = 0.0):
        super().__init__()
        self.weight, self.gram_weight = _check_weight(weight), _check_weight(gram_weight)
        mean, std, gram = channel_statistics(_check_image("style", style))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("gram", gram)

    def forward(self, x0: Tensor) -> Tensor:
        mean, std, gram = channel_statistics(x0)
        loss = self.weight * (batch_mean((mean - self.mean.to(mean)) ** 2) + batch_mean((std - self.std.to(std)) ** 2))
        if self.gram_weight > 0:
            loss = loss + self.gram_weight * batch_mean((gram - self.gram.to(gram)) ** 2)
        return loss


class ConsistencyLoss(nn.Module):
    """Measurement consistency weight * ||A(x0) - y||^2 per example (sum of squares), for any
    differentiable operator A (e.g. a task's `forward_operator`): with an unconditional prior, AGG then
    solves the inverse problem y = A(x) zero-shot (the MCG idea of Chung et al. 2022 that AGG builds on)."""

    def __init__(self, operator: Callable[[Tensor], Tensor], y: Tensor, weight: float = 1.0):
        super().__init__()
        if not callable(operator):
            raise ValueError(f"operator: expected a callable x -> A(x), got {type(operator).__name__}")
        if not isinstance(y, Tensor) or y.ndim < 1:
            raise ValueError("y: expected a tensor of measurements (B, ...)")
        self.operator, self.weight = operator, _check_weight(weight)
        self.register_buffer("y", y.detach())

    def forward(self, x0: Tensor) -> Tensor:
        return self.weight * batch_sum((self.operator(x0) - self.y.to(x0)) ** 2)


class RangeLoss(nn.Module):
    """Soft range penalty weight * mean (x0 - clamp(x0, lo, hi))^2 per example. The paper's models live
    in [-1, 1]; msdiff's data range is [0, 1], hence the defaults."""

    def __init__(self, lo: float = 0.0, hi: float = 1.0, weight: float = 1.0):
        super().__init__()
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"lo={lo}, hi={hi}: expected finite lo < hi")
        self.lo, self.hi, self.weight = float(lo), float(hi), _check_weight(weight)

    def forward(self, x0: Tensor) -> Tensor:
        return self.weight * batch_mean((x0 - x0.clamp(self.lo, self.hi)) ** 2)


# ---- optional feature losses (pretrained weights from a local file) -----------------------------------
def _require_weights(weights: str | Path) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"weights: no such file {str(path)!r} (pretrained weights must be a local file)")
    return path


def _import(module: str, pip_name: str, user: str):
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(f"{user}: the optional package {module!r} is not installed (pip install {pip_name})") from None


def _resize_normalise(x: Tensor, size: int, mean, std, lo: float, hi: float) -> Tensor:
    x = (x - lo) / (hi - lo)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class ClipDirectionalLoss(nn.Module):
    """CLIP text loss of DiffuseIT/AGG (App. B, Eqs. 21-22): -cos(v_trg, E_I(aug(x0))) with
    v_trg = E_T(d_trg) + lambda_i E_I(x_src) - lambda_s E_T(d_src) (unit-normalised embeddings).
    aug = `n_aug` random crops (3/4 to 1 of the side) resized to the CLIP input size. DiffuseIT's
    exact lambda_i, lambda_s were not available here; 1.0 each moves the source image embedding along
    the text direction. Needs open_clip and a local checkpoint for `model_name`."""

    def __init__(self, weights: str | Path, target_text: str, source_text: str, source_image: Tensor,
                 model_name: str = "ViT-B-32", lambda_i: float = 1.0, lambda_s: float = 1.0,
                 weight: float = 1.0, n_aug: int = 8, data_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        path = _require_weights(weights)
        open_clip = _import("open_clip", "open_clip_torch", "ClipDirectionalLoss")
        if n_aug < 1:
            raise ValueError(f"n_aug={n_aug}: expected at least one augmented view")
        try:
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(path))
            tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as err:  # any loading failure becomes the one-line start-up error
            raise ValueError(f"weights: could not load {str(path)!r} as CLIP {model_name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        self.model = model.eval().requires_grad_(False)
        self.weight, self.n_aug, self.lo, self.hi = _check_weight(weight), int(n_aug), *map(float, data_range)
        size = getattr(model.visual, "image_size", 224)
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        self.std = getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        with torch.no_grad():
            text = F.normalize(self.model.encode_text(tokenizer([target_text, source_text])), dim=-1)
            src = F.normalize(self.model.encode_image(self._prep(_check_image("source_image", source_image))), dim=-1)
        v_trg = text[0] + lambda_i * src.mean(0) - lambda_s * text[1]
        self.register_buffer("v_trg", F.normalize(v_trg, dim=-1))

    def _prep(self, x: Tensor) -> Tensor:
        return _resize_normalise(x, self.size, self.mean, self.std, self.lo, self.hi)

    def forward(self, x0: Tensor) -> Tensor:
        b, _, h, w = x0.shape
        views = []
        for _ in range(self.n_aug):
            side = int(min(h, w) * (0.75 + 0.25 * torch.rand(()).item()))
            top, left = torch.randint(0, h - side + 1, ()).item(), torch.randint(0, w - side + 1, ()).item()
            views.append(x0[:, :, top:top + side, left:left + side])
        emb = torch.stack([F.normalize(self.model.encode_image(self._prep(v)), dim=-1) for v in views], 1)
        return -self.weight * (emb @ self.v_trg.to(emb)).mean(1)


class DinoClsLoss(nn.Module):
    """DINO ViT [CLS] loss of DiffuseIT/AGG (App. B Eq. 23, first term): weight * ||e_CLS(x_trg) -
    e_CLS(x0)||_2 with e_CLS the last layer's [CLS] token (after the final norm). Add the pixel term of
    Eq. 23 with MSELoss. Needs timm and a local checkpoint of `model_name`."""

    def __init__(self, weights: str | Path, target_image: Tensor, model_name: str = "vit_base_patch16_224.dino",
                 weight: float = 1.0, data_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        path = _require_weights(weights)
        timm = _import("timm", "timm", "DinoClsLoss")
        try:
            model = timm.create_model(model_name, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": str(path)})
        except Exception as err:
            raise ValueError(f"weights: could not load {str(path)!r} as {model_name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        self.model = model.eval().requires_grad_(False)
        self.weight, self.lo, self.hi = _check_weight(weight), *map(float, data_range)
        with torch.no_grad():
            self.register_buffer("e_trg", self._cls(_check_image("target_image", target_image)))

    def _cls(self, x: Tensor) -> Tensor:
        x = _resize_normalise(x, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), self.lo, self.hi)
        return self.model.forward_features(x)[:, 0]

    def forward(self, x0: Tensor) -> Tensor:
        return self.weight * (self._cls(x0) - self.e_trg.to(x0)).norm(dim=-1)
