"""Conditions from image files for `sample.py --input FOLDER` (layer 2, no Lightning).

A task (`msdiff.tasks.Task`) turns a target x into a condition y; a user with a folder of
measurements needs the way back, file -> condition, which the task's condition protocol gives:

* the file must have exactly `task.measurement_shape(x_shape)`'s size (a low-res image for SR, a
  full-size image otherwise); the channels are converted (RGB -> BT.601 luma for a 1-channel
  measurement such as a 1-channel edge map, grey -> RGB for a 3-channel one);
* a task with `needs_mask` (inpainting) needs `NAME_mask.png` next to `NAME.png` (white = known,
  black = hole), binarised at 0.5;
* `task.condition_from_measurement(image, mask)` builds the condition (SR: nearest upsampling;
  inpainting: the hole gets the task's fill value whatever the file holds there).

Files of the wrong size are an error naming the file and the size expected: a silent resize would
change the degradation the model was trained on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from msdiff.images import find_images, read_image
from msdiff.tasks import Task, luminance

__all__ = ["condition_from_image", "FolderConditions"]


def _channels(image: Tensor, c: int) -> Tensor:
    if image.shape[1] == c:
        return image
    if c == 1:
        return luminance(image)
    if image.shape[1] == 1:
        return image.expand(-1, c, -1, -1)
    raise ValueError(f"expected 1 or {c} channels, got {image.shape[1]}")


def condition_from_image(task: Task, image: Tensor, x_shape: tuple[int, int, int],
                         mask: Optional[Tensor] = None) -> dict[str, Tensor]:
    """{"y": condition, ["mask"]} for a batch `image` (B, C, h, w) in [0, 1] read from files (module doc).
    `x_shape` is the (C, H, W) of the model's samples. ValueError on a wrong size or a missing mask."""
    c, h, w = task.measurement_shape(x_shape)
    if tuple(image.shape[-2:]) != (h, w):
        raise ValueError(f"expected {w}x{h} pixels for this checkpoint's task ({task!r}), got "
                         f"{image.shape[-1]}x{image.shape[-2]}")
    image = _channels(image, c)
    if task.needs_mask and mask is not None:
        if tuple(mask.shape[-2:]) != (h, w):
            raise ValueError(f"mask: expected {w}x{h} pixels, got {mask.shape[-1]}x{mask.shape[-2]}")
        mask = (mask[:, :1] > 0.5).to(image.dtype)
    return task.condition_from_measurement(image, mask if task.needs_mask else None)


class FolderConditions(Dataset):
    """Conditions read from a folder: items {"y", "index", "name"[, "mask"]}, one per image file
    (files named `*_mask.*` are the masks of the others). Every file is read and checked up front,
    so a bad file fails before any sampling."""

    def __init__(self, root: str, task: Optional[Task], x_shape: tuple[int, int, int]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"--input {root}: not a folder")
        files = [p for p in find_images(self.root, recursive=True) if not p.stem.endswith("_mask")]
        if not files:
            raise ValueError(f"--input {root}: no condition images found")
        if task is None:
            raise ValueError("--input: the checkpoint names no task, so condition images cannot be interpreted")
        self.items = [self._load(i, p, task, x_shape) for i, p in enumerate(files)]

    @staticmethod
    def _load(i: int, path: Path, task: Task, x_shape: tuple[int, int, int]) -> dict:
        mask = None
        if task.needs_mask:
            mask_path = next((m for m in path.parent.glob(f"{path.stem}_mask.*") if m.is_file()), None)
            if mask_path is None:
                raise ValueError(f"--input {path}: {task!r} needs its mask {path.stem}_mask.png (white = known)")
            mask = read_image(mask_path, 3)[None]
        try:
            cond = condition_from_image(task, read_image(path, 3)[None], x_shape, mask)
        except ValueError as e:
            if mask is not None and str(e).startswith("mask:"):  # name the mask file itself
                raise ValueError(f"--input {mask_path}: {str(e)[len('mask:'):].strip()} (the mask of {path.name})") from None
            raise ValueError(f"--input {path}: {e}") from None
        return {"index": i, "name": path.stem, **{k: v[0] for k, v in cond.items()}}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
