"""Sampling helpers without Lightning: the small inference file, per-example noise and image output.

* Inference file (`write_inference_file`, recognised by `is_inference_file`): the EMA network weights, the
  estimator's buffers (VS-CMDE's current sigma_max_y) and the resolved model and data config, saved
  as plain tensors and dicts so `torch.load(path, weights_only=True)` reads it. No optimizer, no
  raw weights: a few times smaller than a training checkpoint.
* `example_generators`: one generator per batch row, seeded from (seed, condition index, draw).
  Samplers and estimators draw noise through `msdiff.utils.randn_like`, which accepts such a list
  and draws row i from generator i, so sampling is deterministic per condition whatever the batch
  size.
* `save_png`, `make_grid` ([y | draws | x] rows) and `write_report` (metrics.json and metrics.md).
* `software_version()`: msdiff's version and, in a git checkout, its commit, for metrics.json.
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
                         estimator_state: dict[str, Tensor], global_step: int | None = None) -> Path:
    """Save {"msdiff": config + format (+ the training step it comes from), "net": EMA weights,
    "estimator": buffers} to `path` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = {} if global_step is None else {"global_step": int(global_step)}
    payload = {
        "msdiff": {**config, "format": INFERENCE_FORMAT, **step},
        "net": {k: v.detach().cpu().clone() for k, v in net_state.items()},
        "estimator": {k: v.detach().cpu().clone() for k, v in estimator_state.items()},
    }
    from msdiff.atomic_io import atomic_write  # temporary file + rename; OSErrors name `path`

    atomic_write(path, lambda f: torch.save(payload, f))
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
    try:
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(path)
    except OSError as e:  # disk full mid-file: no truncated PNG left behind; the error names the file
        Path(path).unlink(missing_ok=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


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


# ---- report -----------------------------------------------------------------------------------
def software_version() -> dict[str, Any]:
    """{"msdiff": version, "git_commit": HEAD or None, "git_dirty": bool or None} of the msdiff
    source that runs (the commit only when msdiff is a git checkout and git is installed)."""
    import subprocess

    import msdiff

    root = Path(msdiff.__file__).resolve().parents[1]
    out: dict[str, Any] = {"msdiff": msdiff.__version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out



def write_report(result: dict, out: Path) -> str:
    """Write out/metrics.json and out/metrics.md; return the markdown (also what sample.py prints).

    result: {"metrics": {name: float | None}, "notes": {name: why None}, "settings": {...},
    optionally "gaussian": {name: float} (exact Gaussian-field evaluation), "config" (the sampler and
    guidance blocks that reproduce the run), "checkpoint", "software", "per_image" (written to
    metrics.json only)}."""
    import json

    metrics, notes = result["metrics"], result.get("notes", {})
    lines = ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | unavailable: {notes.get(k, 'n/a')} |")
    for k, v in (result.get("gaussian") or {}).items():
        lines.append(f"| gaussian {k} (exact) | {v:.4f} |" if isinstance(v, float) else f"| gaussian {k} | {v} |")
    s = result["settings"]
    guided = f", guidance {s['guidance']}" if s.get("guidance") else ""
    step = (result.get("checkpoint") or {}).get("global_step")
    at = f" (step {step})" if step is not None else ""
    head = (f"# {s['ckpt_path']}{at}: {s['num_images']} conditions x {s['draws']} draws, sampler {s['sampler']}{guided} "
            f"({s['nfe_per_sample']} network evaluations per sample), seed {s['seed']}, {s['seconds']} s\n\n")
    text = head + "\n".join(lines) + "\n"
    from msdiff.atomic_io import atomic_write  # never a half-written report

    atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(result, indent=2, default=str).encode()))
    atomic_write(out / "metrics.md", lambda f: f.write(text.encode()))
    return text
