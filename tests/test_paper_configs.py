"""The experiment configs carry the official MSDiff experiment settings that differ between tasks
(read from the official configs): CMDE's sigma_max_y and VS-CMDE's target and the step reaching it;
and the GPU experiments' loader settings."""
import pytest
from conftest import resolved_config


def _estimator(name: str) -> dict:
    return resolved_config(name)["model"]["init_args"]["estimator"]["init_args"]


@pytest.mark.parametrize("name, sigma_max_y", [("sr8x_cmde", 0.5), ("inpaint_cmde", 1.0), ("edges_cmde", 1.0)])
def test_cmde_sigma_max_y(name, sigma_max_y):
    sde = _estimator(name)["sde"]["init_args"]
    assert sde["y"]["init_args"]["sigma_max"] == sigma_max_y
    assert sde["y"]["init_args"]["sigma_min"] == sde["x"]["init_args"]["sigma_min"] == 0.005


@pytest.mark.parametrize("name, target, steps", [("sr8x_vscmde", 0.5, 250_000), ("inpaint_vscmde", 1.0, 500_000),
                                                 ("edges_vscmde", 1.0, 300_000)])
def test_vscmde_target_and_step(name, target, steps):
    est = _estimator(name)
    sde = est["sde"]["init_args"]
    assert (est["sigma_max_y_target"], est["reach_target_steps"], est["clamp"]) == (target, steps, False)
    assert sde["y"]["init_args"]["sigma_min"] == sde["x"]["init_args"]["sigma_min"] == 0.005
    # y starts as x: the printed y-SDE shows the schedule's start, sigma_max_x, not an unused default
    assert sde["y"]["init_args"]["sigma_max"] == sde["x"]["init_args"]["sigma_max"]


@pytest.mark.parametrize("name", [f"edges_{est}" for est in ("cde", "cdiffe", "cmde", "vscmde")])
def test_edges2shoes_pairs_are_not_flipped(name):
    """The reference sets data.random_flip = False for edges2shoes and applies only ToTensor."""
    assert resolved_config(name)["data"]["init_args"]["dataset"]["init_args"]["flip"] is False



PAPER_GPU_CONFIGS = [f"{task}_{est}" for task in ("sr8x", "inpaint", "edges") for est in ("cde", "cdiffe", "cmde", "vscmde")]


@pytest.mark.parametrize("name", PAPER_GPU_CONFIGS + ["sr8x_cmde_vp"])
def test_gpu_configs_feed_the_gpu(name):
    """The GPU experiments load with worker processes that outlive an epoch, into pinned memory
    (Lightning then copies batches to the GPU without blocking), on the GPU when there is one."""
    cfg = resolved_config(name)
    data = cfg["data"]["init_args"]
    assert data["num_workers"] >= 4 and data["pin_memory"] is True and data["persistent_workers"] is True
    assert cfg["trainer"]["accelerator"] == "auto"


def test_loader_settings_reach_the_loaders():
    from functools import partial

    from msdiff.data import ConditionalDataModule
    from msdiff.datasets import Shapes
    from msdiff.tasks import SuperResolution

    shapes = partial(Shapes, task=SuperResolution(4), image_size=8, length=8)
    dm = ConditionalDataModule(shapes, batch_size=2, val_size=2, num_workers=2, pin_memory=True,
                               persistent_workers=True)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (2, True, True)
    dm0 = ConditionalDataModule(shapes, batch_size=2, val_size=2, num_workers=0, persistent_workers=True)
    dm0.setup("fit")
    assert dm0.train_dataloader().persistent_workers is False  # torch refuses persistent workers without workers
