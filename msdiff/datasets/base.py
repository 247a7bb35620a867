"""The dataset base class, per-example seeding and image I/O shared by every msdiff dataset.

Every dataset is a plain map-style torch `Dataset` whose items are dicts

    {"x": (C, H, W) float in [0, 1], "y": condition, "index": int, ...task extras ("mask")}

where y is built from x by the dataset's `task` (`msdiff.tasks`) unless the dataset provides
the pair itself (edges2shoes, the Gaussian field). All randomness of an item (horizontal flip,
inpainting mask) comes from a generator seeded from (seed, split, epoch, index), never from the
global RNG, so an item is a pure function of its key and a resumed run sees the same data.
A key is an index, or an (epoch, index) pair as `msdiff.data.ResumableSampler` yields them in
training.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from msdiff.tasks import Task
from msdiff.tasks import resize as tasks_resize

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
_TORCHVISION_FORMATS = (".jpg", ".jpeg", ".png", ".webp", ".gif")


def example_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by mixing the non-negative integers `keys` (NumPy's SeedSequence).

    Unlike `seed + epoch` style sums, distinct key tuples give unrelated streams.
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


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
        return example_generator(self.seed, SPLITS.index(self.split), epoch, index)

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

def find_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under `root` (common extensions, case-insensitive), sorted by path."""
    root = Path(root)
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in it if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def require_images(files: list, root: str | os.PathLike, what: str, how: str) -> list:
    """Fail with one line naming the path and how to obtain the data when `files` is empty."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: not found; {how}, or point the dataset's root at it")
    if not files:
        raise ValueError(f"{root}: no {what} found; {how}, or point the dataset's root at it")
    return files


def read_image_uint8(path: str | os.PathLike) -> Tensor:
    """Decode an image file to RGB (3, H, W) uint8; a corrupt or unreadable file raises naming it.

    JPEG, PNG, WebP and GIF go through torchvision's decoders (libjpeg-turbo, about twice as
    fast as PIL here); other formats through PIL. Truncated files fail with both.
    """
    try:
        if Path(path).suffix.lower() in _TORCHVISION_FORMATS:
            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        with Image.open(path) as im:
            a = np.array(im.convert("RGB"))  # forces the full decode, so truncated files fail here
        return torch.from_numpy(a).permute(2, 0, 1)
    except RuntimeError as err:  # torchvision: "function, source:line, message"
        raise ValueError(f"{path}: unreadable or corrupt image ({str(err).split(', ', 2)[-1]})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: unreadable or corrupt image ({err})") from None


def to_float(x: Tensor) -> Tensor:
    """uint8 (C, H, W) -> float in [0, 1]."""
    return x.float().mul_(1.0 / 255.0)


def read_image(path: str | os.PathLike) -> Tensor:
    """Decode an image file to RGB (3, H, W) float in [0, 1] (see `read_image_uint8`)."""
    return to_float(read_image_uint8(path))


def center_crop(x: Tensor, size: int | tuple[int, int], path: str | os.PathLike = "") -> Tensor:
    """The central size x size (or h x w) window of a (C, H, W) image (a view)."""
    h, w = (size, size) if isinstance(size, int) else size
    H, W = x.shape[-2:]
    if H < h or W < w:
        raise ValueError(f"{path}: image is {H}x{W}, smaller than the {h}x{w} crop")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top : top + h, left : left + w]


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Antialiased bicubic resize of a (C, H, W) image (`msdiff.tasks.resize`); identity at equal size."""
    return tasks_resize(x, (size, size) if isinstance(size, int) else tuple(size))


def split_by_order(files: list, split: str, holdout: float) -> list:
    """Deterministic split of a sorted list: the last `holdout` fraction is test, the one before val."""
    n = len(files)
    k = max(1, round(holdout * n)) if n >= 3 else 0
    bounds = {"train": (0, n - 2 * k), "val": (n - 2 * k, n - k), "test": (n - k, n)}
    lo, hi = bounds[split]
    return files[lo:hi]
