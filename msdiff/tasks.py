"""Degradations y = A(x) that turn a target image into its condition (layer 1, plain torch).

Each task builds the condition y from the target x (both in [0, 1], shape (B, C, H, W)) as the
MSDiff paper (Batzolis et al., *Conditional Image Generation with Score-Based Diffusion Models*,
Sec. 5) and its reference code do, and exposes

- `measure(x, generator)`: y plus everything evaluation needs to reproduce A (the real
  inpainting mask); datasets store this dict in their items,
- `forward_operator(x, mask=None)`: A(x) in the measurement space (the low-resolution image,
  the known pixels, the edge map), differentiable, for consistency and for AGG's
  measurement-consistency loss,
- `consistency(x_sample, y, mask=None)`: the paper's consistency PSNR per example, (B,),
  computed with the task's own operator against the condition y (not against the ground
  truth's measurement, which the reference evaluation used by mistake for edges).

`mask` is a keyword every task accepts so that callers can pass `batch.get("mask")` without
knowing the task; only `Inpainting` uses it (`needs_mask`).

The condition protocol (what `sample.py --input FOLDER` and AGG's consistency loss need; defaults
here, overridden where a task differs):

- `needs_mask`: whether the measurement depends on a per-example mask (inpainting: a condition file
  then comes with its mask, and consistency is computed with the real one),
- `measurement_shape(x_shape)`: (C, H, W) of the measurement A(x) (what a condition file holds),
- `condition_from_measurement(m, mask)`: the condition y (and mask) the network was trained with,
  from measurements m read from files (SR: nearest upsampling),
- `measurement(y)`: the condition y back in measurement space (SR: the low-res image),
- `gaussian_problem()`: the exact `GaussianInverseProblem` behind the task, if any.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from msdiff.images import resize  # the one antialiased bicubic resize (re-exported: msdiff.tasks.resize)

if TYPE_CHECKING:
    from msdiff.gaussian import GaussianInverseProblem

__all__ = ["Task", "SuperResolution", "Inpainting", "Edges", "masked_psnr", "luminance", "resize"]


def masked_psnr(a: Tensor, b: Tensor, mask: Tensor | None = None, data_range: float = 1.0) -> Tensor:
    """PSNR per example, (B,), over the pixels where `mask` is 1 (all pixels when None).

    `mask` broadcasts against a and b (e.g. (B, 1, H, W) for all channels of a pixel). The MSE is
    floored at 1e-10, so a perfect match scores 100 dB (as `msdiff.metrics.psnr`) instead of +inf,
    which would make every average over draws infinite.
    """
    err = (a - b).square()
    if mask is None:
        mse = err.flatten(1).mean(dim=1)
    else:
        m = mask.to(err.dtype).expand_as(err)
        mse = (err * m).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1).clamp_min(1.0)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


def luminance(x: Tensor) -> Tensor:
    """ITU-R BT.601 luma of an RGB batch, (B, 1, H, W); a 1-channel batch is returned as is."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"luminance: expected 1 or 3 channels, got {x.shape[1]}")
    w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _check_batch(x: Tensor, who: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{who}: expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")


class Task:
    """A degradation y = A(x). Subclasses implement `forward_operator`, `measure`, `consistency`
    and override the condition protocol (module doc) where its defaults do not hold."""

    #: whether the measurement depends on a per-example mask (passed as `mask=`; inpainting)
    needs_mask: bool = False

    def y_channels(self, x_channels: int) -> int:
        """Channels of the condition y for an x with `x_channels` channels."""
        return x_channels

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """{"y": condition, ...}: draw any randomness of the operator and apply it."""
        raise NotImplementedError

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The condition y for a batch x."""
        return self.measure(x, generator)["y"]

    def forward_operator(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def consistency(self, x_sample: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    # ---- the condition protocol (module doc) ----------------------------------------------------
    def measurement_shape(self, x_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of `forward_operator(x)` for an x of shape x_shape (C, H, W)."""
        x = torch.zeros(1, *x_shape)
        mask = torch.ones(1, 1, *x_shape[1:]) if self.needs_mask else None
        with torch.no_grad():
            c, h, w = self.forward_operator(x, mask=mask).shape[1:]
        return int(c), int(h), int(w)

    def condition_from_measurement(self, measurement: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """{"y": condition[, "mask"]} for measurements (B, C, H, W) of `measurement_shape` (here:
        the measurement is the condition, as for edge maps and Gaussian-field y)."""
        return {"y": measurement}

    def measurement(self, y: Tensor) -> Tensor:
        """The condition y in the space of `forward_operator`, the y_meas of a consistency loss
        ||A(x) - y_meas||^2 (here: y itself)."""
        return y

    def gaussian_problem(self) -> GaussianInverseProblem | None:
        """The exact Gaussian inverse problem behind this task (`msdiff.gaussian`), else None."""
        return None


class SuperResolution(Task):
    """Super-resolution by `factor` (the paper's 8x: 160 -> 20 -> 160).

    A(x) = antialiased bicubic downsampling (`resize`, i.e. PyTorch's `interpolate(mode="bicubic",
    antialias=True)`, which, like MATLAB's `imresize`, widens the cubic kernel by the factor so
    it low-passes before subsampling; with antialiasing PyTorch uses the a = -0.5 cubic, the same
    kernel as MATLAB's). The operator itself is not clamped (guidance losses need its gradient
    everywhere). The condition y is A(x), clamped to [0, 1], upsampled back to the target size by
    nearest neighbour (pixel replication), as the reference concatenates it with x.
    """

    def __init__(self, factor: int = 8) -> None:
        if int(factor) != factor or factor < 1:
            raise ValueError(f"SuperResolution: factor must be a positive integer, got {factor}")
        self.factor = int(factor)

    def __repr__(self) -> str:
        return f"SuperResolution(factor={self.factor})"

    def _check(self, x: Tensor) -> None:
        _check_batch(x, "SuperResolution")
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"SuperResolution: image size {h}x{w} is not divisible by factor {self.factor}")

    def forward_operator(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The low-resolution image, (B, C, H/factor, W/factor), not clamped."""
        self._check(x)
        if self.factor == 1:
            return x
        return resize(x, (x.shape[-2] // self.factor, x.shape[-1] // self.factor), clamp=False)

    def upsample(self, low_res: Tensor) -> Tensor:
        """Nearest-neighbour upsampling by `factor` (exact pixel replication)."""
        *lead, h, w = low_res.shape
        f = self.factor
        return low_res[..., :, None, :, None].expand(*lead, h, f, w, f).reshape(*lead, h * f, w * f)

    def low_res(self, y: Tensor) -> Tensor:
        """Recover the low-resolution image from a condition y (inverse of `upsample`)."""
        return y[..., :: self.factor, :: self.factor]

    def measurement_shape(self, x_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H / factor, W / factor)."""
        self._check(torch.empty(1, *x_shape, device="meta"))
        c, h, w = x_shape
        return c, h // self.factor, w // self.factor

    def condition_from_measurement(self, measurement: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """The low-res image upsampled by this task's nearest rule (as `measure` builds y)."""
        return {"y": self.upsample(measurement)}

    def measurement(self, y: Tensor) -> Tensor:
        """The low-resolution image (`low_res`)."""
        return self.low_res(y)

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return {"y": self.upsample(self.forward_operator(x).clamp(0.0, 1.0))}

    def consistency(self, x_sample: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """PSNR between A(x_sample) and the low-resolution condition (= A(x) of the ground truth)."""
        return masked_psnr(self.forward_operator(x_sample).clamp(0.0, 1.0), self.low_res(y))


class Inpainting(Task):
    """Inpainting: y = x with a hole filled with `fill` (0 in the reference), no mask channel.

    `mode="square"`: one axis-aligned hole covering `hole_fraction` of the area (side
    round(sqrt(hole_fraction) * H) by round(sqrt(hole_fraction) * W): 64x64 in 128x128 for the
    paper's 0.25) at a uniformly random position. `mode="random_pixels"`: exactly
    round(hole_fraction * H * W) pixels chosen uniformly without replacement. The mask is 1 on
    known pixels and 0 in the hole, shape (B, 1, H, W); datasets draw it from a per-example
    generator seeded from (seed, index), so a test image's mask is reproducible.
    """

    MODES = ("square", "random_pixels")
    needs_mask = True

    def __init__(self, hole_fraction: float = 0.25, mode: str = "square", fill: float = 0.0) -> None:
        if not 0.0 < hole_fraction < 1.0:
            raise ValueError(f"Inpainting: hole_fraction must be in (0, 1), got {hole_fraction}")
        if mode not in self.MODES:
            raise ValueError(f"Inpainting: mode must be one of {self.MODES}, got {mode!r}")
        self.hole_fraction = float(hole_fraction)
        self.mode = mode
        self.fill = float(fill)

    def __repr__(self) -> str:
        return f"Inpainting(hole_fraction={self.hole_fraction}, mode={self.mode!r}, fill={self.fill})"

    def hole_size(self, h: int, w: int) -> tuple[int, int]:
        """Side lengths of the square-mode hole for an h x w image."""
        s = math.sqrt(self.hole_fraction)
        return max(1, min(h, round(s * h))), max(1, min(w, round(s * w)))

    def mask(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor:
        """Draw keep-masks (1 known, 0 hole) of shape (B, 1, H, W) for a batch of `shape`."""
        b, h, w = shape[0], shape[-2], shape[-1]
        dev = generator.device if generator is not None else device
        if self.mode == "square":
            hh, ww = self.hole_size(h, w)
            top = torch.randint(0, h - hh + 1, (b, 1, 1, 1), generator=generator, device=dev)
            left = torch.randint(0, w - ww + 1, (b, 1, 1, 1), generator=generator, device=dev)
            rows = torch.arange(h, device=dev).view(1, 1, h, 1)
            cols = torch.arange(w, device=dev).view(1, 1, 1, w)
            hole = (rows >= top) & (rows < top + hh) & (cols >= left) & (cols < left + ww)
        else:
            n_hole = round(self.hole_fraction * h * w)
            chosen = torch.rand(b, h * w, generator=generator, device=dev).argsort(dim=1)[:, :n_hole]
            hole = torch.zeros(b, h * w, dtype=torch.bool, device=dev).scatter_(1, chosen, True).view(b, 1, h, w)
        return (~hole).float().to(device if device is not None else dev)

    def forward_operator(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The known pixels: x where mask is 1, `fill` in the hole."""
        if mask is None:
            raise ValueError("Inpainting.forward_operator: mask is required (1 known, 0 hole), got None")
        return x * mask + self.fill * (1.0 - mask)

    def measure(self, x: Tensor, generator: torch.Generator | None = None,
                mask: Tensor | None = None) -> dict[str, Tensor]:
        _check_batch(x, "Inpainting")
        if mask is None:
            mask = self.mask(x.shape, generator, device=x.device)
        mask = mask.to(device=x.device, dtype=x.dtype)
        return {"y": self.forward_operator(x, mask), "mask": mask}

    def __call__(self, x: Tensor, generator: torch.Generator | None = None, mask: Tensor | None = None) -> Tensor:
        return self.measure(x, generator, mask)["y"]

    def condition_from_measurement(self, measurement: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """The known pixels of the image with the hole filled (`forward_operator`), and its mask:
        whatever a file holds inside the hole is discarded."""
        if mask is None:
            raise ValueError(f"{self!r} needs the mask of each image (NAME_mask.png, white = known)")
        return {"y": self.forward_operator(measurement, mask=mask), "mask": mask}

    def consistency(self, x_sample: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """PSNR between the sample and the condition outside the real hole."""
        if mask is None:
            raise ValueError("Inpainting.consistency: pass the real mask used to build y (batch['mask']), got None")
        return masked_psnr(x_sample, y, mask)


class Edges(Task):
    """A differentiable edge detector: y = edge map of x (for images without provided edges).

    Luma (BT.601) -> optional Gaussian blur (`sigma`, 0 disables) -> Sobel gradients ->
    magnitude sqrt(gx^2 + gy^2 + eps) divided by its maximum for [0, 1] images (4 * sqrt(2)) ->
    soft threshold sigmoid((m - threshold) / softness) (`threshold=None` keeps the normalised
    magnitude). With `invert=True` edges are dark on white, the pix2pix edges2shoes convention,
    so the map is comparable with a provided edge map. Every step is differentiable.
    """

    def __init__(self, threshold: float | None = 0.1, softness: float = 0.02, sigma: float = 1.0,
                 channels: int = 3, invert: bool = True) -> None:
        if channels not in (1, 3):
            raise ValueError(f"Edges: channels must be 1 or 3, got {channels}")
        if softness <= 0:
            raise ValueError(f"Edges: softness must be positive, got {softness}")
        if sigma < 0:
            raise ValueError(f"Edges: sigma must be >= 0, got {sigma}")
        self.threshold, self.softness, self.sigma = threshold, float(softness), float(sigma)
        self.channels, self.invert = channels, invert

    def __repr__(self) -> str:
        return (f"Edges(threshold={self.threshold}, softness={self.softness}, sigma={self.sigma}, "
                f"channels={self.channels}, invert={self.invert})")

    def y_channels(self, x_channels: int) -> int:
        return self.channels

    def _blur(self, v: Tensor) -> Tensor:
        if self.sigma == 0:
            return v
        r = max(1, math.ceil(2 * self.sigma))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=v.dtype, device=v.device) / self.sigma) ** 2)
        k = k / k.sum()
        v = F.conv2d(F.pad(v, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        return F.conv2d(F.pad(v, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))

    def forward_operator(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The edge map, (B, channels, H, W) in [0, 1]."""
        _check_batch(x, "Edges")
        v = self._blur(luminance(x))
        sobel = v.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([sobel, sobel.t()]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
        g = F.conv2d(F.pad(v, (1, 1, 1, 1), mode="replicate"), kernels)
        m = (g.square().sum(dim=1, keepdim=True) + 1e-12).sqrt() / (4.0 * math.sqrt(2.0))
        if self.threshold is not None:
            m = torch.sigmoid((m - self.threshold) / self.softness)
        if self.invert:
            m = 1.0 - m
        return m.expand(-1, self.channels, -1, -1).contiguous() if self.channels == 3 else m

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return {"y": self.forward_operator(x)}

    def consistency(self, x_sample: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """PSNR between the sample's edge map and the input edge map y."""
        e = self.forward_operator(x_sample)
        if y.shape[1] != e.shape[1]:
            y = luminance(y) if e.shape[1] == 1 else y.expand_as(e)
        return masked_psnr(e, y)
