"""Unpaired two-domain image data for CUT / FastCUT, and its LightningDataModule.

Two sources of domain A and B images:
- `ImageFolderDomain`: the official CUT/CycleGAN layout `root/trainA`, `root/trainB`,
  `root/testA`, `root/testB` (horse2zebra, cityscapes, ...).
- `ProceduralDomain`: an embedded toy pair generated deterministically in code (no download):
  domain A shows solid-coloured ellipses on a plain background ("horses"), domain B the same
  kind of scene with the ellipses filled by black-and-white stripes ("zebras").

`UnpairedDataset` pairs them as the reference's unaligned dataset does (A in order, B drawn at
random, length max(|A|, |B|)) with the reference augmentation: resize to load_size (antialiased
bicubic, `msdiff.images.resize`),
random crop to crop_size, random horizontal flip, every image independently. All randomness
is derived from (seed, epoch, index) by `msdiff.utils.mix_seed`, never from a global RNG or worker seeds, so an epoch is
reproducible with any number of workers and after a resume. The training order and its checkpointable
position come from `msdiff.data.ResumableSampler` / `ResumableLoader` (the same as for the conditional
datasets): the sampler yields (epoch, index) keys and Lightning stores the loader's position, so a
resume from a mid-epoch checkpoint continues with the very next batch.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from msdiff.data import ResumableLoader, ResumableSampler
from msdiff.images import list_images, read_image, resize
from msdiff.utils import make_generator, mix_seed


class ImageFolderDomain:
    """The images of one folder (e.g. `root/trainA`), sorted by file name, as RGB in [0, 1]."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"root: expected a folder {folder} (the trainA/trainB/testA/testB layout)")
        self.files = list_images(folder, "root")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        return read_image(self.files[i], 3)


class ProceduralDomain:
    """Embedded toy domain: `n` images of `size` x `size` with 1-3 ellipses on a plain background.

    `striped=False` (domain A) fills the ellipses with one colour; `striped=True` (domain B) fills
    them with black/white stripes of random angle and period. Image i is a pure function of
    (seed, striped, i); pixels are computed with whole-tensor ops and quantised to 8 bits.
    """

    def __init__(self, n: int, size: int, striped: bool, seed: int = 0) -> None:
        if n < 1 or size < 4:
            raise ValueError(f"ProceduralDomain: expected n >= 1 and size >= 4, got n={n}, size={size}")
        self.n, self.size, self.striped, self.seed = n, size, striped, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        g = make_generator(mix_seed(self.seed, int(self.striped), i))
        u = lambda *shape: torch.rand(shape, generator=g)  # noqa: E731
        coords = (torch.arange(self.size, dtype=torch.float32) + 0.5) / self.size
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W) in (0, 1)
        img = (0.25 + 0.5 * u(3, 1, 1)).expand(3, self.size, self.size).clone()  # muted background
        k = 1 + int(u(1).item() * 3)
        centre, radius, angle = 0.25 + 0.5 * u(k, 2), 0.12 + 0.18 * u(k, 2), math.pi * u(k)
        colour, period = u(k, 3), 0.08 + 0.1 * u(k)
        for j in range(k):  # a handful of ellipses, each a whole-image mask
            inside = ((xx - centre[j, 0]) / radius[j, 0]) ** 2 + ((yy - centre[j, 1]) / radius[j, 1]) ** 2 <= 1
            if self.striped:
                phase = (xx * torch.cos(angle[j]) + yy * torch.sin(angle[j])) / period[j]
                fill = (torch.sin(2 * math.pi * phase) > 0).float().expand(3, -1, -1)
            else:
                fill = colour[j].view(3, 1, 1).expand(3, self.size, self.size)
            img = torch.where(inside, fill, img)
        return img.mul(255).round().div(255)


