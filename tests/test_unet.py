"""The DDPM U-Net: reference parameter counts, structure, initialisation, exact formulas of its
blocks, and the checkpointing / channels-last / bf16 / torch.compile switches."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_across_kernel_paths

from msdiff.nn.attention import NaiveProcessor, SDPAProcessor, SelfAttention
from msdiff.nn.layers import Downsample, Dropout, ResBlock, Upsample, keep_mask, timestep_embedding
from msdiff.nn.unet import UNet

EDGES = dict(ch=128, ch_mult=(1, 1, 2, 2), attn_resolutions=(16, 8), image_size=64)
INPAINT = dict(attn_resolutions=(16, 8, 4), image_size=128)
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)


def n_params(**kwargs) -> int:
    with torch.device("meta"):          # count without allocating or initialising 43M weights
        return sum(p.numel() for p in UNet(**kwargs).parameters())


@pytest.mark.parametrize("kwargs, expected", [
    (dict(out_channels=6), 43_481_862),
    (dict(out_channels=3), 43_479_267),
    (dict(EDGES, out_channels=6), 28_752_902),
    (dict(EDGES, out_channels=3), 28_749_443),
    (dict(INPAINT, out_channels=6), 43_481_862),
    (dict(INPAINT, out_channels=3), 43_479_267),
])
def test_reference_parameter_counts(kwargs, expected):
    assert n_params(in_channels=6, **kwargs) == expected


def test_attention_layer_names_and_mid_alias():
    with torch.device("meta"):
        net = UNet()
    names = list(net.attention_layers())
    expected = [f"down.{i}.attn.{j}" for i in (3, 4, 5) for j in (0, 1)] + ["mid.attn"] + \
               [f"up.{i}.attn" for i in (3, 4, 5)]
    assert names == expected
    assert all(isinstance(m.processor, SDPAProcessor) for m in net.attention_layers().values())


def randomize_(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised weights random values so every path contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def tiny_inputs(net: UNet, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size, generator=g)
    return x, torch.rand(batch, generator=g) * 100


def test_fresh_network_outputs_zero_and_blocks_start_as_identity():
    torch.manual_seed(0)
    net = UNet(**TINY)
    x, label = tiny_inputs(net)
    assert torch.equal(net(x, label), torch.zeros(2, 6, 8, 8))
    res = ResBlock(32, 32, temb_dim=128).eval()
    h = torch.randn(2, 32, 4, 4)
    assert torch.equal(res(h, torch.randn(2, 128)), h)
    attn = SelfAttention(32)
    assert torch.equal(attn(h), h)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.5, 700.0])
    emb = timestep_embedding(t, 64)
    half = 32
    for i in (0, 7, half - 1):
        w = 10000.0 ** (-i / (half - 1))
        torch.testing.assert_close(emb[:, i], torch.sin(t * w))
        torch.testing.assert_close(emb[:, half + i], torch.cos(t * w))


def test_downsample_is_tf_same_padding_and_upsample_is_nearest():
    down = Downsample(32)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        down.conv.weight[torch.arange(32), torch.arange(32), 0, 0] = 1.0   # delta at kernel (0, 0)
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(down(x), x[:, :, ::2, ::2])  # no padding on top/left, as "SAME"
    up = Upsample(32)
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.bias.zero_()
        up.conv.weight[torch.arange(32), torch.arange(32), 1, 1] = 1.0     # centre delta
    torch.testing.assert_close(up(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))


@pytest.mark.parametrize("num_heads", [1, 2])
def test_attention_block_matches_written_out_formula(num_heads):
    torch.manual_seed(0)
    c, h, w = 64, 3, 5
    attn = randomize_(SelfAttention(c, num_heads))
    x = torch.randn(2, c, h, w)
    hn = F.group_norm(x, 32, attn.norm.weight, attn.norm.bias, eps=1e-6).flatten(2)   # (B, C, N)
    wq, wk, wv = attn.qkv.weight.chunk(3)
    bq, bk, bv = attn.qkv.bias.chunk(3)
    q, k, v = (torch.einsum("oc,bcn->bon", W, hn) + b[:, None] for W, b in ((wq, bq), (wk, bk), (wv, bv)))
    d = c // num_heads
    heads = []
    for i in range(num_heads):
        qi, ki, vi = (z[:, i * d:(i + 1) * d] for z in (q, k, v))
        weights = torch.softmax(torch.einsum("bcn,bcm->bnm", qi, ki) / math.sqrt(d), dim=-1)
        heads.append(torch.einsum("bnm,bcm->bcn", weights, vi))
    out = torch.einsum("oc,bcn->bon", attn.proj_out.weight, torch.cat(heads, 1)) + attn.proj_out.bias[:, None]
    torch.testing.assert_close(attn(x), x + out.reshape(2, c, h, w), atol=1e-5, rtol=1e-5)
    attn.processor = NaiveProcessor()
    torch.testing.assert_close(attn(x), x + out.reshape(2, c, h, w), atol=1e-5, rtol=1e-5)


def test_examples_do_not_mix_and_noise_label_matters():
    torch.manual_seed(0)
    net = randomize_(UNet(**TINY)).eval()
    x, label = tiny_inputs(net, batch=3)
    out = net(x, label)
    # a batch of 3 and a batch of 1 take different float32 kernel paths (CONTRIBUTING.md, "Tolerances")
    assert_close_across_kernel_paths(out[1:2], net(x[1:2], label[1:2]), net)
    assert (out - net(x, label + 1.0)).abs().max() > 1e-3


def test_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain = randomize_(UNet(**TINY, dropout=0.3))
    ckpt = UNet(**TINY, dropout=0.3, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, label = tiny_inputs(plain)
    results = []
    for net in (plain, ckpt):
        torch.manual_seed(123)                 # same dropout masks; recomputation must reuse them
        out = net(x, label)
        out.square().mean().backward()
        results.append((out, [p.grad for p in net.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, atol=0, rtol=0)


def test_channels_last_and_bf16_autocast_agree():
    torch.manual_seed(0)
    net = randomize_(UNet(**TINY)).eval()
    x, label = tiny_inputs(net)
    with torch.no_grad():
        ref = net(x, label)
        net_cl = net.to(memory_format=torch.channels_last)
        out_cl = net_cl(x.to(memory_format=torch.channels_last), label)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = net(x, label)
    scale = ref.abs().max()
    assert (out_cl - ref).abs().max() <= 1e-5 * scale           # fp32, only the layout differs
    assert (out_bf16.float() - ref).abs().max() <= 5e-2 * scale  # bf16 has an 8-bit mantissa
    assert (out_bf16.float() - ref).abs().max() > 0              # autocast really ran in bf16


@pytest.mark.slow
def test_torch_compile_agrees():
    """The U-Net compiles without graph breaks (TorchDynamo, fullgraph) and the traced graph computes
    what the eager network does. The AOT-eager backend runs dynamo and AOTAutograd but no C++
    code generation: inductor's cold build (~30 s on 2 cores) tests torch, not this network."""
    torch.manual_seed(0)
    net = randomize_(UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,), image_size=4)).eval()
    x, label = tiny_inputs(net)
    with torch.no_grad():
        ref = net(x, label)
        out = torch.compile(net, backend="aot_eager", fullgraph=True)(x, label)
    # AOTAutograd's decompositions reorder float32 sums: the network's kernel-path round-off
    assert_close_across_kernel_paths(out, ref, net)


