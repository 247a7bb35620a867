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

REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((REPO / "tests" / "data" / "config_reference.json").read_text())

#: class paths renamed on purpose since 961b691 (old -> new), applied to the reference's values
#: before comparing. The lead fills this at merge, e.g. the CUT classes moving to msdiff.cut.*.
RENAMED_CLASS_PATHS: dict[str, str] = {}

#: keys whose value changed on purpose: (config-name regex, dotted key) -> (new value, reason).
#: A key absent from the new config is written as ABSENT.
ABSENT = object()
CHANGED_ON_PURPOSE: dict[tuple[str, str], tuple[object, str]] = {
    (r".*_vscmde", "model.init_args.estimator.init_args.sde.init_args.y.init_args.sigma_max"): (
        50.0, "VS-CMDE ignores y's sigma_max (y starts at sigma_max_x and follows the schedule): the configs "
              "no longer state it, so the resolved config shows VESDE's default"),
}

#: dotted-key prefixes another change adds, removes or replaces as a whole (prefix -> reason),
#: compared in no config. E.g. when `preconditioning`/`weighting` become class_path objects (issue
#: 13 item 4), "model.init_args.estimator.init_args.preconditioning" goes here with that reason; a
#: new constructor argument of a sampler, its key. A value one config changes on purpose (e.g.
#: quickstart.yaml tuned by measurement) goes to CHANGED_ON_PURPOSE instead.
REPLACED_KEYS: dict[str, str] = {}


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out: dict = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _renamed(value):
    return RENAMED_CLASS_PATHS.get(value, value) if isinstance(value, str) else value


def _replaced(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in REPLACED_KEYS)


@pytest.fixture(scope="module")
def resolved() -> dict[str, dict]:
    """Every configs/*.yaml as train.py resolves it (one parser for all)."""
    return {p.stem: _flatten(resolved_config(p.stem)) for p in sorted((REPO / "configs").glob("*.yaml"))}


def test_the_same_experiments_are_shipped(resolved):
    assert sorted(resolved) == sorted(REFERENCE)


def test_every_experiment_resolves_to_the_reference_settings(resolved):
    mismatches = []
    for name, ref in REFERENCE.items():
        new = resolved.get(name, {})
        changed = {key: value for (pattern, key), (value, _) in CHANGED_ON_PURPOSE.items()
                   if re.fullmatch(pattern, name)}
        for key in sorted(set(ref) | set(new)):
            if _replaced(key):
                continue
            want = changed.get(key, _renamed(ref.get(key, ABSENT)))
            got = new.get(key, ABSENT)
            if got != want:
                mismatches.append(f"{name}: {key} = {got!r}, expected {want!r}")
    assert not mismatches, "\n".join(mismatches)


def test_every_listed_change_is_used():
    """An exception that matches no shipped config and key is stale (or misspelt)."""
    for pattern, key in CHANGED_ON_PURPOSE:
        assert any(re.fullmatch(pattern, n) and key in ref for n, ref in REFERENCE.items()), (pattern, key)


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
