"""Tests of msdiff.guidance.attention (ASAG, PAG, SEG) and msdiff.guidance.cfg (CFG) on a tiny U-Net
with real estimators: the guided score equals s_u + w (s_c - s_u) + scale (s_c - s_perturbed)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_across_kernel_paths, kernel_path_atol, watch_host_traffic
from torch import nn

from msdiff.estimators import CDE, CMDE, CDiffE
from msdiff.guidance import ASAG, CFG, PAG, SEG, AttentionGuidance
from msdiff.nn.attention import ASAGProcessor, PAGProcessor, SDPAProcessor, swap_attention_processors
from msdiff.nn.unet import UNet
from msdiff.samplers import DDIM
from msdiff.sde import VESDE, MultiSpeedSDE
from msdiff.utils import make_generator

B, C, N = 2, 1, 8  # batch, x/y channels, image size




def tiny_unet(out_channels: int) -> UNet:
    """ch 32, levels at 8 and 4, attention at 4 and in the middle; the zero-initialised output
    projections get weights so that attention (hence its perturbation) changes the output."""
    torch.manual_seed(0)
    net = UNet(in_channels=2 * C, out_channels=out_channels, ch=32, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), image_size=N, dropout=0.0).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.normal_(0.0, 0.3)
    return net


def estimator(name: str, p_uncond: float = 0.0):
    ve = VESDE(0.01, 10.0)
    return {"CDE": lambda: CDE(ve, p_uncond=p_uncond), "CDiffE": lambda: CDiffE(ve),
            "CMDE": lambda: CMDE(MultiSpeedSDE(ve, VESDE(0.01, 0.5)))}[name]()


def setup(name: str, p_uncond: float = 0.0):
    est = estimator(name, p_uncond)
    net = tiny_unet(est.out_channels(C, C))
    g = make_generator(1)
    x, y = torch.randn(B, C, N, N, generator=g), torch.rand(B, C, N, N, generator=g)
    t = torch.tensor([0.3, 0.7])
    return est, net, x, y, t


def processors(net):
    return {n: m.processor for n, m in net.attention_layers().items()}


def manual_branches(est, net, x, y, t, processor, layers, seed):
    """s and s_perturbed written out with the estimator's conventions and ONE y_t draw."""
    cond = y
    if est.y_sde is not None:
        z = torch.randn(y.shape, generator=make_generator(seed))
        cond = est.y_sde.mean_coef(t).view(-1, 1, 1, 1) * y + est.y_sde.std(t).view(-1, 1, 1, 1) * z
    h = torch.cat([x, cond], 1) * 2 - 1
    std = est.sampling_sde.std(t).view(-1, 1, 1, 1)
    s = net(h, 999 * t)[:, :C] / std
    with swap_attention_processors(net, processor, layers):
        s_p = net(h, 999 * t)[:, :C] / std
    return s, s_p


GUIDANCES = {"ASAG": lambda **k: ASAG(**k), "PAG": lambda **k: PAG(**k), "SEG": lambda **k: SEG(sigma=1.0, **k)}


@pytest.mark.parametrize("kind", GUIDANCES)
@pytest.mark.parametrize("est_name", ["CDE", "CDiffE"])
def test_scale_zero_is_exactly_unguided(kind, est_name):
    est, net, x, y, t = setup(est_name)
    guidance = GUIDANCES[kind](scale=0.0)
    assert guidance.evaluations == 1
    guided = guidance.score_fn(est, net, y, make_generator(5))(x, t)
    plain = est.score_fn(net, y, make_generator(5))(x, t)
    assert torch.equal(guided, plain)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("est_name", ["CDE", "CMDE"])
