"""CUTSystem (msdiff.systems.cut) and the unpaired data (msdiff.unpaired): tiny CPU runs."""
import warnings

import lightning.pytorch as pl
import pytest
import torch

from msdiff.systems.cut import CUTSystem, linear_decay, load_cut_system
from msdiff.unpaired import UnpairedDataModule, UnpairedDataset, UnpairedSampler
from msdiff.utils import make_generator

warnings.filterwarnings("ignore", ".*(does not have many workers|eval mode|LeafSpec|litlogger).*")

TINY = dict(ngf=8, ndf=8, n_blocks=2, num_patches=16, netf_nc=16, n_epochs=1, n_epochs_decay=2)


def tiny_data(**kw):
    return UnpairedDataModule(load_size=36, crop_size=32, num_workers=0, procedural_train_size=3,
                              procedural_test_size=2, num_val_images=2, **kw)


def trainer(max_steps, root, **kw):
    kw = {"enable_checkpointing": False, **kw}
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      num_sanity_val_steps=0, limit_val_batches=0, **kw)


def test_linear_decay_rule():
    # reference: 1.0 for n_epochs epochs, then 1 - (e + 1 - n) / (n_decay + 1)
    assert [linear_decay(e, 2, 3) for e in range(5)] == [1.0, 1.0, 0.75, 0.5, 0.25]


def test_one_iteration_changes_g_d_f(tmp_path):
    torch.manual_seed(0)
    m = CUTSystem(**TINY, ema_decay=0.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainer(3, tmp_path).fit(m, tiny_data())  # 3 optimizer steps = 1 iteration
    after = m.state_dict()
    for prefix in ("G.", "D.", "F.", "G_ema.net."):
        changed = [k for k in before if k.startswith(prefix) and "kernel" not in k and not torch.equal(before[k], after[k])]
        assert changed, f"no parameter of {prefix} changed"
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("kernel"))  # blur stays fixed
    assert int(after["G_ema.num_updates"]) == 1


def _fit(tmp_path, steps, ckpt=None, callbacks=(), enable_checkpointing=False, **kw):
    torch.manual_seed(0)  # same initial weights in every run
    m = CUTSystem(**TINY, ema_decay=0.9, **kw)
    t = trainer(steps, tmp_path, callbacks=list(callbacks), enable_checkpointing=enable_checkpointing)
    t.fit(m, tiny_data(), ckpt_path=ckpt)
    return m, t


def test_resume_is_bitwise_exact(tmp_path):
    """A run checkpointed at iteration 3 (by ModelCheckpoint, as train.py does) and resumed ends
    bitwise equal to the uninterrupted run: G, D, F, EMA, all three optimizers and schedulers.
    CUT's identity term and FastCUT's flip are both on, so every random draw is exercised."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(flip_equivariance=True)
    total, cut_at = 3 * 5, 3 * 3  # 5 iterations (3 optimizer steps each); 3 images per epoch
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=cut_at, save_top_k=-1)
    full, _ = _fit(tmp_path / "a", total, callbacks=[ck], enable_checkpointing=True, **kw)
    ckpt = tmp_path / "ck" / f"epoch=0-step={cut_at}.ckpt"
    loaded = torch.load(ckpt, weights_only=True)  # hyperparameters are primitive
    assert len(loaded["optimizer_states"]) == 3 and len(loaded["lr_schedulers"]) == 3
    assert not torch.equal(loaded["state_dict"]["G.model.1.weight"], full.state_dict()["G.model.1.weight"])
    resumed, t2 = _fit(tmp_path / "c", total, ckpt=str(ckpt), **kw)
    assert t2.global_step == total
    sd_full, sd_res = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(sd_full[k], sd_res[k]) for k in sd_full), "weights differ after resume"
    for o_full, o_res in zip(full.optimizers(), resumed.optimizers()):
        s1, s2 = o_full.optimizer.state_dict()["state"], o_res.optimizer.state_dict()["state"]
        assert all(torch.equal(s1[i][n], s2[i][n]) for i in s1 for n in s1[i])
        assert o_full.optimizer.param_groups[0]["lr"] == o_res.optimizer.param_groups[0]["lr"]
    # lr after 5 scheduler steps: epoch 5 // 3 = 1 -> 1 - (1 + 1 - 1) / (2 + 1)
    assert resumed.optimizers()[0].optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * (1 - 1 / 3))
    sys2 = load_cut_system(ckpt)
    assert torch.equal(sys2.G.model[1].weight, loaded["state_dict"]["G.model.1.weight"])


def test_flip_equivariance_mirrors_features_back():
    """FastCUT feeds G a mirrored batch and mirrors the output's features back before PatchNCE.
    With a mirror-symmetric encoder (enc(flip t) = flip enc(t)) the flipped loss on flip(t) must
    equal the plain loss on t, and must not without the mirror-back."""
    torch.manual_seed(0)
    m = CUTSystem(**TINY, nce_layers=(0, 1, 3))  # taps before the stride-2 blur (which is not
    with torch.no_grad():                        # mirror-equivariant on even sizes)
        for mod in m.G.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.copy_(torch.randn_like(mod.weight) * 0.3)
                mod.weight.copy_(0.5 * (mod.weight + mod.weight.flip(-1)))
        for mod in m.F.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 0.3)
    a, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    g = lambda: make_generator(3)  # noqa: E731
    plain = m.nce_loss(a, t, False, g())
    torch.testing.assert_close(m.nce_loss(a, t.flip(3), True, g()), plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(m.nce_loss(a, t.flip(3), False, g()), plain, rtol=1e-3)


def test_unpaired_dataset_and_sampler():
    dm = tiny_data()
    ds = dm.train_dataset()
    assert isinstance(ds, UnpairedDataset) and len(ds) == 3
    x = ds[1]
    assert x["A"].shape == (3, 32, 32) and x["B"].shape == (3, 32, 32) and 0 <= x["A"].min() and x["A"].max() <= 1
    assert torch.equal(ds[1]["A"], x["A"]) and not torch.equal(ds[1 + 3]["A"], x["A"])  # epoch in the index
    s0, s1 = UnpairedSampler(ds, 2, 0, seed=0), UnpairedSampler(ds, 2, 1, seed=0)
    i0, i1 = list(s0), list(s1)
    assert len(i0) == len(i1) == 2 and set(i0) | set(i1) == {0, 1, 2}
    s0.set_epoch(4)
    assert all(4 * 3 <= i < 5 * 3 for i in s0)
    with pytest.raises(ValueError, match="root"):
        UnpairedDataModule(root="/nonexistent/folder").domains("train")
    with pytest.raises(ValueError, match="gan_mode"):
        CUTSystem(**TINY, gan_mode="wgan")
