"""sample.py end to end on a checkpoint trained by train.py (tests/conftest.py: 4 steps, 8x8 SR 4x CMDE),
the Gaussian-field exact evaluation, --input conditions per task, and the one-line errors."""
from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from conftest import TEST_THREADS, run_process, run_sample, sample_pngs  # noqa: E402
from msdiff.sampling.conditions import FolderConditions, condition_from_image  # noqa: E402
from msdiff.tasks import Edges, Inpainting, SuperResolution  # noqa: E402


run, pngs = run_sample, sample_pngs


def test_end_to_end_on_a_trained_checkpoint_deterministic_and_export(tiny_score_checkpoint, tmp_path):
    ckpt = tiny_score_checkpoint
    common = ["--ckpt_path", ckpt, "--num_images", 3, "--draws", 2, "--sampler", "EulerMaruyama", "--steps", 2, "--seed", 7]
    run(*common, "--output_dir", tmp_path / "a", "--batch_size", 3)
    run(*common, "--output_dir", tmp_path / "b", "--batch_size", 2)
    a, b = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert sorted(a) == [f"{i:05d}_draw{k}.png" for i in range(3) for k in range(2)]
    assert a["00000_draw0.png"].shape == (8, 8, 3)
    # same noise per (seed, index, draw); batches of 3 and 2 take other float32 kernel paths through the
    # network (CONTRIBUTING.md, "Tolerances"): a pixel may round to the neighbouring 8-bit level
    assert all(np.abs(a[n].astype(int) - b[n].astype(int)).max() <= 1 for n in a)
    assert not np.array_equal(a["00000_draw0.png"], a["00000_draw1.png"])
    result = json.loads((tmp_path / "a" / "metrics.json").read_text())
    m = result["metrics"]
    assert m["psnr"] is not None and m["consistency"] is not None and m["diversity"] > 0
    assert m["ssim"] is None and "at least 11x11" in result["notes"]["ssim"]      # 8x8 images
    assert result["settings"]["nfe_per_sample"] == 2 and "gaussian" not in result
    assert "psnr" in (tmp_path / "a" / "metrics.md").read_text()
    assert len(list((tmp_path / "a" / "grids").glob("*.png"))) == 1
    # export: a small weights_only file that sample.py accepts and that gives the same samples
    run("--ckpt_path", ckpt, "--export", tmp_path / "tiny.pt")
    obj = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert obj["msdiff"]["global_step"] == 4                      # the step it was exported at
    assert "optimizer_states" not in obj and obj["msdiff"]["model"] == torch.load(ckpt, weights_only=True)["msdiff"]["model"]
    assert (tmp_path / "tiny.pt").stat().st_size < Path(ckpt).stat().st_size / 2
    run(*[tmp_path / "tiny.pt" if v == ckpt else v for v in common], "--output_dir", tmp_path / "c", "--batch_size", 3)
    c = pngs(tmp_path / "c")
    assert all(np.array_equal(a[n], c[n]) for n in a)


def test_input_folder_and_task_mismatch(tiny_score_checkpoint, tmp_path):
    cond = tmp_path / "cond"
    cond.mkdir()
    low = np.array([[[0, 0, 0], [255, 255, 255]], [[255, 0, 0], [0, 0, 255]]], np.uint8)     # SR 4x of 8x8: 2x2
    Image.fromarray(low).save(cond / "lowres.png")
    out = tmp_path / "o"
    run("--ckpt_path", tiny_score_checkpoint, "--input", cond, "--output_dir", out, "--draws", 2,
        "--sampler", "EulerMaruyama", "--sampler.steps", 1)
    assert (out / "samples" / "lowres_draw1.png").is_file()
    grid = np.asarray(Image.open(out / "grids" / "batch00000.png"))
    assert np.array_equal(grid[:8, :8], np.kron(low, np.ones((4, 4, 1), np.uint8)))   # y = nearest upsampling
    result = json.loads((out / "metrics.json").read_text())
    assert result["metrics"]["psnr"] is None and "ground truth" in result["notes"]["psnr"]
    assert result["metrics"]["consistency"] is not None
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(cond / "edges.png")          # full size: not an SR input
    with pytest.raises(ValueError, match=r"edges.png: expected 2x2 pixels"):
        run("--ckpt_path", tiny_score_checkpoint, "--input", cond, "--output_dir", tmp_path / "o2")


