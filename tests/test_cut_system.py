"""CUTSystem (msdiff.cut.system), the unpaired data (msdiff.cut.data) and folder translation / FID
(msdiff.cut.translate): tiny CPU runs, including exact resume and 2-process CPU DDP."""
import multiprocessing
import os
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

import msdiff.cut.system as cut_module
from msdiff.data import ResumableLoader, ResumableSampler
from msdiff.gaussian import frechet_distance
from msdiff.cut.system import CUTSystem, linear_decay
from msdiff.run import TrainedRun
from msdiff.systems.ema import EMA
from msdiff.cut.translate import folder_fid, translate_folder
from msdiff.cut.data import UnpairedDataModule, UnpairedDataset
from msdiff.utils import make_generator, tensor_to_uint8

# Lightning's advice-only warnings: tiny loaders without workers, its own pytree deprecation, the
# litlogger tip, and ModelCheckpoint's notes on manual optimisation (CUT checkpoints hold the state
# after the iteration, which is what a resume needs) and on callbacks passed with ckpt_path.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|LeafSpec|litlogger|ckpt_path|no pre-optimization state).*")

TINY = dict(ngf=8, ndf=8, n_blocks=2, num_patches=16, netf_nc=16, n_epochs=1, n_epochs_decay=2)


def tiny_data(**kw):
    kw = {**dict(load_size=36, crop_size=32, num_workers=0, procedural_train_size=3, procedural_test_size=2,
                 num_val_images=2), **kw}
    return UnpairedDataModule(**kw)


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
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")  # the EMA copy, by design
        trainer(3, tmp_path).fit(m, tiny_data())  # 3 optimizer steps = 1 iteration
    after = m.state_dict()
    # one Adam step each for G, D and F (lr 2e-4, schedule factor 1): a first Adam step moves every
    # element with a gradient by lr * g / (|g| + 1e-8), i.e. by lr unless its gradient is ~1e-8
    lr = 2e-4
    for prefix in ("G.", "D.", "F."):
        d = torch.cat([(after[k] - before[k]).abs().flatten() for k in before
                       if k.startswith(prefix) and "kernel" not in k and before[k].is_floating_point()])
        moved = d[d > 0]
        assert moved.numel() > 0.5 * d.numel(), prefix
        assert moved.median().item() == pytest.approx(lr, rel=1e-3) and moved.max().item() <= lr * 1.001, prefix
    # EMA: one update with decay min(0.5, (1 + 1) / (10 + 1)) = 2/11 from the initial G (the reference's
    # counter is incremented before the decay is computed)
    for k in before:
        if k.startswith("G.") and "kernel" not in k and before[k].is_floating_point():
            want = before[k] + (1 - 2 / 11) * (after[k] - before[k])
            torch.testing.assert_close(after["G_ema.net." + k[2:]], want, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("kernel"))  # blur stays fixed
    assert int(after["G_ema.num_updates"]) == 1
    # the EMA is a child module, hosted as ScoreSystem's: always in eval mode, no gradients
    assert isinstance(m.G_ema, EMA) and not m.G_ema.net.training
    assert not any(p.requires_grad for p in m.G_ema.parameters())


def _fit(tmp_path, steps, ckpt=None, callbacks=(), enable_checkpointing=False, **kw):
    torch.manual_seed(0)  # same initial weights in every run
    m = CUTSystem(**TINY, ema_decay=0.9, **kw)
    t = trainer(steps, tmp_path, callbacks=list(callbacks), enable_checkpointing=enable_checkpointing)
    t.fit(m, tiny_data(), ckpt_path=ckpt, weights_only=True)
    return m, t


