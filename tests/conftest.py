"""Shared fixtures of the training tests (and of sample.py's tests).

`tiny_score_checkpoint` (session scope) trains a tiny CMDE model with train.py for 4 steps on
the embedded procedural data and returns the path of its `last.ckpt`; load it with
`msdiff.systems.score.load_score_system(path)`. `tiny_config(...)` writes a shrunken copy of any
experiment config (tiny U-Net, procedural data) for tests that run train.py.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The tests use tiny tensors: one intra-op thread per process is fastest, and subprocesses (train.py,
# 2-process DDP) inherit it through OMP_NUM_THREADS instead of oversubscribing the 2 CI cores.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)


def _task_of(cfg: dict) -> dict:
    ds = cfg["data"]["init_args"]["dataset"]
    task = ds.get("init_args", {}).get("task")
    if task is None:  # edges2shoes provides y; the procedural stand-in builds it with the Edges task
        task = {"class_path": "msdiff.tasks.Edges"}
    return task


def shrink_config(cfg: dict, image_size: int = 8, length: int = 16, batch_size: int = 2) -> dict:
    """A copy of an experiment config with a tiny U-Net, procedural data (Gaussian-field configs keep
    their data, which needs no files), CPU/1 device and a 2-step grid sampler."""
    cfg = copy.deepcopy(cfg)
    data = cfg["data"]["init_args"]
    if "GaussianField" in data["dataset"]["class_path"]:
        image_size = data["dataset"]["init_args"].get("size", 8)
        data["dataset"]["init_args"]["length"] = length
    else:
        data["dataset"] = {"class_path": "msdiff.datasets.Shapes",
                           "init_args": {"image_size": image_size, "length": length, "max_shapes": 3,
                                         "task": _task_of(cfg),
                                         "channels": cfg["model"]["init_args"].get("x_channels", 3)}}
    data.update(batch_size=batch_size, val_batch_size=2, val_size=2, num_workers=0,
                pin_memory=False, persistent_workers=False)
    net = cfg["model"]["init_args"]["net"]["init_args"]
    net.update(ch=32, ch_mult=[1], num_res_blocks=1, attn_resolutions=[], image_size=image_size, dropout=0.1)
    model = cfg["model"]["init_args"]
    model["sampler"] = {"class_path": "msdiff.samplers.DDIM", "init_args": {"steps": 2}}
    model["sample_grid_size"] = 2
    est = model["estimator"]["init_args"]
    if "reach_target_steps" in est:
        est["reach_target_steps"] = 10
    tr = cfg.setdefault("trainer", {})
    tr.update(accelerator="cpu", devices=1, strategy="auto", enable_progress_bar=False,
              enable_model_summary=False, log_every_n_steps=1, val_check_interval=10,
              num_sanity_val_steps=0, precision="32-true")
    cfg["checkpoint"] = {"every_n_steps": 1000}
    return cfg


def tiny_config(name: str, out_dir: Path, **kw) -> Path:
    """Write shrink_config(configs/<name>.yaml) to out_dir/<name>.yaml and return its path."""
    cfg = shrink_config(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), **kw)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_train(args: list[str]) -> int:
    """train.py's main() in this process (user errors raise; see msdiff.cli.run_entry_point)."""
    import train

    return train.main([str(a) for a in args])


@pytest.fixture(scope="session")
def tiny_score_checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a 4-step tiny CMDE (quickstart) run: 8x8 procedural images, SR 4x."""
    d = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = tiny_config("quickstart", d)
    assert run_train(["--config", cfg, "--trainer.max_steps", "4", "--trainer.default_root_dir", d / "runs",
                      "--trainer.logger", "false"]) == 0
    path = d / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def run_sample(*args) -> None:
    """Run sample.py's main in-process with these arguments; it must exit 0."""
    import sample

    old = sys.argv
    sys.argv = ["sample.py", *map(str, args)]
    try:
        assert sample.main() == 0
    finally:
        sys.argv = old


def sample_pngs(d: Path) -> dict:
    """{file name: pixels} of the per-draw PNGs sample.py wrote under d/samples."""
    import numpy as np
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)) for p in sorted((d / "samples").glob("*.png"))}