def test_guided_score_matches_manual_formula(est_name, batched):
    est, net, x, y, t = setup(est_name)
    scale = 1.5
    guided = ASAG(scale=scale, iters=3, layers=("mid", "up.1"), batched=batched).score_fn(
        est, net, y, make_generator(7))(x, t)
    s, s_p = manual_branches(est, net, x, y, t, ASAGProcessor(3), ("mid", "up.1"), seed=7)
    assert (s - s_p).abs().max() > 1e-3 * s.abs().max()  # the perturbation is not a no-op here
    # batched: both branches in one batch of 2B rows, another kernel path than the manual B-row passes;
    # s + scale (s - s_p) carries each branch's round-off (1 + 2 scale) times (CONTRIBUTING.md, "Tolerances")
    atol = (1 + 2 * scale) * kernel_path_atol(net, torch.maximum(s.abs(), s_p.abs()))
    assert ((guided - (s + scale * (s - s_p))).abs() <= atol).all()


@pytest.mark.parametrize("kind", GUIDANCES)
def test_only_the_perturbed_branch_changes(kind):
    """Unbatched: the unguided branch is bitwise the estimator's score (same generator draws)."""
    est, net, x, y, t = setup("CMDE")
    branches = GUIDANCES[kind](scale=2.0, batched=False).branch_scores(est, net, y, make_generator(3))(x, t)
    assert set(branches) == {"cond", "perturbed"}
    assert torch.equal(branches["cond"], est.score_fn(net, y, make_generator(3))(x, t))
    assert not torch.allclose(branches["perturbed"], branches["cond"], atol=1e-4)


@pytest.mark.parametrize("est_name", ["CDiffE", "CMDE"])
@pytest.mark.parametrize("batched", [False, True])
def test_both_branches_see_the_same_y_t(est_name, batched):
    """SEG with sigma = 0 perturbs nothing, so s_perturbed = s iff both branches use the same y_t;
    two fresh y_t draws would differ far more."""
    est, net, x, y, t = setup(est_name)
    g = make_generator(11)
    b = SEG(scale=1.0, sigma=0.0, batched=batched).branch_scores(est, net, y, g)(x, t)
    fresh = est.score_fn(net, y, g)
    noise_gap = (fresh(x, t) - fresh(x, t)).abs().max()
    gap = (b["perturbed"] - b["cond"]).abs().max()
    if batched:
        assert gap <= 1e-4 * noise_gap
    else:
        assert gap == 0


@pytest.mark.parametrize("kind", GUIDANCES)
@pytest.mark.parametrize("est_name", ["CDE", "CMDE"])
def test_batched_and_unbatched_agree(kind, est_name):
    est, net, x, y, t = setup(est_name)
    a = GUIDANCES[kind](scale=2.0, batched=True).score_fn(est, net, y, make_generator(2))(x, t)
    b = GUIDANCES[kind](scale=2.0, batched=False).score_fn(est, net, y, make_generator(2))(x, t)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


class Boom(RuntimeError):
    pass


def exploding(q, k, v, grid):
    raise Boom("inside the network")


@pytest.mark.parametrize("batched", [False, True])
def test_processors_restored_after_call_and_after_error(batched):
    est, net, x, y, t = setup("CMDE")
    before = processors(net)
    assert all(isinstance(p, SDPAProcessor) for p in before.values())
    PAG(scale=3.0, layers=("mid", "down", "up"), batched=batched).score_fn(est, net, y)(x, t)
    assert processors(net) == before  # the very same objects
    with pytest.raises(Boom):
        AttentionGuidance(exploding, scale=1.0, layers="mid", batched=batched).score_fn(est, net, y)(x, t)
    assert processors(net) == before


def test_pag_perturbed_pass_uses_the_value_path_only_in_chosen_layers():
    """A PAG pass equals the network with PAGProcessor swapped into exactly the chosen layers."""
    est, net, x, y, t = setup("CDE")
    b = PAG(scale=1.0, layers="down", batched=True).branch_scores(est, net, y)(x, t)
    _, s_p = manual_branches(est, net, x, y, t, PAGProcessor(), "down", seed=0)
    assert_close_across_kernel_paths(b["perturbed"], s_p, net)  # batched 2B rows vs the manual B rows