def test_condition_from_image_per_task():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g)
    sr = SuperResolution(4)
    low = sr.forward_operator(x)
    assert torch.equal(condition_from_image(sr, low, (3, 8, 8))["y"], sr.measure(x)["y"])
    assert torch.equal(sr.measurement(sr.measure(x)["y"]), low)
    inp = Inpainting(0.25, fill=0.0)
    ref = inp.measure(x, g)
    garbage = x.clone()                                           # hole content of a file is ignored
    out = condition_from_image(inp, garbage, (3, 8, 8), mask=ref["mask"].expand(-1, 3, -1, -1))
    assert torch.equal(out["y"], ref["y"]) and torch.equal(out["mask"], ref["mask"])
    with pytest.raises(ValueError, match="mask"):
        condition_from_image(inp, garbage, (3, 8, 8))
    edges = Edges(channels=1)
    e = edges.forward_operator(x)
    assert torch.allclose(condition_from_image(edges, e.expand(-1, 3, -1, -1), (3, 8, 8))["y"], e, atol=1e-6)
    with pytest.raises(ValueError, match="expected 8x8 pixels"):
        condition_from_image(edges, torch.rand(1, 3, 4, 4), (3, 8, 8))


def test_inpainting_folder_needs_masks(tmp_path):
    img = np.full((8, 8, 3), 200, np.uint8)
    Image.fromarray(img).save(tmp_path / "face.png")
    with pytest.raises(ValueError, match="face_mask.png"):
        FolderConditions(str(tmp_path), Inpainting(0.25), (3, 8, 8))
    mask = np.full((8, 8), 255, np.uint8)
    mask[2:6, 2:6] = 0
    Image.fromarray(mask).save(tmp_path / "face_mask.png")
    (item,) = FolderConditions(str(tmp_path), Inpainting(0.25), (3, 8, 8)).items
    assert item["name"] == "face" and item["mask"].shape == (1, 8, 8) and item["mask"].sum() == 48
    assert item["y"][:, 2:6, 2:6].abs().sum() == 0 and torch.allclose(item["y"][:, 0, 0], torch.full((3,), 200 / 255))


def test_gaussian_field_checkpoint_reports_exact_posterior_error(tmp_path):
    """A Gaussian-field inference file (random weights): sample.py reports the exact evaluation of
    the RAW draws (the field is not confined to [0, 1]), equal to msdiff.gaussian on the same draws."""

    from conftest import resolved_config, shrink_config
    from msdiff.utils import example_noise
    from msdiff.gaussian import posterior_error
    from msdiff.samplers import DDIM
    from msdiff.checkpoint_file import instantiate_config
    from msdiff.run import TrainedRun
    from msdiff.sampling.inference_file import write_inference_file
    from msdiff.systems.score import ScoreSystem

    cfg = shrink_config(resolved_config("gaussian_cmde"))
    cfg = {"model": cfg["model"], "data": cfg["data"]}
    torch.manual_seed(0)
    system = instantiate_config(cfg["model"], ScoreSystem)
    path = write_inference_file(tmp_path / "field.pt", cfg, system.ema.net.state_dict(), system.estimator.state_dict())
    run("--ckpt_path", path, "--output_dir", tmp_path / "o", "--num_images", 4, "--draws", 3, "--sampler", "DDIM",
        "--sampler.steps", 2, "--batch_size", 4)
    exact = json.loads((tmp_path / "o" / "metrics.json").read_text())["gaussian"]
    assert exact["draws"] == 12 and exact["joint_frechet"] > 0
    trained = TrainedRun.open(path)
    assert (trained.kind, trained.step) == ("export", None)
    system, dataset, task = trained.system(), trained.split("test"), trained.task()
    y = torch.stack([dataset[i]["y"] for i in range(4)])
    est = system.estimator
    draws = []
    with torch.no_grad():
        for k in range(3):
            g = example_noise(0, range(4), k, "cpu")
            x_T = est.sampling_sde.prior_sampling(y.shape, generator=g)
            draws.append(DDIM(steps=2)(est.score_fn(system.ema.net, y, generator=g), est.sampling_sde, x_T, generator=g))
    s = torch.stack(draws)
    assert s.min() < 0 or s.max() > 1                      # clamping would have changed the numbers
    ref = posterior_error(s, y, task.gaussian_problem())
    assert exact["mean_error"] == pytest.approx(ref["mean_error"], rel=1e-5)
    assert exact["cov_error"] == pytest.approx(ref["cov_error"], rel=1e-5)


