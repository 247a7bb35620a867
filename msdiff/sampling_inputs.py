"""Conditions from image files for `sample.py --input FOLDER`, per task (layer 2, no Lightning).

A task (`msdiff.tasks`) turns a target x into a condition y; a user with a folder of measurements
needs the way back, file -> condition. That is done here from the task's public API only:

* the measurement's shape is that of `task.forward_operator` applied to a blank x (with a blank mask
  when the task's `measure` takes one), so the file must have exactly that size (a low-res image for
  SR, a full-size image otherwise); the channels are converted (RGB -> BT.601 luma for a 1-channel
  measurement such as a 1-channel edge map, grey -> RGB for a 3-channel one);
* tasks whose `measure` takes a `mask` (inpainting) need `NAME_mask.png` next to `NAME.png` (white =
  known, black = hole), and the condition is `forward_operator(image, mask)`: hole pixels get the
  task's fill value whatever the file holds there;
* tasks with an `upsample` method (super-resolution) build the condition with it (their own nearest
  rule); for other tasks the condition is the measurement itself (edge maps, Gaussian-field y).

A task that defines `condition_from_image(image, mask=None) -> {"y", ["mask"]}` (image: a (B, C, h, w)
batch as read from the files) is used as is instead of these rules.

Files of the wrong size are an error naming the file and the size expected: a silent resize would
change the degradation the model was trained on.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from msdiff.images import find_images, read_image
from msdiff.tasks import luminance

__all__ = ["takes_mask", "measurement_shape", "condition_from_image", "measurement", "FolderConditions",
           "MaskedConsistency"]


def takes_mask(task: Any) -> bool:
    """Whether the task's measurement depends on a mask (its `measure` accepts one: inpainting)."""
    return "mask" in inspect.signature(task.measure).parameters


def measurement_shape(task: Any, x_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) of `task.forward_operator(x)` for an x of shape x_shape (C, H, W)."""
    x = torch.zeros(1, *x_shape)
    mask = torch.ones(1, 1, *x_shape[1:]) if takes_mask(task) else None
    with torch.no_grad():
        return tuple(task.forward_operator(x, mask=mask).shape[1:])


def _channels(image: Tensor, c: int) -> Tensor:
    if image.shape[1] == c:
        return image
    if c == 1:
        return luminance(image)
    if image.shape[1] == 1:
        return image.expand(-1, c, -1, -1)
    raise ValueError(f"expected 1 or {c} channels, got {image.shape[1]}")


def condition_from_image(task: Any, image: Tensor, x_shape: tuple[int, int, int],
                         mask: Optional[Tensor] = None) -> dict[str, Tensor]:
    """{"y": condition, ["mask"]} for a batch `image` (B, C, h, w) in [0, 1] read from files (module doc).
    `x_shape` is the (C, H, W) of the model's samples. ValueError on a wrong size or a missing mask."""
    own = getattr(task, "condition_from_image", None)
    if callable(own):
        return own(image, mask=mask)
    c, h, w = measurement_shape(task, x_shape)
    if tuple(image.shape[-2:]) != (h, w):
        raise ValueError(f"expected {w}x{h} pixels for this checkpoint's task ({task!r}), got "
                         f"{image.shape[-1]}x{image.shape[-2]}")
    image = _channels(image, c)
    if takes_mask(task):
        if mask is None:
            raise ValueError(f"{task!r} needs the mask of each image (NAME_mask.png, white = known)")
        if tuple(mask.shape[-2:]) != (h, w):
            raise ValueError(f"mask: expected {w}x{h} pixels, got {mask.shape[-1]}x{mask.shape[-2]}")
        mask = (mask[:, :1] > 0.5).to(image.dtype)
        return {"y": task.forward_operator(image, mask=mask), "mask": mask}
    upsample = getattr(task, "upsample", None)
    return {"y": upsample(image) if callable(upsample) else image}


def measurement(task: Any, y: Tensor) -> Tensor:
    """The condition y in the space of `task.forward_operator` (SR: the low-res image `task.low_res(y)`;
    every other task: y itself), the y of a consistency loss ||A(x) - y_meas||^2."""
    low_res = getattr(task, "low_res", None)
    return low_res(y) if callable(low_res) else y


class FolderConditions(Dataset):
    """Conditions read from a folder: items {"y", "index", "name"[, "mask"]}, one per image file
    (files named `*_mask.*` are the masks of the others). Every file is read and checked up front,
    so a bad file fails before any sampling."""

    def __init__(self, root: str, task: Any, x_shape: tuple[int, int, int]) -> None:
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
    def _load(i: int, path: Path, task: Any, x_shape: tuple[int, int, int]) -> dict:
        mask = None
        if takes_mask(task):
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


class MaskedConsistency:
    """`task.consistency` with the batch's real inpainting mask (set `.mask` per batch; None for
    tasks without one), repeated over the K draws that `ConditionalSampleMetrics` stacks draw-major."""

    def __init__(self, task: Any) -> None:
        self.task, self.mask = task, None

    def consistency(self, x_sample: Tensor, y: Tensor) -> Tensor:
        mask = None if self.mask is None else self.mask.repeat(x_sample.shape[0] // self.mask.shape[0], 1, 1, 1)
        return self.task.consistency(x_sample, y, mask=mask)
