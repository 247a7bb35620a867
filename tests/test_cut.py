"""CUT networks (msdiff.cut.networks) and the PatchNCE / GAN losses (msdiff.cut.losses)."""
import math

import pytest
import torch
import torch.nn.functional as F_

from msdiff.cut.losses import gan_loss, lsgan_loss, nonsaturating_gan_loss, patch_nce_loss
from msdiff.cut.networks import BlurDownsample, BlurUpsample, PatchDiscriminator, PatchSampleMLP, ResnetGenerator
from msdiff.utils import make_generator

NCE_LAYERS = (0, 4, 8, 12, 16)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_reference_parameter_counts_and_buffers():
    G, D, F = ResnetGenerator(), PatchDiscriminator(), PatchSampleMLP(in_channels=(3, 128, 256, 256, 256), nc=256)
    assert n_params(G) == 11_378_179
    assert n_params(D) == 2_764_737
    assert n_params(F) == 560_384
    assert G.nce_channels(NCE_LAYERS) == (3, 128, 256, 256, 256)
    # the fixed blur kernels are buffers, not trainable parameters
    assert not any("kernel" in name for name, _ in G.named_parameters())
    assert sum("kernel" in name for name, _ in G.named_buffers()) == 4
    assert sum("kernel" in name for name, _ in D.named_buffers()) == 3


def test_discriminator_30x30_at_256():
    D = PatchDiscriminator()
    with torch.no_grad():
        assert D(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_reference_init():
    G = ResnetGenerator()
    conv = G.model[8]  # 128 -> 256, 3x3
    assert torch.all(conv.bias == 0)
    fan_in, fan_out = 128 * 9, 256 * 9
    expected_std = 0.02 * math.sqrt(2.0 / (fan_in + fan_out))
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.02
    F = PatchSampleMLP()
    assert all(torch.all(m.bias == 0) for m in F.modules() if isinstance(m, torch.nn.Linear))


def test_blur_kernels():
    down, up = BlurDownsample(2), BlurUpsample(2)
    ones = torch.ones(1, 2, 8, 8)
    torch.testing.assert_close(down(ones), torch.ones(1, 2, 4, 4))  # normalised: constants stay constant
    torch.testing.assert_close(up(ones), torch.ones(1, 2, 16, 16))
    # an impulse at an even interior location lands on one output pixel with weight 4/16 (centre tap)
    x = torch.zeros(1, 2, 8, 8)
    x[..., 4, 4] = 1.0
    y = down(x)
    assert y[0, 0, 2, 2].item() == pytest.approx(4 / 16)
    assert y[0, 0, 2, 1].item() == 0.0 and y.sum().item() == pytest.approx(2 * 0.25)  # 4x fewer pixels
    # the transposed blur spreads an impulse over the outer product of [1,3,3,1]/4 (sum 4)
    z = torch.zeros(1, 2, 6, 6)
    z[..., 3, 3] = 1.0
    w = up(z)[0, 0]
    a = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 4
    torch.testing.assert_close(w[5:9, 5:9], a[:, None] * a[None, :])
    assert w.sum().item() == pytest.approx(4.0)


def test_generator_shapes_and_nce_taps():
    torch.manual_seed(0)
    G = ResnetGenerator(ngf=8, n_blocks=9)
    x = torch.randn(2, 3, 32, 32)
    assert G(x).shape == (2, 3, 32, 32)
    assert G(x).abs().max() <= 1.0
    feats = G(x, layers=NCE_LAYERS, encode_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 3, 38, 38), (2, 16, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8),
                                              (2, 32, 8, 8)]
    torch.testing.assert_close(feats[0], F_.pad(x, (3, 3, 3, 3), mode="reflect"))  # layer 0: padded input
    h = x
    for m in G.model[:4]:
        h = m(h)
    torch.testing.assert_close(feats[1], G.model[4](h))  # layer 4: first down conv, before its norm
    # tap 16 = output of res block 5 = input of res block 6; the encoder stops there
    h = x
    for m in G.model[:17]:
        h = m(h)
    torch.testing.assert_close(feats[4], h)
    with pytest.raises(ValueError, match="layers"):
        G(x, layers=(0, 99), encode_only=True)


