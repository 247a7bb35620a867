"""Preconditioning and weighting objects of msdiff.estimators, line by line against Karras et al.
2022 Table 1 and the reference's formulas; the estimator hooks the training system calls; configs
saved with the old string options."""
from __future__ import annotations

import math

import pytest
import torch

from msdiff.estimators import (CDE, CMDE, VSCMDE, ConditionalEstimator, EDMPrecond, LikelihoodWeighting,
                               ReferencePrecond, SimpleWeighting)
from msdiff.estimators.legacy import upgrade_estimator_configs
from msdiff.resume_config import check_resume_changes
from msdiff.sde import VESDE, MultiSpeedSDE
from msdiff.checkpoint_file import instantiate_config

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 3.0, 80.0], dtype=torch.float64)


@pytest.mark.parametrize("sd", [0.5, 0.3])
def test_edm_scalings_are_karras_table_1(sd):
    """EDM column of Table 1 at a few sigmas, and (D - x) / sigma of Eq. 7 from them."""
    pre = EDMPrecond(sigma_data=sd)
    for s in SIGMAS.tolist():
        sigma = torch.tensor(s, dtype=torch.float64)
        assert pre.c_skip(sigma).item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-14)
        assert pre.c_out(sigma).item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-14)
        assert pre.c_in(sigma).item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-14)
    x = torch.linspace(-3, 3, 5, dtype=torch.float64)
    f = torch.tensor([0.7, -1.1, 0.2, 2.0, -0.4], dtype=torch.float64)
    D = pre.c_skip(SIGMAS) * x + pre.c_out(SIGMAS) * f
    torch.testing.assert_close(pre.neg_z(x, SIGMAS, f), (D - x) / SIGMAS, rtol=1e-9, atol=0)
    torch.testing.assert_close(pre.net_input(x, SIGMAS), x / torch.sqrt(SIGMAS**2 + sd**2), rtol=1e-14, atol=0)
    # units: x = k (v / a - m), sigma = k s / a (k = 2, m = 0.5 for [0, 1] data)
    v, a, s = torch.tensor(0.9), torch.tensor(0.8), torch.tensor(0.3)
    u, sigma = pre.units(v, a, s, centered=False)
    assert (u.item(), sigma.item()) == pytest.approx((2 * (0.9 / 0.8 - 0.5), 2 * 0.3 / 0.8), rel=1e-6)
    u, sigma = pre.units(v, a, s, centered=True)
    assert (u.item(), sigma.item()) == pytest.approx((0.9 / 0.8, 0.3 / 0.8), rel=1e-6)
    # c_noise: the time label 999 t for every preconditioning (not EDM's ln(sigma) / 4)
    t = torch.tensor([1e-5, 0.5, 1.0])
    torch.testing.assert_close(pre.c_noise(t), 999 * t)
    with pytest.raises(ValueError, match="sigma_data=0"):
        EDMPrecond(sigma_data=0.0)