# ---- classifier-free guidance -----------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
def test_cfg_formula(batched):
    est, net, x, y, t = setup("CDE", p_uncond=0.1)
    w = 2.5
    s_c = est.score_fn(net, y)(x, t)
    s_u = est.unconditional_score_fn(net, y)(x, t)
    assert not torch.allclose(s_c, s_u, atol=1e-4)
    guided = CFG(scale=w, batched=batched).score_fn(est, net, y)(x, t)
    # batched: both branches in one batch of 2B rows (another kernel path): (1 + 2 w) x the branch round-off
    atol = (1 + 2 * w) * kernel_path_atol(net, torch.maximum(s_c.abs(), s_u.abs()))
    assert ((guided - (s_u + w * (s_c - s_u))).abs() <= atol).all()
    assert torch.equal(CFG(scale=1.0).score_fn(est, net, y)(x, t), s_c)


@pytest.mark.parametrize("batched", [False, True])
def test_cfg_combined_with_attention_guidance(batched):
    """eps_u + w (eps_c - eps_u) + s (eps_c - eps_c_perturbed), in score form."""
    est, net, x, y, t = setup("CDE", p_uncond=0.1)
    w, scale = 3.0, 1.5
    g = ASAG(scale=scale, cfg_scale=w, batched=batched)
    assert g.branches == ("cond", "uncond", "perturbed") and g.evaluations == 3
    guided = g.score_fn(est, net, y)(x, t)
    s_c, s_p = manual_branches(est, net, x, y, t, ASAGProcessor(2), "mid", seed=0)
    s_u = est.unconditional_score_fn(net, y)(x, t)
    want = s_u + w * (s_c - s_u) + scale * (s_c - s_p)
    torch.testing.assert_close(guided, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("est_name", ["CDE", "CMDE"])
def test_cfg_needs_condition_dropout(est_name):
    est, net, x, y, t = setup(est_name)
    with pytest.raises(ValueError, match="p_uncond"):
        CFG(scale=2.0).score_fn(est, net, y)
    with pytest.raises(ValueError, match="p_uncond"):
        PAG(scale=1.0, cfg_scale=2.0).score_fn(est, net, y)


# ---- input checks, sampling, the command line ---------------------------------------------------
def test_bad_arguments_name_the_argument():
    est, net, x, y, t = setup("CDE")
    for make, arg in [(lambda: ASAG(scale=-1.0), "scale"), (lambda: PAG(scale=math.nan), "scale"),
                      (lambda: CFG(scale=math.inf), "scale"), (lambda: SEG(cfg_scale=-2), "cfg_scale"),
                      (lambda: ASAG(iters=0), "iters"), (lambda: PAG(layers=()), "layers"),
                      (lambda: SEG(sigma=-1.0), "sigma"),
                      (lambda: ASAG(layers="nope").score_fn(est, net, y), "layers")]:
        with pytest.raises(ValueError, match=arg) as info:
            make()
        assert "\n" not in str(info.value)


def test_guided_sampling_with_scale_zero_reproduces_unguided_sampling():
    est, net, x, y, t = setup("CMDE")
    sampler, sde = DDIM(steps=3, eta=0.5), est.sampling_sde
    x_T = sde.prior_sampling((B, C, N, N), generator=make_generator(4))
    a = sampler(PAG(scale=0.0).score_fn(est, net, y, make_generator(9)), sde, x_T, make_generator(8))
    b = sampler(est.score_fn(net, y, make_generator(9)), sde, x_T, make_generator(8))
    c = sampler(PAG(scale=3.0).score_fn(est, net, y, make_generator(9)), sde, x_T, make_generator(8))
    assert torch.equal(a, b)
    # scale 3: the sampler integrates s + 3 (s - s_perturbed) of the same y_t draws
    branches = PAG(scale=3.0, batched=False).branch_scores(est, net, y, make_generator(9))
    guided = lambda v, tt: (lambda br: br["cond"] + 3.0 * (br["cond"] - br["perturbed"]))(branches(v, tt))  # noqa: E731
    ref = sampler(guided, sde, x_T, make_generator(8))
    torch.testing.assert_close(c, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert (b - c).abs().max() > 1e-3 * b.abs().max()


def test_sample_py_guidance_names_resolve():
    """`sample.py --guidance NAME` resolves these classes by name among the subclasses of Guidance."""
    from jsonargparse import ArgumentParser

    from msdiff.guidance import Guidance

    p = ArgumentParser(exit_on_error=False)
    p.add_subclass_arguments(Guidance, "guidance")
    for name, cls in {"ASAG": ASAG, "PAG": PAG, "SEG": SEG, "CFG": CFG}.items():
        assert type(p.instantiate(p.parse_args(["--guidance", name])).guidance) is cls


@pytest.mark.parametrize("make", [lambda: PAG(scale=3.0), lambda: ASAG(scale=1.5), lambda: SEG(scale=3.0)],
                         ids=["PAG", "ASAG", "SEG"])
def test_fixed_y_noise_reaches_the_guided_score(make):
    """An adaptive sampler's flag (fixed_y_noise) makes the guided CMDE score deterministic in (x, t),
    with the estimator's own fixed draw; without it every call draws a fresh y_t."""
    est, net, x, y, t = setup("CMDE")
    score = make().score_fn(est, net, y, make_generator(3), fixed_y_noise=True)
    assert torch.equal(score(x, t), score(x, t))
    fresh = make().score_fn(est, net, y, make_generator(3))
    assert not torch.allclose(fresh(x, t), fresh(x, t))
    cond = make().branch_scores(est, net, y, make_generator(3), fixed_y_noise=True)(x, t)["cond"]
    # the branches run in one batch of 2B rows, the plain score in B: another kernel path, so float32
    # round-off of the network's depth, not bitwise (CONTRIBUTING.md, "Tolerances")
    assert_close_across_kernel_paths(cond, est.score_fn(net, y, make_generator(3), fixed_y_noise=True)(x, t), net)


def test_the_composition_hands_an_adaptive_sampler_a_deterministic_guided_score():
    """Guidance.sample (sample.py and the validation grids): x_T from the SDE's prior, the guided
    score with fixed y_t noise when sampler.adaptive (ProbabilityFlowODE), then the sampler."""
    from msdiff.samplers import ProbabilityFlowODE

    est, net, x, y, t = setup("CMDE")
    seen = {}

    class Probe(ProbabilityFlowODE):
        def __call__(self, score_fn, sde, x_T, generator=None):
            seen["same"] = torch.equal(score_fn(x_T, t), score_fn(x_T, t))
            seen["x_T"] = x_T
            return x_T

    out = PAG(scale=3.0).sample(est, net, y, Probe(), C, generator=make_generator(5))
    assert seen["same"] and out is seen["x_T"]
    g = make_generator(5)
    torch.randn(y.shape, generator=g)                     # the fixed y_t noise is drawn first, then x_T
    torch.testing.assert_close(out, est.sampling_sde.prior_sampling((B, C, N, N), generator=g))


@pytest.mark.parametrize("guidance", [PAG(), SEG(), ASAG(), CFG(scale=2.0)], ids=lambda g: type(g).__name__)
def test_guided_sampling_has_no_host_device_traffic_per_step(guidance, monkeypatch):
    """As the samplers (test_samplers.py): a guided sample's reads back and copies from host data do
    not grow with the sampler's steps (sample.py's noise, one stream per condition)."""
    from msdiff.samplers import PredictorCorrector
    from msdiff.utils import example_noise

    torch.manual_seed(0)
    cfg = isinstance(guidance, CFG)
    net = UNet(in_channels=2, out_channels=1 if cfg else 2, ch=32, ch_mult=[1, 2], num_res_blocks=1,
               attn_resolutions=[4], image_size=8, dropout=0.0).eval()
    est = CDE(sde=VESDE(0.01, 5.0), p_uncond=0.1) if cfg else CMDE(sde=MultiSpeedSDE(VESDE(0.01, 5.0), VESDE(0.01, 0.5)))
    y, traffic, counts = torch.rand(2, 1, 8, 8), [], []
    watch_host_traffic(monkeypatch, lambda: traffic.append(1))
    for steps in (3, 6):
        traffic.clear()
        with torch.no_grad():
            guidance.sample(est, net, y, PredictorCorrector(steps), 1, generator=example_noise(0, range(2), 0, "cpu"))
        counts.append(len(traffic))
    assert counts[0] == counts[1]