def test_resume_is_bitwise_exact(tmp_path):
    """Runs checkpointed at iteration 3 and at iteration 4 (by ModelCheckpoint, as train.py does) and
    resumed end bitwise equal to the uninterrupted run: G, D, F, EMA, all three optimizers and
    schedulers. 3 images per epoch and batch 1: iteration 3 ends epoch 0 (epoch boundary),
    iteration 4 is one batch into epoch 1 (mid-epoch: the loader's position comes back from the
    checkpoint). CUT's identity term and FastCUT's flip are both on, so every random draw is used."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(flip_equivariance=True)
    total = 3 * 6  # 6 iterations of 3 optimizer steps
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    full, _ = _fit(tmp_path / "a", total, callbacks=[ck], enable_checkpointing=True, **kw)
    sd_full = full.state_dict()
    for cut_at in (3, 4):
        ckpt = tmp_path / "ck" / f"epoch={(cut_at - 1) // 3}-step={3 * cut_at}.ckpt"
        loaded = torch.load(ckpt, weights_only=True)  # hyperparameters are primitive
        assert len(loaded["optimizer_states"]) == 3 and len(loaded["lr_schedulers"]) == 3
        loader_state = loaded["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert loader_state == [{"epoch": 1, "consumed": cut_at - 3}]  # where the next batch starts
        assert not torch.equal(loaded["state_dict"]["G.model.1.weight"], sd_full["G.model.1.weight"])
        resumed, t2 = _fit(tmp_path / f"resumed{cut_at}", total, ckpt=str(ckpt), **kw)
        assert t2.global_step == total
        sd_res = resumed.state_dict()
        assert sd_full.keys() == sd_res.keys() and int(sd_res["G_ema.num_updates"]) == 6
        assert all(torch.equal(sd_full[k], sd_res[k]) for k in sd_full), f"weights differ after resume at {cut_at}"
        for o_full, o_res in zip(full.optimizers(), resumed.optimizers()):
            s1, s2 = o_full.optimizer.state_dict()["state"], o_res.optimizer.state_dict()["state"]
            assert s1.keys() == s2.keys() and all(torch.equal(s1[i][n], s2[i][n]) for i in s1 for n in s1[i])
            assert o_full.optimizer.param_groups[0]["lr"] == o_res.optimizer.param_groups[0]["lr"]
        assert [s.last_epoch for s in resumed.lr_schedulers()] == [s.last_epoch for s in full.lr_schedulers()] == [6] * 3
    # lr after 6 scheduler steps: epoch 6 // 3 = 2 -> 1 - (2 + 1 - 1) / (2 + 1)
    assert resumed.optimizers()[0].optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 / 3)
    sys2 = TrainedRun.open(ckpt).cut_system()
    assert torch.equal(sys2.G.model[1].weight, loaded["state_dict"]["G.model.1.weight"])
    assert torch.equal(sys2.G_ema.net.model[1].weight, loaded["state_dict"]["G_ema.net.model.1.weight"])


def _ddp_two_processes(tmp_path) -> None:
    """The body of test_ddp_two_processes (module level, so that a spawned interpreter can run it)."""
    real_nce = cut_module.patch_nce_loss

    def spy(q, k, batch_size, *args, **kwargs):  # runs in the forked ranks
        with open(tmp_path / f"nce{torch.distributed.get_rank()}.txt", "a") as f:
            f.write(f"{batch_size} {q.shape[0]}\n")
        return real_nce(q, k, batch_size, *args, **kwargs)

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            torch.save(batch["A"], tmp_path / f"batch{trainer.global_rank}_{batch_idx}.pt")

        def on_train_end(self, trainer, module):
            torch.save(module.state_dict(), tmp_path / f"rank{trainer.global_rank}.pt")

    cut_module.patch_nce_loss = spy
    try:
        torch.manual_seed(0)
        init = CUTSystem(**TINY, ema_decay=0.9).state_dict()
        torch.save(init, tmp_path / "init.pt")
        torch.manual_seed(0)
        m = CUTSystem(**TINY, ema_decay=0.9)
        t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork_find_unused_parameters_true", max_steps=6,
                       logger=False, enable_progress_bar=False, enable_model_summary=False,
                       enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                       default_root_dir=tmp_path, callbacks=[Record()])
        t.fit(m, tiny_data(batch_size=2, procedural_train_size=8))
    finally:
        cut_module.patch_nce_loss = real_nce


def _spawned_ddp_two_processes(tmp_path) -> None:  # a fresh interpreter: CUDA hidden, never initialised
    torch.set_num_threads(1)
    _ddp_two_processes(tmp_path)


@pytest.mark.slow
def test_ddp_two_processes(tmp_path, monkeypatch):
    """2 CPU processes (gloo, forked): each rank reads its own images, PatchNCE is reshaped with the
    per-device batch (2, not the global 4), and after 2 iterations both ranks hold identical G, D,
    F and EMA weights that differ from the initial ones.

    Forking after CUDA was initialised breaks the children (Lightning's isolate_rng reads the CUDA
    RNG there), so on a machine where an earlier test touched the GPU the forking parent is a
    spawned interpreter with CUDA hidden; otherwise it is this process (faster). The same when this
    process runs more than one intra-op thread (MSDIFF_TEST_THREADS=2): GNU OpenMP's thread team is
    not fork-safe, and a forked rank's first parallel kernel then waits forever on the parent's team."""
    if (torch.cuda.is_initialized() or torch.get_num_threads() > 1
            or os.environ.get("MSDIFF_TEST_SPAWN_DDP") == "1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        child = multiprocessing.get_context("spawn").Process(target=_spawned_ddp_two_processes, args=(tmp_path,))
        child.start()
        try:
            child.join(timeout=120)
        finally:
            if child.is_alive():
                child.kill()
                child.join()
        assert child.exitcode == 0, f"spawned DDP run failed with exit code {child.exitcode}"
    else:
        _ddp_two_processes(tmp_path)
    init = torch.load(tmp_path / "init.pt")
    for r in (0, 1):
        calls = [tuple(map(int, line.split())) for line in (tmp_path / f"nce{r}.txt").read_text().splitlines()]
        assert len(calls) == 2 * 2 * 5  # 2 iterations x (A and identity B) x 5 layers
        assert set(calls) == {(2, 2 * 16)}  # per-device batch 2, 16 patches per image
    a0, a1 = torch.load(tmp_path / "batch0_0.pt"), torch.load(tmp_path / "batch1_0.pt")
    assert a0.shape == (2, 3, 32, 32) and not torch.equal(a0, a1)  # different shards
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == init.keys() and all(torch.equal(w0[k], w1[k]) for k in w0), "ranks diverged"
    for prefix in ("G.", "D.", "F.", "G_ema.net."):
        assert any(not torch.equal(w0[k], init[k]) for k in w0 if k.startswith(prefix)), prefix


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


def test_unpaired_dataset_and_loader():
    dm = tiny_data()
    ds = dm.train_dataset()
    assert isinstance(ds, UnpairedDataset) and len(ds) == 3
    x = ds[(0, 1)]
    assert x["A"].shape == (3, 32, 32) and x["B"].shape == (3, 32, 32) and 0 <= x["A"].min() and x["A"].max() <= 1
    assert torch.equal(ds[1]["A"], x["A"]) and not torch.equal(ds[(1, 1)]["A"], x["A"])  # epoch-seeded crops
    with pytest.raises(IndexError):
        ds[(0, 3)]
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader) and isinstance(loader.sampler, ResumableSampler)
    it = iter(loader)
    first = next(it)["A"]
    state = loader.state_dict()
    rest = [b["A"] for b in it]
    again = tiny_data().train_dataloader()
    again.load_state_dict(state)
    assert [torch.equal(a, b["A"]) for a, b in zip(rest, again)] == [True] * len(rest) == [True, True]
    assert not torch.equal(first, rest[0])
    with pytest.raises(ValueError, match="root"):
        UnpairedDataModule(root="/nonexistent/folder").domains("train")
    with pytest.raises(ValueError, match="batch_size"):
        tiny_data(batch_size=4).train_dataloader()
    with pytest.raises(ValueError, match="gan_mode"):
        CUTSystem(**TINY, gan_mode="wgan")


def _tiny_checkpoint(path):
    """A CUT checkpoint in Lightning's layout with an EMA different from G."""
    torch.manual_seed(0)
    m = CUTSystem(**TINY, ema_decay=0.9)
    with torch.no_grad():
        for p in m.G_ema.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    return path


