"""Self-attention with a swappable per-layer processor, and the perturbed processors of
attention-perturbation guidance.

`SelfAttention` (the DDPM attention block, Ho et al. 2020) computes GroupNorm -> q, k, v as 1x1
projections, hands them to its processor and adds the output projection to the input:

    processor(q, k, v, grid) -> out       q, k, v, out: (B, heads, N, d); grid = (H, W), N = H * W

Processors are plain callables (not modules: swapping one never changes a state dict).
- `SDPAProcessor`: softmax(q k^T / sqrt(d)) v by the fused `scaled_dot_product_attention` (default).
- `NaiveProcessor`: the same attention written out (a reference for tests and benchmarks).
- `ASAGProcessor`: Adversarial Sinkhorn Attention Guidance (Kim 2025): the Sinkhorn transport
  plan of the adversarial kernel exp(-q k^T / sqrt(d)) replaces the softmax map (`sinkhorn_plan`).
- `PAGProcessor`: Perturbed-Attention Guidance (Ahn et al. 2024): identity map, output = v.
- `SEGProcessor`: Smoothed Energy Guidance (Hong 2024): queries blurred by a Gaussian over the
  2-D token grid, then fused attention.

`swap_attention_processors(net, processor, layers)` installs a processor on chosen layers for the
duration of a `with` block and restores the previous ones in `finally`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from msdiff.nn.layers import group_norm, linear


class AttentionProcessor(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor: ...


class SDPAProcessor:
    """Softmax attention through the fused `torch.nn.functional.scaled_dot_product_attention`."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def __repr__(self) -> str:
        return "SDPAProcessor()"


class NaiveProcessor:
    """softmax(q k^T / sqrt(d)) v materialised explicitly (the unfused reference)."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
        weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        return weights @ v

    def __repr__(self) -> str:
        return "NaiveProcessor()"


def sinkhorn(log_kernel: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp in log space: alternately normalise the rows, then the columns, of the
    matrix exp(log_kernel) (..., N, N) so that each sums to 1; returns the matrix (not its log).

    This is N times the entropic transport plan with uniform marginals 1/N (Cuturi 2013), so rows
    and columns sum to 1 as iterations grow; after any iters >= 1 the columns sum to 1 exactly.
    Only logsumexp is used, so any scale of the logits is stable. A constant added to a row of
    `log_kernel` cancels in the first row normalisation: the plan does not change.
    """
    if iters < 1:
        raise ValueError(f"iters: expected an integer >= 1, got {iters}")
    log_p = log_kernel
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p.exp()


def sinkhorn_plan(q: Tensor, k: Tensor, iters: int = 2) -> Tensor:
    """Adversarial Sinkhorn transport plan of ASAG (Kim 2025).

    q, k (B, H, N, d) -> plan (B, H, N, N), rows and columns summing to 1 (the N * P scaling the
    community port omits). The cost is the similarity, i.e. the kernel is exp(-q k^T / sqrt(d)),
    so mass goes to DISSIMILAR query/key pairs. Computed in float32 whatever the input dtype.
    """
    with torch.autocast(q.device.type, enabled=False):           # keep float32 under bf16 autocast
        logits = q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5
        return sinkhorn(-logits, iters)


class ASAGProcessor:
    """ASAG's perturbed attention: output = sinkhorn_plan(q, k, iters) @ v."""

    def __init__(self, iters: int = 2) -> None:
        if iters < 1:
            raise ValueError(f"iters: expected an integer >= 1, got {iters}")
        self.iters = iters

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
        return sinkhorn_plan(q, k, self.iters).to(v.dtype) @ v

    def __repr__(self) -> str:
        return f"ASAGProcessor(iters={self.iters})"