def augment(x: Tensor, load_size: int, crop_size: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Reference 'resize_and_crop' + flip: resize (C, H, W) to load_size^2 (bicubic, antialiased),
    crop crop_size^2 at a random offset, mirror horizontally with probability 1/2."""
    x = resize(x, load_size)
    top, left = (torch.randint(0, load_size - crop_size + 1, (2,), generator=generator)).tolist()
    x = x[:, top:top + crop_size, left:left + crop_size]
    if flip and torch.rand((), generator=generator).item() < 0.5:
        x = x.flip(-1)
    return x


class UnpairedDataset(Dataset):
    """Unaligned pairs {"A": a, "B": b} in [0, 1], (3, crop_size, crop_size) each.

    Key `(epoch, i)` (as `ResumableSampler` yields) gives A[i mod |A|] and a B image drawn
    uniformly from (seed, epoch, i); a plain index i means epoch 0. With `train=False` images are
    only resized to crop_size and B[i mod |B|] is used.
    """

    def __init__(self, domain_a, domain_b, load_size: int = 286, crop_size: int = 256, flip: bool = True,
                 train: bool = True, seed: int = 0) -> None:
        if crop_size < 1 or load_size < crop_size:
            raise ValueError(f"load_size/crop_size: expected load_size >= crop_size >= 1, got {load_size}, {crop_size}")
        self.a, self.b = domain_a, domain_b
        self.load_size, self.crop_size, self.flip, self.train, self.seed = load_size, crop_size, flip, train, seed

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        epoch, i = (int(k) for k in key) if isinstance(key, tuple) else (0, int(key))
        if not 0 <= i < len(self):
            raise IndexError(f"UnpairedDataset: index {i} out of range for {len(self)} examples")
        if not self.train:
            return {"A": resize(self.a[i % len(self.a)], self.crop_size), "B": resize(self.b[i % len(self.b)], self.crop_size)}
        g = make_generator(mix_seed(self.seed, epoch, i))
        j = int(torch.randint(0, len(self.b), (), generator=g))
        a = augment(self.a[i % len(self.a)], self.load_size, self.crop_size, self.flip, g)
        b = augment(self.b[j], self.load_size, self.crop_size, self.flip, g)
        return {"A": a, "B": b}


class UnpairedDataModule(pl.LightningDataModule):
    """Train/val data for CUT: `root` with trainA/trainB/testA/testB, or the embedded procedural
    domains when `root` is None. Batches are {"A": (B, 3, crop, crop), "B": ...} in [0, 1].

    `batch_size` is per device (the reference trains with 1). Validation serves the first
    `num_val_images` test pairs, resized to crop_size, for image grids.
    """

    def __init__(self, root: str | None = None, load_size: int = 286, crop_size: int = 256, flip: bool = True,
                 batch_size: int = 1, num_workers: int = 4, seed: int = 0, num_val_images: int = 4,
                 procedural_train_size: int = 400, procedural_test_size: int = 16) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0 or num_val_images < 0:
            raise ValueError(f"UnpairedDataModule: expected batch_size >= 1, num_workers >= 0, num_val_images >= 0, "
                             f"got {batch_size}, {num_workers}, {num_val_images}")
        self.save_hyperparameters()
        self.root, self.load_size, self.crop_size, self.flip = root, load_size, crop_size, flip
        self.batch_size, self.num_workers, self.seed, self.num_val_images = batch_size, num_workers, seed, num_val_images
        self.train_size, self.test_size = procedural_train_size, procedural_test_size

    def domains(self, split: str):
        """(domain A, domain B) for split 'train' or 'test'."""
        if self.root is None:
            n = self.train_size if split == "train" else self.test_size
            offset = 0 if split == "train" else 1_000_003  # test images differ from training ones
            return (ProceduralDomain(n, self.load_size, striped=False, seed=self.seed + offset),
                    ProceduralDomain(n, self.load_size, striped=True, seed=self.seed + offset))
        root = Path(self.root)
        return ImageFolderDomain(root / f"{split}A"), ImageFolderDomain(root / f"{split}B")

    def train_dataset(self) -> UnpairedDataset:
        return UnpairedDataset(*self.domains("train"), self.load_size, self.crop_size, self.flip, True, self.seed)

    def test_dataset(self) -> UnpairedDataset:
        return UnpairedDataset(*self.domains("test"), self.load_size, self.crop_size, False, False, self.seed)

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled (seed, epoch) order sharded over ranks; the loader's position is checkpointed."""
        ds = self.train_dataset()
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = ResumableSampler(ds, seed=self.seed, shuffle=True, rank=rank, world_size=world)
        loader = ResumableLoader(ds, sampler, batch_size=self.batch_size, num_workers=self.num_workers,
                                 drop_last=True, persistent_workers=self.num_workers > 0,
                                 pin_memory=torch.cuda.is_available())
        if len(loader) == 0:
            raise ValueError(f"batch_size={self.batch_size}: exceeds the {len(sampler)} training images per rank")
        return loader

    def val_dataloader(self) -> DataLoader:
        ds = self.test_dataset()
        subset = torch.utils.data.Subset(ds, range(min(self.num_val_images, len(ds))))
        return DataLoader(subset, batch_size=max(1, min(self.num_val_images, len(ds))), shuffle=False,
                          num_workers=0)
