"""Prepare CelebA for msdiff: the 160x160 center crop of the aligned faces, split into folders.

    python data/prepare_celeba.py --src DIR [--dst data/celeba] [--crop 160] [--size 160] [--workers 4]

DIR is where CelebA was downloaded: it holds img_align_celeba/ (the 202,599 aligned 178x218
JPEGs, from img_align_celeba.zip) and, for the official split, list_eval_partition.txt (or the
Kaggle list_eval_partition.csv); torchvision's layout DIR/celeba/... works too. The script writes
DST/{train,val,test}/NNNNNN.png: the central crop x crop window at native resolution, resized
to size x size (antialiased bicubic) only when size < crop, stored losslessly, exactly the images
msdiff.datasets.CelebA would produce from the JPEGs on the fly. Existing outputs are skipped, so
an interrupted run can be restarted. Without a partition file the split is by sorted name (the
last 5% test, the 5% before val).
"""
from __future__ import annotations

import argparse
import sys
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msdiff.datasets import CelebA  # noqa: E402
from msdiff.utils import tensor_to_uint8  # noqa: E402

_dataset: CelebA | None = None


def _init(split: str, src: str, size: int, crop: int) -> None:
    global _dataset
    _dataset = CelebA(split, None, root=src, image_size=size, crop=crop, flip=False)


def _convert(job: tuple[int, str]) -> None:
    index, out = job
    x, _ = _dataset.load(index, None)
    Image.fromarray(tensor_to_uint8(x)).save(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="folder with img_align_celeba/ (and list_eval_partition.txt)")
    p.add_argument("--dst", default="data/celeba", help="output root (default data/celeba)")
    p.add_argument("--crop", type=int, default=160, help="side of the central crop (default 160)")
    p.add_argument("--size", type=int, default=160, help="output side after resizing the crop (default 160)")
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args(argv)
    try:
        for split in ("train", "val", "test"):
            ds = CelebA(split, None, root=args.src, image_size=args.size, crop=args.crop, flip=False)
            out_dir = Path(args.dst) / split
            out_dir.mkdir(parents=True, exist_ok=True)
            jobs = [(i, str(out_dir / (f.stem + ".png"))) for i, f in enumerate(ds.files)
                    if not (out_dir / (f.stem + ".png")).exists()]
            print(f"{split}: {len(ds.files)} images, {len(jobs)} to write -> {out_dir}", flush=True)
            with Pool(args.workers, initializer=_init, initargs=(split, args.src, args.size, args.crop)) as pool:
                for done, _ in enumerate(pool.imap_unordered(_convert, jobs, chunksize=64), 1):
                    if done % 5000 == 0:
                        print(f"  {done}/{len(jobs)}", flush=True)
    except (ValueError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
