"""Sampling helpers without Lightning: the small inference file, per-example noise and image output.

* Inference file (`write_inference_file` / `read_inference_file`): the EMA network weights, the
  estimator's buffers (VS-CMDE's current sigma_max_y) and the resolved model and data config, saved
  as plain tensors and dicts so `torch.load(path, weights_only=True)` reads it. No optimizer, no
  raw weights: a few times smaller than a training checkpoint.
* `example_generators`: one generator per batch row, seeded from (seed, condition index, draw).
  Samplers and estimators draw noise through `msdiff.utils.randn_like`, which accepts such a list
  and draws row i from generator i, so sampling is deterministic per condition whatever the batch
  size.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from msdiff.utils import tensor_to_uint8

INFERENCE_FORMAT = "msdiff-inference-1"


# ---- inference file ---------------------------------------------------------------------------
def write_inference_file(path: str | os.PathLike, config: dict[str, Any], net_state: dict[str, Tensor],
                         estimator_state: dict[str, Tensor]) -> Path:
    """Save {"msdiff": config + format, "net": EMA weights, "estimator": buffers} to `path` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "msdiff": {**config, "format": INFERENCE_FORMAT},
        "net": {k: v.detach().cpu().clone() for k, v in net_state.items()},
        "estimator": {k: v.detach().cpu().clone() for k, v in estimator_state.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def is_inference_file(obj: Any) -> bool:
    """Whether a loaded object is an inference file written by `write_inference_file`."""
    return isinstance(obj, dict) and isinstance(obj.get("msdiff"), dict) and obj["msdiff"].get("format") == INFERENCE_FORMAT


# ---- per-example noise ------------------------------------------------------------------------
def noise_seed(seed: int, index: int, draw: int) -> int:
    """A 63-bit seed mixed from (seed, condition index, draw) by NumPy's SeedSequence."""
    s = np.random.SeedSequence([int(seed) % 2**63, int(index), int(draw)]).generate_state(2, np.uint32)
    return (int(s[0]) << 31) ^ int(s[1])


def example_generators(seed: int, indices: Sequence[int], draw: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per condition index for draw `draw`, on `device`."""
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed(noise_seed(seed, int(i), draw))
        gens.append(g)
    return gens


# ---- images -----------------------------------------------------------------------------------
def save_png(x: Tensor, path: str | os.PathLike) -> None:
    """Write a (C, H, W) image in [0, 1] (C = 1 or 3) as an 8-bit PNG."""
    a = tensor_to_uint8(x)
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(path)


def to_rgb(x: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) -> (B, 3, H, W)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def make_grid(y: Tensor, samples: Tensor, x: Tensor | None, pad: int = 2) -> Tensor:
    """One row per condition: [y | draw 1 .. draw K | x], (3, B*(H+pad), (K+2)*(W+pad)) in [0, 1].

    y is resized to the sample size by nearest neighbour when it is smaller (a low-res condition)."""
    b, h, w = samples.shape[1], samples.shape[-2], samples.shape[-1]
    if tuple(y.shape[-2:]) != (h, w):
        y = torch.nn.functional.interpolate(y.float(), size=(h, w), mode="nearest")
    cols = [to_rgb(y.float())] + [to_rgb(s.float()) for s in samples] + ([to_rgb(x.float())] if x is not None else [])
    cols = [torch.nn.functional.pad(c.clamp(0, 1), (0, pad, 0, pad), value=1.0) for c in cols]
    rows = torch.cat(cols, dim=3)                       # (B, 3, H+pad, n*(W+pad))
    return torch.cat(list(rows), dim=1)                 # (3, B*(H+pad), n*(W+pad))


# ---- conditions from a folder, consistency with the real mask, report --------------------------
class FolderConditions:
    """Condition images from a folder (layout: sample.py's doc), items {"y", "index", "name"[, "mask"]}."""

    def __init__(self, root: str, task, image_size: int) -> None:
        from msdiff.datasets.base import find_images

        self.root, self.task, self.size = Path(root), task, image_size
        if not self.root.is_dir():
            raise ValueError(f"--input {root}: not a folder")
        files = [p for p in find_images(self.root) if not p.stem.endswith("_mask")]
        if not files:
            raise ValueError(f"--input {root}: no condition images found")
        self.files = files
        self.items = [self._load(i) for i in range(len(files))]  # validate every file before sampling

    def _read(self, path: Path, size: int, what: str):
        from msdiff.datasets.base import read_image

        y = read_image(path)
        if tuple(y.shape[-2:]) != (size, size):
            raise ValueError(f"--input {path}: {what} must be {size}x{size} for this checkpoint "
                             f"({self.task!r}), got {y.shape[-1]}x{y.shape[-2]}")
        return y

    def _load(self, i: int) -> dict:
        path = self.files[i]
        item = {"index": i, "name": path.stem}
        factor = getattr(self.task, "factor", None)
        if callable(getattr(self.task, "upsample", None)) and factor:   # super-resolution: low-res input
            item["y"] = self.task.upsample(self._read(path, self.size // factor, "a low-res image")[None])[0]
        elif callable(getattr(self.task, "hole_size", None)):            # inpainting: image + mask
            mask_path = path.with_name(path.stem + "_mask.png")
            if not mask_path.is_file():
                raise ValueError(f"--input {path}: inpainting needs its mask {mask_path.name} (white = known)")
            item["y"] = self._read(path, self.size, "a masked image")
            item["mask"] = (self._read(mask_path, self.size, "a mask")[:1] > 0.5).float()
        else:                                                             # edges: the edge map itself
            item["y"] = self._read(path, self.size, "an edge map")
        return item

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]



class MaskedConsistency:
    """Passes the batch's real inpainting mask (set per batch) to `task.consistency`."""

    def __init__(self, task) -> None:
        self.task, self.mask = task, None

    def consistency(self, x_sample, y):
        mask = None if self.mask is None else self.mask.repeat(x_sample.shape[0] // self.mask.shape[0], 1, 1, 1)
        return self.task.consistency(x_sample, y, mask=mask)



def write_report(result: dict, out: Path) -> str:
    """Write out/metrics.json and out/metrics.md; return the markdown table."""
    import json

    metrics, notes = result["metrics"], result.get("notes", {})
    lines = ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | unavailable: {notes.get(k, 'n/a')} |")
    s = result["settings"]
    head = (f"# {s['ckpt_path']}: {s['num_images']} conditions x {s['draws']} draws, sampler {s['sampler']} "
            f"({s['nfe_per_sample']} network evaluations per sample), seed {s['seed']}, {s['seconds']} s\n\n")
    text = head + "\n".join(lines) + "\n"
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "metrics.md").write_text(text)
    return text
