"""The shared score network: the DDPM U-Net (Ho et al. 2020, Appendix B) as configured by
score_sde_pytorch's `ddpm` model, which the MSDiff reference (Batzolis et al. 2021) trains.

Levels i = 0 .. len(ch_mult) - 1 work at resolution image_size / 2**i with ch * ch_mult[i]
channels. Down: `num_res_blocks` res blocks per level (each followed by attention at the
`attn_resolutions`), then a stride-2 conv (not on the last level). Middle: Res -> Attn -> Res.
Up (levels in reverse): `num_res_blocks + 1` res blocks on the concatenation with the stored
skips, ONE attention after them at the `attn_resolutions` (as the reference), then nearest x2 +
conv (not on level 0). Head: GroupNorm -> SiLU -> conv3x3 (zero init).

Attention layers are named by module path: "down.{i}.attn.{j}", "mid.attn", "up.{i}.attn"
(down.i and up.i share resolution image_size / 2**i); see `attention_layers()`.

The network knows nothing of SDEs: `net(x, noise_label)` takes whatever input scaling and
noise label the estimator chooses, and returns the raw output.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from msdiff.nn.attention import SelfAttention, attention_layers
from msdiff.nn.layers import Downsample, ResBlock, TimeEmbedding, Upsample, conv2d, group_norm


class DownLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, num_res_blocks: int, attn: bool,
                 downsample: bool, dropout: float, num_heads: int) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResBlock(in_ch if j == 0 else out_ch, out_ch, temb_dim, dropout)
                                 for j in range(num_res_blocks))
        self.attn = nn.ModuleList(SelfAttention(out_ch, num_heads) for _ in range(num_res_blocks)) if attn else None
        self.downsample = Downsample(out_ch) if downsample else None


class UpLevel(nn.Module):
    def __init__(self, in_chs: Sequence[int], out_ch: int, temb_dim: int, attn: bool, upsample: bool,
                 dropout: float, num_heads: int) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, out_ch, temb_dim, dropout) for c in in_chs)
        self.attn = SelfAttention(out_ch, num_heads) if attn else None
        self.upsample = Upsample(out_ch) if upsample else None


class MidBlock(nn.Module):
    def __init__(self, ch: int, temb_dim: int, dropout: float, num_heads: int) -> None:
        super().__init__()
        self.res0 = ResBlock(ch, ch, temb_dim, dropout)
        self.attn = SelfAttention(ch, num_heads)
        self.res1 = ResBlock(ch, ch, temb_dim, dropout)


class UNet(nn.Module):
    """DDPM U-Net. Defaults: the SR-160 network of the MSDiff reference (43,481,862 parameters
    with 6 output channels, 43,479,267 with 3).

    Args:
        in_channels: input channels (x_t concatenated with the condition: 6 for RGB pairs).
        out_channels: output channels (3: x-score only, CDE; 6: joint score, CDiffE/CMDE).
        ch: base channel count (multiple of 32 for GroupNorm(32)); also the time-embedding dim.
        ch_mult: channel multiplier per level; the resolution halves from one level to the next.
        num_res_blocks: res blocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions with self-attention (each must be a level's resolution).
        image_size: input height and width (divisible by 2 ** (len(ch_mult) - 1)).
        dropout: dropout rate inside the res blocks.
        num_heads: attention heads (1 as the reference).
        checkpointing: recompute each block in the backward pass (torch.utils.checkpoint,
            non-reentrant, same dropout masks) to trade compute for activation memory.
    """

    def __init__(self, in_channels: int = 6, out_channels: int = 6, ch: int = 96,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 3, 3), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (20, 10, 5), image_size: int = 160,
                 dropout: float = 0.1, num_heads: int = 1, checkpointing: bool = False) -> None:
        super().__init__()
        levels = len(ch_mult)
        if levels < 1 or image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size: expected a multiple of 2**(len(ch_mult)-1)="
                             f"{2 ** max(levels - 1, 0)}, got {image_size}")
        resolutions = [image_size // 2**i for i in range(levels)]
        unknown = sorted(set(attn_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(f"attn_resolutions: {unknown} are not level resolutions {resolutions}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks: expected >= 1, got {num_res_blocks}")
        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.ch, self.ch_mult, self.num_res_blocks = ch, tuple(ch_mult), num_res_blocks  # (for hparams)
        self.attn_resolutions = tuple(attn_resolutions)
        self.checkpointing = checkpointing
        temb_dim = 4 * ch

        self.time_embed = TimeEmbedding(ch)
        self.conv_in = conv2d(in_channels, ch)
        skips, c = [ch], ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = DownLevel(c, ch * mult, temb_dim, num_res_blocks, resolutions[i] in attn_resolutions,
                              i < levels - 1, dropout, num_heads)
            self.down.append(level)
            c = ch * mult
            skips += [c] * (num_res_blocks + (i < levels - 1))
        self.mid = MidBlock(c, temb_dim, dropout, num_heads)
        up: list[UpLevel] = []
        for i in reversed(range(levels)):
            out_ch = ch * ch_mult[i]
            in_chs = []
            for _ in range(num_res_blocks + 1):
                in_chs.append(c + skips.pop())
                c = out_ch
            up.append(UpLevel(in_chs, out_ch, temb_dim, resolutions[i] in attn_resolutions, i > 0,
                              dropout, num_heads))
        self.up = nn.ModuleList(reversed(up))        # indexed by level, like self.down
        self.norm_out = group_norm(c)
        self.conv_out = conv2d(c, out_channels, init_scale=0.0)

    def attention_layers(self) -> dict[str, SelfAttention]:
        """Every attention layer by dotted name ("down.3.attn.0", "mid.attn", "up.3.attn", ...)."""
        return attention_layers(self)

    def _run(self, block, *args: Tensor) -> Tensor:
        """block(*args), recomputed in the backward pass (only its inputs kept) when checkpointing."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @staticmethod
    def _skip_res(res: ResBlock, h: Tensor, skip: Tensor, temb: Tensor) -> Tensor:
        # concatenation inside the checkpointed call: the concatenated copy is never stored
        return res(torch.cat([h, skip], dim=1), temb)

    def _head(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: Tensor, noise_label: Tensor) -> Tensor:
        """x (B, in_channels, H, W), noise_label (B,) float -> (B, out_channels, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if noise_label.shape != (x.shape[0],):
            raise ValueError(f"noise_label: expected shape ({x.shape[0]},), got {tuple(noise_label.shape)}")
        temb = self.time_embed(noise_label)
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for j, res in enumerate(level.res):
                h = self._run(res, h, temb)
                if level.attn is not None:
                    h = self._run(level.attn[j], h)
                hs.append(h)
            if level.downsample is not None:
                h = self._run(level.downsample, h)
                hs.append(h)
        h = self._run(self.mid.res0, h, temb)
        h = self._run(self.mid.attn, h)
        h = self._run(self.mid.res1, h, temb)
        for level in reversed(self.up):
            for res in level.res:
                h = self._run(partial(self._skip_res, res), h, hs.pop(), temb)
            if level.attn is not None:
                h = self._run(level.attn, h)
            if level.upsample is not None:
                h = self._run(level.upsample, h)
        return self._run(self._head, h)