class PAGProcessor:
    """PAG's perturbed attention: the identity map, output = v (then the module's out-projection)."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
        return v

    def __repr__(self) -> str:
        return "PAGProcessor()"


def blur_matrix(n: int, sigma: float, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """(n, n) matrix of a 1-D Gaussian blur (radius ceil(3 sigma)) with half-sample symmetric
    boundaries (the signal mirrored with its edge sample repeated: ... b a | a b c | c b ...).

    Rows and columns sum to 1, so the blur keeps the mean, and as sigma grows it tends to the
    all-1/n matrix (every sample replaced by the mean). sigma = 0 gives the identity.
    """
    if sigma == 0:
        return torch.eye(n, device=device, dtype=dtype)
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()
    idx = (torch.arange(n, device=device)[:, None] + offsets.long()[None, :]) % (2 * n)
    idx = torch.where(idx < n, idx, 2 * n - 1 - idx)
    m = torch.zeros(n, n, device=device, dtype=torch.float64)
    m.scatter_add_(1, idx, weights.expand(n, -1).contiguous())
    return m.to(dtype)


def blur_tokens(q: Tensor, grid: tuple[int, int], sigma: float) -> Tensor:
    """Separable Gaussian blur of tokens (..., N, d) laid out row-major on an (H, W) grid.

    sigma = 0: no-op; sigma = inf: every token replaced by the mean token; otherwise the blur of
    `blur_matrix` along H and W (two small matmuls, exact for any radius, even wider than the grid).
    """
    if not sigma >= 0:
        raise ValueError(f"sigma: expected a number >= 0 (or inf), got {sigma}")
    if sigma == 0:
        return q
    if math.isinf(sigma):
        return q.mean(dim=-2, keepdim=True).expand_as(q)
    h, w = grid
    q2 = rearrange(q, "... (h w) d -> ... h w d", h=h, w=w)
    mh = blur_matrix(h, sigma, q.device, q.dtype)
    mw = blur_matrix(w, sigma, q.device, q.dtype)
    q2 = torch.einsum("ij,...jwd->...iwd", mh, q2)
    q2 = torch.einsum("kw,...iwd->...ikd", mw, q2)
    return rearrange(q2, "... h w d -> ... (h w) d")


class SEGProcessor:
    """SEG's perturbed attention: fused attention with the queries Gaussian-blurred over the grid
    (half-sample symmetric boundaries, see `blur_matrix`); sigma = inf uses the mean query."""

    def __init__(self, sigma: float = math.inf) -> None:
        if not sigma >= 0:
            raise ValueError(f"sigma: expected a number >= 0 (or inf), got {sigma}")
        self.sigma = float(sigma)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
        return F.scaled_dot_product_attention(blur_tokens(q, grid, self.sigma), k, v)

    def __repr__(self) -> str:
        return f"SEGProcessor(sigma={self.sigma})"


class SelfAttention(nn.Module):
    """DDPM self-attention block: x + proj_out(processor(q, k, v)) with q, k, v 1x1 projections
    of GroupNorm(x), `num_heads` heads of dim C / num_heads, and a zero-initialised proj_out."""

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads: expected a divisor of channels={channels}, got {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = linear(channels, 3 * channels)
        self.proj_out = linear(channels, channels, init_scale=0.0)
        self.processor: AttentionProcessor = SDPAProcessor()

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        q, k, v = rearrange(self.qkv(tokens), "b n (qkv heads d) -> qkv b heads n d", qkv=3, heads=self.num_heads)
        out = self.processor(q, k, v, (h, w))
        out = self.proj_out(rearrange(out, "b heads n d -> b n (heads d)"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, processor={self.processor!r}"


def attention_layers(net: nn.Module) -> dict[str, SelfAttention]:
    """Every `SelfAttention` in `net`, by its dotted module name."""
    return {name: m for name, m in net.named_modules() if isinstance(m, SelfAttention)}


def select_attention_layers(net: nn.Module, layers: str | Sequence[str]) -> dict[str, SelfAttention]:
    """Resolve layer names: an entry selects the attention layer of that name, or every attention
    layer below that prefix ("mid" -> "mid.attn", "up.3" -> its attention, "down" -> all down).
    Uses `net.attention_layers()` when the network has it (so a torch.compile wrapper keeps the
    unprefixed names), else every SelfAttention found by `attention_layers(net)`."""
    own = getattr(net, "attention_layers", None)
    available = own() if callable(own) else attention_layers(net)
    entries = (layers,) if isinstance(layers, str) else tuple(layers)
    chosen: dict[str, SelfAttention] = {}
    for entry in entries:
        hits = {n: m for n, m in available.items() if n == entry or n.startswith(entry + ".")}
        if not hits:
            raise ValueError(f"layers: unknown attention layer {entry!r}; valid names: "
                             f"{', '.join(available) or '(the network has no attention layers)'}")
        chosen.update(hits)
    return chosen


@contextmanager
def swap_attention_processors(net: nn.Module, processor: AttentionProcessor,
                              layers: str | Sequence[str] = ("mid",)) -> Iterator[dict[str, SelfAttention]]:
    """Use `processor` in the chosen attention layers inside the block; the previous processors
    come back in `finally` (also when the block raises). Yields the swapped layers by name."""
    chosen = select_attention_layers(net, layers)
    previous = {name: m.processor for name, m in chosen.items()}
    try:
        for m in chosen.values():
            m.processor = processor
        yield chosen
    finally:
        for name, m in chosen.items():
            m.processor = previous[name]
