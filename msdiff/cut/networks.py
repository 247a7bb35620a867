"""CUT / FastCUT networks: ResNet generator, PatchGAN discriminator and the patch head F.

Park et al., *Contrastive Learning for Unpaired Image-to-Image Translation* (ECCV 2020),
Sec. 3 and Appendix: the generator is the 9-block ResNet of Johnson et al. with anti-aliased
down/up-sampling (Zhang, *Making Convolutional Networks Shift-Invariant Again*, 2019), the
discriminator a 70x70 PatchGAN, and F (called H in the paper) a 2-layer MLP per encoder layer
that maps sampled patch features to L2-normalised 256-d embeddings (Eq. 2-5).

Architecture facts (parameter counts, NCE tap indices, initialisation) follow the official
implementation. Plain PyTorch: knows nothing of training.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F_
from torch import Tensor, nn


def _binomial_kernel(taps: Sequence[float]) -> Tensor:
    """Outer product of a 1-D binomial filter with itself, normalised to sum 1: (k, k)."""
    a = torch.tensor(taps, dtype=torch.float32)
    k = a[:, None] * a[None, :]
    return k / k.sum()


class BlurDownsample(nn.Module):
    """Anti-aliased stride-2 down-sampling: reflection pad, fixed [1,2,1]x[1,2,1]/16 blur, stride 2.

    The blur kernel is a buffer (not a parameter). (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("kernel", _binomial_kernel([1.0, 2.0, 1.0]).expand(channels, 1, 3, 3).clone())

    def forward(self, x: Tensor) -> Tensor:
        x = F_.pad(x, (1, 1, 1, 1), mode="reflect")
        return F_.conv2d(x, self.kernel.to(x.dtype), stride=2, groups=self.channels)


class BlurUpsample(nn.Module):
    """Anti-aliased x2 up-sampling: a transposed conv with the fixed [1,3,3,1]x[1,3,3,1] kernel.

    Replication pad 1, depthwise transposed conv (stride 2, kernel scaled by 4 so a constant image
    stays constant), cropped back to exactly (2H, 2W). The kernel is a buffer.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        k = _binomial_kernel([1.0, 3.0, 3.0, 1.0]) * 4.0
        self.register_buffer("kernel", k.expand(channels, 1, 4, 4).clone())

    def forward(self, x: Tensor) -> Tensor:
        x = F_.pad(x, (1, 1, 1, 1), mode="replicate")
        y = F_.conv_transpose2d(x, self.kernel.to(x.dtype), stride=2, padding=2, groups=self.channels)
        return y[:, :, 1:-1, 1:-1]  # (2H + 2) -> 2H


class ResnetBlock(nn.Module):
    """x + [reflect pad, 3x3 conv, IN, ReLU, reflect pad, 3x3 conv, IN](x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _norm(channels: int) -> nn.InstanceNorm2d:
    """InstanceNorm without affine parameters or running statistics (the reference's 'instance')."""
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """Reference initialisation: xavier-normal weights with `gain` for every conv/linear, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class ResnetGenerator(nn.Module):
    """CUT generator G: c7s1-ngf, two anti-aliased down-samplings, `n_blocks` res blocks, two
    anti-aliased up-samplings, c7s1-out, Tanh. 11,378,179 parameters by default (3->3, ngf 64).

    `model` is a flat module list so encoder features can be tapped by index; the default NCE
    layers (0, 4, 8, 12, 16) are the padded input, the first and second down-sampling convs
    (before their norm) and the outputs of res blocks 1 and 5.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9,
                 init_gain: float = 0.02) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or ngf < 1 or n_blocks < 0:
            raise ValueError(f"ResnetGenerator: expected positive channels/ngf and n_blocks >= 0, got "
                             f"in_channels={in_channels}, out_channels={out_channels}, ngf={ngf}, n_blocks={n_blocks}")
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7), _norm(ngf), nn.ReLU(True)]
        for i in range(2):
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, padding=1), _norm(2 * c), nn.ReLU(True), BlurDownsample(2 * c)]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2):
            c = ngf * 2 ** (2 - i)
            layers += [BlurUpsample(c), nn.Conv2d(c, c // 2, 3, padding=1), _norm(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.ModuleList(layers)
        self.ngf, self.n_blocks = ngf, n_blocks
        init_weights(self, init_gain)

    def nce_channels(self, layers: Sequence[int]) -> tuple[int, ...]:
        """Channels of the features tapped at `layers` (for building a PatchSampleMLP)."""
        x = torch.zeros(1, self.model[1].in_channels, 16, 16)
        with torch.no_grad():
            return tuple(f.shape[1] for f in self.encode(x, layers))

    def encode(self, x: Tensor, layers: Sequence[int]) -> list[Tensor]:
        """Features after module `i` for each i in `layers` (stops at the last one requested)."""
        if not layers:
            raise ValueError("ResnetGenerator.encode: layers must name at least one module index")
        wanted = set(layers)
        if min(wanted) < 0 or max(wanted) >= len(self.model):
            raise ValueError(f"ResnetGenerator.encode: layers must lie in [0, {len(self.model) - 1}], got {tuple(layers)}")
        feats: dict[int, Tensor] = {}
        last = max(wanted)
        for i, module in enumerate(self.model):
            x = module(x)
            if i in wanted:
                feats[i] = x
            if i == last:
                break
        return [feats[i] for i in layers]

    def forward(self, x: Tensor, layers: Sequence[int] = (), encode_only: bool = False) -> Tensor | list[Tensor]:
        """G(x) in [-1, 1]; with `encode_only=True` the list of features at `layers` instead."""
        if encode_only:
            return self.encode(x, layers)
        for module in self.model:
            x = module(x)
        return x


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator with anti-aliased strided convs: 2,764,737 parameters by default;
    a 256x256 input gives a 30x30 map of real/fake logits (70x70 receptive field)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, init_gain: float = 0.02) -> None:
        super().__init__()
        if in_channels < 1 or ndf < 1 or n_layers < 1:
            raise ValueError(f"PatchDiscriminator: expected positive in_channels, ndf, n_layers, got "
                             f"{in_channels}, {ndf}, {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, padding=1), nn.LeakyReLU(0.2, True),
                                   BlurDownsample(ndf)]
        c = ndf
        for n in range(1, n_layers):
            c_next = ndf * min(2**n, 8)
            layers += [nn.Conv2d(c, c_next, 4, padding=1), _norm(c_next), nn.LeakyReLU(0.2, True),
                       BlurDownsample(c_next)]
            c = c_next
        c_next = ndf * min(2**n_layers, 8)
        layers += [nn.Conv2d(c, c_next, 4, padding=1), _norm(c_next), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(c_next, 1, 4, padding=1)]
        self.model = nn.Sequential(*layers)
        init_weights(self, init_gain)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class PatchSampleMLP(nn.Module):
    """Patch head F (H in the paper, Sec. 3.2): for each tapped layer, sample patch locations and
    embed their features with a 2-layer MLP (C -> nc, ReLU, nc -> nc), then L2-normalise.

    Built eagerly from `in_channels` (the reference builds it lazily at the first batch);
    560,384 parameters for the default channels (3, 128, 256, 256, 256) and nc 256.
    """

    def __init__(self, in_channels: Sequence[int] = (3, 128, 256, 256, 256), nc: int = 256,
                 init_gain: float = 0.02) -> None:
        super().__init__()
        if not in_channels or min(in_channels) < 1 or nc < 1:
            raise ValueError(f"PatchSampleMLP: expected a non-empty list of positive in_channels and nc >= 1, "
                             f"got in_channels={tuple(in_channels)}, nc={nc}")
        self.in_channels, self.nc = tuple(int(c) for c in in_channels), nc
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(c, nc), nn.ReLU(True), nn.Linear(nc, nc)) for c in self.in_channels
        )
        init_weights(self, init_gain)

    def sample_ids(self, feats: Sequence[Tensor], num_patches: int = 256,
                   generator: torch.Generator | None = None) -> list[Tensor]:
        """For each feature map, `min(num_patches, H*W)` distinct flat locations drawn uniformly
        without replacement (shared across the batch). Drawn on `generator`'s device (CPU by
        default) and moved to the features' device, so no host-device sync is needed."""
        ids = []
        for f in feats:
            hw = f.shape[2] * f.shape[3]
            device = generator.device if generator is not None else torch.device("cpu")
            perm = torch.randperm(hw, generator=generator, device=device)
            ids.append(perm[: min(num_patches, hw)].to(f.device, non_blocking=True))
        return ids

    def forward(self, feats: Sequence[Tensor], num_patches: int = 256, patch_ids: Sequence[Tensor] | None = None,
                generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Embed the patches of each feature map at `patch_ids` (sampled when None).

        Returns (embeddings, patch_ids): embeddings[l] is (B * S_l, nc), image-major, unit norm;
        pass the returned ids back in to embed the output image's features at the same locations.
        """
        if len(feats) != len(self.mlps):
            raise ValueError(f"PatchSampleMLP: got {len(feats)} feature maps, expected {len(self.mlps)}")
        if patch_ids is None:
            patch_ids = self.sample_ids(feats, num_patches, generator)
        out = []
        for f, ids, mlp in zip(feats, patch_ids, self.mlps):
            b, c = f.shape[:2]
            patches = f.flatten(2).index_select(2, ids)  # (B, C, S)
            z = mlp(patches.transpose(1, 2).reshape(-1, c))  # (B * S, nc)
            out.append(z / (z.norm(dim=1, keepdim=True) + 1e-7))
        return out, list(patch_ids)
