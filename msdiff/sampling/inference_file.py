"""The small inference file of `sample.py --export PATH` (layer 2, plain torch).

`write_inference_file` saves the EMA network weights, the estimator's buffers (VS-CMDE's current
sigma_max_y) and the resolved model and data config as plain tensors and dicts, so that
`torch.load(path, weights_only=True)` reads it; `is_inference_file` recognises one. No optimizer,
no raw weights: a few times smaller than a training checkpoint, and itself a valid `--ckpt_path`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["INFERENCE_FORMAT", "write_inference_file", "is_inference_file"]

INFERENCE_FORMAT = "msdiff-inference-1"


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