def test_a_checkpoint_naming_the_old_class_path_still_loads(tmp_path):
    """Checkpoints written before msdiff.cut existed store class_path msdiff.systems.cut.CUTSystem."""
    ckpt = torch.load(_tiny_checkpoint(tmp_path / "cut.ckpt"), weights_only=True)
    ckpt["msdiff"] = {"model": {"class_path": "msdiff.systems.cut.CUTSystem", "init_args": ckpt.pop("hyper_parameters")}}
    torch.save(ckpt, tmp_path / "old.ckpt")
    trained = TrainedRun.open(tmp_path / "old.ckpt")
    assert trained.kind == "cut"
    system = trained.cut_system()
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in system.state_dict().items())


def _write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)


def test_translate_folder(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "cut.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "other.ckpt")
    trained = TrainedRun.open(ckpt)  # a checkpoint without the msdiff entry (hyper_parameters only)
    assert (trained.kind, trained.step) == ("cut", None)
    with pytest.raises(ValueError, match="other.ckpt: not an msdiff checkpoint"):
        TrainedRun.open(tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="missing.ckpt: no such checkpoint file"):
        TrainedRun.open(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="not a CUT checkpoint"):
        TrainedRun(ckpt, "score", None, trained.config).cut_system()
    system = trained.cut_system()
    src = tmp_path / "in"
    _write_images(src, {"a.png": (32, 32), "b.jpg": (32, 32), "c.png": (30, 34)})
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(src / "d.png")  # grayscale -> RGB
    written = translate_folder(system, src, tmp_path / "out", batch_size=3)
    assert [p.name for p in written] == ["a.png", "b.png", "c.png", "d.png"]
    sizes = {p.name: Image.open(p).size for p in written}
    assert sizes == {"a.png": (32, 32), "b.png": (32, 32), "c.png": (34, 30), "d.png": (32, 32)}
    # the file holds the EMA generator's translation of the image
    x = torch.from_numpy(np.array(Image.open(src / "a.png"))).permute(2, 0, 1)[None].float() / 255
    expected = tensor_to_uint8(cut_module.to_unit_range(system.G_ema.net(x * 2 - 1)).clamp(0, 1)[0])
    assert np.array_equal(np.array(Image.open(written[0])), expected)
    assert not np.array_equal(expected, tensor_to_uint8(cut_module.to_unit_range(system.G(x * 2 - 1)).clamp(0, 1)[0]))
    again = translate_folder(system, src, tmp_path / "out1", batch_size=1)
    for p, q in zip(written, again):  # deterministic and independent of the batch size
        assert np.abs(np.array(Image.open(p), np.int16) - np.array(Image.open(q), np.int16)).max() <= 1
    with pytest.raises(ValueError, match="no such folder"):
        translate_folder(system, tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        translate_folder(system, tmp_path / "empty", tmp_path / "o")
    (src / "e.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="e.png: not a readable image"):
        translate_folder(system, src, tmp_path / "o")


def test_folder_fid(tmp_path, monkeypatch):
    _write_images(tmp_path / "g", {f"{i}.png": (16, 16) for i in range(5)}, seed=1)
    _write_images(tmp_path / "t", {f"{i}.png": (16, 24) for i in range(4)}, seed=2)
    features = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # (B, 3) channel means

    def feats(folder):
        return torch.stack([features(torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)[None].double() / 255)[0]
                            for p in sorted(folder.iterdir())])

    fg, ft = feats(tmp_path / "g"), feats(tmp_path / "t")
    expected = frechet_distance(fg.mean(0), torch.cov(fg.T), ft.mean(0), torch.cov(ft.T))
    r = folder_fid(tmp_path / "g", tmp_path / "t", features=features)
    assert r["fid"] == pytest.approx(expected, rel=1e-5) and expected > 1e-4
    assert (r["num_generated"], r["num_target"], r["fid_note"]) == (5, 4, None)
    assert folder_fid(tmp_path / "g", tmp_path / "g", features=features)["fid"] == pytest.approx(0, abs=1e-9)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no Inception weights anywhere
    r = folder_fid(tmp_path / "g", tmp_path / "t", weights_dir=tmp_path / "w")
    assert r["fid"] is None and "unavailable" in r["fid_note"] and "\n" not in r["fid_note"]
    with pytest.raises(ValueError, match="target_dir"):
        folder_fid(tmp_path / "g", tmp_path / "nope", features=features)


def test_sample_py_translates_a_folder_with_a_cut_checkpoint(tmp_path, monkeypatch):
    import json
    import sys

    import sample

    ckpt = _tiny_checkpoint(tmp_path / "cut.ckpt")
    src = tmp_path / "in"
    _write_images(src, {"a.png": (32, 32), "b.png": (32, 32)})
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt_path", str(ckpt), "--input", str(src),
                                      "--output_dir", str(tmp_path / "o")])
    assert sample.main() == 0
    assert sorted(p.name for p in (tmp_path / "o" / "translated").iterdir()) == ["a.png", "b.png"]
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["num_translated"] == 2
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="--input FOLDER"):
        sample.main()


