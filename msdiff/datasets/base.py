"""The dataset base class and the per-example seeding shared by every msdiff dataset.

Every dataset is a plain map-style torch `Dataset` whose items are dicts

    {"x": (C, H, W) float in [0, 1], "y": condition, "index": int, ...task extras ("mask")}

where y is built from x by the dataset's `task` (`msdiff.tasks`) unless the dataset provides
the pair itself (edges2shoes, the Gaussian field). All randomness of an item (horizontal flip,
inpainting mask) comes from a generator seeded from (seed, split, epoch, index), never from the
global RNG (`msdiff.utils.mix_seed`), so an item is a pure function of its key and a resumed run
sees the same data. Image files are listed, decoded and resized by `msdiff.images`.
A key is an index, or an (epoch, index) pair as `msdiff.data.ResumableSampler` yields them in
training.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from msdiff.tasks import Task
from msdiff.utils import make_generator, mix_seed

SPLITS = ("train", "val", "test")


def check_split(split: str, who: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"{who}: split must be one of {SPLITS}, got {split!r}")
    return split


class ConditionalDataset(Dataset):
    """Base of every msdiff dataset (see the module doc for the item format and the seeding).

    Subclasses implement `__len__` and `load(index, generator) -> (x, y_or_None)`; the base
    applies the training flip (x and a provided y together) and the task.
    """

    def __init__(self, split: str, task: Task | None, seed: int = 0, flip: bool = False) -> None:
        self.split = check_split(split, type(self).__name__)
        self.task = task
        self.seed = int(seed)
        self.flip = bool(flip) and split == "train"

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def generator(self, index: int, epoch: int = 0) -> torch.Generator:
        """The generator of example `index` in `epoch` (evaluation splits ignore the epoch)."""
        epoch = epoch if self.split == "train" else 0
        return make_generator(mix_seed(self.seed, SPLITS.index(self.split), epoch, index))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor | int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {len(self)} examples")
        g = self.generator(index, int(epoch))
        x, y = self.load(index, g)
        if self.flip and bool(torch.rand((), generator=g) < 0.5):
            x = x.flip(-1)
            y = None if y is None else y.flip(-1)
        item: dict[str, Tensor | int] = {"x": x}
        if y is None:
            if self.task is None:
                raise ValueError(f"{type(self).__name__}: task is required to build y from x (e.g. msdiff.tasks.SuperResolution)")
            item.update({k: v[0] for k, v in self.task.measure(x[None], g).items()})
        else:
            item["y"] = y
        item["index"] = index
        return item


# ---- image files -------------------------------------------------------------------------------

def require_images(files: list, root: str | os.PathLike, what: str, how: str) -> list:
    """Fail with one line naming the path and how to obtain the data when `files` is empty."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: not found; {how}, or point the dataset's root at it")
    if not files:
        raise ValueError(f"{root}: no {what} found; {how}, or point the dataset's root at it")
    return files


def center_crop(x: Tensor, size: int | tuple[int, int], path: str | os.PathLike = "") -> Tensor:
    """The central size x size (or h x w) window of a (C, H, W) image (a view)."""
    h, w = (size, size) if isinstance(size, int) else size
    H, W = x.shape[-2:]
    if H < h or W < w:
        raise ValueError(f"{path}: image is {H}x{W}, smaller than the {h}x{w} crop")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top : top + h, left : left + w]


def split_by_order(files: list, split: str, holdout: float) -> list:
    """Deterministic split of a sorted list: the last `holdout` fraction is test, the one before val."""
    n = len(files)
    k = max(1, round(holdout * n)) if n >= 3 else 0
    bounds = {"train": (0, n - 2 * k), "val": (n - 2 * k, n - k), "test": (n - k, n)}
    lo, hi = bounds[split]
    return files[lo:hi]