def test_reference_scalings_and_formula():
    """The reference: c_skip = 1, c_out = sigma, c_in = 1 (Table 1's VE column), so (D - x) / sigma is
    F; the estimator feeds concat(2 x_t - 1, 2 y_t - 1) with label 999 t and returns F unchanged."""
    pre = ReferencePrecond()
    x = torch.linspace(-3, 3, 5, dtype=torch.float64)
    f = torch.tensor([0.7, -1.1, 0.2, 2.0, -0.4], dtype=torch.float64)
    assert bool((pre.c_skip(SIGMAS) == 1).all()) and torch.equal(pre.c_out(SIGMAS), SIGMAS)
    assert bool((pre.c_in(SIGMAS) == 1).all())
    D = pre.c_skip(SIGMAS) * x + pre.c_out(SIGMAS) * f
    torch.testing.assert_close(pre.neg_z(x, SIGMAS, f), (D - x) / SIGMAS, rtol=1e-12, atol=1e-12)
    u, sigma = pre.units(torch.tensor(0.9), torch.tensor(0.8), torch.tensor(0.3), centered=False)
    assert (u.item(), sigma.item()) == pytest.approx((0.8, 0.6))

    class Net(torch.nn.Module):
        def forward(self, h, label):
            self.h, self.label = h, label
            return torch.tanh(h * 0.3 + label[:, None, None, None] / 999)

    g = torch.Generator().manual_seed(0)
    x_t, y_t = 5 * torch.randn(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    net = Net()
    out = CMDE(MultiSpeedSDE(VESDE(0.01, 20.0), VESDE(0.01, 1.0)))._run(net, x_t, y_t, t)
    h = torch.cat([x_t, y_t], 1) * 2.0 - 1.0
    assert torch.equal(net.h, h) and torch.equal(net.label, 999.0 * t)
    assert torch.equal(out, torch.tanh(h * 0.3 + (999.0 * t)[:, None, None, None] / 999))


def test_weightings_closed_forms():
    sde, t = VESDE(0.005, 277.128), torch.tensor([0.01, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(LikelihoodWeighting()(sde, t), torch.full_like(t, 2 * math.log(277.128 / 0.005)))
    assert torch.equal(SimpleWeighting()(sde, t), torch.ones_like(t))


def test_options_are_typed_objects():
    with pytest.raises(ValueError, match="preconditioning='edm': expected a msdiff.estimators.Preconditioning"):
        CDE(VESDE(), preconditioning="edm")
    with pytest.raises(ValueError, match="weighting='simple': expected a msdiff.estimators.Weighting"):
        CDE(VESDE(), weighting="simple")


def test_schedule_hooks():
    """What the training system calls: schedule_values (logged every step) and hparams_summary."""
    pair = MultiSpeedSDE(VESDE(0.005, 277.128), VESDE(0.005, 0.5))
    assert CMDE(pair).schedule_values() == {}
    est = VSCMDE(pair, sigma_max_y_target=0.5, reach_target_steps=100)
    value = est.set_step(37)
    assert est.schedule_values() == {"sigma_max_y": value} and value == est.speed_y_at(37)
    hp = est.hparams_summary()
    assert (hp["sigma_max_x"], hp["sigma_max_y"], hp["sigma_max_y_target"]) == (277.128, 277.128, 0.5)
    assert (hp["reach_target_steps"], hp["clamp"], hp["preconditioning"]) == (100, False, "ReferencePrecond()")
    assert CDE(VESDE(), weighting=SimpleWeighting()).hparams_summary()["weighting"] == "SimpleWeighting()"


def _old_config(**options) -> dict:
    sde = {"class_path": "msdiff.sde.MultiSpeedSDE", "init_args": {
        "x": {"class_path": "msdiff.sde.VESDE", "init_args": {"sigma_min": 0.01, "sigma_max": 20.0}},
        "y": {"class_path": "msdiff.sde.VESDE", "init_args": {"sigma_min": 0.01, "sigma_max": 1.0}}}}
    return {"class_path": "msdiff.estimators.CMDE", "init_args": {"sde": sde, "p_uncond": 0.0, "t_eps": 1e-5,
                                                                  "centered": False, **options}}


def test_configs_saved_with_string_options_still_build():
    """Checkpoints and run directories written before the options were objects store
    weighting: likelihood | simple, preconditioning: none | edm and sigma_data (a stored run is read
    through msdiff.run.TrainedRun, which upgrades its config: tests/test_run.py)."""
    est = instantiate_config(upgrade_estimator_configs(_old_config(weighting="simple", preconditioning="edm",
                                                                   sigma_data=0.3)), ConditionalEstimator)
    assert est.preconditioning == EDMPrecond(0.3) and est.weighting == SimpleWeighting()
    est = instantiate_config(upgrade_estimator_configs(_old_config(weighting="likelihood", preconditioning="none",
                                                                   sigma_data=0.5)), ConditionalEstimator)
    assert est.preconditioning == ReferencePrecond() and est.weighting == LikelihoodWeighting()
    # nested in a model config, and the recorded config of a run compares equal to today's form
    old = {"model": {"init_args": {"estimator": _old_config(weighting="likelihood", preconditioning="edm",
                                                            sigma_data=0.5)}}}
    new = upgrade_estimator_configs(old)
    args = new["model"]["init_args"]["estimator"]["init_args"]
    assert args["preconditioning"] == {"class_path": "msdiff.estimators.EDMPrecond", "init_args": {"sigma_data": 0.5}}
    assert "sigma_data" not in args and old["model"]["init_args"]["estimator"]["init_args"]["preconditioning"] == "edm"
    assert check_resume_changes(old, new, "run", 10) is None
    # today's form passes through unchanged (an EDMPrecond's own sigma_data included)
    args["preconditioning"]["init_args"]["sigma_data"] = 0.3
    assert upgrade_estimator_configs(new) == new
    assert instantiate_config(new["model"]["init_args"]["estimator"], ConditionalEstimator).preconditioning \
        == EDMPrecond(0.3)
