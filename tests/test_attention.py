"""Attention processors (ASAG's Sinkhorn plan, PAG, SEG) and swapping them on a U-Net."""
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from msdiff.nn.attention import (ASAGProcessor, NaiveProcessor, PAGProcessor, SDPAProcessor, SEGProcessor,
                                 SelfAttention, blur_matrix, blur_tokens, sinkhorn, sinkhorn_plan,
                                 swap_attention_processors)
from msdiff.nn.unet import UNet


def qkv(b=2, h=2, n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(3))


def test_sinkhorn_marginals_converge_and_columns_are_exact_after_each_iteration():
    q, k, _ = qkv()
    plan = sinkhorn_plan(q, k, iters=2)
    assert plan.shape == (2, 2, 12, 12)
    torch.testing.assert_close(plan.sum(-2), torch.ones(2, 2, 12))
    assert (plan.sum(-1) - 1).abs().max() > 1e-4          # rows not yet converged after 2 iterations
    plan = sinkhorn_plan(q, k, iters=300)
    torch.testing.assert_close(plan.sum(-1), torch.ones(2, 2, 12), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(-2), torch.ones(2, 2, 12), atol=1e-5, rtol=0)


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_sinkhorn_plan_equals_scaling_form_times_n(iters):
    """Against the textbook Sinkhorn-Knopp scaling P = diag(u) K diag(v), K = exp(-q k^T / sqrt(d)),
    uniform marginals 1/N, in float64; the plan is N * P."""
    q, k, _ = qkv(n=10)
    kernel = torch.exp(-(q.double() @ k.double().transpose(-2, -1)) / math.sqrt(8))
    n = 10
    v = torch.ones(2, 2, n, dtype=torch.float64)
    for _ in range(iters):
        u = (1 / n) / (kernel @ v[..., None])[..., 0]
        v = (1 / n) / (kernel.transpose(-2, -1) @ u[..., None])[..., 0]
    expected = n * u[..., :, None] * kernel * v[..., None, :]
    torch.testing.assert_close(sinkhorn_plan(q, k, iters), expected.float(), atol=1e-5, rtol=1e-4)


def test_zero_queries_give_the_uniform_plan():
    _, k, _ = qkv()
    plan = sinkhorn_plan(torch.zeros_like(k), k, iters=2)
    torch.testing.assert_close(plan, torch.full_like(plan, 1 / 12))


def test_per_row_logit_shift_leaves_plan_unchanged():
    q, k, _ = qkv(d=8)
    e = torch.zeros(8)
    e[0] = 1.0
    k = k.clone()
    k[..., 0] = 2.0                                       # every key has the same component along e
    shift = torch.randn(2, 2, 12, 1) * 3                  # per query: adds -shift * 2 / sqrt(d) to its row
    torch.testing.assert_close(sinkhorn_plan(q + shift * e, k, 2), sinkhorn_plan(q, k, 2), atol=1e-5, rtol=1e-5)
    logits = torch.randn(3, 7, 7)
    torch.testing.assert_close(sinkhorn(logits + torch.randn(3, 7, 1) * 50, 2), sinkhorn(logits, 2),
                               atol=1e-5, rtol=1e-5)


