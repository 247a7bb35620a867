"""The training schedules by value, as the reference (score_sde / MSDiff, docs/reference.md "Training")
runs them: the learning rate of each optimizer step under the linear warm-up lr * min(s / warmup, 1)
(s = the step counter before the update: the first step has lr 0) and the EMA decay of each update,
min(decay, (1 + n) / (10 + n)) with the counter n incremented first (2/11, 3/12, 4/13); and the lr of
the first step after a resume that changes the lr during the warm-up."""
from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from msdiff.data import ConditionalDataModule
from msdiff.datasets import Shapes
from msdiff.estimators import CDE
from msdiff.nn.unet import UNet
from msdiff.resume_config import ApplyLearningRate
from msdiff.sde import VESDE
from msdiff.systems.score import ScoreSystem
from msdiff.tasks import SuperResolution

pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|litlogger).*")


def _system(lr: float = 1e-3, warmup_steps: int = 4) -> ScoreSystem:
    torch.manual_seed(0)
    net = UNet(in_channels=2, out_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
               image_size=8, dropout=0.0)
    return ScoreSystem(net, CDE(VESDE(0.01, 8.0)), lr=lr, warmup_steps=warmup_steps, ema_decay=0.999)


class Probe(pl.Callback):
    """Records, just before each optimizer step, the lr it uses and the EMA decay its update will use."""

    def __init__(self) -> None:
        self.lr: list[float] = []
        self.decay: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lr.append(optimizer.param_groups[0]["lr"])
        self.decay.append(pl_module.ema.current_decay())


def test_first_steps_lr_and_ema_decay_are_the_references(tmp_path):
    """Five Lightning steps with lr 1e-3 and a 4-step warm-up: lr 0, 1/4, 2/4, 3/4, 1 of 1e-3 (the
    reference's step / warmup; (k + 1) / warmup would start at 1/4), EMA decays 2/11, 3/12, ... ."""
    probe = Probe()
    dm = ConditionalDataModule(dataset=lambda split: Shapes(split, SuperResolution(factor=2), image_size=8,
                                                            length=10, max_shapes=3, channels=1),
                               batch_size=2, val_size=2, val_batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[probe])
    system = _system()
    trainer.fit(system, datamodule=dm)
    # the factors k / 4 are exact binary fractions: the float64 lr is exactly 1e-3 * k / 4
    assert probe.lr == [1e-3 * k / 4 for k in range(4)] + [1e-3]
    assert probe.decay == [(1 + n) / (10 + n) for n in range(1, 6)]  # the reference: n incremented first
    assert int(system.ema.num_updates) == 5


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_resumed_lr_change_reaches_the_first_resumed_step():
    """A run with lr 1e-3 (warm-up 100) saved after 6 steps, resumed with lr 0.5: its first resumed
    step (k = 6) uses 0.5 * 6 / 100, the next 0.5 * 7 / 100 -- what a run started with 0.5 has."""
    system = _system(lr=1e-3, warmup_steps=100)
    cfg = system.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    for _ in range(6):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 6 / 100, rel=1e-15)
    trainer = SimpleNamespace(optimizers=[opt], lr_scheduler_configs=[SimpleNamespace(scheduler=sched)])
    ApplyLearningRate(0.5).on_train_start(trainer, system)
    # float64: lr * (new / old) and new * k / warmup differ by rounding only (a few ulp)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 6 / 100, rel=1e-14)
    assert sched.get_last_lr() == [pytest.approx(0.5 * 6 / 100, rel=1e-14)]
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 7 / 100, rel=1e-14)
    assert opt.param_groups[0]["initial_lr"] == 0.5 and sched.base_lrs == [0.5]


def test_loss_noise_is_drawn_per_rank_and_step(monkeypatch):
    """The training step's noise comes from (seed, step, rank): under DDP the two ranks draw different
    noise for their batches (the same noise would halve the effective batch of t and z draws), and a
    repeated (step, rank) draws the very same (exact resume). The same batch on every call here, so
    the loss tells the draws apart."""
    system = _system()
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(2, 1, 8, 8, generator=g), "y": torch.rand(2, 1, 8, 8, generator=g)}
    monkeypatch.setattr(ScoreSystem, "log", lambda *args, **kwargs: None)
    loss = {}
    for rank, step in [(0, 0), (1, 0), (0, 1), (0, 0)]:
        monkeypatch.setattr(ScoreSystem, "global_rank", property(lambda self, r=rank: r))
        monkeypatch.setattr(ScoreSystem, "global_step", property(lambda self, k=step: k))
        with torch.no_grad():
            value = system.training_step(batch, 0).item()
        assert loss.setdefault((rank, step), value) == value  # the same path twice: bitwise
    assert len({loss[0, 0], loss[1, 0], loss[0, 1]}) == 3
