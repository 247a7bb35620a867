"""Single formulas against their written-out form: EDM preconditioning with a non-zero network, AGG's
stochastic (eta > 0) step, the DDPM ResBlock, and the Gaussian posterior under operators that are
not projections (a random full-rank A and an averaging blur)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msdiff.estimators import CDE, CMDE, EDMPrecond
from msdiff.gaussian import GaussianField, GaussianInverseProblem
from msdiff.guidance import AGGSampler
from msdiff.nn.layers import ResBlock
from msdiff.sde import VESDE, VPSDE, MultiSpeedSDE

# ---- EDM preconditioning -------------------------------------------------------------------------


class ChannelConstants(nn.Module):
    """F(h, label) = a different constant per output channel; records its input."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float64)
        self.h = None

    def forward(self, h, label):
        self.h, self.label = h, label
        return self.values.view(1, -1, 1, 1).to(h).expand(h.shape[0], -1, *h.shape[2:]).clone()


@pytest.mark.parametrize("sde_cls", [VESDE, VPSDE])
@pytest.mark.parametrize("centered", [False, True])
def test_edm_preconditioning_with_a_constant_network(sde_cls, centered):
    """Karras et al. 2022, Table 1, per part v (x_t and y_t) with u = k (v/a - m), sigma = k s / a:
    network input c_in u, c_in = 1/sqrt(sigma^2 + sd^2); D = c_skip u + c_out F with
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2); prediction of -z is
    (D - u) / sigma and the x-score is that over s_x(t)."""
    sde_x = VESDE(0.01, 20.0) if sde_cls is VESDE else VPSDE(0.1, 20.0)
    sde_y = sde_x.with_speed(sde_x.speed / 4)
    sd = 0.4
    est = CMDE(MultiSpeedSDE(sde_x, sde_y), preconditioning=EDMPrecond(sigma_data=sd), centered=centered)
    k, m = (1.0, 0.0) if centered else (2.0, 0.5)
    g = torch.Generator().manual_seed(0)
    b = 4
    x_t = torch.randn(b, 2, 3, 5, generator=g, dtype=torch.float64)
    y_t = torch.randn(b, 2, 3, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=torch.float64)
    Fv = [0.7, -0.3, 0.45, 1.2]
    net = ChannelConstants(Fv)
    out = est._run(net, x_t, y_t, t)
    want, inputs = [], []
    for v, sde, fv in ((x_t, sde_x, Fv[:2]), (y_t, sde_y, Fv[2:])):
        a = sde.mean_coef(t).view(-1, 1, 1, 1)
        sigma = k * sde.std(t).view(-1, 1, 1, 1) / a
        u = k * (v / a - m)
        c_in = 1 / torch.sqrt(sigma**2 + sd**2)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
        Fn = torch.tensor(fv, dtype=torch.float64).view(1, -1, 1, 1)
        D = c_skip * u + c_out * Fn
        want.append((D - u) / sigma)
        inputs.append(c_in * u)
    torch.testing.assert_close(out, torch.cat(want, 1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net.h, torch.cat(inputs, 1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net.label, 999 * t)
    score = est.x_score(net, x_t, y_t, t)
    torch.testing.assert_close(score, want[0] / sde_x.std(t).view(-1, 1, 1, 1), rtol=1e-10, atol=1e-10)


def test_edm_cde_condition_is_clean_and_passed_unscaled():
    """CDE: the clean y has sigma = 0, so the network sees y in centered units divided by sd."""
    sde = VESDE(0.01, 20.0)
    sd = 0.5
    est = CDE(sde, preconditioning=EDMPrecond(sigma_data=sd))
    x_t = torch.randn(3, 1, 4, 6, dtype=torch.float64)
    y = torch.rand(3, 1, 4, 6, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    net = ChannelConstants([0.9])
    out = est._run(net, x_t, y, t)
    torch.testing.assert_close(net.h[:, 1:], (2 * y - 1) / sd)
    sigma = 2 * sde.std(t).view(-1, 1, 1, 1)
    u = 2 * (x_t - 0.5)
    D = sd**2 / (sigma**2 + sd**2) * u + sigma * sd / torch.sqrt(sigma**2 + sd**2) * 0.9
    torch.testing.assert_close(out, (D - u) / sigma, rtol=1e-10, atol=1e-10)


# ---- AGG with eta > 0 ----------------------------------------------------------------------------
def test_agg_stochastic_step_by_hand():
    """DDIM Eq. 12/16 on VP with eta > 0: x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar'); the guided step applies it to
    the corrected x0'' with the unguided eps (asymmetric update)."""
    field = GaussianField(channels=1, size=4, std=0.2)
    sde = VPSDE(0.1, 20.0)
    score_fn = lambda x, t: field.score(x, t, sde)  # noqa: E731
    eta = 0.8
    agg = AGGSampler(steps=10, t_edit=3, eta=eta, lambda_reg=50.0, adam_steps=1)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t, tn = torch.full((2,), 0.6, dtype=torch.float64), torch.full((2,), 0.45, dtype=torch.float64)
    abar, abar2 = (float(sde.mean_coef(v[:1])) ** 2 for v in (t, tn))
    sigma = eta * math.sqrt((1 - abar2) / (1 - abar)) * math.sqrt(1 - abar / abar2)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    score = score_fn(x, t)
    x0 = (x + (1 - abar) * score) / math.sqrt(abar)
    eps = -math.sqrt(1 - abar) * score
    want = math.sqrt(abar2) * x0 + math.sqrt(1 - abar2 - sigma**2) * eps + sigma * z
    got = agg.ddim_step(score_fn, sde, x, t, tn, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    step = agg.guided_step(score_fn, sde, x, t, tn, None, torch.Generator().manual_seed(5))
    want = math.sqrt(abar2) * step.x0_final + math.sqrt(1 - abar2 - sigma**2) * step.eps + sigma * z
    torch.testing.assert_close(step.x_next, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step.eps, eps, rtol=1e-10, atol=1e-10)


def test_agg_stochastic_step_ve_by_hand():
    """VE (a = 1): sigma = eta s' sqrt(s^2 - s'^2) / s, x' = x0 + sqrt(s'^2 - sigma^2) eps + sigma z."""
    field = GaussianField(channels=1, size=4, std=0.2)
    sde = VESDE(0.01, 20.0)
    score_fn = lambda x, t: field.score(x, t, sde)  # noqa: E731
    eta = 0.5
    agg = AGGSampler(steps=10, t_edit=0, eta=eta)
    x = 3 * torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t, tn = torch.full((2,), 0.7, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    s, s2 = 0.01 * 2000**0.7, 0.01 * 2000**0.5
    sigma = eta * s2 * math.sqrt(s**2 - s2**2) / s
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    score = score_fn(x, t)
    want = (x + s**2 * score) + math.sqrt(s2**2 - sigma**2) * (-s * score) + sigma * z
    got = agg.ddim_step(score_fn, sde, x, t, tn, torch.Generator().manual_seed(6))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---- ResBlock ------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_ch,out_ch", [(32, 64), (32, 32)])
def test_resblock_matches_its_written_out_formula(in_ch, out_ch):
    """Ho et al. 2020 (App. B): h = conv0(silu(GN0(x))) + Dense(silu(temb)); out = shortcut(x) +
    conv1(dropout(silu(GN1(h)))), GroupNorm(32, eps 1e-6), NIN shortcut when the channels change."""
    torch.manual_seed(0)
    blk = ResBlock(in_ch, out_ch, temb_dim=16, dropout=0.1).double().eval()
    with torch.no_grad():  # conv1 is zero-initialised and the norms start at identity: randomise all
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, in_ch, 5, 7, dtype=torch.float64)
    temb = torch.randn(2, 16, dtype=torch.float64)
    silu = lambda v: v * torch.sigmoid(v)  # noqa: E731

    def gn(v, norm):
        b, c = v.shape[:2]
        g = v.reshape(b, 32, -1)
        vn = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
        return vn.reshape(v.shape) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)

    h = F.conv2d(silu(gn(x, blk.norm0)), blk.conv0.weight, blk.conv0.bias, padding=1)
    h = h + (silu(temb) @ blk.temb_proj.weight.T + blk.temb_proj.bias)[:, :, None, None]
    h = F.conv2d(silu(gn(h, blk.norm1)), blk.conv1.weight, blk.conv1.bias, padding=1)
    skip = F.conv2d(x, blk.shortcut.weight, blk.shortcut.bias) if in_ch != out_ch else x
    torch.testing.assert_close(blk(x, temb), skip + h, rtol=1e-10, atol=1e-10)


# ---- the Gaussian posterior with non-projection operators ---------------------------------------
def _blur_matrix(n: int) -> torch.Tensor:
    """3x3 averaging blur with zero padding, as a (n*n, n*n) matrix (symmetric, not a projection)."""
    eye = torch.eye(n * n, dtype=torch.float64).reshape(n * n, 1, n, n)
    return F.avg_pool2d(eye, 3, stride=1, padding=1, count_include_pad=True).reshape(n * n, n * n).T


def _operators(field):
    D = field.dim
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64) / math.sqrt(D)
    return {"random": A, "blur": _blur_matrix(field.size)}


def _information_form(field, A, noise, y):
    """(C_post, m_post) of x | y = A x + noise n in the information form, independent of the gain form
    the class uses: C_post = (Sigma^-1 + A^T A / n^2)^-1, m_post = C_post (Sigma^-1 mu + A^T y / n^2)."""
    Sig, mu = field.cov, field.mean
    P = torch.linalg.inv(torch.linalg.inv(Sig) + A.T @ A / noise**2)
    yf = y.reshape(y.shape[0], -1).double()
    return P, (torch.linalg.solve(Sig, mu) + yf @ A / noise**2) @ P.T


@pytest.mark.parametrize("name", ["random", "blur"])
def test_posterior_with_a_non_projection_operator(name):
    """Information form, independent of the gain form the class uses: C_post = (Sigma^-1 + A^T A /
    n^2)^-1, m_post = C_post (Sigma^-1 mu + A^T y / n^2)."""
    field = GaussianField(channels=1, size=4, length_scale=1.5)
    A = _operators(field)[name]
    assert not torch.allclose(A @ A, A)  # not a projection
    noise = 0.1
    problem = GaussianInverseProblem(field, A, noise)
    Sig, mu = field.cov, field.mean
    x, y = problem.sample(3, torch.Generator().manual_seed(4))
    yf = y.reshape(3, -1).double()
    P, m_ref = _information_form(field, A, noise, y)
    m, C = problem.posterior(y)
    torch.testing.assert_close(C, P, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(m.reshape(3, -1), m_ref, rtol=1e-7, atol=1e-9)
    # sampling: y = A x + noise n, replayed from the same generator
    g = torch.Generator().manual_seed(4)
    x2 = field.sample(3, g).reshape(3, -1).double()
    n = torch.randn(3, field.dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(yf, (x2 @ A.T + noise * n).float().double())
    torch.testing.assert_close(problem.apply(x.double()).reshape(3, -1), x.double().reshape(3, -1) @ A.T)
    # joint moments
    mj, cj = problem.joint_moments()
    torch.testing.assert_close(mj, torch.cat([mu, A @ mu]))
    S = A @ Sig @ A.T + noise**2 * torch.eye(field.dim, dtype=torch.float64)
    torch.testing.assert_close(cj, torch.cat([torch.cat([Sig, Sig @ A.T], 1), torch.cat([A @ Sig, S], 1)]))


@pytest.mark.parametrize("name", ["random", "blur"])
def test_perturbed_scores_with_a_non_projection_operator(name):
    field = GaussianField(channels=1, size=4, length_scale=1.5)
    A = _operators(field)[name]
    noise = 0.1
    problem = GaussianInverseProblem(field, A, noise)
    Sig, mu = field.cov, field.mean
    _, y = problem.sample(2, torch.Generator().manual_seed(5))
    P, m_post = _information_form(field, A, noise, y)
    sde = VPSDE(0.1, 20.0)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    x_t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a, s = sde.mean_coef(t), sde.std(t)
    want = []
    for i in range(2):
        cov = a[i] ** 2 * P + s[i] ** 2 * torch.eye(field.dim, dtype=torch.float64)
        want.append(-torch.linalg.solve(cov, x_t[i].reshape(-1) - a[i] * m_post[i]))
    got = problem.conditional_score(x_t, y.double(), t, sde).reshape(2, -1)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-7, atol=1e-7)
    # the joint score of (x_t, y_t) under a multi-speed SDE, against the hand-built joint covariance
    msde = MultiSpeedSDE(VESDE(0.01, 5.0), VESDE(0.01, 0.5))
    y_t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    tt = torch.tensor([0.3, 0.6], dtype=torch.float64)
    S = A @ Sig @ A.T + noise**2 * torch.eye(field.dim, dtype=torch.float64)
    J = torch.cat([torch.cat([Sig, Sig @ A.T], 1), torch.cat([A @ Sig, S], 1)])
    gx, gy = problem.joint_score(x_t, y_t, tt, msde)
    for i in range(2):
        sx, sy = msde.x.std(tt[i : i + 1]), msde.y.std(tt[i : i + 1])
        cov = J + torch.diag(torch.cat([sx.expand(field.dim), sy.expand(field.dim)]) ** 2)
        r = torch.cat([x_t[i].reshape(-1) - mu, y_t[i].reshape(-1) - A @ mu])
        g = -torch.linalg.solve(cov, r)
        torch.testing.assert_close(torch.cat([gx[i].reshape(-1), gy[i].reshape(-1)]), g, rtol=1e-7, atol=1e-7)


def test_agg_inversion_stores_x0_hat_for_the_guided_steps_after_the_first():
    """invert() keeps the x0_hat* of the inversion at the times of guided reverse steps 2..t_edit,
    ordered by increasing t, so that pop() hands reverse step k its own time's estimate."""
    field = GaussianField(channels=1, size=4, std=0.2)
    sde = VPSDE(0.1, 20.0)
    score_fn = lambda x, t: field.score(x, t, sde)  # noqa: E731
    agg = AGGSampler(steps=7, t_edit=3, lambda_reg=1.0)
    x_src = field.sample(2, torch.Generator().manual_seed(0)).double()
    latent, stored = agg.invert(score_fn, sde, x_src)
    assert len(stored) == agg.guided_steps - 1 == 2
    grid = agg.time_grid(sde)  # the sampler's own (float32) times
    x, want = x_src, {}
    for j in range(agg.steps):  # plain deterministic DDIM inversion, eps -> T
        t, tn = grid[j].expand(2), grid[j + 1].expand(2)
        a, s = sde.mean_coef(t).view(-1, 1, 1, 1), sde.std(t).view(-1, 1, 1, 1)
        sc = score_fn(x, t)
        x0, eps = (x + s**2 * sc) / a, -s * sc
        want[j] = x0
        x = sde.mean_coef(tn).view(-1, 1, 1, 1) * x0 + sde.std(tn).view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(latent, x, rtol=1e-7, atol=1e-7)
    # reverse step k (k = 1, 2) starts at grid[steps - k] and pops the estimate made there
    torch.testing.assert_close(stored[-1], want[agg.steps - 1], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(stored[-2], want[agg.steps - 2], rtol=1e-7, atol=1e-7)
    assert (want[agg.steps - 2] - want[agg.steps - 3]).abs().max() > 1e-4  # neighbours differ


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (128, 96)])
def test_ddpm_initialisation_bound(shape):
    """Fan-average uniform variance scaling: U(-b, b), b = sqrt(3 scale / ((fan_in + fan_out) / 2))."""
    from msdiff.nn.layers import default_init_

    torch.manual_seed(0)
    w = default_init_(torch.empty(shape), scale=0.7)
    rf = shape[2] * shape[3] if len(shape) == 4 else 1
    b = math.sqrt(3 * 0.7 / ((shape[1] * rf + shape[0] * rf) / 2))
    assert w.abs().max().item() <= b and w.abs().max().item() > 0.99 * b
    assert w.var().item() == pytest.approx(b * b / 3, rel=0.05)
    assert torch.equal(default_init_(torch.empty(shape), scale=0.0), torch.zeros(shape))


# ---- the whole U-Net, written out ------------------------------------------------------------------
def _silu(v):
    return v * torch.sigmoid(v)


def _gn(v, norm):
    b = v.shape[0]
    g = v.reshape(b, 32, -1)
    vn = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
    return vn.reshape(v.shape) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


def _attention(att, x):
    """x + proj(softmax(q k^T / sqrt(C)) v) over the H*W tokens of GN(x) (one head)."""
    b, c, h, w = x.shape
    tok = _gn(x, att.norm).flatten(2).transpose(1, 2)
    q, k, v = (tok @ att.qkv.weight.T + att.qkv.bias).split(c, dim=-1)
    out = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), -1) @ v
    out = out @ att.proj_out.weight.T + att.proj_out.bias
    return x + out.transpose(1, 2).reshape(b, c, h, w)