def test_bad_inputs_one_line_errors(tiny_score_checkpoint, tmp_path):
    ckpt = tiny_score_checkpoint
    junk = tmp_path / "junk.ckpt"
    torch.save({"weights": torch.zeros(1)}, junk)
    with pytest.raises(ValueError, match="not an msdiff checkpoint"):
        run("--ckpt_path", junk, "--output_dir", tmp_path / "o")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"--output_dir: .*file \(part of .*sub\) is an existing file"):
        run("--ckpt_path", ckpt, "--output_dir", blocker / "sub")
    with pytest.raises(ValueError, match="--guidance nope: unknown; expected one of AGG, ASAG, CFG, PAG, SEG, Unguided ") as e:
        run("--ckpt_path", ckpt, "--output_dir", tmp_path / "o", "--guidance", "nope")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="--sampler Hune: unknown; expected one of AdaptiveSDE, DDIM, DPMSolverPC, "
                                         "DPMSolverPP, EDMStochastic, EulerMaruyama, Heun, HeunPC, "
                                         "PredictorCorrector, ProbabilityFlowODE ") as e:
        run("--ckpt_path", ckpt, "--output_dir", tmp_path / "o", "--sampler", "Hune")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="--steps 5: sampler HeunPC has no step count"):
        run("--ckpt_path", ckpt, "--output_dir", tmp_path / "o", "--sampler", "HeunPC", "--steps", 5)
    with pytest.raises(ValueError, match="--device gpu: expected auto, cpu or cuda"):
        run("--ckpt_path", ckpt, "--output_dir", tmp_path / "o", "--device", "gpu")
    with pytest.raises(ValueError, match="--split"):
        run("--ckpt_path", ckpt, "--output_dir", tmp_path / "o", "--split", "dev")
    # as a command: one line, exit 2, no traceback
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = run_process([sys.executable, ROOT / "sample.py", "--ckpt_path", junk, "--output_dir", tmp_path / "o"],
                    timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("sample.py: error:") and "junk.ckpt" in r.stderr


def test_per_example_noise_rows_do_not_depend_on_the_batch():
    from msdiff.utils import example_noise
    from msdiff.utils import randn

    two = randn((2, 3), example_noise(0, [5, 6], 1, "cpu"))
    one = randn((1, 3), example_noise(0, [6], 1, "cpu"))
    assert torch.equal(two[1:], one) and not torch.equal(two[0], two[1])


# ---- issue 14: device, output directory, progress, metrics.json, weights ---------------------------
def test_device_auto_and_one_line_device_errors(monkeypatch):
    from msdiff.sampling.loop import resolve_device

    assert resolve_device("auto", 1) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu", 2) == "cpu"
    with pytest.raises(ValueError, match="--device gpu: expected auto, cpu or cuda"):
        resolve_device("gpu", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto", 1) == "cuda"
    with pytest.raises(ValueError, match="--devices 2: only 1 CUDA device"):
        resolve_device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1) == "cpu"
    with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA device"):
        resolve_device("cuda", 1)


def test_fixed_batches_are_shared_once_over_shards_and_devices():
    from msdiff.sampling.plan import Shard, fixed_batches, share

    assert fixed_batches(5, 2) == [[0, 1], [2, 3], [4]] and fixed_batches(0, 3) == []
    for n, b, shards, world in ((1, 1, 1, 2), (5, 2, 1, 2), (7, 2, 3, 2), (8, 3, 2, 3)):
        batches = fixed_batches(n, b)
        taken = [x for i in range(shards) for r in range(world) for x in share(len(batches), Shard(i, shards), r, world)]
        assert sorted(taken) == list(range(len(batches)))  # every batch once, whatever the split
    assert share(7, Shard(1, 3)) == [1, 4] and share(7, Shard(0, 2), 1, 2) == [2, 6]
    assert Shard.parse("2/4") == Shard(2, 4) and Shard.parse(None) == Shard(0, 1)
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ValueError, match=f"--shard {bad}: expected i/N with 0 <= i < N"):
            Shard.parse(bad)