def test_sinkhorn_is_stable_at_large_scale():
    q, k, _ = qkv()
    plan = sinkhorn_plan(q * 1e3, k * 1e3, iters=2)
    # logits ~1e5: the float32 plan equals float64 log-domain Sinkhorn on the same logits (no overflow)
    log_p = -((q * 1e3) @ (k * 1e3).transpose(-2, -1) * 8**-0.5).double()
    for _ in range(2):
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, -2, keepdim=True)
    torch.testing.assert_close(plan.double(), log_p.exp(), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(plan.sum(-2), torch.ones(2, 2, 12))


def test_self_mass_below_uniform_for_sinkhorn_above_for_softmax():
    q, _, _ = qkv(n=16, d=16)
    n = 16
    plan = sinkhorn_plan(q, q, iters=2)
    softmax = torch.softmax(q @ q.transpose(-2, -1) / 4.0, dim=-1)
    assert plan.diagonal(dim1=-2, dim2=-1).mean() < 1 / n
    assert softmax.diagonal(dim1=-2, dim2=-1).mean() > 1 / n


def test_asag_and_pag_processors():
    q, k, v = qkv()
    torch.testing.assert_close(ASAGProcessor(iters=3)(q, k, v, (3, 4)), sinkhorn_plan(q, k, 3) @ v)
    assert PAGProcessor()(q, k, v, (3, 4)) is v
    torch.testing.assert_close(SDPAProcessor()(q, k, v, (3, 4)), NaiveProcessor()(q, k, v, (3, 4)),
                               atol=1e-5, rtol=1e-5)


def test_pag_block_output_is_the_value_path():
    torch.manual_seed(0)
    attn = SelfAttention(32)
    torch.nn.init.normal_(attn.proj_out.weight, std=0.1)
    attn.processor = PAGProcessor()
    x = torch.randn(2, 32, 3, 5)
    hn = F.group_norm(x, 32, attn.norm.weight, attn.norm.bias, eps=1e-6).flatten(2).transpose(1, 2)
    value = F.linear(hn, attn.qkv.weight[64:], attn.qkv.bias[64:])
    expected = x + F.linear(value, attn.proj_out.weight, attn.proj_out.bias).transpose(1, 2).reshape(2, 32, 3, 5)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_seg_limits():
    q, k, v = qkv(n=12)
    grid = (3, 4)
    assert blur_tokens(q, grid, 0.0) is q
    torch.testing.assert_close(blur_tokens(q, grid, 1e-3), q)                      # sigma -> 0: no-op
    torch.testing.assert_close(SEGProcessor(0.0)(q, k, v, grid), SDPAProcessor()(q, k, v, grid))
    mean = q.mean(-2, keepdim=True).expand_as(q)
    torch.testing.assert_close(blur_tokens(q, grid, math.inf), mean)                # sigma = inf: mean
    torch.testing.assert_close(blur_tokens(q, grid, 200.0), mean, atol=1e-3, rtol=0)  # and its limit
    torch.testing.assert_close(SEGProcessor(math.inf)(q, k, v, grid),
                               F.scaled_dot_product_attention(mean, k, v))
    blurred = blur_tokens(q, grid, 1.3)                                            # keeps the mean
    torch.testing.assert_close(blurred.mean(-2), q.mean(-2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        SEGProcessor(-1.0)


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_seg_blur_matches_scipy_reflect_gaussian(sigma):
    """Half-sample symmetric ("reflect" in scipy.ndimage) Gaussian with radius ceil(3 sigma), on a
    non-square grid; sigma = 2 has a kernel wider than the 5-row grid."""
    h, w, d = 5, 7, 3
    q = torch.randn(1, 1, h * w, d, dtype=torch.float64)
    ours = blur_tokens(q, (h, w), sigma).reshape(h, w, d).numpy()
    ref = scipy.ndimage.gaussian_filter(q.reshape(h, w, d).numpy(), sigma=(sigma, sigma, 0), mode="reflect",
                                        truncate=math.ceil(3 * sigma) / sigma)
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    m = blur_matrix(6, sigma, dtype=torch.float64)
    torch.testing.assert_close(m, m.T)
    torch.testing.assert_close(m.sum(0), torch.ones(6, dtype=torch.float64))


class Recorder:
    """Wraps SDPA and records the grids it is called on."""

    def __init__(self):
        self.grids = []

    def __call__(self, q, k, v, grid):
        assert q.shape[-2] == grid[0] * grid[1]
        self.grids.append(grid)
        return F.scaled_dot_product_attention(q, k, v)


def tiny_unet():
    torch.manual_seed(0)
    net = UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4, 2), image_size=8).eval()
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return net, torch.randn(2, 6, 8, 8), torch.rand(2)


def test_swap_changes_only_chosen_layers_and_restores():
    net, x, label = tiny_unet()
    layers = net.attention_layers()
    before = {n: m.processor for n, m in layers.items()}
    assert "mid.attn" in layers
    rec = Recorder()
    with torch.no_grad(), swap_attention_processors(net, rec, layers=("mid",)) as swapped:
        assert list(swapped) == ["mid.attn"]
        assert all((m.processor is rec) == (n == "mid.attn") for n, m in layers.items())
        net(x, label)
    assert rec.grids == [(2, 2)]
    assert {n: m.processor for n, m in layers.items()} == before
    rec = Recorder()
    with torch.no_grad(), swap_attention_processors(net, rec, layers=("up.1", "down.2.attn.0")) as swapped:
        assert sorted(swapped) == ["down.2.attn.0", "up.1.attn"]
        net(x, label)
    assert sorted(rec.grids) == [(2, 2), (4, 4)]
    with torch.no_grad():
        ref = net(x, label)
        with swap_attention_processors(net, PAGProcessor(), "mid"):
            perturbed = net(x, label)
        again = net(x, label)
    assert (perturbed - ref).abs().max() > 1e-4
    assert torch.equal(again, ref)


def test_swap_restores_on_error_and_rejects_unknown_layers():
    net, x, label = tiny_unet()
    before = {n: m.processor for n, m in net.attention_layers().items()}

    def boom(q, k, v, grid):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), swap_attention_processors(net, boom, ("mid", "up")):
        net(x, label)
    assert {n: m.processor for n, m in net.attention_layers().items()} == before
    with pytest.raises(ValueError, match=r"unknown attention layer 'middle'.*mid\.attn") as info:
        with swap_attention_processors(net, boom, ("middle",)):
            pass
    assert "\n" not in str(info.value)
    assert {n: m.processor for n, m in net.attention_layers().items()} == before


def test_sinkhorn_plan_stays_float32_under_bf16_autocast():
    q, k, _ = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = sinkhorn_plan(q.bfloat16(), k.bfloat16(), iters=2)
    assert plan.dtype == torch.float32
    torch.testing.assert_close(plan, sinkhorn_plan(q.bfloat16().float(), k.bfloat16().float(), 2))
