"""Per-example noise and image output shared by sample.py and the validation grids (to move to
`msdiff.utils.example_generators`/`mix_seed` and `msdiff.images.write_png`/`sample_grid`).

* `example_generators`: one generator per batch row, seeded from (seed, condition index, draw).
  Samplers and estimators draw noise through `msdiff.utils.randn_like`, which accepts such a list
  and draws row i from generator i, so sampling is deterministic per condition whatever the batch
  size.
* `save_png`, `make_grid` ([y | draws | x] rows).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from msdiff.utils import tensor_to_uint8


# ---- per-example noise ------------------------------------------------------------------------
def noise_seed(seed: int, index: int, draw: int) -> int:
    """A 63-bit seed mixed from (seed, condition index, draw) by NumPy's SeedSequence."""
    s = np.random.SeedSequence([int(seed) % 2**63, int(index), int(draw)]).generate_state(2, np.uint32)
    return (int(s[0]) << 31) ^ int(s[1])


def example_generators(seed: int, indices: Sequence[int], draw: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per condition index for draw `draw`, on `device`."""
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed(noise_seed(seed, int(i), draw))
        gens.append(g)
    return gens


# ---- images -----------------------------------------------------------------------------------
def save_png(x: Tensor, path: str | os.PathLike) -> None:
    """Write a (C, H, W) image in [0, 1] (C = 1 or 3) as an 8-bit PNG."""
    a = tensor_to_uint8(x)
    try:
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(path)
    except OSError as e:  # disk full mid-file: no truncated PNG left behind; the error names the file
        Path(path).unlink(missing_ok=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


def to_rgb(x: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) -> (B, 3, H, W)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def make_grid(y: Tensor, samples: Tensor, x: Tensor | None, pad: int = 2) -> Tensor:
    """One row per condition: [y | draw 1 .. draw K | x], (3, B*(H+pad), (K+2)*(W+pad)) in [0, 1].

    y is resized to the sample size by nearest neighbour when it is smaller (a low-res condition)."""
    b, h, w = samples.shape[1], samples.shape[-2], samples.shape[-1]
    if tuple(y.shape[-2:]) != (h, w):
        y = torch.nn.functional.interpolate(y.float(), size=(h, w), mode="nearest")
    cols = [to_rgb(y.float())] + [to_rgb(s.float()) for s in samples] + ([to_rgb(x.float())] if x is not None else [])
    cols = [torch.nn.functional.pad(c.clamp(0, 1), (0, pad, 0, pad), value=1.0) for c in cols]
    rows = torch.cat(cols, dim=3)                       # (B, 3, H+pad, n*(W+pad))
    return torch.cat(list(rows), dim=1)                 # (3, B*(H+pad), n*(W+pad))
