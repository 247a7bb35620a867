"""Every shipped experiment resolves to the same effective settings as at commit 961b691, before the
configs were composed from shared pieces (configs/<kind>/*.yaml) and the network's shape was derived
in train.py: value by value, defaults included, except the changes listed below with their reason.

The reference, tests/data/config_reference.json, was written by ``scripts/dump_configs.py`` at
961b691 (``train.py --config NAME --print_config`` for every configs/*.yaml, flattened to dotted
keys). Do not regenerate it to make this test pass: list an intended change here instead.
The configs are parsed in this process with train.py's own parser; nothing is instantiated.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import resolved_config
from scripts.dump_configs import flatten  # the flattening that wrote the reference

REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((REPO / "tests" / "data" / "config_reference.json").read_text())

#: class paths renamed on purpose since 961b691 (old -> new), applied to the reference's values
#: before comparing. The lead fills this at merge, e.g. the CUT classes moving to msdiff.cut.*.
RENAMED_CLASS_PATHS: dict[str, str] = {
    "msdiff.systems.cut.CUTSystem": "msdiff.cut.system.CUTSystem",  # CUT in one package (issue 13, item 3)
    "msdiff.unpaired.UnpairedDataModule": "msdiff.cut.data.UnpairedDataModule",
}

#: keys whose value changed on purpose: (config-name regex, dotted key) -> (new value, reason).
#: A key absent from the new config is written as ABSENT.
ABSENT = object()
QUICKSTART = ("quickstart: tuned by measurement for a 5-minute CPU run whose samples look like the targets "
              "(issue 16; benchmarks/RESULTS.md, 'Quickstart that convinces')")
QUICKSTART_GPU = ("quickstart: two loader workers, so that on a GPU the images are drawn beside the training step "
                  "(issue 15; no slower on a 2-core CPU: benchmarks/RESULTS.md, 'GPU')")
CHANGED_ON_PURPOSE: dict[tuple[str, str], tuple[object, str]] = {
    ("quickstart", "trainer.max_steps"): (1000, QUICKSTART),
    ("quickstart", "model.init_args.estimator.init_args.noise_levels.class_path"): (
        "msdiff.estimators.LogNormalSigma", QUICKSTART),
    ("quickstart", "model.init_args.estimator.init_args.noise_levels.init_args.mean"): (-1.2, QUICKSTART),
    ("quickstart", "model.init_args.estimator.init_args.noise_levels.init_args.std"): (1.2, QUICKSTART),
    ("quickstart", "model.init_args.estimator.init_args.sde.init_args.x.init_args.sigma_min"): (0.01, QUICKSTART),
    ("quickstart", "model.init_args.estimator.init_args.sde.init_args.x.init_args.sigma_max"): (20.0, QUICKSTART),
    ("cut_quickstart", "trainer.accelerator"): (
        "auto", "cut_quickstart: the GPU when there is one, as quickstart.yaml (issue 15)"),
    ("quickstart", "data.init_args.num_workers"): (2, QUICKSTART_GPU),
    ("quickstart", "data.init_args.persistent_workers"): (True, QUICKSTART_GPU),
    (r"gaussian_.*", "data.init_args.dataset.init_args.root"): (
        ABSENT, "GaussianFieldDataset's `root` was never read (dead argument, removed)"),
    **{(name, "model.init_args.estimator.init_args.sde.init_args.y.init_args.sigma_max"): (
        sigma_max_x, "VS-CMDE's y starts as x (sigma_max_y = sigma_max_x at step 0) and follows the schedule: "
                     "the configs give y x's SDE file, so the printed y-SDE shows the schedule's start, not an "
                     "unused default (issue 27)")
       for name, sigma_max_x in [("sr8x_vscmde", 277.128), ("inpaint_vscmde", 221.703), ("edges_vscmde", 110.851),
                                 ("fmnist_sr4x_vscmde", 32.0)]},
    (r"edges_.*", "data.init_args.dataset.init_args.flip"): (
        False, "edges2shoes: no random flip, as the reference (data.random_flip = False, only ToTensor on the "
               "pairs; issue 27, docs/reference.md 'Data and tasks')"),
}

#: dotted-key prefixes another change adds, removes or replaces as a whole (prefix -> reason),
#: compared in no config. E.g. when `preconditioning`/`weighting` become class_path objects (issue
#: 13 item 4), "model.init_args.estimator.init_args.preconditioning" goes here with that reason; a
#: new constructor argument of a sampler, its key. A value one config changes on purpose (e.g.
#: quickstart.yaml tuned by measurement) goes to CHANGED_ON_PURPOSE instead.
REPLACED_KEYS: dict[str, str] = {}

EST = "model.init_args.estimator.init_args."
SAMPLER = "model.init_args.sampler."
WEIGHTINGS = {"likelihood": "msdiff.estimators.LikelihoodWeighting", "simple": "msdiff.estimators.SimpleWeighting"}


def _typed_options(ref: dict) -> dict:
    """The reference's settings spelt as today's typed objects (issue 13, items 2 and 4): the same
    values, not new ones. preconditioning "none" is ReferencePrecond, "edm" with sigma_data is
    EDMPrecond(sigma_data); weighting "likelihood"/"simple" are LikelihoodWeighting/SimpleWeighting;
    a sampler's `rho` is the rho of its Karras grid (HeunPC: heun_grid, with LogSigma for its PC
    part; Heun: grid) and the uniform-time samplers name UniformTime; the training times
    t ~ U(t_eps, T) are UniformTimes(). Class paths renamed on
    purpose (RENAMED_CLASS_PATHS) are applied to every value."""
    out = {k: _renamed(v) for k, v in ref.items() if k not in (EST + "sigma_data", SAMPLER + "init_args.rho")}
    if EST + "preconditioning" in ref:
        kind = out.pop(EST + "preconditioning")
        out[EST + "preconditioning.class_path"] = {"none": "msdiff.estimators.ReferencePrecond",
                                                   "edm": "msdiff.estimators.EDMPrecond"}[kind]
        if kind == "edm":
            out[EST + "preconditioning.init_args.sigma_data"] = ref[EST + "sigma_data"]
    if EST + "weighting" in ref:
        out[EST + "weighting.class_path"] = WEIGHTINGS[out.pop(EST + "weighting")]
        out[EST + "noise_levels.class_path"] = "msdiff.estimators.UniformTimes"  # t ~ U(t_eps, T), as before
    sampler = ref.get(SAMPLER + "class_path")
    if sampler == "msdiff.samplers.HeunPC":
        out[SAMPLER + "init_args.heun_grid.class_path"] = "msdiff.samplers.KarrasSigma"
        out[SAMPLER + "init_args.heun_grid.init_args.rho"] = ref[SAMPLER + "init_args.rho"]
        out[SAMPLER + "init_args.pc_grid.class_path"] = "msdiff.samplers.LogSigma"
    elif sampler == "msdiff.samplers.Heun":
        out[SAMPLER + "init_args.grid.class_path"] = "msdiff.samplers.KarrasSigma"
        out[SAMPLER + "init_args.grid.init_args.rho"] = ref[SAMPLER + "init_args.rho"]
    elif sampler is not None and sampler != "msdiff.samplers.ProbabilityFlowODE":
        out[SAMPLER + "init_args.grid.class_path"] = "msdiff.samplers.UniformTime"
    return out


def _renamed(value):
    return RENAMED_CLASS_PATHS.get(value, value) if isinstance(value, str) else value


def _replaced(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in REPLACED_KEYS)


@pytest.fixture(scope="module")
def resolved() -> dict[str, dict]:
    """Every configs/*.yaml as train.py resolves it (one parser for all)."""
    return {p.stem: flatten(resolved_config(p.stem)) for p in sorted((REPO / "configs").glob("*.yaml"))}


def test_the_same_experiments_are_shipped(resolved):
    assert sorted(resolved) == sorted(REFERENCE)


def test_every_experiment_resolves_to_the_reference_settings(resolved):
    mismatches = []
    for name, ref in REFERENCE.items():
        ref, new = _typed_options(ref), resolved.get(name, {})
        changed = {key: value for (pattern, key), (value, _) in CHANGED_ON_PURPOSE.items()
                   if re.fullmatch(pattern, name)}
        for key in sorted(set(ref) | set(new)):
            if _replaced(key):
                continue
            want = changed.get(key, ref.get(key, ABSENT))
            got = new.get(key, ABSENT)
            if got != want:
                mismatches.append(f"{name}: {key} = {got!r}, expected {want!r}")
    assert not mismatches, "\n".join(mismatches)


def test_every_listed_change_is_used(resolved):
    """An exception that matches no shipped config and key (before or after) is stale (or misspelt)."""
    for pattern, key in CHANGED_ON_PURPOSE:
        assert any(re.fullmatch(pattern, n) and (key in _typed_options(ref) or key in resolved.get(n, {}))
                   for n, ref in REFERENCE.items()), (pattern, key)


def test_derived_network_shape_and_disagreement():
    """out_channels comes from the estimator (CDE: the score of x; CDiffE/CMDE: of x and y),
    image_size from the dataset; a value that disagrees with them is one error naming both keys."""
    import train

    def net(*overrides):
        return train.resolved_config("fmnist_sr4x_cde", *overrides)["model"]["init_args"]["net"]["init_args"]

    assert [net()[k] for k in ("in_channels", "out_channels", "image_size")] == [2, 1, 32]
    assert net("--model.init_args.estimator.class_path", "msdiff.estimators.CDiffE")["out_channels"] == 2
    assert net("--data.init_args.dataset.init_args.image_size", "28")["image_size"] == 28
    assert net("--model.init_args.net.init_args.out_channels", "1")["out_channels"] == 1  # agrees: allowed
    with pytest.raises(ValueError, match=r"^model.init_args.net.init_args.out_channels=5: disagrees with "
                                         r"CDE.out_channels\(x_channels=1, y_channels=1\) = 1; leave"):
        net("--model.init_args.net.init_args.out_channels", "5")
    with pytest.raises(ValueError, match=r"^model.init_args.net.init_args.image_size=16: disagrees with "
                                         r"data.init_args.dataset.init_args.image_size = 32"):
        net("--model.init_args.net.init_args.image_size", "16")
