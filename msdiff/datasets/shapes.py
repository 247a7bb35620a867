"""The embedded default dataset: procedural images generated in code, no download, no network.

Each image is a pure function of (seed, split, index), drawn with vectorised torch ops:

- background: a linear gradient between two random colours along a random direction, plus a
  low-frequency sinusoidal shading (smooth content, what super-resolution recovers easily);
- 3 to 7 shapes (ellipses, rotated rectangles, rings) with hard edges, composited back to front
  (painter's algorithm), each filled with a solid colour, sharp stripes, a checkerboard or an
  internal gradient at a random frequency (textures at several scales, what 8x SR cannot
  recover from the low-res image and must hallucinate plausibly; sharp boundaries for edges;
  occluded structure for inpainting).

Splits use disjoint seed streams; lengths default to 10,000 train / 500 val / 500 test.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from msdiff.datasets.base import ConditionalDataset
from msdiff.tasks import Task, luminance

DEFAULT_LENGTHS = {"train": 10_000, "val": 500, "test": 500}


def procedural_image(size: int, generator: torch.Generator, max_shapes: int = 7) -> Tensor:
    """One (3, size, size) image in [0, 1] drawn from `generator` (see the module doc)."""
    g = generator

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    py, px = coords.view(size, 1), coords.view(1, size)  # (H, 1), (1, W)

    # background: gradient along a random direction + low-frequency shading
    theta = u(1, hi=2 * math.pi)
    ramp = (px * torch.cos(theta) + py * torch.sin(theta) - (torch.cos(theta) + torch.sin(theta)).clamp_max(0))
    ramp = ramp / ramp.max()
    c0, c1 = u(3, 1, 1), u(3, 1, 1)
    freq, phase = u(2, lo=0.5, hi=2.5), u(2, hi=2 * math.pi)
    shade = torch.sin(2 * math.pi * freq[0] * px + phase[0]) * torch.sin(2 * math.pi * freq[1] * py + phase[1])
    background = (c0 + (c1 - c0) * ramp + u(3, 1, 1, hi=0.15) * shade).clamp(0, 1)

    # shapes, all at once: (n, H, W) local coordinates in each shape's rotated frame
    n = int(torch.randint(3, max_shapes + 1, (), generator=g))
    cx, cy = u(n, 1, 1), u(n, 1, 1)
    rx, ry = u(n, 1, 1, lo=0.06, hi=0.3), u(n, 1, 1, lo=0.06, hi=0.3)
    phi = u(n, 1, 1, hi=math.pi)
    a = ((px - cx) * torch.cos(phi) + (py - cy) * torch.sin(phi)) / rx
    b = (-(px - cx) * torch.sin(phi) + (py - cy) * torch.cos(phi)) / ry
    radius2 = a.square() + b.square()
    kind = torch.randint(0, 3, (n, 1, 1), generator=g)
    ellipse = radius2 <= 1
    rectangle = (a.abs() <= 1) & (b.abs() <= 1)
    ring = ellipse & (radius2 >= u(n, 1, 1, lo=0.3, hi=0.7).square())
    inside = torch.where(kind == 0, ellipse, torch.where(kind == 1, rectangle, ring))  # (n, H, W)

    # textures: 0 solid, 1 stripes, 2 checkerboard, 3 gradient, at 1.5 to 6 cycles per radius
    tex = torch.randint(0, 4, (n,), generator=g)
    f = u(n, lo=1.5, hi=6.0)
    fg, fg2 = u(n, 3), u(n, 3)

    # composite: each pixel takes the last shape covering it (top = its index + 1), else the
    # background; the texture is evaluated only for that shape, pixel by pixel
    top = (inside * torch.arange(1, n + 1).view(n, 1, 1)).amax(dim=0)  # (H, W), 0 = background
    k = (top - 1).clamp_min(0)  # the covering shape's index (background pixels: 0, not used)
    a_k, b_k = a.gather(0, k[None])[0], b.gather(0, k[None])[0]
    sa, sb = torch.sin(math.pi * f[k] * a_k) > 0, torch.sin(math.pi * f[k] * b_k) > 0
    p = (tex[k] == 1) * sa.float() + (tex[k] == 2) * (sa ^ sb).float() + (tex[k] == 3) * ((a_k + 1) / 2).clamp(0, 1)
    fill = (fg[k] + (fg2[k] - fg[k]) * p[..., None]).permute(2, 0, 1)  # (3, H, W)
    return torch.where(top > 0, fill, background).contiguous()


class Shapes(ConditionalDataset):
    """The embedded default dataset (module doc): `length` procedural images of `image_size`.

    `root` is accepted so configs can swap dataset classes without other edits; nothing is
    read from it. `length=None` uses 10,000 / 500 / 500 for train / val / test. `channels=1`
    gives grey images (the BT.601 luma of the colour ones), a stand-in for grey data sets.
    """

    def __init__(self, split: str = "train", task: Task | None = None, root: str | None = None,
                 image_size: int = 32, length: int | None = None, seed: int = 0, flip: bool = False,
                 max_shapes: int = 7, channels: int = 3) -> None:
        super().__init__(split, task, seed, flip)
        if channels not in (1, 3):
            raise ValueError(f"Shapes: channels must be 1 or 3, got {channels}")
        self.channels = int(channels)
        if image_size < 4:
            raise ValueError(f"Shapes: image_size must be >= 4, got {image_size}")
        if max_shapes < 3:
            raise ValueError(f"Shapes: max_shapes must be >= 3, got {max_shapes}")
        self.root, self.image_size, self.max_shapes = root, int(image_size), int(max_shapes)
        self.length = DEFAULT_LENGTHS[split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"Shapes: length must be positive, got {length}")

    def __len__(self) -> int:
        return self.length

    def load(self, index: int, generator: torch.Generator) -> tuple[Tensor, None]:
        # the image depends on (seed, split, index) only, not on the epoch: draw it from its own stream
        x = procedural_image(self.image_size, self.generator(index, epoch=0), self.max_shapes)
        return (luminance(x[None])[0] if self.channels == 1 else x), None
