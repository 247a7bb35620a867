"""Image files and image-shaped tensors: the one home of listing, reading, writing, resizing and
the sample grid (layer 0: imports only `msdiff.utils`).

* `IMAGE_EXTENSIONS`: the file suffixes msdiff treats as images (case-insensitive), every one of
  them a format Pillow decodes (JPEG, PNG, BMP, WebP, GIF, TIFF, PPM).
* `find_images(folder, recursive)` lists them (sorted by path); `list_images(folder, flag)` does
  the same and fails with one line naming the flag and the folder when it is missing or empty.
* `read_image(path, channels)`: (C, H, W) float in [0, 1] at the file's true scale (8-bit and
  16-bit files; 32-bit, float and transparent images are refused naming the file);
  `write_png(img, path)`: an 8-bit PNG (grey for one channel). An 8-bit PNG round-trips exactly.
* `resize(img, size)`: antialiased bicubic resampling (PyTorch's `interpolate(mode="bicubic",
  antialias=True)`, as PIL's BICUBIC for downsampling), clamped to [0, 1].
* `sample_grid(y, draws, x)`: one row per condition, [y | draw 1 .. draw K | x], with white
  separators (torchvision's `make_grid`).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.utils import make_grid

from msdiff.utils import tensor_to_uint8

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
#: decoded by torchvision (libjpeg-turbo, libpng, libwebp: about twice as fast as PIL); the rest by PIL
_TORCHVISION_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
#: PIL modes of one-channel images (`read_image(path)` keeps them grey)
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N")
#: PIL modes of 16-bit grey pixels (0..65535 is black..white)
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
#: modes torchvision decodes as PIL converts them (8-bit, and 16-bit PNGs, which it returns as uint16)
_TORCHVISION_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")
#: every other mode PIL converts to RGB / L at the file's own 8-bit scale
_8BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# ---- listing ----------------------------------------------------------------------------------
def find_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Files with an image suffix directly in `folder` (or anywhere below it when `recursive`),
    sorted by path; [] when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def list_images(folder: str | os.PathLike, flag: str = "folder", recursive: bool = False) -> list[Path]:
    """`find_images`, but a ValueError "FLAG=FOLDER: why" when the folder is missing or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{flag}={folder}: no such folder")
    files = find_images(folder, recursive)
    if not files:
        raise ValueError(f"{flag}={folder}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


# ---- reading and writing ----------------------------------------------------------------------
def _check_mode(path: Path, im: Image.Image) -> None:
    """ValueError naming the file unless it holds one image whose pixels have a known scale (8-bit,
    16-bit, or a PNG's "I") and it is opaque (transparent pixels have no colour to read: flatten
    them first)."""
    mode = im.mode
    if mode == "F" or (mode == "I" and im.format != "PNG"):
        bits = "32-bit float" if mode == "F" else "32-bit integer"
        raise ValueError(f"{path}: {bits} pixels (PIL mode {mode}) have no fixed black and white; expected an "
                         "8-bit or 16-bit image (convert it, choosing the scale)")
    if mode not in _8BIT_MODES and mode not in _16BIT_MODES and mode != "I":
        raise ValueError(f"{path}: PIL mode {mode} is not read; expected an 8- or 16-bit grey, RGB, palette "
                         "or CMYK image")
    frames = getattr(im, "n_frames", 1)  # PIL's multi-frame plugins (GIF, TIFF, WebP) have it
    if frames > 1:
        raise ValueError(f"{path}: holds {frames} frames (an animation or a multi-page file); expected one image")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        lowest = im.convert("RGBA" if mode not in ("LA", "La") else "LA").getchannel("A").getextrema()[0]
        if lowest < 255:
            raise ValueError(f"{path}: has transparent pixels (alpha down to {lowest} of 255); expected an opaque "
                             "image (flatten it onto a background first)")


def _decode(path: Path, channels: int | None) -> Tensor:
    """(C, H, W) uint8, or uint16 for a 16-bit file (0..65535 is black..white); see `read_image_uint8`."""
    try:
        with Image.open(path) as im:
            _check_mode(path, im)
            grey = im.mode in _GREY_MODES
            c = channels or (1 if grey else 3)
            if path.suffix.lower() in _TORCHVISION_SUFFIXES and im.mode in _TORCHVISION_MODES and (c == 3 or grey):
                im.close()  # no colour conversion needed: torchvision's faster decoders (uint16 for 16-bit PNGs)
                return decode_image(read_file(str(path)), mode=ImageReadMode.RGB if c == 3 else ImageReadMode.GRAY)
            if im.mode in _16BIT_MODES or im.mode == "I":  # a 16-bit TIFF, or a 16-bit PNG that PIL calls "I"
                a = np.asarray(im)  # forces the full decode: truncation fails here
                if a.min(initial=0) < 0 or a.max(initial=0) > 65535:
                    raise ValueError(f"{path}: 16-bit pixels outside 0..65535")
                a = np.repeat(a.astype(np.uint16)[:, :, None], c, axis=2)
            else:
                a = np.array(im.convert("RGB" if c == 3 else "L"))
    except RuntimeError as err:  # torchvision: "function, source:line, message"
        raise ValueError(f"{path}: not a readable image ({str(err).split(', ', 2)[-1]})") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    return torch.from_numpy(a).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)


