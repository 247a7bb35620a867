"""Fashion-MNIST read straight from its four IDX files (Xiao, Rasul and Vollgraf 2017, Zalando).

The files (gzip-compressed `*-ubyte.gz` as distributed, or uncompressed `*-ubyte`):
`train-images-idx3-ubyte`, `train-labels-idx1-ubyte` (60,000), `t10k-images-idx3-ubyte`,
`t10k-labels-idx1-ubyte` (10,000). IDX layout: a big-endian header, magic 2051 (images: then
count, rows, cols as uint32) or 2049 (labels: then count), followed by uint8 values row-major.
28x28 grey, a white object on a black background; classes 0 T-shirt/top, 1 trouser, 2 pullover,
3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot.

Why no conversion to image files: the whole training set is 47 MB of uint8, read (and gunzipped)
once per process in well under a second and then indexed in memory, faster than decoding 70,000
PNGs. data/prepare_fashion_mnist.py validates the files, copies them to data/fashion_mnist and
writes the trainA/trainB/testA/testB PNG folders that CUT's folder dataset reads.
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from msdiff.datasets.base import ConditionalDataset
from msdiff.tasks import Task

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot")
FOOTWEAR = (5, 7, 9)      # sandal, sneaker, ankle boot
VAL_SIZE = 5000           # the last 5,000 images of the official training file are the validation split
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
HOW = ("install Debian's dataset-fashion-mnist (or download the four IDX files from Zalando's fashion-mnist "
       "repository) and run python data/prepare_fashion_mnist.py (see data/README.md)")


def find_idx(root: str | os.PathLike, name: str) -> Path:
    """`root/name.gz` or `root/name` (the first that exists); FileNotFoundError naming both otherwise."""
    root = Path(root)
    for p in (root / f"{name}.gz", root / name):
        if p.is_file():
            return p
    raise FileNotFoundError(f"{root / name}(.gz): not found; {HOW}")


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """The uint8 array of an IDX buffer: (n, rows, cols) for magic 2051, (n,) for magic 2049."""
    if len(raw) < 8:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise ValueError(f"{path}: IDX magic {magic}, expected {IMAGE_MAGIC} (images) or {LABEL_MAGIC} (labels)")
    ndim = 3 if magic == IMAGE_MAGIC else 1
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for the {head}-byte IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) != head + size:
        raise ValueError(f"{path}: header says {'x'.join(map(str, shape))} = {size} values, "
                         f"the file holds {len(raw) - head}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed when its name ends in .gz); ValueError naming it if malformed."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: unreadable ({err})") from None
    return _parse_idx(raw, path)


@lru_cache(maxsize=4)
def _load_pair(images: Path, labels: Path, stamp: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1:
        raise ValueError(f"{images if x.ndim != 3 else labels}: expected an IDX "
                         f"{'image' if x.ndim != 3 else 'label'} file")
    if len(x) != len(y):
        raise ValueError(f"{labels}: {len(y)} labels for the {len(x)} images of {images}")
    return x, y


def load_split(root: str | os.PathLike, official: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) uint8) of the official 'train' or 'test' file pair.

    Cached per process (keyed by path, size and mtime), so the train and val splits read the
    training file once.
    """
    images, labels = (find_idx(root, n) for n in FILES[official])
    si, sl = images.stat(), labels.stat()
    return _load_pair(images.resolve(), labels.resolve(), (si.st_size, si.st_mtime_ns, sl.st_size, sl.st_mtime_ns))


def split_indices(n_train: int, labels: np.ndarray, split: str, classes: tuple[int, ...] | None,
                  val_size: int = VAL_SIZE) -> np.ndarray:
    """Indices into the official file of `split`: train = the first n_train - val_size training
    images, val = the last val_size, test = the official test set; then only `classes` (if given)."""
    lo, hi = {"train": (0, n_train - val_size), "val": (n_train - val_size, n_train),
              "test": (0, len(labels))}[split]
    idx = np.arange(lo, hi)
    if classes is not None:
        idx = idx[np.isin(labels[lo:hi], np.asarray(classes))]
    return idx


def pad_to(x: Tensor, size: int) -> Tensor:
    """Zero-pad a (C, h, w) image symmetrically to size x size (28 -> 32: 2 pixels each side).

    The background is black (0), so padding adds only background and keeps every pixel of the
    original exactly (no resampling)."""
    h, w = x.shape[-2:]
    if size < h or size < w or (size - h) % 2 or (size - w) % 2:
        raise ValueError(f"FashionMNIST: image_size={size}; expected >= {h} with an even margin (e.g. 28, 32)")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top))


class FashionMNIST(ConditionalDataset):
    """Fashion-MNIST, one grey channel, zero-padded from 28x28 to `image_size` (default 32).

    Splits: train = the first 55,000 images of the official training file, val = its last 5,000
    (`holdout`; a fixed carve-out, no shuffling), test = the official 10,000 test images. `classes` keeps only
    those labels (e.g. [5, 7, 9], the footwear subset: 16,525 / 1,475 / 3,000 images). `root` holds
    the four IDX files, gzip-compressed or not (data/fashion_mnist after the preparation script,
    or Debian's /usr/share/datasets/fashion-mnist directly). Items are (1, size, size) in [0, 1];
    training images are flipped horizontally with probability 1/2 when `flip`.
    """

    def __init__(self, split: str = "train", task: Task | None = None, root: str = "data/fashion_mnist",
                 image_size: int = 32, classes: list[int] | None = None, holdout: int = VAL_SIZE, seed: int = 0,
                 flip: bool = True) -> None:
        super().__init__(split, task, seed, flip)
        if classes is not None and not all(0 <= int(c) <= 9 for c in classes):
            raise ValueError(f"FashionMNIST: classes must be labels 0..9, got {classes}")
        self.root, self.image_size = Path(root), int(image_size)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: not found; {HOW}, or point the dataset's root at it")
        official = "test" if split == "test" else "train"
        images, labels = load_split(self.root, official)
        n_train = len(labels) if official == "train" else 0
        if official == "train" and not 0 < holdout < n_train:
            raise ValueError(f"{self.root}: {n_train} training images; holdout={holdout} must be between 1 and "
                             f"{n_train - 1}")
        self.classes = None if classes is None else tuple(int(c) for c in classes)
        self.images, self.labels = images, labels
        self.indices = split_indices(n_train, labels, split, self.classes, int(holdout))
        if len(self.indices) == 0:
            raise ValueError(f"{self.root}: no images of classes {self.classes} in split {split!r}")
        pad_to(torch.zeros(1, *images.shape[1:]), self.image_size)  # validate image_size now

    def __len__(self) -> int:
        return len(self.indices)

    def label(self, index: int) -> int:
        return int(self.labels[self.indices[index]])

    def load(self, index: int, generator: torch.Generator) -> tuple[Tensor, None]:
        x = torch.from_numpy(self.images[self.indices[index]].astype(np.float32) / 255.0)[None]
        return pad_to(x, self.image_size), None


__all__ = ["FashionMNIST", "read_idx", "find_idx", "load_split", "split_indices", "pad_to", "CLASSES", "FOOTWEAR"]
