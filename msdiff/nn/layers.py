"""Building blocks of the DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
Appendix B), with the conventions of score_sde_pytorch's `ddpm` model that the MSDiff reference
trains: GroupNorm(32, eps=1e-6), SiLU, fan-average uniform initialisation with zero biases,
zero-initialised last convolutions, TF-"SAME" strided-conv downsampling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPS = 32
GN_EPS = 1e-6


def default_init_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """Variance scaling, fan-average, uniform (the DDPM/TF default): Var = scale / fan_avg.

    `scale=0` gives exact zeros (used for the last conv of each block and the attention output).
    """
    if scale == 0.0:
        return nn.init.zeros_(weight)
    receptive = weight[0][0].numel() if weight.ndim > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    return nn.init.uniform_(weight, -bound, bound)


def conv2d(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None,
           init_scale: float = 1.0) -> nn.Conv2d:
    """A conv with DDPM initialisation; kernel_size=1 is the "NIN" projection of the reference."""
    padding = kernel_size // 2 if padding is None else padding
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding)
    default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def linear(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    """A dense layer with DDPM initialisation."""
    layer = nn.Linear(in_features, out_features)
    default_init_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) as in the reference; `channels` must be a multiple of 32."""
    if channels % GROUPS:
        raise ValueError(f"group_norm: channels={channels} must be a multiple of {GROUPS}")
    return nn.GroupNorm(GROUPS, channels, eps=GN_EPS)


def timestep_embedding(noise_label: Tensor, dim: int, max_positions: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017, sec. 3.5; DDPM's `get_timestep_embedding`).

    noise_label (B,) float -> (B, dim) = [sin(l * w_i), cos(l * w_i)] with
    w_i = max_positions^(-i / (dim/2 - 1)), i = 0 .. dim/2 - 1 (zero-padded when dim is odd).
    """
    if noise_label.ndim != 1:
        raise ValueError(f"noise_label: expected shape (B,), got {tuple(noise_label.shape)}")
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=noise_label.device, dtype=torch.float32)
                      * (-math.log(max_positions) / (half - 1)))
    args = noise_label.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimeEmbedding(nn.Module):
    """noise_label -> sinusoid(ch) -> Dense(ch, 4ch) -> SiLU -> Dense(4ch, 4ch)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.dense0 = linear(ch, 4 * ch)
        self.dense1 = linear(4 * ch, 4 * ch)

    def forward(self, noise_label: Tensor) -> Tensor:
        emb = timestep_embedding(noise_label, self.ch).to(self.dense0.weight.dtype)
        return self.dense1(F.silu(self.dense0(emb)))


class _ScaleByMask(torch.autograd.Function):
    """out = x * mask * scale with a boolean mask; keeps only the 1-byte mask for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x.mul(mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None, None


def keep_mask(x: Tensor, p: float) -> Tensor:
    """Boolean keep-mask shaped (and laid out in memory) like `x`: each element is kept with
    probability 1 - p_q, where p_q = round(p * 2**15) / 2**15 (0.1 -> 0.100006).

    The uniform 15-bit numbers come two per 32-bit draw of the torch RNG (`random_()` on int32
    gives 31 uniform bits; the two int16 halves, masked to 15 bits, are independent), about 3x
    cheaper on CPU than `bernoulli_`, which draws one number per element.
    """
    n = x.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_().view(torch.int16)[:n]
    keep = bits.bitwise_and_(0x7FFF) >= round(p * 2**15)
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = x.shape
        return keep.view(b, h, w, c).permute(0, 3, 1, 2)     # same strides as x: no layout mixing
    return keep.view(x.shape)


class Dropout(nn.Module):
    """Inverted dropout, x * mask / (1 - p). On CPU the mask comes from `keep_mask` (15-bit
    resolution of p) and only the boolean mask is saved for the backward; elsewhere this is
    `F.dropout` (fused on GPUs). Draws from the global torch RNG either way, so seeding and
    activation-checkpoint recomputation behave as with `nn.Dropout`."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout: expected 0 <= p < 1, got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        p_q = round(self.p * 2**15) / 2**15
        return _ScaleByMask.apply(x, keep_mask(x, self.p), 1.0 / (1.0 - p_q))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ResBlock(nn.Module):
    """DDPM residual block: GN -> SiLU -> conv3x3 -> + Dense(SiLU(temb)) -> GN -> SiLU -> dropout
    -> conv3x3 (zero init), plus a 1x1 (NIN) shortcut when the channel count changes."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm0 = group_norm(in_ch)
        self.conv0 = conv2d(in_ch, out_ch)
        self.temb_proj = linear(temb_dim, out_ch)
        self.norm1 = group_norm(out_ch)
        self.dropout = Dropout(dropout)
        self.conv1 = conv2d(out_ch, out_ch, init_scale=0.0)
        self.shortcut = conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """3x3 conv with stride 2 after padding one row/column at the bottom/right (TF "SAME", as the
    reference); halves an even resolution."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = conv2d(ch, ch, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = conv2d(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