def _unet_by_hand(net, x, label):
    """DDPM U-Net (Ho et al. 2020, App. B; score_sde's ddpm): sinusoid(999 t) -> Dense -> SiLU -> Dense;
    down levels of res blocks (+ attention) and a stride-2 conv after right/bottom padding, keeping
    every output for the skips; mid res-attn-res; up levels on cat([h, skip]) with one more res block,
    nearest x2 + conv; head conv(SiLU(GN(h)))."""
    ch = net.time_embed.ch
    half = ch // 2
    # the sinusoid is computed in float32 (as the reference) whatever the network's dtype
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    args = label.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], 1).double()
    te = net.time_embed
    temb = _silu(emb @ te.dense0.weight.T + te.dense0.bias) @ te.dense1.weight.T + te.dense1.bias
    h = net.conv_in(x)
    hs = [h]
    for level in net.down:
        for j, res in enumerate(level.res):
            h = res(h, temb)
            if level.attn is not None:
                h = _attention(level.attn[j], h)
            hs.append(h)
        if level.downsample is not None:
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), level.downsample.conv.weight, level.downsample.conv.bias, stride=2)
            hs.append(h)
    h = net.mid.res1(_attention(net.mid.attn, net.mid.res0(h, temb)), temb)
    for level in reversed(net.up):
        for res in level.res:
            h = res(torch.cat([h, hs.pop()], 1), temb)
        if level.attn is not None:
            h = _attention(level.attn, h)
        if level.upsample is not None:
            up = h.repeat_interleave(2, -2).repeat_interleave(2, -1)
            h = F.conv2d(up, level.upsample.conv.weight, level.upsample.conv.bias, padding=1)
    return F.conv2d(_silu(_gn(h, net.norm_out)), net.conv_out.weight, net.conv_out.bias, padding=1)