def read_image_uint8(path: str | os.PathLike, channels: int | None = None) -> Tensor:
    """Decode an image file to (C, H, W) uint8 at the file's true scale: C = `channels` (3: RGB, 1:
    PIL's "L" luma), or, when None, 1 for a grey file and 3 for any other.

    Every 8-bit mode PIL gives (1-bit, grey, palette, RGB, CMYK, YCbCr) is converted as PIL
    converts it; 16-bit files (PNG, TIFF) are rounded from 0..65535 to 0..255 (v / 257). An alpha
    channel must be fully opaque. ValueError naming the file for 32-bit integer or float pixels
    (no fixed black and white), transparent pixels, other modes, and files that cannot be decoded
    (truncated files included)."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels}: expected 1, 3 or None")
    x = _decode(Path(path), channels)
    if x.dtype == torch.uint8:
        return x
    return ((x.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


def to_float(x: Tensor) -> Tensor:
    """uint8 (C, H, W) -> float in [0, 1] (uint16: 0..65535 -> [0, 1])."""
    if x.dtype == torch.uint16:
        return x.to(torch.int32).float().mul_(1.0 / 65535.0)
    return x.float().mul_(1.0 / 255.0)


def read_image(path: str | os.PathLike, channels: int | None = None) -> Tensor:
    """(C, H, W) float in [0, 1] from an image file (see `read_image_uint8` for `channels` and the
    modes read); a 16-bit file keeps its 16-bit precision (v / 65535)."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels}: expected 1, 3 or None")
    return to_float(_decode(Path(path), channels))


def write_png(img: Tensor, path: str | os.PathLike) -> None:
    """Write a (C, H, W) image in [0, 1] (C = 1: grey, C = 3: RGB) as an 8-bit PNG. On an OSError
    (disk full mid-file) no truncated file is left behind and the error names the file."""
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"{path}: expected a (1 or 3, H, W) image, got shape {tuple(img.shape)}")
    a = tensor_to_uint8(img)
    try:
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(path, format="PNG")
    except OSError as e:
        Path(path).unlink(missing_ok=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


# ---- resizing ---------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_in, n_out) matrix of 1-D antialiased bicubic resampling: row i is the response to e_i."""
    eye = torch.eye(n_in, dtype=torch.float64).view(1, 1, n_in, n_in)
    m = F.interpolate(eye, size=(n_in, n_out), mode="bicubic", antialias=True, align_corners=False)[0, 0]
    return m.to(device=device, dtype=dtype)


def resize(img: Tensor, size: int | tuple[int, int], clamp: bool = True) -> Tensor:
    """Antialiased bicubic resize of (..., H, W) to `size` (an int: square), clamped to [0, 1]
    unless `clamp` is False (an operator inside a guidance loss keeps its gradient for out-of-range
    pixels); the input itself at equal size.

    Equal (to float rounding) to `F.interpolate(mode="bicubic", antialias=True)`, which is
    separable, but computed as two matrix products with cached 1-D resampling matrices: about 3x
    faster on CPU, any device, differentiable, any number of leading dims."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(img.shape[-2:]) == (h, w):
        return img
    mh = _resize_matrix(img.shape[-2], h, img.device, img.dtype)
    mw = _resize_matrix(img.shape[-1], w, img.device, img.dtype)
    out = mh.t() @ (img @ mw)
    return out.clamp(0.0, 1.0) if clamp else out


# ---- the sample grid --------------------------------------------------------------------------
def _rgb(v: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) -> (B, 3, H, W) float, clamped to [0, 1]."""
    v = v.float().clamp(0.0, 1.0)
    return v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v


def sample_grid(y: Tensor, draws: Tensor, x: Tensor | None = None, pad: int = 2) -> Tensor:
    """One row per condition, [y | draw 1 .. draw K | x]: (3, B (H + pad), n (W + pad)) in [0, 1].

    y (B, C_y, h, w) is upsampled to the draws' H x W by nearest neighbour when smaller (a low-res
    condition); draws (K, B, C, H, W); x (B, C, H, W) targets or None. Grey columns are shown as
    RGB. Every cell is followed by `pad` white pixels on its right and below (torchvision's
    `make_grid` pads before each cell too; that leading border is cut off)."""
    k, b, _, h, w = draws.shape
    if tuple(y.shape[-2:]) != (h, w):
        y = F.interpolate(y.float(), size=(h, w), mode="nearest")
    cols = [y, *draws] + ([] if x is None else [x])
    cells = rearrange(torch.stack([_rgb(c.cpu()) for c in cols]), "n b c h w -> (b n) c h w")
    return make_grid(cells, nrow=len(cols), padding=pad, pad_value=1.0)[:, pad:, pad:]
