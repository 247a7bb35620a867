"""Datasets (msdiff.datasets) and the resumable loading of msdiff.data; tiny shapes, seeded."""
import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from msdiff.data import ConditionalDataModule, ResumableLoader, ResumableSampler
from msdiff.datasets import CelebA, Edges2Shoes, GaussianFieldDataset, ImageFolder, Shapes
from msdiff.gaussian import GaussianField, GaussianInverseProblem
from msdiff.tasks import Edges, Inpainting, SuperResolution


def _write(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _noise_image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- embedded default ----------------------------------------------------------------------------

def test_shapes_is_deterministic_rich_and_split_dependent():
    ds = Shapes("train", SuperResolution(4), image_size=32, length=20)
    a, b = ds[3], ds[3]
    assert a["x"].shape == (3, 32, 32) and a["y"].shape == (3, 32, 32) and a["index"] == 3
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert 0 <= a["x"].min() and a["x"].max() <= 1
    assert not torch.equal(ds[4]["x"], a["x"])
    assert not torch.equal(Shapes("val", SuperResolution(4), image_size=32)[3]["x"], a["x"])
    x = torch.stack([ds[i]["x"] for i in range(8)])
    # sharp edges: many large neighbour differences, and SR loses information (y != x)
    jumps = (x[..., 1:] - x[..., :-1]).abs()
    assert (jumps > 0.2).float().mean() > 0.01
    assert (torch.stack([ds[i]["y"] for i in range(8)]) - x).abs().mean() > 0.02
    assert len(Shapes("test", None)) == 500 and len(Shapes("train", None)) == 10_000


def test_procedural_image_reference_values():
    """Pinned pixels of two procedural images (the values of the first version, which built every
    shape's texture at every pixel; the current one evaluates only the covering shape's): the
    embedded dataset, and so every Shapes run and figure, stays the same image for image."""
    from msdiff.datasets.shapes import procedural_image

    x = procedural_image(16, torch.Generator().manual_seed(3))
    assert float(x.double().sum()) == pytest.approx(238.46667892858386, rel=1e-12)
    assert x[:, 5, 7].tolist() == pytest.approx([0.2600368857383728, 0.17336595058441162, 0.3741319477558136],
                                                rel=1e-7)
    assert x[:, 12, 2].tolist() == pytest.approx([0.05803484469652176, 0.22450554370880127, 0.10303163528442383],
                                                 rel=1e-7)
    big = procedural_image(160, torch.Generator().manual_seed(11))
    assert float(big.double().sum()) == pytest.approx(46795.07448752597, rel=1e-12) and big.is_contiguous()


def test_inpainting_mask_of_a_test_image_is_reproducible_from_seed_and_index():
    mk = lambda seed: Shapes("test", Inpainting(), image_size=16, length=10, seed=seed)
    m1, m2 = mk(0)[7]["mask"], mk(0)[7]["mask"]
    assert torch.equal(m1, m2) and m1.shape == (1, 16, 16) and (1 - m1).sum() == 64
    masks = torch.stack([mk(0)[i]["mask"] for i in range(10)])
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 5  # the position varies over images
    assert not all(torch.equal(mk(1)[i]["mask"], masks[i]) for i in range(10))


def test_gaussian_field_dataset_items_follow_the_problem():
    field = GaussianField(channels=1, size=4)
    problem = GaussianInverseProblem.super_resolution(field, factor=2, noise_std=0.05)
    ds = GaussianFieldDataset("train", problem=problem, length=64)
    items = [ds[i] for i in range(64)]
    assert torch.equal(ds[5]["y"], items[5]["y"])
    x = torch.stack([it["x"] for it in items])
    y = torch.stack([it["y"] for it in items])
    residual = (y - problem.apply(x)) / problem.noise_std  # y = A x + noise_std n
    assert abs(residual.std().item() - 1.0) < 0.15 and abs(residual.mean().item()) < 0.15
    # consistency: PSNR between A x_sample and y, i.e. of the observation noise itself here
    mse = (problem.apply(x) - y).flatten(1).square().mean(1)
    torch.testing.assert_close(ds.task.consistency(x, y), 10 * torch.log10(1 / mse), rtol=1e-4, atol=1e-4)


# ---- image files ---------------------------------------------------------------------------------

@pytest.fixture
def celeba_root(tmp_path):
    root = tmp_path / "celeba"
    lines = []
    for i in range(1, 7):
        _write(root / "img_align_celeba" / f"{i:06d}.jpg", _noise_image(218, 178, i), quality=95)
        lines.append(f"{i:06d}.jpg {0 if i <= 4 else (1 if i == 5 else 2)}")
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def test_celeba_partition_center_crop_and_resize(celeba_root):
    task = SuperResolution(8)
    train = CelebA("train", task, root=str(celeba_root), flip=False)
    assert len(train) == 4 and len(CelebA("val", task, root=str(celeba_root))) == 1
    assert [p.name for p in CelebA("test", task, root=str(celeba_root)).files] == ["000006.jpg"]
    item = train[0]
    raw = torch.from_numpy(np.asarray(Image.open(celeba_root / "img_align_celeba" / "000001.jpg"))).permute(2, 0, 1) / 255
    torch.testing.assert_close(item["x"], raw[:, 29:189, 9:169])  # center 160x160 of 218x178, native resolution
    assert item["y"].shape == (3, 160, 160)
    small = CelebA("train", Inpainting(), root=str(celeba_root), image_size=128)[0]
    assert small["x"].shape == (3, 128, 128) and small["mask"].shape == (1, 128, 128)


def test_training_flip_is_seeded_per_seed_epoch_and_index(tmp_path):
    for i in range(6):
        _write(tmp_path / "imgs" / f"{i}.png", _noise_image(8, 8, i))
    mk = lambda split, **kw: ImageFolder(split, SuperResolution(2), root=str(tmp_path / "imgs"), image_size=8,
                                         holdout=0.2, **kw)
    ds, plain = mk("train"), mk("train", flip=False)
    assert len(ds) == 4
    flipped = torch.tensor([[not torch.equal(ds[(e, i)]["x"], plain[i]["x"]) for i in range(4)] for e in range(8)])
    assert flipped.any() and not flipped.all()  # about half the (epoch, index) keys are flipped
    assert (flipped.float().std(0) > 0).any()  # an image's flip varies over epochs
    assert torch.equal(ds[(3, 2)]["x"], ds[(3, 2)]["x"])  # a pure function of its key
    assert not all(torch.equal(ds[(e, 1)]["x"], mk("train", seed=1)[(e, 1)]["x"]) for e in range(8))
    for e in range(3):  # x and the task's y are flipped together
        it = ds[(e, 0)]
        torch.testing.assert_close(it["y"], SuperResolution(2)(it["x"][None])[0])
    val = mk("val")
    assert torch.equal(val[(5, 0)]["x"], val[0]["x"])  # evaluation splits never flip


def test_edges2shoes_splits_pairs_into_y_edges_and_x_photo(tmp_path):
    pair = np.concatenate([np.full((32, 32, 3), 255, np.uint8), _noise_image(32, 32, 0)], axis=1)
    for split in ("train", "val"):
        _write(tmp_path / "e2s" / split / "1_AB.png", pair)
    ds = Edges2Shoes("test", root=str(tmp_path / "e2s"), image_size=16)
    item = ds[0]
    assert torch.allclose(item["y"], torch.ones(3, 16, 16))
    assert item["x"].std() > 0.1 and item["x"].shape == (3, 16, 16)
    # Edges() by default, for consistency: the white condition is what it computes for a flat image
    white = torch.ones(1, 3, 16, 16)
    torch.testing.assert_close(ds.task(white), Edges()(white))
    assert ds.task.consistency(white, item["y"][None]).item() == pytest.approx(10 * math.log10(1 / (1 - Edges()(white)).square().mean().item()), rel=1e-4)


def test_image_folder_recursive_split_by_order(tmp_path):
    for i in range(10):
        _write(tmp_path / "imgs" / f"sub{i % 2}" / f"{i}.png", _noise_image(20, 24, i))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    sizes = [len(ImageFolder(s, SuperResolution(2), root=str(tmp_path / "imgs"), image_size=8, holdout=0.1))
             for s in ("train", "val", "test")]
    assert sizes == [8, 1, 1]
    assert ImageFolder("val", SuperResolution(2), root=str(tmp_path / "imgs"), image_size=8)[0]["x"].shape == (3, 8, 8)


def test_missing_empty_and_corrupt_data_fail_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        CelebA("train", SuperResolution(8), root=str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "prepare_celeba.py" in msg and "\n" not in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder("train", SuperResolution(2), root=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="edges2shoes"):
        Edges2Shoes("train", root=str(tmp_path / "e2s"))
    bad = tmp_path / "bad" / "train" / "broken.jpg"
    _write(bad, _noise_image(20, 20, 0))
    bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEG
    ds = ImageFolder("train", SuperResolution(2), root=str(tmp_path / "bad"), image_size=8)
    with pytest.raises(ValueError, match="broken.jpg"):
        ds[0]


# ---- resumable order -----------------------------------------------------------------------------

def _indices(batches):
    return [b["index"].tolist() for b in batches]


def test_sampler_permutation_depends_on_seed_and_epoch_and_shards_ranks():
    ds = Shapes("train", SuperResolution(2), image_size=8, length=11)
    s = ResumableSampler(ds, seed=1)
    e0 = [i for _, i in s]
    assert sorted(e0) == list(range(11)) and e0 == [i for _, i in s]
    s.set_epoch(1)
    assert [k for k in s][0][0] == 1 and [i for _, i in s] != e0
    assert [i for _, i in ResumableSampler(ds, seed=2)] != e0
    shards = [[i for _, i in ResumableSampler(ds, seed=1, rank=r, world_size=2)] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6  # padded to equal length
    assert set(shards[0]) | set(shards[1]) == set(range(11))
    assert shards[0] == e0[0::2]  # the same global order, interleaved


@pytest.mark.parametrize("stop", [2, 3, 4])  # mid-epoch, the epoch's last batch, next epoch
def test_loader_state_resumes_at_the_next_batch_with_workers(stop):
    ds = Shapes("train", SuperResolution(2), image_size=8, length=10)

    def loader(rank=0, world=1):
        sampler = ResumableSampler(ds, seed=0, rank=rank, world_size=world)
        return ResumableLoader(ds, sampler, batch_size=3, drop_last=True, num_workers=2)

    def run(ld, epochs, stop_after=None):
        out = []
        for e in epochs:
            ld.sampler.set_epoch(e)
            for batch in ld:
                out.append(batch)
                if stop_after is not None and len(out) == stop_after:
                    return out, ld.state_dict()
        return out, ld.state_dict()

    full, _ = run(loader(), range(3))  # 3 batches per epoch
    first, state = run(loader(), range(3), stop_after=stop)
    resumed = loader()
    resumed.load_state_dict(state)
    rest, _ = run(resumed, range(state["epoch"], 3))
    assert _indices(first + rest) == _indices(full)
    assert torch.equal(torch.cat([b["x"] for b in first + rest]), torch.cat([b["x"] for b in full]))


def _ddp_expected_keys(n: int, seed: int, world: int, batch: int, epochs: int) -> list[list[list[tuple[int, int]]]]:
    """By hand: per rank, per step, the (epoch, index) keys of its batch. Epoch e's global order is
    randperm(n) from the generator of (seed, e), padded by wrapping to a multiple of the world size;
    rank r takes positions r, r + W, ...; a rank's incomplete last batch is dropped."""
    from msdiff.utils import make_generator, mix_seed

    per_rank = math.ceil(n / world)
    out: list[list[list[tuple[int, int]]]] = [[] for _ in range(world)]
    for e in range(epochs):
        order = torch.randperm(n, generator=make_generator(mix_seed(seed, e))).tolist()
        order = (order * 2)[: per_rank * world]
        for r in range(world):
            shard = order[r::world]
            out[r] += [[(e, i) for i in shard[b * batch:(b + 1) * batch]] for b in range(per_rank // batch)]
    return out


@pytest.mark.parametrize("stop", range(1, 9))  # every resumable position of 3 epochs of 3 steps
def test_ddp_shards_resume_at_every_position_by_value(stop):
    """Two ranks (13 examples, padded to 14, 7 per rank, batches of 2: 3 steps per epoch): both ranks
    stop after `stop` steps and save the same state (epoch, samples consumed over all ranks); fresh
    loaders restored from it continue each rank's shard with the very batches of the uninterrupted
    run, whose keys and pixels (items after the first epoch included: flips are seeded by epoch)
    are pinned by hand."""
    ds = Shapes("train", SuperResolution(2), image_size=8, length=13, flip=True, seed=3)
    world, batch, epochs = 2, 2, 3

    def loader(rank):
        return ResumableLoader(ds, ResumableSampler(ds, seed=7, rank=rank, world_size=world), batch_size=batch,
                               drop_last=True)

    def run(ld, first_epoch, stop_after=None):
        out = []
        for e in range(first_epoch, epochs):
            ld.sampler.set_epoch(e)
            for b in ld:
                out.append(b)
                if len(out) == stop_after:
                    return out, ld.state_dict()
        return out, ld.state_dict()

    want = _ddp_expected_keys(len(ds), seed=7, world=world, batch=batch, epochs=epochs)
    states = []
    for r in range(world):
        full, _ = run(loader(r), 0)
        assert _indices(full) == [[i for _, i in keys] for keys in want[r]]
        for (e, i), x in zip(sum(want[r], []), torch.cat([b["x"] for b in full])):
            assert torch.equal(x, ds[(e, i)]["x"])  # the item of ITS epoch (seeded flip), not epoch 0's
        first, state = run(loader(r), 0, stop_after=stop)
        states.append(state)
        resumed = loader(r)
        resumed.load_state_dict(state)
        rest, _ = run(resumed, state["epoch"])
        assert _indices(first + rest) == _indices(full), r
        assert torch.equal(torch.cat([b["x"] for b in first + rest]), torch.cat([b["x"] for b in full]))
    assert states[0] == states[1] == {"epoch": stop // 3, "consumed": (stop % 3) * batch * world}
    flipped_later = [not torch.equal(ds[(e, i)]["x"], ds[(0, i)]["x"]) for e in (1, 2) for i in range(len(ds))]
    assert any(flipped_later)  # the pixel check above can tell the epochs apart


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_item_streams_by_split_epoch_and_index(split):
    """Every random choice of an item (the training flip, the inpainting hole's position) comes from
    ONE generator seeded from (dataset seed, split, epoch, index), the epoch only for train: built
    here by hand for 3 epochs x 6 items; the training items change with the epoch, evaluation items
    never, and the splits' streams differ."""
    from msdiff.utils import make_generator, mix_seed

    task = Inpainting(hole_fraction=0.25)
    ds = Shapes(split, task, image_size=8, length=6, flip=True, seed=4)
    split_id = ("train", "val", "test").index(split)
    masks = {}
    for e in range(3):
        for i in range(6):
            g = make_generator(mix_seed(4, split_id, e if split == "train" else 0, i))
            x, _ = ds.load(i, g)
            if split == "train" and bool(torch.rand((), generator=g) < 0.5):
                x = x.flip(-1)
            want = {"x": x, **{k: v[0] for k, v in task.measure(x[None], g).items()}}
            got = ds[(e, i)]
            assert got.keys() - {"index"} == want.keys() and got["index"] == i
            assert all(torch.equal(got[k], want[k]) for k in want), (e, i)
            masks[e, i] = got["mask"]
    changed = [not torch.equal(masks[e, i], masks[0, i]) for e in (1, 2) for i in range(6)]
    assert any(changed) if split == "train" else not any(changed)


def test_evaluation_subsets_of_every_split_by_value():
    """val_size / test_size pick evenly spaced examples of THEIR split (round(linspace(0, n - 1, size)),
    half to even); train is never subsampled; test/predict loaders read the test subset."""
    dm = ConditionalDataModule(functools.partial(Shapes, task=SuperResolution(2), image_size=4, length=12),
                               batch_size=4, val_size=3, test_size=5, val_batch_size=8)
    dm.setup("fit")
    dm.setup("test")
    picked = {name: [dm.split(name)[i]["index"] for i in range(len(dm.split(name)))] for name in ("train", "val", "test")}
    assert picked == {"train": list(range(12)), "val": [0, 6, 11], "test": [0, 3, 6, 8, 11]}
    assert [dm.split("val")[i]["x"].sum() for i in range(3)] == [Shapes("val", SuperResolution(2), image_size=4, length=12)[i]["x"].sum()
                                                               for i in (0, 6, 11)]
    for loader in (dm.test_dataloader(), dm.predict_dataloader()):
        assert sum(_indices(loader), []) == [0, 3, 6, 8, 11]


def test_datamodule_loaders_and_fixed_batch():
    dm = ConditionalDataModule(functools.partial(Shapes, task=SuperResolution(2), image_size=8, length=12),
                               batch_size=4, val_size=5)
    dm.setup("fit")
    assert len(dm.split("val")) == 5 and isinstance(dm.task, SuperResolution)
    a, b = dm.fixed_batch(3), dm.fixed_batch(3)
    assert a["x"].shape == (3, 3, 8, 8) and torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    train = dm.train_dataloader()
    assert isinstance(train, ResumableLoader) and len(train) == 3
    assert sorted(sum(_indices(train), [])) == list(range(12))
    with pytest.raises(ValueError, match="batch_size"):
        ConditionalDataModule(dm.dataset, batch_size=0)


def test_lightning_checkpoint_resumes_the_exact_batch_sequence(tmp_path):
    """Lightning saves ResumableLoader.state_dict() in its checkpoints and restores it:
    resuming from a mid-epoch and from an epoch's-last-batch checkpoint replays the same batches."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["index"].tolist())
            return (self.w - batch["x"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps, ckpt_path=None, callbacks=()):
        dm = ConditionalDataModule(functools.partial(Shapes, task=SuperResolution(2), image_size=4, length=9),
                                   batch_size=3, seed=5)
        model = Recorder()
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=bool(callbacks),
                             callbacks=list(callbacks), limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                 filename="{step}")
    full = fit(8, callbacks=[every_step])  # 3 batches per epoch
    assert len(full) == 8 and full[:3] != full[3:6]
    for step in (2, 3):  # mid-epoch; on the last batch of epoch 0
        assert fit(8, ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt")) == full[step:]
