"""Folder-to-folder translation with a trained CUT / FastCUT generator, and FID between folders.

- `translate_folder(system, input_dir, output_dir)`: every image of `input_dir` (sorted by name) is
  translated at its own resolution and written as `output_dir/<stem>.png`. The generator needs
  sides divisible by 4 (two stride-2 stages), so other sizes are reflection-padded to the next
  multiple of 4 and the output is cropped back: each output has exactly its input's size.
  Consecutive images of equal size share a batch; the generator normalises each image on its own
  (instance norm), so the result does not depend on `batch_size`.
- `folder_fid(generated_dir, target_dir)`: FID (Heusel et al. 2017) between the images of two
  folders with the FID Inception-v3 of `msdiff.metric_networks` (`load_inception`). Without its weights
  the result is `{"fid": None, "fid_note": <one-line hint>}`: unavailable, never invented. The
  feature network is injectable (`features=`), as in `msdiff.metrics`.

`system` is anything with `translate(x) -> y` on (B, C, H, W) images in [0, 1], e.g.
`msdiff.run.TrainedRun.open(ckpt).cut_system()`; this module does not import Lightning. Image files are
listed, read and written by `msdiff.images`.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from msdiff.gaussian import frechet_distance
from msdiff.images import list_images, read_image, write_png
from msdiff.metric_networks import WeightsUnavailable, load_inception

__all__ = ["translate_folder", "folder_fid", "check_inputs", "list_images", "SIZE_MULTIPLE", "MIN_SIDE"]
SIZE_MULTIPLE = 4  # the generator down-samples twice by 2
#: smallest side: padded to a multiple of 4 it is >= 8 px, so the generator's reflection paddings
#: (1 px after two halvings) have something to reflect (4 px inputs fail inside the generator)
MIN_SIDE = 5


def check_inputs(files: Sequence[Path], channels: int = 3, what: str = "input_dir") -> None:
    """Decode every image of ``files`` and check its size, before anything is written: ValueError
    naming the first file that cannot be read or is smaller than MIN_SIDE px on a side."""
    for path in files:
        h, w = read_image(path, channels).shape[-2:]
        if min(h, w) < MIN_SIDE:
            raise ValueError(f"{what}: {path} is {w}x{h} pixels; the CUT generator needs at least "
                             f"{MIN_SIDE}x{MIN_SIDE}")


def _batches(files: Sequence[Path], batch_size: int, channels: int) -> Iterator[tuple[list[Path], Tensor]]:
    """Runs of consecutive files with equal image size, at most `batch_size` each, stacked."""
    paths: list[Path] = []
    images: list[Tensor] = []
    for path in files:
        x = read_image(path, channels)
        if images and (len(images) == batch_size or x.shape != images[0].shape):
            yield paths, torch.stack(images)
            paths, images = [], []
        paths.append(path)
        images.append(x)
    if images:
        yield paths, torch.stack(images)


def _pad_to_multiple(x: Tensor, m: int) -> Tensor:
    """Reflection-pad the bottom/right of (B, C, H, W) so H and W are multiples of m (replicate
    when a side is too short to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = -h % m, -w % m
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F_.pad(x, (0, pw, 0, ph), mode=mode)


@torch.no_grad()
def translate_folder(system: Any, input_dir: str | os.PathLike, output_dir: str | os.PathLike, batch_size: int = 8,
                     device: str | torch.device = "cpu", channels: int = 3) -> list[Path]:
    """Translate every image of `input_dir` with `system.translate` and write `output_dir/<stem>.png`.

    Args:
        system: has `translate(x)` mapping (B, C, H, W) in [0, 1] (H, W multiples of 4) to the same
            shape in [0, 1]; it is moved to `device`.
        input_dir: folder of source-domain images (png, jpg, ...; not searched recursively).
        output_dir: created if needed; one PNG per input, named after the input's stem.
        batch_size: images per generator call (results do not depend on it).
        device: where the generator runs.
        channels: image channels the generator takes (3: RGB; 1: grayscale).

    Returns the written paths, in input order. ValueError for a missing/empty folder, an unreadable
    or too small (< MIN_SIDE px) image, two inputs with the same stem, or a non-positive batch_size;
    all inputs are checked before the first output is written.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    files = list_images(input_dir, "input_dir")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise ValueError(f"input_dir={input_dir}: {stems[p.stem].name} and {p.name} would both be written as {p.stem}.png")
        stems[p.stem] = p
    check_inputs(files, channels)  # all inputs, before the first output is written
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(system, "to"):
        system = system.to(device)
    written = []
    for paths, x in _batches(files, batch_size, channels):
        h, w = x.shape[-2:]
        y = system.translate(_pad_to_multiple(x.to(device), SIZE_MULTIPLE))[..., :h, :w]
        for path, img in zip(paths, y):
            write_png(img, out / f"{path.stem}.png")
            written.append(out / f"{path.stem}.png")
    return written


@torch.no_grad()
def _feature_moments(features: nn.Module, files: Sequence[Path], batch_size: int,
                     device: str | torch.device) -> tuple[Tensor, Tensor, int]:
    """(mean, covariance, count) of the features of the images in `files`, accumulated in float64."""
    total = outer = None
    n = 0
    for _, x in _batches(files, batch_size, 3):
        f = features(x.to(device)).double().reshape(x.shape[0], -1).cpu()
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = f.T @ f if outer is None else outer + f.T @ f
        n += f.shape[0]
    mu = total / n
    cov = (outer - n * torch.outer(mu, mu)) / max(n - 1, 1)
    return mu, cov, n


def folder_fid(generated_dir: str | os.PathLike, target_dir: str | os.PathLike,
               weights_dir: str | os.PathLike | None = None, features: nn.Module | None = None,
               batch_size: int = 32, device: str | torch.device = "cpu") -> dict[str, Any]:
    """FID between the images of `generated_dir` and `target_dir` (e.g. translated testA vs testB).

    Args:
        generated_dir, target_dir: image folders (images of any size; features resize as needed).
        weights_dir: where to look for the FID Inception weights (see `msdiff.metric_networks.load_inception`).
        features: a feature network (B, 3, H, W) in [0, 1] -> (B, d) to use instead of Inception.
        batch_size, device: feature extraction settings.

    Returns {"fid": float or None, "fid_note": None or why it is unavailable, "num_generated": n,
    "num_target": m}. ValueError for a missing/empty folder or an unreadable image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    gen_files = list_images(generated_dir, "generated_dir")
    tgt_files = list_images(target_dir, "target_dir")
    report: dict[str, Any] = {"fid": None, "fid_note": None, "num_generated": len(gen_files),
                              "num_target": len(tgt_files)}
    if min(len(gen_files), len(tgt_files)) < 2:
        report["fid_note"] = "FID unavailable: needs at least 2 generated and 2 target images"
        return report
    if features is None:
        try:
            features = load_inception(weights_dir)
        except WeightsUnavailable as e:
            report["fid_note"] = str(e)
            return report
    features = features.to(device).eval()
    mu_g, cov_g, _ = _feature_moments(features, gen_files, batch_size, device)
    mu_t, cov_t, _ = _feature_moments(features, tgt_files, batch_size, device)
    report["fid"] = frechet_distance(mu_g, cov_g, mu_t, cov_t)
    return report