def test_unet_forward_matches_its_written_out_composition():
    from msdiff.nn.unet import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=4, out_channels=2, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               image_size=8, dropout=0.1).double().eval()
    with torch.no_grad():  # zero-initialised convs and unit norms would hide wiring: randomise all
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        label = torch.tensor([3.0, 700.0], dtype=torch.float64)
        torch.testing.assert_close(net(x, label), _unet_by_hand(net, x, label), rtol=1e-8, atol=1e-8)


def test_channel_statistics_by_value():
    from msdiff.guidance.losses import StatisticsLoss, channel_statistics

    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, std, gram = channel_statistics(x)
    flat = x.flatten(2)
    c = flat - flat.mean(2, keepdim=True)
    torch.testing.assert_close(mean, flat.mean(2))
    torch.testing.assert_close(gram, torch.einsum("bip,bjp->bij", c, c) / 20)
    torch.testing.assert_close(std, flat.std(2, unbiased=False))
    style = torch.rand(1, 3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = StatisticsLoss(style, weight=2.0, gram_weight=0.5)(x)
    ms, ss, gs = channel_statistics(style)
    want = 2.0 * (((mean - ms) ** 2).mean(1) + ((std - ss) ** 2).mean(1)) + 0.5 * ((gram - gs) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, want)
