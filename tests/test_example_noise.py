"""Per-example noise streams (msdiff.utils.ExampleNoise): SplitMix64 against its reference outputs,
the documented counter scheme and Box-Muller by hand, batch- and device-independence, and the
distribution of the draws."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from msdiff.utils import ExampleNoise, example_noise, mix_seed, rand, randn, randn_like, splitmix64

M = 2**64
GOLDEN, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def mix(z: int) -> int:
    """SplitMix64's output function on Python integers (an independent implementation)."""
    z %= M
    z = ((z ^ (z >> 30)) * M1) % M
    z = ((z ^ (z >> 27)) * M2) % M
    return z ^ (z >> 31)


def signed(z: int) -> int:
    return z - M if z >= 2**63 else z


def python_words(key: int, call: int, n: int) -> list[int]:
    """Call `call` (1, 2, ...) of a row keyed `key`: the class doc's scheme, in unsigned integers."""
    seed = mix(key + call * GOLDEN)
    return [mix(seed + k * GOLDEN) for k in range(1, n + 1)]


def test_splitmix64_gives_the_reference_generator_outputs():
    """The first outputs of Vigna's splitmix64.c seeded with 1234567."""
    state = torch.tensor([signed((1234567 + k * GOLDEN) % M) for k in range(1, 6)])
    assert [int(w) % M for w in splitmix64(state)] == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                                       4593380528125082431, 16408922859458223821]


def test_words_follow_the_counter_scheme_call_by_call():
    keys = [0, 3, 2**63 - 1]
    noise = ExampleNoise(keys)
    for call in (1, 2, 3):
        got = noise.words((3, 2, 3))
        assert noise.calls == call
        assert [[int(w) % M for w in row] for row in got] == [python_words(k, call, 6) for k in keys]


def test_normals_are_box_muller_of_the_words_and_uniforms_their_top_bits():
    key, n = 12345, 5
    w = python_words(key, 1, 3)  # 3 words give 5 normals: 3 cosines, then 2 sines
    r = [math.sqrt(-2 * math.log(((v >> 32) + 1) * 2.0**-32)) for v in w]
    theta = [2 * math.pi * (v & 0xFFFFFFFF) * 2.0**-32 for v in w]
    expected = [ri * math.cos(t) for ri, t in zip(r, theta)] + [ri * math.sin(t) for ri, t in zip(r, theta)][:2]
    got = ExampleNoise([key]).randn((1, n), torch.float64)
    torch.testing.assert_close(got[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    got32 = ExampleNoise([key]).randn((1, n), torch.float32)
    torch.testing.assert_close(got32[0], torch.tensor(expected, dtype=torch.float32), rtol=2e-6, atol=2e-6)
    u = ExampleNoise([key]).rand((1, 4), torch.float32)[0]
    assert u.tolist() == [(v >> 40) * 2.0**-24 for v in python_words(key, 1, 4)]
    u64 = ExampleNoise([key]).rand((1, 4), torch.float64)[0]
    assert u64.tolist() == [(v >> 11) * 2.0**-53 for v in python_words(key, 1, 4)]


def test_a_row_does_not_depend_on_the_batch_it_is_drawn_in():
    """sample.py's guarantee: condition i's draw is the same whatever the batch size."""
    both = example_noise(0, [5, 6], 1, "cpu")
    alone = example_noise(0, [6], 1, "cpu")
    assert torch.equal(both.words((2, 48))[1:], alone.words((1, 48)))  # the integer words: exactly
    # The floats: a row sits at another offset of the batch tensor, so ATen may take a vector or the
    # scalar tail loop for its log / sqrt / cos / sin, each within 1 ulp: Box-Muller's
    # r cos(theta) with |z| <= 6.66 agrees to a few ulp of 6.66 (4 eps32 x 6.66 = 3.2e-6).
    z_atol = {torch.float32: 4 * torch.finfo(torch.float32).eps * 6.66, torch.float64: 4 * torch.finfo(torch.float64).eps * 6.66}
    for _ in range(3):  # call after call
        two, one = randn((2, 3, 4, 4), both), randn((1, 3, 4, 4), alone)
        torch.testing.assert_close(two[1:], one, rtol=0, atol=z_atol[torch.float32])
        assert not torch.allclose(two[0], two[1])
    x = torch.zeros(2, 7, dtype=torch.float64)
    torch.testing.assert_close(randn_like(x, example_noise(0, [5, 6], 9, "cpu"))[1:],
                               randn_like(x[:1], example_noise(0, [6], 9, "cpu")), rtol=0, atol=z_atol[torch.float64])
    # uniforms are the words' top bits times 2^-p: exact in any path
    assert torch.equal(rand((2, 8), example_noise(1, [5, 6], 0, "cpu"))[1:], rand((1, 8), example_noise(1, [6], 0, "cpu")))


def test_draws_are_standard_normal_and_uniform_and_rows_uncorrelated():
    z = ExampleNoise(range(8)).randn((8, 40_001), torch.float32).double()
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3
    assert abs(float(z.mean())) < 4 / math.sqrt(z.numel()) and abs(float(z.var()) - 1) < 4 * math.sqrt(2 / z.numel())
    corr = torch.corrcoef(z)
    assert (corr - torch.eye(8, dtype=torch.float64)).abs().max() < 4 / math.sqrt(z.shape[1])  # rows independent
    halves = torch.corrcoef(torch.stack([z[:, :20_000].flatten(), z[:, 20_001:].flatten()]))[0, 1]
    assert abs(float(halves)) < 4 / math.sqrt(8 * 20_000)  # a cosine and its pair's sine are uncorrelated
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        u = ExampleNoise(range(4)).rand((4, 50_000), dtype)
        assert u.dtype == dtype and float(u.min()) >= 0 and float(u.max()) < 1
        assert stats.kstest(u.double().flatten().numpy(), "uniform").pvalue > 1e-3 or dtype == torch.bfloat16


def test_one_row_per_key_or_one_line_error():
    noise = ExampleNoise([1, 2])
    with pytest.raises(ValueError, match=r"ExampleNoise: expected a shape with one row per key \(2\), got \(3, 4\)"):
        noise.randn((3, 4))
    with pytest.raises(ValueError, match="at least one key"):
        ExampleNoise([])
    assert ExampleNoise([-1]).keys.tolist() == [2**63 - 1]  # keys modulo 2^63, as mix_seed
    assert example_noise(3, [4], 5, "cpu").keys.tolist() == [mix_seed(3, 4, 5)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_same_noise_on_gpu_and_cpu():
    cpu, gpu = ExampleNoise([7, 8]), ExampleNoise([7, 8], "cuda")
    assert torch.equal(cpu.words((2, 1000)), gpu.words((2, 1000)).cpu())
    torch.testing.assert_close(cpu.randn((2, 3, 8, 8)), gpu.randn((2, 3, 8, 8)).cpu(), rtol=1e-5, atol=1e-5)
