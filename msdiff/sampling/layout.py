"""The files of a sample.py output directory, and how a unit of them is written (layer 2).

    samples/NAME_drawK.png     draw K of condition NAME (8-bit, what the metrics are computed from)
    raw/NAME_drawK.pt          the unclamped float draw (Gaussian-field tasks only: their exact
                               evaluation uses the raw values)
    y/NAME.png, x/NAME.png     the condition and the target as 8-bit images (for other tools:
    mask/NAME.png              torch-fidelity, clean-fid; x only with ground truth, mask for inpainting)
    conditions/NAME.pt         the exact float y, x and mask the metrics use
    task.pt                    the task (its consistency measurement), for `--evaluate`
    sample_config.yaml         the command's resolved settings (`--config` reads it back)
    grids/batchNNNNN.png       [y | draws | x] per fixed batch

Every file is written atomically (`msdiff.atomic_io`): a kill leaves the old file or the new one;
`write_files` returns each file's sha256 for the manifest (`msdiff.sampling.manifest`), whose
fsync'ed line is what makes a sample count as finished (so the samples themselves need no fsync).
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image
from torch import Tensor

from msdiff.atomic_io import atomic_write
from msdiff.utils import tensor_to_uint8

__all__ = ["sample_file", "raw_file", "condition_files", "png_bytes", "tensor_bytes", "write_files",
           "read_tensor_file", "TASK_FILE", "CONFIG_FILE", "grid_file"]

TASK_FILE = "task.pt"
CONFIG_FILE = "sample_config.yaml"  # the resolved settings: `sample.py --config DIR/sample_config.yaml` reruns them


def sample_file(name: str, draw: int) -> str:
    return f"samples/{name}_draw{draw}.png"


def raw_file(name: str, draw: int) -> str:
    return f"raw/{name}_draw{draw}.pt"


def grid_file(batch: int) -> str:
    return f"grids/batch{batch:05d}.png"


def png_bytes(img: Tensor) -> bytes:
    """A (C, H, W) image in [0, 1] (C = 1 grey, 3 RGB) as 8-bit PNG bytes (clamped, rounded)."""
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected a (1 or 3, H, W) image, got shape {tuple(img.shape)}")
    a = tensor_to_uint8(img)
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def tensor_bytes(obj: Any) -> bytes:
    """`torch.save(obj)` as bytes (tensors on the CPU)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def condition_files(name: str, y: Tensor, x: Optional[Tensor], mask: Optional[Tensor]) -> dict[str, bytes]:
    """The files of one condition (module doc): y/x/mask PNGs and the exact tensors."""
    exact = {"y": y.detach().float().cpu().clone(), "x": None if x is None else x.detach().float().cpu().clone(),
             "mask": None if mask is None else mask.detach().float().cpu().clone()}
    files = {f"conditions/{name}.pt": tensor_bytes(exact)}
    if y.shape[0] in (1, 3):  # an image-like condition
        files[f"y/{name}.png"] = png_bytes(y.float().cpu())
    if x is not None:
        files[f"x/{name}.png"] = png_bytes(x.float().cpu())
    if mask is not None:
        files[f"mask/{name}.png"] = png_bytes(mask.float().cpu()[:1])
    return files


def write_files(out: Path, files: dict[str, bytes], durable: bool = False) -> dict[str, str]:
    """Write each out/REL atomically (temporary file + rename: a reader sees the old or the whole new
    file); {REL: sha256 of its bytes}. Not fsync'ed unless `durable`: a file that a power loss empties
    no longer matches its digest in the (fsync'ed) manifest and is redone."""
    digests = {}
    for rel, data in files.items():
        atomic_write(out / rel, lambda f, d=data: f.write(d), fsync=durable)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def read_tensor_file(path: Path, trusted_objects: bool = False) -> Any:
    """torch.load of a file this module wrote; ValueError naming it when unreadable.
    trusted_objects=True loads Python objects too (the task file of the run's own directory)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted_objects)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not readable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
