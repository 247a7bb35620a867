"""Datasets read from image files: CelebA, edges2shoes (pix2pix side-by-side pairs), any folder.

Every one takes `root`; a missing or empty root fails at construction with one line naming the
path and how to obtain the data, and a corrupt image fails when read, naming the file. See
data/README.md for the layouts and the preparation script.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from msdiff.datasets.base import ConditionalDataset, center_crop, require_images, split_by_order
from msdiff.images import find_images, read_image_uint8, resize, to_float
from msdiff.tasks import Edges, Task

CELEBA_HOW = ("download CelebA's img_align_celeba (and list_eval_partition.txt) and run "
              "python data/prepare_celeba.py --src DIR --dst data/celeba (see data/README.md)")
EDGES2SHOES_HOW = ("download edges2shoes.tar.gz of the pix2pix datasets and extract it so that "
                   "ROOT/train and ROOT/val hold the edges|photo images (see data/README.md)")


def _read_partition(path: Path) -> dict[str, int]:
    """CelebA's list_eval_partition: 'name split' lines (.txt) or 'name,split' rows (.csv)."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.replace(",", " ").split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    if not out:
        raise ValueError(f"{path}: no 'image split' lines; expected CelebA's list_eval_partition file")
    return out


class CelebA(ConditionalDataset):
    """Aligned CelebA faces, center-cropped to `crop` and resized to `image_size`.

    Layouts found under `root`, first match wins:
    1. `root/{train,val,test}/`: the output of data/prepare_celeba.py (already 160x160);
    2. `img_align_celeba/*.jpg` in `root`, `root/celeba` (torchvision's layout) or `root` itself,
       split by `list_eval_partition.txt`/`.csv` next to it (0 train, 1 val, 2 test) when present,
       otherwise by sorted name (the last `holdout` fraction test, the one before val).
    The crop keeps the 160x160 center of the 178x218 aligned faces at native resolution (the
    paper's SR target; no resampling); inpainting resizes it to 128 (antialiased bicubic).
    Training images are flipped horizontally with probability 1/2, seeded per example.
    """

    def __init__(self, split: str = "train", task: Task | None = None, root: str = "data/celeba",
                 image_size: int = 160, crop: int = 160, seed: int = 0, flip: bool = True,
                 holdout: float = 0.05) -> None:
        super().__init__(split, task, seed, flip)
        self.root, self.image_size, self.crop = Path(root), int(image_size), int(crop)
        if self.image_size > self.crop:
            raise ValueError(f"CelebA: image_size={image_size} is larger than crop={crop}; expected image_size <= crop")
        self.files = require_images(self._list(holdout), root, f"CelebA images for split {split!r}", CELEBA_HOW)

    def _list(self, holdout: float) -> list[Path]:
        if not self.root.is_dir():
            return []
        if (self.root / "train").is_dir():
            return find_images(self.root / self.split, recursive=True)
        for d in (self.root / "img_align_celeba", self.root / "celeba" / "img_align_celeba", self.root):
            files = find_images(d)
            if files:
                break
        else:
            return []
        for p in (d.parent / "list_eval_partition.txt", d.parent / "list_eval_partition.csv",
                  d / "list_eval_partition.txt", d / "list_eval_partition.csv"):
            if p.is_file():
                code = ("train", "val", "test").index(self.split)
                part = _read_partition(p)
                return [f for f in files if part.get(f.name) == code]
        return split_by_order(files, self.split, holdout)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, generator: torch.Generator) -> tuple[Tensor, None]:
        path = self.files[index]
        # crop the uint8 pixels first: only the crop is converted to float
        return resize(to_float(center_crop(read_image_uint8(path, 3), self.crop, path)), self.image_size), None


class Edges2Shoes(ConditionalDataset):
    """The pix2pix edges2shoes pairs: each file is [edges | photo] side by side; y = edges, x = photo.

    `root/train` is the training split; the dataset has only one held-out folder, `root/val`
    (200 pairs), which serves as both val and test. Both halves are resized to `image_size`
    (antialiased bicubic) and flipped together in training. `task` (default `Edges()`) is not
    used to build y (the file provides it); it gives the forward operator and consistency.
    """

    def __init__(self, split: str = "train", task: Task | None = None, root: str = "data/edges2shoes",
                 image_size: int = 64, seed: int = 0, flip: bool = True) -> None:
        super().__init__(split, task if task is not None else Edges(), seed, flip)
        self.root, self.image_size = Path(root), int(image_size)
        folder = self.root / ("train" if split == "train" else "val")
        files = find_images(folder, recursive=True)
        self.files = require_images(files, root if not self.root.is_dir() else folder,
                                    "edges|photo pairs", EDGES2SHOES_HOW)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        path = self.files[index]
        pair = to_float(read_image_uint8(path, 3))
        w = pair.shape[-1]
        if w % 2:
            raise ValueError(f"{path}: expected an edges|photo pair of even width, got width {w}")
        return resize(pair[..., w // 2 :], self.image_size), resize(pair[..., : w // 2], self.image_size)


class ImageFolder(ConditionalDataset):
    """Any folder of images (recursive; jpg, png, bmp, webp, tif, ppm), center-cropped to a square
    and resized to `image_size`.

    Splits: `root/train`, `root/val` (or `root/valid`) and `root/test` when `root/train` exists
    (test falls back to val); otherwise one sorted listing split by order (the last `holdout`
    fraction test, the one before val).
    """

    def __init__(self, split: str = "train", task: Task | None = None, root: str = "data/images",
                 image_size: int = 64, seed: int = 0, flip: bool = True, holdout: float = 0.05) -> None:
        super().__init__(split, task, seed, flip)
        self.root, self.image_size = Path(root), int(image_size)
        self.files = require_images(self._list(holdout), root, f"images for split {split!r}",
                                    "put image files (any sub-folders) under it")

    def _list(self, holdout: float) -> list[Path]:
        if not self.root.is_dir():
            return []
        if (self.root / "train").is_dir():
            names = {"train": ["train"], "val": ["val", "valid"], "test": ["test", "val", "valid"]}[self.split]
            for name in names:
                if (self.root / name).is_dir():
                    return find_images(self.root / name, recursive=True)
            return []
        return split_by_order(find_images(self.root, recursive=True), self.split, holdout)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, generator: torch.Generator) -> tuple[Tensor, None]:
        path = self.files[index]
        x = read_image_uint8(path, 3)
        side = min(x.shape[-2:])
        return resize(to_float(center_crop(x, side, path)), self.image_size), None


__all__ = ["CelebA", "Edges2Shoes", "ImageFolder"]