def test_patch_sample_mlp_locations_and_norm():
    torch.manual_seed(0)
    F = PatchSampleMLP(in_channels=(3, 5), nc=16, init_gain=1.0)  # norms >> the 1e-7 guard
    feats = [torch.randn(2, 3, 6, 6), torch.randn(2, 5, 3, 3)]
    z, ids = F(feats, num_patches=10, generator=make_generator(7))
    assert [tuple(t.shape) for t in z] == [(20, 16), (18, 16)]  # S = min(10, H*W)
    assert len(set(ids[0].tolist())) == 10 and sorted(ids[1].tolist()) == list(range(9))
    torch.testing.assert_close(z[0].norm(dim=1), torch.ones(20))
    # image-major rows: row b*S + s embeds feature map b at flat location ids[s]
    b, s = 1, 3
    loc = ids[0][s].item()
    f = feats[0][b, :, loc // 6, loc % 6]
    e = F.mlps[0](f)
    torch.testing.assert_close(z[0][b * 10 + s], e / e.norm())
    # same generator seed -> same ids; passing ids back reuses the locations
    _, ids2 = F(feats, num_patches=10, generator=make_generator(7))
    assert all(torch.equal(a, c) for a, c in zip(ids, ids2))
    z3, ids3 = F([t + 1 for t in feats], patch_ids=ids)
    assert ids3[0] is ids[0] and not torch.allclose(z3[0], z[0])


def _orthonormal(n, c, seed=0):
    g = make_generator(seed)
    qmat, _ = torch.linalg.qr(torch.randn(c, c, generator=g))
    return qmat[:n].contiguous()


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_patch_nce_identical_orthonormal_hand_computed(tau):
    B, S, C = 2, 4, 16
    q = _orthonormal(B * S, C)
    loss = patch_nce_loss(q, q.clone(), batch_size=B, tau=tau)
    # positive logit 1/tau, S-1 orthogonal negatives at 0, the masked self-comparison at -10/tau
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (S - 1) + math.exp(-10 / tau)))
    assert loss.shape == (B * S,)
    torch.testing.assert_close(loss, torch.full((B * S,), expected), rtol=1e-5, atol=1e-6)
    # minibatch negatives: B*S - 1 orthogonal negatives
    loss_mb = patch_nce_loss(q, q.clone(), batch_size=B, tau=tau, negatives_from_minibatch=True)
    expected_mb = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (B * S - 1) + math.exp(-10 / tau)))
    torch.testing.assert_close(loss_mb, torch.full((B * S,), expected_mb), rtol=1e-5, atol=1e-6)


def test_patch_nce_matches_per_patch_formula():
    g = make_generator(1)
    B, S, C, tau = 3, 5, 8, 0.07
    q = F_.normalize(torch.randn(B * S, C, generator=g), dim=1)
    k = F_.normalize(torch.randn(B * S, C, generator=g), dim=1)
    loss = patch_nce_loss(q, k, batch_size=B, tau=tau)
    for i in range(B * S):
        b = i // S
        negs = [j for j in range(b * S, (b + 1) * S) if j != i]
        logits = torch.stack([q[i] @ k[i]] + [q[i] @ k[j] for j in negs] + [torch.tensor(-10.0)]) / tau
        assert loss[i].item() == pytest.approx(-torch.log_softmax(logits, 0)[0].item(), rel=1e-5)


def test_patch_nce_keys_detached_and_per_image_negatives():
    g = make_generator(2)
    B, S, C = 2, 6, 8
    q = F_.normalize(torch.randn(B * S, C, generator=g), dim=1).requires_grad_(True)
    k = F_.normalize(torch.randn(B * S, C, generator=g), dim=1).requires_grad_(True)
    patch_nce_loss(q, k, batch_size=B).mean().backward()
    assert k.grad is None
    # d/dq_i of the mean InfoNCE: (softmax(logits_i) . [k_i, k_j..] - k_i) / (tau N), self term masked out
    tau, N = 0.07, B * S
    want = torch.zeros_like(q)
    for i in range(N):
        img = i // S
        keys = torch.stack([k[i]] + [k[j] for j in range(img * S, (img + 1) * S) if j != i]).detach()
        p = torch.softmax(torch.cat([keys @ q[i].detach(), torch.tensor([-10.0])]) / tau, 0)[:-1]
        want[i] = (p @ keys - k[i].detach()) / (tau * N)
    torch.testing.assert_close(q.grad, want, rtol=1e-4, atol=1e-6)
    # changing image 1's keys leaves image 0's losses unchanged (no cross-image negatives)...
    k2 = k.detach().clone()
    k2[S:] = F_.normalize(torch.randn(S, C, generator=g), dim=1)
    l1, l2 = patch_nce_loss(q, k, batch_size=B), patch_nce_loss(q, k2, batch_size=B)
    torch.testing.assert_close(l1[:S], l2[:S])
    assert not torch.allclose(l1[S:], l2[S:])
    # ...but not with minibatch negatives
    m1 = patch_nce_loss(q, k, batch_size=B, negatives_from_minibatch=True)
    m2 = patch_nce_loss(q, k2, batch_size=B, negatives_from_minibatch=True)
    assert not torch.allclose(m1[:S], m2[:S])
    with pytest.raises(ValueError, match="batch_size"):
        patch_nce_loss(q, k, batch_size=5)


def test_gan_losses():
    pred = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    torch.testing.assert_close(lsgan_loss(pred, True), torch.tensor([(1 + 0 + 1 + 4) / 4, 0.25]))
    torch.testing.assert_close(lsgan_loss(pred, False), torch.tensor([(0 + 1 + 4 + 1) / 4, 0.25]))
    expected_real = -torch.log(torch.sigmoid(pred)).flatten(1).mean(1)
    expected_fake = -torch.log(1 - torch.sigmoid(pred)).flatten(1).mean(1)
    torch.testing.assert_close(nonsaturating_gan_loss(pred, True), expected_real)
    torch.testing.assert_close(nonsaturating_gan_loss(pred, False), expected_fake)
    torch.testing.assert_close(gan_loss("lsgan", pred, True), lsgan_loss(pred, True))
    with pytest.raises(ValueError, match="gan_mode"):
        gan_loss("wgan", pred, True)
