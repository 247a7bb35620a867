"""Small tensor helpers shared by every layer (layer 0: imports nothing from msdiff).

Seeding has one home here: `mix_seed` mixes integer keys into one 63-bit seed (NumPy's
SeedSequence), `make_generator` turns a seed into a torch.Generator, and `example_noise` gives one
noise stream per condition index (an `ExampleNoise`, drawn for the whole batch in one vectorised
call), which `randn`/`rand` below accept (row i drawn from stream i).
"""
from __future__ import annotations

import math
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


# ---- per-example noise streams: one vectorised draw for a batch whose rows have their own seeds ----
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's Weyl increment (2^64 / golden ratio)
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # its two output multipliers


def _int64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits (torch has no uint64 math)."""
    return c - 2**64 if c >= 2**63 else c


def _shift_right(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic: clear the sign-extended bits)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(z: Tensor) -> Tensor:
    """The SplitMix64 output function of Steele, Lea & Flood (2014), as in Vigna's reference
    splitmix64.c, on int64 tensors holding uint64 bits (multiplications wrap modulo 2^64):
    z ^= z >> 30; z *= M1; z ^= z >> 27; z *= M2; z ^= z >> 31. The SplitMix64 generator seeded
    with s outputs splitmix64(s + k * GOLDEN) for k = 1, 2, ..."""
    z = (z ^ _shift_right(z, 30)) * _int64(_M1)
    z = (z ^ _shift_right(z, 27)) * _int64(_M2)
    return z ^ _shift_right(z, 31)


class ExampleNoise:
    """One noise stream per batch row, drawn for the whole batch in one vectorised call.

    Row b has its own 63-bit `keys[b]`; call number d (0, 1, ...) of `randn`/`rand` gives row b the
    first n outputs of the SplitMix64 generator seeded with s = splitmix64(keys[b] + (d + 1) GOLDEN)
    (words w_k = splitmix64(s + k GOLDEN), k = 1..n; counter-based, so no per-row state and no loop
    over rows). A row's noise therefore depends on its key, the call count and the row shape only:
    not on which other rows share the batch, nor on the device (the integer words are identical on
    CPU and GPU, in any batch; the floats agree to the rounding of the math kernels, a few ulp). sample.py gives each condition its own key
    (`example_noise`), so samples do not depend on the batch size or the number of devices.

    Uniforms take the top bits of a word: u = (w >> (64 - p)) 2^-p in [0, 1), p the dtype's
    precision (24 for float32, 53 for float64). Normals are Box-Muller pairs (Box & Muller 1958), one
    word per pair as cuRAND's normal does: hi, lo = the word's upper and lower 32 bits,
    u1 = (hi + 1) 2^-32 in (0, 1], theta = 2 pi lo 2^-32, r = sqrt(-2 ln u1),
    z = (r cos theta, r sin theta), in float32 (float64 for a float64 request); row b's n normals are
    the ceil(n/2) cosines followed by the sines (n odd: the last sine dropped). |z| <= sqrt(64 ln 2)
    = 6.66: the tail beyond it has probability 3e-11.
    """

    def __init__(self, keys: Sequence[int], device: torch.device | str = "cpu") -> None:
        keys = [int(k) for k in keys]
        if not keys:
            raise ValueError("ExampleNoise: expected at least one key (one per batch row)")
        self.keys = torch.tensor([k % 2**63 for k in keys], dtype=torch.int64, device=device)
        self.calls = 0  # host counter: advancing it needs no device synchronisation

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def row_size(self, shape: Sequence[int]) -> int:
        """The number of elements of one row of `shape`, or a ValueError unless it has a row per key."""
        shape = tuple(int(d) for d in shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"ExampleNoise: expected a shape with one row per key ({len(self)}), got {shape}")
        return math.prod(shape[1:])

    def words(self, shape: Sequence[int]) -> Tensor:
        """The (B, n) int64 words of the next call (n = the elements of one row; advances the count)."""
        return self._next_words(self.row_size(shape))

    def _next_words(self, n: int) -> Tensor:
        self.calls += 1
        seed = splitmix64(self.keys + _int64((self.calls * _GOLDEN) % 2**64))  # (B,): the call's stream seed
        k = torch.arange(1, n + 1, dtype=torch.int64, device=self.device) * _int64(_GOLDEN)  # wraps mod 2^64
        return splitmix64(seed[:, None] + k)

    def rand(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
        """Uniform [0, 1) noise of `shape` (class doc)."""
        dtype = dtype or torch.get_default_dtype()
        p = 1 - round(math.log2(torch.finfo(dtype).eps))  # significand bits: 24 for float32, 53 for float64
        w = self.words(shape)
        return (_shift_right(w, 64 - p).to(torch.float64) * 2.0**-p).to(dtype).reshape(shape)

    def randn(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal noise of `shape` (class doc)."""
        dtype = dtype or torch.get_default_dtype()
        shape = tuple(int(d) for d in shape)
        n = self.row_size(shape)
        w = self._next_words((n + 1) // 2)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        u1 = (_shift_right(w, 32) + 1).to(work) * 2.0**-32
        theta = (w & 0xFFFFFFFF).to(work) * (2.0 * math.pi * 2.0**-32)
        r = (-2.0 * u1.log()).sqrt()
        z = torch.cat([r * theta.cos(), r * theta.sin()], dim=1)[:, :n]
        return z.to(dtype).reshape(shape)


Generators = torch.Generator | ExampleNoise | None
"""A single generator for the whole batch, one noise stream per batch row (ExampleNoise), or None
(the global RNG)."""


def randn(shape, generator: Generators = None, device=None, dtype=None) -> Tensor:
    """Standard normal noise of `shape`. With an ExampleNoise, row i of the batch is drawn from its
    own stream, so each example's noise is independent of how examples are batched (sample.py uses
    this to make draws reproducible per condition whatever the batch size)."""
    if isinstance(generator, ExampleNoise):
        return generator.randn(shape, dtype).to(device or generator.device)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def rand(shape, generator: Generators = None, device=None, dtype=None) -> Tensor:
    """Uniform [0, 1) noise of `shape`; per-row streams as in `randn`."""
    if isinstance(generator, ExampleNoise):
        return generator.rand(shape, dtype).to(device or generator.device)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """`torch.randn_like` that honours an explicit generator or ExampleNoise, which must live on
    x's device."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def mix_seed(*keys: int) -> int:
    """One 63-bit seed mixed from the integer `keys` by NumPy's SeedSequence: key tuples that differ
    give unrelated streams (unlike `seed + step` sums, where (1, 2) and (2, 1) collide), except
    that trailing zero keys do not count (SeedSequence pads its entropy with zeros: (s,), (s, 0)
    and (s, 0, 0) give one seed).

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


def example_noise(seed: int, indices: Sequence[int], draw: int, device: torch.device | str) -> ExampleNoise:
    """One noise stream per condition index for draw `draw`, on `device`, keyed by
    `mix_seed(seed, index, draw)`: example i's noise does not depend on the batch it is drawn in,
    so sampling is deterministic per condition whatever the batch size."""
    return ExampleNoise([mix_seed(seed, int(i), int(draw)) for i in indices], device)


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
