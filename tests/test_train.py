"""train.py, ScoreSystem, EMA and checkpoint writing (CPU, tiny shapes, in-process)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS, cpu_bf16_attention_missing, resolved_config, run_train, tiny_config, watch_host_traffic

from msdiff.callbacks import atomic_write
from msdiff.systems.ema import EMA

# the score-model configs (CUT's configs are tested with the CUT system)
ALL_CONFIGS = sorted(p.stem for p in CONFIGS.glob("*.yaml")
                     if "msdiff.systems.score.ScoreSystem" in p.read_text())


def test_ema_warmup_decay_and_exact_average():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.999)
    w0 = ema.net.weight.clone()
    # the reference increments its counter n before min(decay, (1 + n) / (10 + n)): 2/11, 3/12, 4/13
    assert ema.current_decay() == 2 / 11
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # ema = 2/11 * w0 + 9/11 * (w0 + 1)
    torch.testing.assert_close(ema.net.weight, w0 + 9 / 11, rtol=0, atol=1e-6)  # float32 lerp: a few ulp of |w| < 2
    assert ema.current_decay() == 3 / 12 and int(ema.num_updates) == 1
    ema.update(net)
    assert ema.current_decay() == 4 / 13 and int(ema.num_updates) == 2
    ema.num_updates.fill_(10**6)
    ema.load_state_dict(ema.state_dict())  # the host mirror follows a loaded counter
    assert ema.current_decay() == 0.999
    ema.train()
    assert not ema.net.weight.requires_grad and not ema.net.training


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "ckpt" / "last.ckpt"
    atomic_write(target, lambda f: f.write(b"good"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))  # must not be used

    def crash(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"good"
    assert os.listdir(target.parent) == ["last.ckpt"]  # no temp file left behind
    assert not (tmp_path / "elsewhere").exists()


def test_config_prints(capsys):
    """--print_config prints the resolved config, derived network values included, and instantiates
    nothing (every shipped config parses: tests/test_configs_equivalence.py)."""
    import train

    with pytest.raises(SystemExit) as e:
        train.main(["--config", "sr8x_cde", "--print_config"])
    assert e.value.code in (0, None)
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["class_path"] == "msdiff.systems.score.ScoreSystem"
    assert out["data"]["class_path"] == "msdiff.data.ConditionalDataModule"
    assert out["model"]["init_args"]["net"]["init_args"]["out_channels"] == 3  # CDE: the score of x alone


def test_reference_hyperparameters():
    sr = resolved_config("sr8x_cmde")
    m = sr["model"]["init_args"]
    sde = m["estimator"]["init_args"]["sde"]["init_args"]
    assert sde["x"]["init_args"]["sigma_max"] == pytest.approx(math.sqrt(3 * 160 * 160), abs=1e-3)
    assert sde["x"]["init_args"]["sigma_min"] == sde["y"]["init_args"]["sigma_min"] == 0.005
    assert sde["y"]["init_args"]["sigma_max"] == 0.5
    assert (m["lr"], m["warmup_steps"], m["grad_clip"], m["ema_decay"]) == (2e-4, 2500, 1.0, 0.999)
    assert sr["trainer"]["max_steps"] == 500_000 and sr["trainer"]["devices"] * sr["data"]["init_args"]["batch_size"] == 32
    inp = resolved_config("inpaint_cmde")
    assert inp["trainer"]["devices"] * inp["data"]["init_args"]["batch_size"] == 100
    edges = resolved_config("edges_cde")
    assert edges["data"]["init_args"]["batch_size"] == 50 and edges["model"]["init_args"]["net"]["init_args"]["ch"] == 128


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_fast_dev_run(name, tmp_path):
    """One training and one validation step (with a sample grid) of every config, shrunk."""
    cfg = tiny_config(name, tmp_path)
    assert run_train(["--config", cfg, "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", tmp_path / "runs"]) == 0


def test_logging_checkpoint_contents_and_reload(tmp_path, capfd):
    """TensorBoard gets every scalar, the validation grid's metrics, the [y | K draws | x] grid and
    the run's hyperparameters (HPARAMS tab); the console shows progress over max_steps without
    Lightning's noise; the checkpoint loads with weights_only and rebuilds the system (EMA and
    VS-CMDE buffer included) from the file alone."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from msdiff.run import TrainedRun

    cfg = tiny_config("sr8x_vscmde", tmp_path)
    root = tmp_path / "runs"
    assert run_train(["--config", cfg, "--trainer.max_steps", "10", "--trainer.default_root_dir", root,
                      "--model.init_args.sample_draws", "2", "--trainer.enable_progress_bar", "true",
                      "--trainer.enable_model_summary", "true", "--trainer.limit_val_batches", "1",
                      "--data.init_args.val_size", "4"]) == 0
    out = "".join(capfd.readouterr())
    assert "10/10 [" in out and "step/s" in out                       # one bar over max_steps
    for noise in ("💡 Tip", "was configured so", "Total Flops", "LeafSpec", "TPU available"):
        assert noise not in out, noise
    assert "Validation DataLoader 0: 100%|██████████| 1/1" in out      # limit_val_batches 1 of 2 batches
    run = root / "sr8x_vscmde"
    ea = EventAccumulator(str(run))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for t in ("train/loss", "train/loss_x", "train/loss_y", "train/grad_norm", "train/lr",
              "train/images_per_sec", "train/sigma_max_y", "val/loss", "val/psnr", "val/consistency", "val/diversity"):
        assert t in tags, t
    assert "val/ssim" not in tags                                      # 8x8 images: below the 11x11 window
    assert 0 < ea.Scalars("val/psnr")[0].value < 100 and ea.Scalars("val/diversity")[0].value > 0
    assert ea.Tags()["images"] == ["samples/y|draws|x"]
    img = ea.Images("samples/y|draws|x")[0]
    assert (img.height, img.width) == (2 * (8 + 2), (2 + 2) * (8 + 2))  # 2 rows of [y | 2 draws | x], padded
    hp_content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp_content["_hparams_/session_start_info"])
    hp = {k: v.string_value or v.number_value for k, v in start.session_start_info.hparams.items()}
    assert hp["estimator"] == "VSCMDE" and hp["sigma_max_x"] == pytest.approx(277.128)
    assert hp["sigma_max_y"] == pytest.approx(277.128) and hp["sigma_max_y_target"] == 0.5
    assert hp["reach_target_steps"] == 10 and hp["net_ch"] == 32 and hp["net_ch_mult"] == "[1]"
    assert hp["net_params"] > 1000 and hp["sampler"] == "DDIM(steps=2, eta=0.0, grid=UniformTime())" and hp["lr"] == pytest.approx(2e-4)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hp_content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"val/loss", "val/psnr", "val/consistency"}
    sig = [e.value for e in ea.Scalars("train/sigma_max_y")]
    assert sig[-1] < sig[0]  # the VS-CMDE schedule advanced
    lr = [e.value for e in ea.Scalars("train/lr")]
    assert lr[0] == pytest.approx(2e-4 / 2500 * 1, rel=1e-6)  # logged at step 1: k / warmup (float32 event)

    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["global_step"] == 10 and "msdiff" in ckpt
    trained = TrainedRun.open(ckpt_path)
    assert (trained.kind, trained.step) == ("score", 10)
    system = trained.system()
    sd = system.state_dict()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(sd[k], v), k
    assert int(sd["ema.num_updates"]) == 10
    assert system.estimator.current_speed_y == pytest.approx(system.estimator.speed_y_at(10))
    dm = __import__("msdiff.checkpoint_file", fromlist=["x"]).instantiate_config(
        trained.config["data"], __import__("lightning").pytorch.LightningDataModule)
    batch = dm.fixed_batch(2)
    x = system.sample(batch["y"], __import__("msdiff.samplers", fromlist=["DDIM"]).DDIM(steps=2),
                      generator=torch.Generator().manual_seed(0))
    assert x.shape == batch["x"].shape and torch.isfinite(x).all()
    assert (run / "config.yaml").is_file() and (run / "config.yaml").stat().st_mode & 0o044


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, capsys):
    """A huge learning rate blows the weights up; training stops with one line, exit code 2, and
    last.ckpt still holds the last finite step."""
    from msdiff.cli import run_entry_point
    import train

    cfg = tiny_config("quickstart", tmp_path)
    root = tmp_path / "runs"
    args = ["--config", str(cfg), "--trainer.max_steps", "50", "--trainer.default_root_dir", str(root),
            "--model.init_args.lr", "1e30", "--model.init_args.warmup_steps", "0",
            "--model.init_args.grad_clip", "0", "--checkpoint.every_n_steps", "1", "--trainer.logger", "false"]
    with pytest.raises(SystemExit) as e:
        run_entry_point(lambda: train.main(args), prog="train.py")
    assert e.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite" in last_line and "Traceback" not in last_line
    ckpt = torch.load(root / "quickstart" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] >= 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("flag", ["true", "false"])
