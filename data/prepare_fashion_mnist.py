"""Prepare Fashion-MNIST for msdiff: validated IDX files plus the sneaker <-> ankle boot CUT folders.

    python data/prepare_fashion_mnist.py [--src /usr/share/datasets/fashion-mnist] [--dst data/fashion_mnist]

SRC holds the four IDX files of Fashion-MNIST (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each gzip-compressed `.gz` or plain); the default
is where Debian's `dataset-fashion-mnist` package installs them. The script
1. reads and checks every file (magic, header sizes, image/label counts) and copies it unchanged
   to DST, which `msdiff.datasets.FashionMNIST` reads (train/val/test splits, the footwear subset);
2. writes DST/trainA, trainB, testA, testB: the sneakers (class 7, domain A) and ankle boots
   (class 9, domain B) of the train split (the official training images but the last 5,000, `--holdout`) and of
   the official test set, as 32x32 grey PNGs (zero-padded like the dataset), for CUT / FastCUT.
A missing or malformed file stops it with one line naming the file (exit status 2).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msdiff.datasets.fashion_mnist import (DEBIAN_DIR, FILES, VAL_SIZE, find_idx, load_split,  # noqa: E402
                                           split_indices)

SNEAKER, ANKLE_BOOT = 7, 9
PAD = 2  # 28 -> 32


def write_domain(images: np.ndarray, indices: np.ndarray, folder: Path) -> int:
    """Write images[indices] as zero-padded grey PNGs named by their index in the official file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(np.pad(images[i], PAD)).save(folder / f"{int(i):05d}.png")
    return len(indices)


def prepare(src: Path, dst: Path, holdout: int = VAL_SIZE) -> None:
    data = {official: load_split(src, official) for official in FILES}  # validates all four files
    dst.mkdir(parents=True, exist_ok=True)
    for names in FILES.values():
        for name in names:
            path = find_idx(src, name)
            if path.resolve() != (dst / path.name).resolve():
                shutil.copyfile(path, dst / path.name)
    for split, official in (("train", "train"), ("test", "test")):
        images, labels = data[official]
        n_train = len(labels) if official == "train" else 0
        for domain, label in (("A", SNEAKER), ("B", ANKLE_BOOT)):
            idx = split_indices(n_train, labels, split, (label,), holdout)
            n = write_domain(images, idx, dst / f"{split}{domain}")
            print(f"{dst / f'{split}{domain}'}: {n} images", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", default=DEBIAN_DIR, help=f"folder with the four IDX files (default {DEBIAN_DIR})")
    p.add_argument("--dst", default="data/fashion_mnist", help="output root (default data/fashion_mnist)")
    p.add_argument("--holdout", type=int, default=VAL_SIZE,
                   help=f"last training images kept out of trainA/trainB, the validation split (default {VAL_SIZE})")
    args = p.parse_args(argv)
    try:
        prepare(Path(args.src), Path(args.dst), args.holdout)
    except (ValueError, OSError) as err:
        print(f"prepare_fashion_mnist: {err}", file=sys.stderr)
        return 2
    print(f"done: python train.py --config fmnist_sr4x_cmde.yaml (data in {args.dst})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
