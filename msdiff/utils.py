"""Small tensor helpers shared by every layer (layer 0: imports nothing from msdiff).

Seeding has one home here: `mix_seed` mixes integer keys into one 63-bit seed (NumPy's
SeedSequence), `make_generator` turns a seed into a torch.Generator, and `example_generators` gives
one generator per condition index, which `randn`/`rand` below accept (row i drawn from generator i).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-example (B,) tensor broadcasts against (B, ...)."""
    if v.ndim > ndim:
        raise ValueError(f"append_dims: tensor has {v.ndim} dims, more than the target {ndim}")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def batch_sum(v: Tensor) -> Tensor:
    """Sum over every dim but the first: (B, ...) -> (B,)."""
    return v.reshape(v.shape[0], -1).sum(dim=1)


def batch_mean(v: Tensor) -> Tensor:
    """Mean over every dim but the first: (B, ...) -> (B,)."""
    return v.reshape(v.shape[0], -1).mean(dim=1)


Generators = torch.Generator | Sequence[torch.Generator] | None
"""A single generator for the whole batch, one generator per batch row, or None (global RNG)."""


def _draw(fn, shape, generator: Generators, device, dtype) -> Tensor:
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        return fn(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"generator: expected one generator per batch row ({shape[0]}), got {len(generator)}")
    return torch.cat([fn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def randn(shape, generator: Generators = None, device=None, dtype=None) -> Tensor:
    """Standard normal noise of `shape`. With a sequence of generators, row i of the batch is drawn
    from generators[i], so each example's noise is independent of how examples are batched
    (sample.py uses this to make draws reproducible per condition whatever the batch size)."""
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape, generator: Generators = None, device=None, dtype=None) -> Tensor:
    """Uniform [0, 1) noise of `shape`; per-row generators as in `randn`."""
    return _draw(torch.rand, shape, generator, device, dtype)


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """`torch.randn_like` that honours an explicit generator (or one generator per row), which
    must live on x's device."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def mix_seed(*keys: int) -> int:
    """One 63-bit seed mixed from the integer `keys` by NumPy's SeedSequence: distinct key tuples
    give unrelated streams (unlike `seed + step` sums, where (1, 2) and (2, 1) collide).

    Each key is taken modulo 2^63 (so a negative seed is accepted); the seed is
    (w0 << 31) ^ w1 for the first two 32-bit words w0, w1 of `generate_state`."""
    if not keys:
        raise ValueError("mix_seed: expected at least one key")
    w = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, np.uint32)
    return (int(w[0]) << 31) ^ int(w[1])


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def example_generators(seed: int, indices: Sequence[int], draw: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per condition index for draw `draw`, on `device`, seeded by
    `mix_seed(seed, index, draw)`: with `randn`/`rand`, example i's noise does not depend on the
    batch it is drawn in, so sampling is deterministic per condition whatever the batch size."""
    return [make_generator(mix_seed(seed, int(i), int(draw)), device) for i in indices]


def to_unit_range(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1.0) * 0.5


def to_symmetric_range(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1] (the 2x - 1 input scaling of the reference)."""
    return x * 2.0 - 1.0


def image_to_tensor(img) -> Tensor:
    """A PIL image (or HWC uint8 array) -> float tensor (C, H, W) in [0, 1]."""
    a = np.array(img)  # a writable copy (np.asarray of a PIL image is read-only)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype != np.uint8:
        raise ValueError(f"image_to_tensor: expected uint8 pixels, got {a.dtype}")
    return torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)


def quantize(x: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to 8 bits, as an image written to disk would be."""
    return x.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def tensor_to_uint8(x: Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> HWC uint8 array (quantised like a PNG on disk)."""
    a = x.detach().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()
    return a.permute(1, 2, 0).numpy()
