"""The experiment configs carry the official MSDiff experiment settings that differ between tasks
(read from the official configs): CMDE's sigma_max_y and VS-CMDE's target and the step reaching it."""
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
    assert sde["y"]["init_args"]["sigma_min"] == sde["x"]["init_args"]["sigma_min"] == 0.005  # y's sigma_max: the schedule