def test_augment_crops_at_every_offset_and_flips_half_the_time():
    from msdiff.cut.data import augment

    x = torch.arange(3 * 6 * 6, dtype=torch.float32).reshape(3, 6, 6) / 108  # already load_size: no resize
    offsets, flips = set(), 0
    for s in range(200):
        out = augment(x, load_size=6, crop_size=4, flip=True, generator=make_generator(s))
        flipped = bool(out[0, 0, 0] > out[0, 0, -1])
        flips += flipped
        crop = out.flip(-1) if flipped else out
        top, left = divmod(int(round(crop[0, 0, 0].item() * 108)), 6)
        torch.testing.assert_close(crop, x[:, top:top + 4, left:left + 4])
        offsets.add((top, left))
    assert offsets == {(i, j) for i in range(3) for j in range(3)}
    assert 70 < flips < 130


@pytest.mark.slow
def test_train_py_cut_run_bar_grids_and_closing_lines(tmp_path, capfd, monkeypatch):
    """train.py on a tiny procedural CUT run: the bar counts iterations (3 optimizer steps each), the
    validation grid of translations is logged at iterations (the scalars' x-axis), and the closing
    lines' sample.py command translates the test images as printed."""
    import shlex
    import sys
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import sample
    from conftest import run_train

    monkeypatch.chdir(tmp_path)
    assert run_train(["--config", "cut_quickstart", "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
                      "--data.init_args.procedural_train_size", "8", "--data.init_args.procedural_test_size", "3",
                      "--data.init_args.num_workers", "0", "--data.init_args.load_size", "20",
                      "--data.init_args.crop_size", "16", "--model.init_args.ngf", "4", "--model.init_args.ndf", "4",
                      "--model.init_args.n_blocks", "1", "--model.init_args.nce_layers", "[0, 4]",
                      "--model.init_args.num_patches", "8", "--model.init_args.netf_nc", "8",
                      "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "true",
                      "--trainer.default_root_dir", "runs"]) == 0
    out, err = capfd.readouterr()
    assert "4/4 [" in (out + err).replace("\r", "\n")           # 2 epochs x 2 batches = 4 iterations, not 12 steps
    lines = {ln[:15].strip(): ln[15:] for ln in out.splitlines() if ln[:15].strip() and ln[14:15] == " "}
    assert lines["checkpoint"] == "runs/cut_quickstart/checkpoints/last.ckpt (step 12 = 4 iterations)"
    ea = EventAccumulator("runs/cut_quickstart")
    ea.Reload()
    assert [e.step for e in ea.Images("translation/A|G(A)|G(B)")][-2:] == [2, 4]
    assert max(e.step for e in ea.Scalars("train/loss_G")) == 3     # iterations 0..3
    command = shlex.split(lines["sample"])
    monkeypatch.setattr(sys, "argv", ["sample.py", *command[2:]])
    assert sample.main() == 0
    assert len(list(Path("runs/cut_quickstart/translated/translated").glob("*.png"))) == 3
