"""The non-finite guard without a per-step host sync (msdiff.systems.nonfinite): a non-finite step
is skipped on the device by the fused Adam kernel, detected on the host at the next check, and
never reaches the weights or a checkpoint."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from msdiff.data import ConditionalDataModule
from msdiff.datasets import Shapes
from msdiff.estimators import CDE
from msdiff.nn.unet import UNet
from msdiff.sde import VESDE
from msdiff.systems.nonfinite import NonFiniteGuard, NonFiniteLossError
from msdiff.systems.score import ScoreSystem
from msdiff.tasks import SuperResolution

pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|litlogger).*")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_fused_adam_skips_a_flagged_step(device):
    """found_inf = 1 leaves weights, moments and the step count as they were; 0 updates as usual."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], device=device))
    opt = torch.optim.Adam([w], lr=0.1, fused=True)
    guard = NonFiniteGuard()
    w.grad = torch.tensor([0.5, 0.5], device=device)
    guard.skip_if_nonfinite(opt, torch.tensor(1.0, device=device), torch.tensor(0.7, device=device), step=0)
    opt.step()
    after_one = w.detach().clone()
    torch.testing.assert_close(after_one, torch.tensor([0.9, -2.1], device=device))  # Adam's first step: lr * sign
    w.grad = torch.tensor([float("nan"), 1.0], device=device)
    guard.skip_if_nonfinite(opt, torch.tensor(1.0, device=device), torch.tensor(float("nan"), device=device), step=1)
    opt.step()
    assert torch.equal(w.detach(), after_one) and int(opt.state[w]["step"]) == 1
    w.grad = torch.tensor([0.5, 0.5], device=device)
    guard.skip_if_nonfinite(opt, torch.tensor(float("inf"), device=device), torch.tensor(0.7, device=device), step=2)
    opt.step()
    assert torch.equal(w.detach(), after_one)  # a non-finite loss alone also skips
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(loss=1, grad norm=nan\)"):
        guard.check()  # the FIRST bad step is reported


class NaNBatch(pl.Callback):
    """Poisons the batch of one step (x = NaN), as a corrupt example would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["x"].fill_(float("nan"))


def _fit(tmp_path, max_steps: int, callbacks=(), log_every: int = 50) -> ScoreSystem:
    torch.manual_seed(0)
    net = UNet(in_channels=6, out_channels=3, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
               image_size=8, dropout=0.0)
    system = ScoreSystem(net, CDE(VESDE(0.01, 14.0)), lr=1e-3, warmup_steps=0)
    dm = ConditionalDataModule(dataset=lambda split: Shapes(split, SuperResolution(factor=2), image_size=8,
                                                            length=16, max_shapes=3),
                               batch_size=2, val_size=2, val_batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, log_every_n_steps=log_every, default_root_dir=tmp_path,
                         callbacks=list(callbacks))
    trainer.fit(system, datamodule=dm)
    return system


def test_a_nan_step_is_skipped_and_stops_training_at_the_next_check(tmp_path):
    """Step 2 is poisoned: right after it the network's weights equal those of a clean 2-step run
    (the step changed nothing), and the check every 4 steps raises at step 4, naming step 2."""
    clean = _fit(tmp_path / "clean", max_steps=2).net.state_dict()
    after_poisoned_step = {}

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # steps 0, 1 and the poisoned 2 are done
                after_poisoned_step.update({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    with pytest.raises(NonFiniteLossError, match="at step 2") as e:
        _fit(tmp_path / "poisoned", max_steps=10, callbacks=[NaNBatch(2), Snapshot()], log_every=4)
    assert "loss=nan" in str(e.value)
    assert after_poisoned_step.keys() == clean.keys()
    assert all(torch.equal(after_poisoned_step[k], clean[k]) for k in clean)


def test_no_checkpoint_is_written_after_a_skipped_step(tmp_path):
    """A save requested after the poisoned step raises before writing (on_save_checkpoint checks)."""
    target = tmp_path / "last.ckpt"

    class SaveAt3(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                trainer.save_checkpoint(target)

    with pytest.raises(NonFiniteLossError, match="at step 2"):
        _fit(tmp_path, max_steps=10, callbacks=[NaNBatch(2), SaveAt3()], log_every=50)
    assert not target.exists()