@pytest.mark.parametrize("kwargs, key", [
    (dict(image_size=100), "image_size"),
    (dict(attn_resolutions=(20, 7)), "attn_resolutions"),
    (dict(ch=48), "channels"),
    (dict(num_heads=5), "num_heads"),
    (dict(num_res_blocks=0), "num_res_blocks"),
])
def test_bad_configuration_raises_one_line_value_error(kwargs, key):
    with torch.device("meta"), pytest.raises(ValueError, match=key) as info:
        UNet(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_input_shapes_raise():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match="x: expected shape"):
        net(torch.zeros(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="noise_label"):
        net(torch.zeros(2, 6, 8, 8), torch.zeros(2, 1))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_rate_on_both_halves_of_each_draw(p):
    # two mask elements come from one 32-bit draw: both halves must keep at rate 1 - p_q
    torch.manual_seed(0)
    keep = keep_mask(torch.empty(2_000_000), p).float()
    rate = 1 - round(p * 2**15) / 2**15
    tol = 5 * math.sqrt(rate * (1 - rate) / 1_000_000)          # 5 binomial standard deviations
    for half in (keep[0::2], keep[1::2]):
        assert abs(half.mean().item() - rate) < tol
    # neighbours independent: P(both kept) = rate^2
    assert abs((keep[0::2] * keep[1::2]).mean().item() - rate**2) < tol


def test_dropout_is_inverted_masking_with_the_layout_of_its_input():
    drop = Dropout(0.1)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(7)
    out = drop(x)
    torch.manual_seed(7)
    keep = keep_mask(x, 0.1)
    assert keep.stride() == x.stride()
    scale = 1 / (1 - round(0.1 * 2**15) / 2**15)
    torch.testing.assert_close(out, x.detach() * keep * scale, rtol=0, atol=0)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, keep.float() * scale, rtol=0, atol=0)
    drop.eval()
    assert drop(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)