def test_tf32_switch(flag, tmp_path, monkeypatch):
    """--tf32 (default true) sets torch's TF32 flags for float32 matmuls and convolutions."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", flag == "false")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", flag == "false")
    cfg = tiny_config("quickstart", tmp_path)
    assert run_train(["--config", cfg, "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", tmp_path,
                      "--tf32", flag]) == 0
    assert torch.backends.cuda.matmul.allow_tf32 is (flag == "true")
    assert torch.backends.cudnn.allow_tf32 is (flag == "true")


def test_limit_val_batches_one_means_one_batch():
    """`limit_val_batches: 1` in a config is one batch. LightningCLI parses it as 1.0 (Lightning's
    annotation is Union[float, int]), which Lightning reads as every batch; StepsTrainer maps 1.0 to 1.
    (End to end: test_logging_checkpoint_contents_and_reload validates 1 of 2 batches.)"""
    from lightning.pytorch.cli import LightningArgumentParser

    from msdiff.train_feedback import StepsTrainer

    p = LightningArgumentParser()
    p.add_lightning_class_args(StepsTrainer, "trainer")
    parsed = p.parse_string("trainer: {limit_val_batches: 1, limit_train_batches: 0.25}").trainer
    assert parsed.limit_val_batches == 1.0 and type(parsed.limit_val_batches) is float  # what the CLI hands over
    trainer = StepsTrainer(limit_val_batches=parsed.limit_val_batches, limit_train_batches=parsed.limit_train_batches,
                           logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False,
                           enable_model_summary=False)
    assert type(trainer.limit_val_batches) is int and trainer.limit_val_batches == 1
    assert trainer.limit_train_batches == 0.25


def test_quiet_lightning_drops_the_noise_and_keeps_the_rest():
    import logging
    import warnings

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from msdiff.train_feedback import quiet_lightning

    quiet_lightning()
    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    handlers = [(logging.getLogger(n), Keep()) for n in ("lightning.pytorch.utilities.rank_zero",
                                                        "lightning.pytorch.callbacks.model_summary")]
    old_levels = [lg.level for lg, _ in handlers]
    try:
        for lg, h in handlers:
            lg.addHandler(h)
            lg.setLevel(logging.INFO)
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger](...)")
        rank_zero_info("`Trainer(limit_val_batches=1)` was configured so 1 batch will be used.")
        rank_zero_info("TPU available: False, using: 0 TPU cores")
        rank_zero_info("GPU available: False, used: False")
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info(
            "330 K     Total params\n58        Modules in eval mode\n0         Total Flops")
    finally:
        for (lg, h), level in zip(handlers, old_levels):
            lg.removeHandler(h)
            lg.setLevel(level)
    assert kept == ["GPU available: False, used: False", "330 K     Total params\n58        Modules in eval mode"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else"]


def test_bf16_mixed_trains_like_fp32_on_a_tiny_network(tmp_path):
    """--trainer.precision bf16-mixed (Lightning's autocast) runs the whole step and tracks fp32: the
    same data and noise, 24 steps of the tiny quickstart net (no warm-up, so the network matters).
    Step 0's loss is the same (the zero-initialised head outputs 0 in any precision); after it the
    losses differ by bf16 rounding (not bitwise: autocast ran) and agree within 1% step by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if (missing := cpu_bf16_attention_missing()) is not None:
        pytest.skip(missing)
    cfg = tiny_config("quickstart", tmp_path)
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        root = tmp_path / precision
        assert run_train(["--config", cfg, "--trainer.max_steps", "24", "--trainer.default_root_dir", root,
                          "--trainer.precision", precision, "--trainer.val_check_interval", "1000",
                          "--data.init_args.batch_size", "8", "--model.init_args.warmup_steps", "0"]) == 0
        acc = EventAccumulator(str(root / "quickstart"), size_guidance={"scalars": 0})
        acc.Reload()
        losses[precision] = torch.tensor([e.value for e in acc.Scalars("train/loss")], dtype=torch.float64)
    fp32, bf16 = losses["32-true"], losses["bf16-mixed"]
    assert len(fp32) == len(bf16) == 24 and fp32[0] == bf16[0]
    assert not torch.equal(fp32[1:], bf16[1:])
    assert float(((bf16 - fp32) / fp32).abs().max()) < 0.01
    assert fp32[-8:].mean() < 0.97 * fp32[:8].mean()  # it trained: the loss went down


def test_no_host_device_traffic_between_logging_steps(tmp_path, monkeypatch):
    """A training step neither reads a device value back nor makes a tensor from host numbers (on a
    GPU each is a host-device synchronisation): the logged scalars, the progress bar's losses and
    the non-finite guard are read, and the host-side scalars (lr, images/s) logged, only every
    log_every_n_steps steps (here 10: in the steps that end at 10, 20 and 30). Counted per step,
    outside data loading (CPU tensors), with conftest.watch_host_traffic; Lightning makes its result
    tensors once, at step 0."""
    import traceback

    import lightning.pytorch as pl

    steps: list[int] = []
    step = {"now": None}

    def record() -> None:
        if step["now"] is not None and not any("/datasets/" in f.filename or "torch/utils/data" in f.filename
                                               for f in traceback.extract_stack(limit=12)):
            steps.append(step["now"])

    class StepProbe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step["now"] = trainer.global_step

        def on_train_end(self, trainer, pl_module):
            step["now"] = None

    watch_host_traffic(monkeypatch, record)
    cfg = yaml.safe_load(tiny_config("quickstart", tmp_path, length=80).read_text())  # one epoch: 40 steps
    cfg["trainer"].update(enable_progress_bar=True, callbacks=[{"class_path": f"{__name__}.StepProbe"}])
    globals()["StepProbe"] = StepProbe  # the config names it by class path
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert run_train(["--config", tmp_path / "c.yaml", "--trainer.max_steps", 30, "--trainer.log_every_n_steps", 10,
                      "--trainer.val_check_interval", 1000, "--checkpoint.every_n_steps", 1000,
                      "--trainer.default_root_dir", tmp_path]) == 0
    assert set(steps) <= {0, 9, 19, 29} and {9, 19, 29} <= set(steps)


@pytest.mark.slow
def test_a_run_ends_by_saying_what_next(tmp_path, capfd, monkeypatch):
    """A run shorter than its validation interval still validates at its last step (grid and val/*
    at the same step); the closing lines name the run directory, the checkpoint, TensorBoard, a
    sample.py command that works as printed, and the last validation's metrics."""
    import shlex
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import sample

    cfg = tiny_config("quickstart", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run_train(["--config", cfg, "--trainer.max_steps", "3", "--trainer.default_root_dir", "runs",
                      "--trainer.val_check_interval", "250", "--trainer.num_sanity_val_steps", "0"]) == 0
    out = capfd.readouterr().out.splitlines()
    lines = {ln[:15].strip(): ln[15:] for ln in out[out.index("") + 1:] if ln[:15].strip()}
    assert lines["run directory"] == "runs/quickstart"
    assert lines["checkpoint"] == "runs/quickstart/checkpoints/last.ckpt (step 3)"
    assert lines["TensorBoard"] == "tensorboard --logdir runs/quickstart"
    ea = EventAccumulator("runs/quickstart")
    ea.Reload()
    assert [e.step for e in ea.Images("samples/y|draws|x")] == [3]
    assert [e.step for e in ea.Scalars("val/psnr")] == [e.step for e in ea.Scalars("val/loss")] == [3]
    loss = ea.Scalars("val/loss")[0].value
    assert lines["validation"].startswith("step 3: ") and f"val/loss {loss:.4g}" in lines["validation"]
    command = shlex.split(lines["sample"])
    assert Path(command[1]).resolve() == Path(__file__).resolve().parents[1] / "sample.py"
    monkeypatch.setattr(sys, "argv", ["sample.py", *command[2:], "--device", "cpu"])
    assert sample.main() == 0
    assert len(list((tmp_path / "runs" / "quickstart" / "samples" / "samples").glob("*.png"))) == 16 * 2
