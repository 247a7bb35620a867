"""Opt-in download of the pretrained metric networks' weights from their official locations.

    download_weights(filename, weights_dir=None) -> Path

Only sample.py's `--download_weights` calls it; without that flag nothing is fetched and a missing
file makes its metric "unavailable" (`msdiff.metrics.WeightsUnavailable`). The files and where they
come from (`msdiff.metrics.WEIGHT_SOURCES`):
  alexnet-owt-7be5be79.pth                   torchvision's ImageNet AlexNet (LPIPS backbone)
  weights-inception-2015-12-05-6726825d.pth  torch-fidelity's FID Inception-v3 (UFID/JFID)
A file is written to `weights_dir` (else the torch hub cache's checkpoints/, where torchvision and
torch-fidelity keep theirs) through a temporary file that is renamed only once the download is
complete and loads as a weights-only torch file, so an interrupted download leaves nothing behind.
No network (offline machine, firewall, timeout) raises `WeightsUnavailable` with the reason: the
metric is then reported unavailable, never invented.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from msdiff.checkpoint_file import load_checkpoint
from msdiff.metric_networks import WEIGHT_SOURCES, WeightsUnavailable, weight_search_dirs

CHUNK = 1 << 20


def download_weights(filename: str, weights_dir: str | os.PathLike | None = None, timeout: float = 30.0) -> Path:
    """Fetch `filename` from WEIGHT_SOURCES into weights_dir (or the hub cache); return its path."""
    if filename not in WEIGHT_SOURCES:
        raise ValueError(f"{filename}: no official download location known (expected one of {', '.join(WEIGHT_SOURCES)})")
    url = WEIGHT_SOURCES[filename]
    dest_dir = Path(weights_dir) if weights_dir is not None else weight_search_dirs(None)[-1]
    dest = dest_dir / filename
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            while block := response.read(CHUNK):
                f.write(block)
        load_checkpoint(tmp, url, verify=False)  # a complete torch file, else ValueError
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError, RuntimeError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e).splitlines()[0] or type(e).__name__
        raise WeightsUnavailable(f"{filename} unavailable: download from {url} failed ({reason}); "
                                 f"put the file in {dest_dir} by hand") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest
