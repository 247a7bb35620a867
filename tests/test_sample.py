"""sample.py end to end on a tiny checkpoint (CPU, 16x16, a few sampler steps), plus its bad-input errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402

MODEL = {"class_path": "msdiff.systems.score.ScoreSystem", "init_args": {
    "net": {"class_path": "msdiff.nn.unet.UNet", "init_args": {
        "in_channels": 6, "out_channels": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
        "attn_resolutions": [8], "image_size": 16, "dropout": 0.0}},
    "estimator": {"class_path": "msdiff.estimators.CDE", "init_args": {
        "sde": {"class_path": "msdiff.sde.VESDE", "init_args": {"sigma_min": 0.01, "sigma_max": 10.0}}}}}}
DATA = {"class_path": "msdiff.datasets.shapes.Shapes", "init_args": {
    "image_size": 16, "length": 4, "task": {"class_path": "msdiff.tasks.SuperResolution", "init_args": {"factor": 4}}}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint in train.py's format (state_dict + checkpoint['msdiff'] config), random weights."""
    from msdiff.systems.score import ScoreSystem, instantiate_config

    torch.manual_seed(0)
    system = instantiate_config(MODEL, ScoreSystem)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": system.state_dict(), "msdiff": {"model": MODEL, "data": DATA, "version": "0"}}, path)
    return path


def run(*args: str) -> None:
    old = sys.argv
    sys.argv = ["sample.py", *map(str, args)]
    try:
        assert sample.main() == 0
    finally:
        sys.argv = old


def pngs(d: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((d / "samples").glob("*.png"))}


def test_end_to_end_deterministic_independent_of_batch_size_and_export(ckpt, tmp_path):
    common = ["--ckpt_path", ckpt, "--num_images", 3, "--draws", 2, "--sampler", "em", "--steps", 2, "--seed", 7]
    run(*common, "--output_dir", tmp_path / "a", "--batch_size", 3)
    run(*common, "--output_dir", tmp_path / "b", "--batch_size", 2)
    a, b = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert sorted(a) == [f"{i:05d}_draw{k}.png" for i in range(3) for k in range(2)]
    assert all(np.array_equal(a[n], b[n]) for n in a)              # same noise per (seed, index, draw)
    assert not np.array_equal(a["00000_draw0.png"], a["00000_draw1.png"])
    result = json.loads((tmp_path / "a" / "metrics.json").read_text())
    m = result["metrics"]
    assert m["psnr"] is not None and m["consistency"] is not None and m["diversity"] > 0
    assert m["lpips"] is None or m["lpips"] >= 0                     # None unless AlexNet weights are cached
    assert "psnr" in (tmp_path / "a" / "metrics.md").read_text()
    assert len(list((tmp_path / "a" / "grids").glob("*.png"))) == 1
    # export: a small weights_only file that sample.py accepts and that gives the same samples
    run("--ckpt_path", ckpt, "--export", tmp_path / "tiny.pt")
    obj = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert "optimizer_states" not in obj and obj["msdiff"]["model"] == MODEL
    run(*[tmp_path / "tiny.pt" if v == ckpt else v for v in common], "--output_dir", tmp_path / "c", "--batch_size", 3)
    c = pngs(tmp_path / "c")
    assert all(np.array_equal(a[n], c[n]) for n in a)


def test_input_folder_and_task_mismatch(ckpt, tmp_path):
    cond = tmp_path / "cond"
    cond.mkdir()
    Image.fromarray(np.full((4, 4, 3), 120, np.uint8)).save(cond / "lowres.png")   # SR x4 of 16: 4x4 input
    run("--ckpt_path", ckpt, "--input", cond, "--output_dir", tmp_path / "o", "--draws", 2, "--sampler", "em", "--steps", 1)
    assert (tmp_path / "o" / "samples" / "lowres_draw1.png").is_file()
    out = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert out["metrics"]["psnr"] is None and "ground truth" in out["notes"]["psnr"]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(cond / "edges.png")       # full size: not an SR input
    with pytest.raises(ValueError, match=r"edges.png: a low-res image must be 4x4"):
        run("--ckpt_path", ckpt, "--input", cond, "--output_dir", tmp_path / "o2")


def test_bad_inputs_one_line_errors(ckpt, tmp_path):
    junk = tmp_path / "junk.ckpt"
    torch.save({"weights": torch.zeros(1)}, junk)
    with pytest.raises(ValueError, match="not an msdiff checkpoint"):
        run("--ckpt_path", junk, "--output_dir", tmp_path / "o")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="--output_dir .*not writable"):
        run("--ckpt_path", ckpt, "--output_dir", blocker / "sub")
    with pytest.raises(ValueError, match="guidance pag is not available yet|--guidance pag"):
        run("--ckpt_path", ckpt, "--output_dir", tmp_path / "o", "--guidance", "pag", "--guidance.scale", 2)
    with pytest.raises(ValueError, match="--sampler"):
        run("--ckpt_path", ckpt, "--output_dir", tmp_path / "o", "--sampler", "nope")
    # as a command: one line, exit 2, no traceback
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt_path", str(junk), "--output_dir", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("sample.py: error:") and "junk.ckpt" in r.stderr


def test_per_example_noise_rows_do_not_depend_on_the_batch():
    from msdiff.export import example_generators
    from msdiff.utils import randn

    two = randn((2, 3), example_generators(0, [5, 6], 1, "cpu"))
    one = randn((1, 3), example_generators(0, [6], 1, "cpu"))
    assert torch.equal(two[1:], one) and not torch.equal(two[0], two[1])
