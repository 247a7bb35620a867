"""`msdiff.run.TrainedRun`: one read of the file, its kind/step/config, and builders whose values equal
what sample.py computes (tests/conftest.py's 4-step tiny CMDE checkpoint)."""
from __future__ import annotations

import pytest
import torch

from msdiff import checkpoint_file
from msdiff.run import TrainedRun, reference_sampler
from msdiff.samplers import EulerMaruyama
from msdiff.sampling.inference_file import write_inference_file


def test_open_reads_and_verifies_the_file_once(tiny_score_checkpoint, monkeypatch):
    calls = {"verify": 0, "load": 0}
    verify, load = checkpoint_file.verify_checkpoint, torch.load

    def counting_verify(path):
        calls["verify"] += 1
        return verify(path)

    def counting_load(*args, **kwargs):
        calls["load"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(checkpoint_file, "verify_checkpoint", counting_verify)
    monkeypatch.setattr(torch, "load", counting_load)
    run = TrainedRun.open(tiny_score_checkpoint)
    system = run.system()
    run.task()
    assert calls == {"verify": 1, "load": 1}
    stored = load(tiny_score_checkpoint, weights_only=True)
    assert (run.kind, run.step) == ("score", 4) == ("score", stored["global_step"])
    assert run.config == {k: v for k, v in stored["msdiff"].items() if k != "version"}
    assert not system.training
    for k, v in stored["state_dict"].items():
        assert torch.equal(system.state_dict()[k], v), k


def test_task_comes_from_its_config_not_from_a_data_split(tiny_score_checkpoint, monkeypatch):
    from msdiff.data import ConditionalDataModule
    from msdiff.tasks import Inpainting, SuperResolution

    run = TrainedRun.open(tiny_score_checkpoint)

    def no_split(self, name):
        raise AssertionError("task() built a split")

    monkeypatch.setattr(ConditionalDataModule, "split", no_split)
    task = run.task()
    assert isinstance(task, SuperResolution) and task.factor == 4
    assert isinstance(run.task("msdiff.tasks.Inpainting"), Inpainting)
    assert run.task('{"class_path": "msdiff.tasks.SuperResolution", "init_args": {"factor": 2}}').factor == 2
    with pytest.raises(ValueError, match=r"--task msdiff.tasks.Inpaint: .*did you mean msdiff.tasks.Inpainting"):
        run.task("msdiff.tasks.Inpaint")
    with pytest.raises(ValueError, match="--task {bad: not valid JSON"):
        run.task("{bad")


def test_sample_equals_sample_py_draws(tiny_score_checkpoint, tmp_path):
    """Row i, draw k of TrainedRun.sample is sample.py's draw k of condition i (the same noise
    stream): bitwise, for a train.py checkpoint and for its --export file."""
    from msdiff.sampling.loop import SamplingJob
    from msdiff.sampling.plan import SamplingSettings

    run = TrainedRun.open(tiny_score_checkpoint)
    test = run.split("test")
    y = torch.stack([test[i]["y"] for i in range(3)])
    x = run.sample(y, EulerMaruyama(steps=2), draws=2, seed=7)
    assert x.shape == (2, 3, 3, 8, 8)
    settings = SamplingSettings(checkpoint="c", step=run.step, sampler=None, guidance=None, conditions=3, draws=2,
                                batch_size=3, seed=7, ema=True, source="split test", task=None, device="cpu")
    module = SamplingJob(run.system(), test, run.task(), EulerMaruyama(steps=2), None, settings, tmp_path, progress=False)
    with torch.no_grad():
        expected = torch.stack([module.draw(y.float(), None, [0, 1, 2], k) for k in range(2)]).clamp(0, 1)
    assert torch.equal(x, expected)
    assert not torch.equal(x[0], x[1])
    system = run.system()
    path = write_inference_file(tmp_path / "small.pt", run.config, system.ema.net.state_dict(),
                                system.estimator.state_dict(), global_step=run.step)
    exported = TrainedRun.open(path)
    assert (exported.kind, exported.step, exported.config) == ("export", 4, run.config)
    assert torch.equal(exported.sample(y, EulerMaruyama(steps=2), draws=2, seed=7), x)
    assert reference_sampler().steps == 1000 and reference_sampler().snr == 0.15


def test_a_config_saved_with_string_estimator_options_is_upgraded(tiny_score_checkpoint, tmp_path):
    """Checkpoints written before weighting/preconditioning were objects store strings there."""
    ckpt = torch.load(tiny_score_checkpoint, weights_only=True)
    args = ckpt["msdiff"]["model"]["init_args"]["estimator"]["init_args"]
    assert args["preconditioning"]["init_args"]["sigma_data"] == 0.5
    args.update(weighting="likelihood", preconditioning="edm", sigma_data=0.5)
    torch.save(ckpt, tmp_path / "old.ckpt")
    run = TrainedRun.open(tmp_path / "old.ckpt")
    upgraded = run.config["model"]["init_args"]["estimator"]["init_args"]
    assert upgraded["preconditioning"] == {"class_path": "msdiff.estimators.EDMPrecond", "init_args": {"sigma_data": 0.5}}
    assert upgraded["weighting"] == {"class_path": "msdiff.estimators.LikelihoodWeighting"}
    new = TrainedRun.open(tiny_score_checkpoint)
    y = new.split("test")[0]["y"][None]
    assert torch.equal(run.sample(y, EulerMaruyama(steps=2)), new.sample(y, EulerMaruyama(steps=2)))


def test_one_line_errors_name_the_file(tiny_score_checkpoint, tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"^--ckpt_path .*junk.ckpt: "):
        TrainedRun.open(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match=r"foreign.ckpt: not an msdiff checkpoint"):
        TrainedRun.open(tmp_path / "foreign.ckpt")
    run = TrainedRun.open(tiny_score_checkpoint)
    with pytest.raises(ValueError, match="--split dev: expected train, val or test"):
        run.split("dev")
    with pytest.raises(ValueError, match="not a CUT checkpoint"):
        run.cut_system()
    data = run.config.pop("data")
    with pytest.raises(ValueError, match="stores no data config"):
        run.split("test")
    run.config["data"] = data


def test_lightning_load_from_checkpoint_rebuilds_the_system(tiny_score_checkpoint):
    """Lightning's own loader works on a train.py checkpoint: its hyperparameters are the
    constructor's config (the HPARAMS display goes to the logger, not into them)."""
    import warnings

    from msdiff.systems.score import ScoreSystem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on the EMA's modules in eval mode
        system = ScoreSystem.load_from_checkpoint(tiny_score_checkpoint, map_location="cpu", weights_only=True)
    stored = torch.load(tiny_score_checkpoint, weights_only=True)
    assert stored["hyper_parameters"]["net"] == stored["msdiff"]["model"]["init_args"]["net"]
    assert stored["hyper_parameters"]["lr"] == stored["msdiff"]["model"]["init_args"]["lr"]
    for k, v in stored["state_dict"].items():
        assert torch.equal(system.state_dict()[k], v), k


def test_the_readme_python_api_runs(tiny_score_checkpoint):
    """README's three lines (load, pick a sampler, sample), executed as written but for the path."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "TrainedRun.open" in b)
    path = re.search(r'TrainedRun.open\("([^"]+)"\)', block).group(1)
    assert path == "runs/quickstart/checkpoints/last.ckpt"
    scope: dict = {}
    exec(block.replace(path, str(tiny_score_checkpoint)), scope)
    x, run, y = scope["x"], scope["run"], scope["y"]
    assert x.shape == (4, 1, 3, 8, 8) and 0 <= x.min() and x.max() <= 1 and not torch.equal(x[0], x[1])
    assert run.kind == "score" and torch.equal(y, run.split("test")[0]["y"][None])
