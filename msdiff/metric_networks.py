"""The pretrained feature networks of the metrics and where their weights are found (no Lightning).

* `LPIPS` (Zhang et al. 2018) on the ImageNet AlexNet trunk (`AlexNetFeatures`, torchvision's
  weights) with the LPIPS v0.1 linear weights shipped with torchmetrics: `load_lpips`.
* `InceptionFeatures`: the 2048-d pool features of the FID Inception-v3 (TF 2015-12-05 weights via
  torch-fidelity): `load_inception`.

Weights are looked up in `weights_dir` and the torch hub cache (`weight_search_dirs`); when missing,
the loaders raise `WeightsUnavailable` with a one-line hint (the metric is then reported
unavailable, never invented). `msdiff.metric_weights` downloads them on request.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from msdiff.checkpoint_file import load_checkpoint

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"                      # torchvision's ImageNet AlexNet
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"   # torch-fidelity's FID Inception-v3
WEIGHT_SOURCES = {  # the official download locations (torchvision; torch-fidelity's release v0.2.0)
    ALEXNET_FILE: "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    INCEPTION_FILE: "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                    "weights-inception-2015-12-05-6726825d.pth",
}

class WeightsUnavailable(RuntimeError):
    """Pretrained weights for a metric network are not on this machine (message: how to get them)."""


# ---- LPIPS ------------------------------------------------------------------------------------
class AlexNetFeatures(nn.Module):
    """The five ReLU outputs of AlexNet's convolutional trunk (the LPIPS 'alex' backbone)."""

    def __init__(self, state_dict: dict[str, Tensor] | None = None) -> None:
        """`state_dict`: torchvision's AlexNet checkpoint (only its `features.*` entries are used)."""
        super().__init__()
        relu, pool = (lambda: nn.ReLU(inplace=True)), (lambda: nn.MaxPool2d(3, 2))
        f = nn.Sequential(  # torchvision's AlexNet.features, same indices
            nn.Conv2d(3, 64, 11, 4, 2), relu(), pool(), nn.Conv2d(64, 192, 5, padding=2), relu(), pool(),
            nn.Conv2d(192, 384, 3, padding=1), relu(), nn.Conv2d(384, 256, 3, padding=1), relu(),
            nn.Conv2d(256, 256, 3, padding=1), relu(),
        )
        if state_dict is not None:
            f.load_state_dict({k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")})
        cuts = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]  # conv1..conv5, each ending after its ReLU
        self.slices = nn.ModuleList(nn.Sequential(OrderedDict((str(i), f[i]) for i in range(a, b))) for a, b in cuts)
        self.channels = (64, 192, 384, 256, 256)
        self.requires_grad_(False).eval()

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x.clone())  # the next slice's ReLU(inplace) must not touch what we keep
        return out


class LPIPS(nn.Module):
    """Learned perceptual image patch similarity (Zhang et al. 2018, Eq. 1): per layer l, unit-normalise
    the channel vectors, weight their squared difference with w_l (1x1 conv), average over space, sum
    over layers. `backbone` maps (B, 3, H, W) in [-1, 1] (after LPIPS' channel scaling) to a list of
    feature maps; `lin_weights` holds one (1, C_l, 1, 1) tensor per map."""

    def __init__(self, backbone: nn.Module, lin_weights: list[Tensor]) -> None:
        super().__init__()
        self.backbone = backbone
        self.lin = nn.ParameterList(nn.Parameter(w.detach().clone(), requires_grad=False) for w in lin_weights)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS distance between image batches in [0, 1], shape (B,)."""
        fa, fb = (self.backbone((2 * v - 1 - self.shift) / self.scale) for v in (a, b))
        d = 0.0
        for u, v, w in zip(fa, fb, self.lin):
            u = u / (u.square().sum(1, keepdim=True) + 1e-8).sqrt()  # LPIPS' eps inside the root
            v = v / (v.square().sum(1, keepdim=True) + 1e-8).sqrt()
            d = d + ((u - v).square() * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return d


# ---- pretrained weights -----------------------------------------------------------------------
def weight_search_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where pretrained metric weights are looked for: `weights_dir` (and its checkpoints/), then the
    torch hub cache ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints), which is
    where torchvision and torch-fidelity keep their downloads."""
    dirs = []
    if weights_dir is not None:
        dirs += [Path(weights_dir), Path(weights_dir) / "checkpoints"]
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_weights(filename: str, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """First existing `filename` in `weight_search_dirs(weights_dir)`, or None."""
    return next((d / filename for d in weight_search_dirs(weights_dir) if (d / filename).is_file()), None)


def _missing(filename: str, what: str, weights_dir: str | os.PathLike | None) -> WeightsUnavailable:
    where = " or ".join(str(d) for d in weight_search_dirs(weights_dir)[-2:])
    return WeightsUnavailable(f"{what} unavailable: {filename} not found in {where}; it comes from "
                              f"{WEIGHT_SOURCES[filename]} (official): put it there (or pass --weights_dir DIR), "
                              "or rerun with --download_weights on a machine with internet")


def load_lpips(weights_dir: str | os.PathLike | None = None) -> LPIPS:
    """LPIPS with the ImageNet AlexNet backbone and the LPIPS v0.1 linear weights shipped with torchmetrics."""
    path = find_weights(ALEXNET_FILE, weights_dir)
    if path is None:
        raise _missing(ALEXNET_FILE, "LPIPS (AlexNet)", weights_dir)
    import torchmetrics.functional.image.lpips as tm_lpips  # the package ships the linear layers

    lin_file = Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth"
    lin = load_checkpoint(lin_file, "torchmetrics' LPIPS weights", mmap=False, verify=False)
    backbone = AlexNetFeatures(load_checkpoint(path, "--weights_dir", mmap=False, verify=False))
    return LPIPS(backbone, [lin[f"lin{i}.model.1.weight"] for i in range(5)])


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception-v3 (TF 2015-12-05 weights, via torch-fidelity through
    torchmetrics), taking images in [0, 1]; it resizes to 299 itself."""

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.mul(255).round().to(torch.uint8)).reshape(x.shape[0], -1)


def load_inception(weights_dir: str | os.PathLike | None = None) -> InceptionFeatures:
    """The FID feature extractor, or `WeightsUnavailable` saying what to install / where to put weights."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise WeightsUnavailable("UFID/JFID unavailable: pip install torch-fidelity (FID Inception-v3)") from None
    path = find_weights(INCEPTION_FILE, weights_dir)
    if path is None:
        raise _missing(INCEPTION_FILE, "UFID/JFID (Inception-v3)", weights_dir)
    return InceptionFeatures(path)
