"""User errors of train.py: non-zero exit, the LAST line names the problem, no traceback, nothing
already written is lost."""
from __future__ import annotations

import hashlib

import pytest
from conftest import tiny_config

from msdiff.cli import USER_ERROR_EXIT_CODE, run_entry_point


def _fail(args: list, capsys) -> str:
    """Run train.py's main in-process through run_entry_point; return the last stderr line."""
    import train

    with pytest.raises(SystemExit) as e:
        run_entry_point(lambda: train.main([str(a) for a in args]), prog="train.py")
    assert e.value.code == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    # (in-process, pytest's capture can make Lightning's log handlers print "--- Logging error ---"
    # blocks; tests/test_faults.py checks the whole stderr of train.py run as a command)
    assert err[-1].startswith("train.py: error: ")
    return err[-1]


def test_unknown_experiment_name(capsys):
    """A bare config name that is not in configs/ is one line naming it and the names there (as a
    command, the same line is the whole output: tests/test_faults.py runs train.py's errors as
    subprocesses)."""
    last = _fail(["--config", "sr8x_nosuch"], capsys)
    assert "sr8x_nosuch" in last and "sr8x_cmde" in last


def test_misspelled_key(capsys):
    last = _fail(["--config", "quickstart", "--model.init_args.lrr", "5"], capsys)
    assert "lrr" in last and "not accepted" in last
    last = _fail(["--config", "quickstart", "--trainer.max_step", "5"], capsys)  # no abbreviations
    assert "--trainer.max_step" in last


def test_wrong_type(capsys):
    last = _fail(["--config", "quickstart", "--trainer.max_steps", "many"], capsys)
    assert "max_steps" in last and "many" in last


def test_value_rejected_by_a_constructor(capsys):
    # jsonargparse wraps the constructor's ValueError in a dump of the whole config: the line shown
    # must be the constructor's own message
    last = _fail(["--config", "quickstart", "--model.init_args.estimator.init_args.sde.init_args.y.init_args.sigma_max",
                  "0.001"], capsys)
    assert "sigma_max=0.001" in last and "expected 0 < sigma_min < sigma_max" in last and "Namespace" not in last


def test_missing_dataset_root(tmp_path, capsys):
    missing = tmp_path / "no_celeba_here"
    cfg = tiny_config("sr8x_cde", tmp_path)
    last = _fail(["--config", cfg, "--trainer.fast_dev_run", "1",
                  "--data.init_args.dataset", "msdiff.datasets.CelebA",
                  "--data.init_args.dataset.init_args.root", missing], capsys)
    assert str(missing) in last


def test_corrupt_image(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "imgs" / split).mkdir(parents=True)
        (tmp_path / "imgs" / split / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        (tmp_path / "imgs" / split / "also_broken.png").write_bytes(b"garbage")
    cfg = tiny_config("quickstart", tmp_path)
    last = _fail(["--config", cfg, "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", tmp_path / "runs",
                  "--data.init_args.dataset", "msdiff.datasets.ImageFolder",
                  "--data.init_args.dataset.init_args.root", tmp_path / "imgs",
                  "--data.init_args.dataset.init_args.image_size", "8"], capsys)
    assert "broken.png" in last


def test_checkpoint_from_another_model(tiny_score_checkpoint, tmp_path, capsys):
    """A CMDE checkpoint given to a CDE config (and found as last.ckpt of a reused run name)."""
    digest = hashlib.sha256(tiny_score_checkpoint.read_bytes()).hexdigest()
    cfg = tiny_config("sr8x_cde", tmp_path)
    root = tmp_path / "runs"
    last = _fail(["--config", cfg, "--trainer.max_steps", "2", "--trainer.default_root_dir", root,
                  "--ckpt_path", tiny_score_checkpoint], capsys)
    assert str(tiny_score_checkpoint) in last and "different model" in last
    run_ckpt = root / "sr8x_cde" / "checkpoints" / "last.ckpt"
    run_ckpt.parent.mkdir(parents=True, exist_ok=True)  # train.py locks it (issue 26)
    run_ckpt.write_bytes(tiny_score_checkpoint.read_bytes())
    last = _fail(["--config", cfg, "--trainer.max_steps", "2", "--trainer.default_root_dir", root], capsys)
    assert str(run_ckpt) in last and "different model" in last
    assert hashlib.sha256(run_ckpt.read_bytes()).hexdigest() == digest  # nothing written over
    assert hashlib.sha256(tiny_score_checkpoint.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("args, line", [
    (["--model.init_args.lrr", "5"],
     "ArgumentError: model: Option 'lrr' is not accepted (class_path msdiff.systems.score.ScoreSystem)"),
    (["--trainer.max_steps", "many"], "ArgumentError: trainer.max_steps: Expected a <class 'int'>. Got value: many"),
    (["--model.init_args.sampler", "Hune"], "ArgumentError: model.init_args.sampler: Expected a dot import path string: "
                                            "Hune (class_path msdiff.systems.score.ScoreSystem)"),
    (["--model.init_args.lr", "-1"], "ValueError: model: lr=-1.0: expected a positive number"),
    (["--model.init_args.net.init_args.ch", "16"],
     "ValueError: model.init_args.net: group_norm: channels=16 must be a multiple of 32"),
    (["--model.init_args.estimator.init_args.sde.init_args.y.init_args.sigma_max", "0.001"],
     "ValueError: model.init_args.estimator.init_args.sde.init_args.y: sigma_min=0.005, sigma_max=0.001: "
     "expected 0 < sigma_min < sigma_max (finite)"),
])
def test_the_one_line_of_each_kind_of_error_is_pinned(args, line, capsys):
    """The exact line of each kind of user error: jsonargparse's parse errors (its ArgumentError, the
    nested report reduced to key and cause) and a constructor's check (the innermost error of the
    exception chain, with the config key whose class, rebuilt alone, fails the same way:
    msdiff.cli.failing_key). A jsonargparse upgrade that changes its reports fails here, not silently."""
    assert _fail(["--config", "quickstart", *args], capsys) == f"train.py: error: {line}"