def test_output_dir_rule(tiny_score_checkpoint, tmp_path):
    out = tmp_path / "o"
    common = ["--ckpt_path", tiny_score_checkpoint, "--output_dir", out, "--draws", 2, "--sampler", "EulerMaruyama",
              "--steps", 1]
    run(*common, "--num_images", 3)
    (out / "my_notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"--output_dir .*/o: holds samples of other settings \(conditions 3 -> 1\); "
                                         r"rerun with the same settings to continue it, or choose a new directory, or "
                                         r"pass --overwrite"):
        run(*common, "--num_images", 1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("")
    with pytest.raises(ValueError, match=r"--output_dir .*/other: not empty \(a.txt\); choose a new directory or pass "
                                         r"--overwrite"):
        run(*common[:2], "--output_dir", other, *common[4:], "--num_images", 1)
    run(*common, "--num_images", 1, "--overwrite", "true")
    assert sorted(pngs(out)) == ["00000_draw0.png", "00000_draw1.png"]  # no leftovers of the 3-image run
    assert (out / "my_notes.txt").read_text() == "keep"
    assert json.loads((out / "metrics.json").read_text())["settings"]["num_images"] == 1


def test_progress_cost_lines_and_rich_metrics_json(tiny_score_checkpoint, tmp_path, capsys):
    import msdiff
    from msdiff.checkpoint_file import instantiate_config
    from msdiff.samplers import Sampler

    out = tmp_path / "o"
    run("--ckpt_path", tiny_score_checkpoint, "--output_dir", out, "--num_images", 3, "--draws", 2, "--steps", 2,
        "--batch_size", 2, "--device", "cpu")
    err = capsys.readouterr().err
    assert ("\nsample.py: planned 3 conditions x 2 draws x 4 network evaluations = 24 sample-evaluations; on 1 cpu "
            "device(s), device 0 runs 4 batch-draws x 4 = 16 batched network calls; a time estimate follows the first "
            "batch-draw\n") in "\n" + err  # a line of its own
    assert re.search(r"[\r\n]sample.py: first batch-draw took .*for all 4 \(done around .* UTC\)\n", err)  # not on the bar
    assert "16/16 evaluations" in err and "batch 1, draw 2/2, step 4/4" in err
    r = json.loads((out / "metrics.json").read_text())
    assert r["checkpoint"]["global_step"] == 4 and r["checkpoint"]["path"] == str(Path(tiny_score_checkpoint).resolve())
    assert r["software"]["msdiff"] == msdiff.__version__ and "git_commit" in r["software"]
    assert r["command"].startswith("python sample.py --ckpt_path") and "--steps 2" in r["command"]
    assert r["config"]["guidance"] is None and r["settings"]["sampler"] == "PredictorCorrector"
    block = r["config"]["sampler"]
    assert block == {"class_path": "msdiff.samplers.PredictorCorrector",
                     "init_args": {"steps": 2, "snr": 0.15, "corrector_steps": 1, "corrector": "euler",
                                   "grid": {"class_path": "msdiff.samplers.UniformTime"}, "sigma_step": False}}
    assert instantiate_config(block, Sampler).nfe == r["settings"]["nfe_per_sample"]
    rows = r["per_image"]
    assert [e["index"] for e in rows] == [0, 1, 2] and [e["name"] for e in rows] == ["00000", "00001", "00002"]
    assert all(len(e["psnr"]) == 2 and len(e["consistency"]) == 2 and e["ssim"] == [None, None] for e in rows)
    assert r["metrics"]["psnr"] == pytest.approx(np.mean([v for e in rows for v in e["psnr"]]), rel=1e-9)
    assert r["metrics"]["diversity"] == pytest.approx(np.mean([e["diversity"] for e in rows]), rel=1e-9)
    assert "(step 4)" in (out / "metrics.md").read_text()
    # the resolved settings next to the outputs read back through --config to the same settings
    written = out / "sample_config.yaml"
    parser, args = sample.parse(["--config", str(written)])
    assert yaml.safe_load(parser.dump(args, skip_unset=False)) == r["config"]
    assert r["config"]["steps"] is None and r["config"]["draws"] == 2 and r["config"]["output_dir"] == str(out)
    parser, args = sample.parse(["--config", str(written), "--sampler.snr", "0.2"])  # later flags override it
    assert args.sampler.init_args.snr == 0.2 and args.sampler.init_args.steps == 2


def test_unavailable_lines_name_the_official_source_and_download_fails_cleanly_offline(
        tiny_score_checkpoint, tmp_path, monkeypatch):
    from msdiff import metrics as M

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    common = ["--ckpt_path", tiny_score_checkpoint, "--num_images", 2, "--draws", 2, "--sampler", "EulerMaruyama",
              "--steps", 1]
    run(*common[:-4], "--output_dir", tmp_path / "a", "--sampler", "Heun", "--sampler.steps", 3)   # any sampler class
    r = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert r["config"]["sampler"] == {"class_path": "msdiff.samplers.Heun", "init_args": {
        "steps": 3, "grid": {"class_path": "msdiff.samplers.KarrasSigma", "init_args": {"rho": 7.0}}}}
    assert r["settings"]["sampler"] == "Heun" and r["settings"]["nfe_per_sample"] == 5   # 3 Heun steps, last Euler
    notes = r["notes"]
    assert M.WEIGHT_SOURCES[M.ALEXNET_FILE] in notes["lpips"] and "--download_weights" in notes["lpips"]
    assert "unavailable" in notes["ufid"] and "unavailable" in notes["ufid_pooled"]
    # no network: a refused connection stands for an offline machine
    dead = {f: f"http://127.0.0.1:9/{f}" for f in M.WEIGHT_SOURCES}
    monkeypatch.setattr(M, "WEIGHT_SOURCES", dead)
    import msdiff.metric_weights as W
    monkeypatch.setattr(W, "WEIGHT_SOURCES", dead)
    run(*common, "--output_dir", tmp_path / "b", "--download_weights", "true")
    r = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert r["metrics"]["lpips"] is None and r["metrics"]["ufid"] is None
    assert f"download from http://127.0.0.1:9/{M.ALEXNET_FILE} failed" in r["notes"]["lpips"]
    assert not list((tmp_path / "hub").rglob("*.part*"))  # nothing half-written left


def test_download_weights_writes_a_complete_file(tmp_path, monkeypatch):
    from msdiff import metric_weights as W
    from msdiff import metrics as M

    src = tmp_path / "src.pth"
    torch.save({"features.0.weight": torch.zeros(2)}, src)
    monkeypatch.setattr(W, "WEIGHT_SOURCES", {M.ALEXNET_FILE: src.as_uri(), M.INCEPTION_FILE: (tmp_path / "junk").as_uri()})
    path = W.download_weights(M.ALEXNET_FILE, tmp_path / "w")
    assert path == tmp_path / "w" / M.ALEXNET_FILE and M.find_weights(M.ALEXNET_FILE, tmp_path / "w") == path
    (tmp_path / "junk").write_bytes(b"not a torch file")
    with pytest.raises(M.WeightsUnavailable, match="download from .*junk failed"):
        W.download_weights(M.INCEPTION_FILE, tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [M.ALEXNET_FILE]


@pytest.mark.slow
def test_two_processes_one_condition(tiny_score_checkpoint, tmp_path):
    """--devices 2 --num_images 1 (a process without conditions) on 2 CPU processes: no crash, the
    same samples and metrics as one process, each condition once."""
    common = ["--ckpt_path", str(tiny_score_checkpoint), "--num_images", "1", "--draws", "2",
              "--sampler", "EulerMaruyama", "--steps", "1", "--device", "cpu"]
    run(*common, "--output_dir", tmp_path / "one")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": TEST_THREADS}
    proc = run_process([sys.executable, ROOT / "sample.py", *common, "--devices", "2", "--output_dir", tmp_path / "two"],
                       timeout=120, cwd=ROOT, env=env)  # the process group (both ranks) is killed on every path
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    # one process vs two ranks: other batch compositions, so other float32 kernel paths (a pixel may
    # round to the neighbouring 8-bit level; CONTRIBUTING.md, "Tolerances")
    assert sorted(two) == ["00000_draw0.png", "00000_draw1.png"]
    assert all(np.abs(one[n].astype(int) - two[n].astype(int)).max() <= 1 for n in one)
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    # PSNR = 10 log10(1 / mse) over N = 192 values: a sample value off by up to one level (1/255) moves its
    # squared error by at most 3/255 (errors within [-1, 1]), so mse by 3 / (255 N) each and the PSNR by
    # 10 / ln 10 x that / mse; differences below a level (float32 round-off) move it less
    off = sum(int((one[n] != two[n]).sum()) for n in one)
    mse = 10 ** (-a["metrics"]["psnr"] / 10)
    tol = 10 / math.log(10) * off * 3 / (255 * 192) / mse + 1e-9 * a["metrics"]["psnr"]
    assert len(b["per_image"]) == 1 and b["metrics"]["psnr"] == pytest.approx(a["metrics"]["psnr"], abs=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_same_draws_on_the_gpu_as_on_the_cpu(tiny_score_checkpoint, tmp_path):
    """The per-condition noise streams are device-independent (msdiff.utils.ExampleNoise), so a
    draw on the GPU is the CPU's up to float rounding (torch.Generator streams differ by device)."""
    common = ["--ckpt_path", tiny_score_checkpoint, "--num_images", 2, "--draws", 1, "--sampler", "DDIM",
              "--sampler.steps", 3]
    run(*common, "--output_dir", tmp_path / "cpu", "--device", "cpu")
    run(*common, "--output_dir", tmp_path / "gpu", "--device", "cuda")
    cpu, gpu = pngs(tmp_path / "cpu"), pngs(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys() and len(cpu) == 2
    for name in cpu:
        assert np.abs(cpu[name].astype(float) - gpu[name].astype(float)).mean() < 2.0  # of 255
