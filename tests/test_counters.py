"""The counter-based kernels: the documented 64-bit words, uniforms strictly inside (0, 1), finite transforms."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import scipy.stats
import torch

from lightning_heavytail import sample_stable
from lightning_heavytail._counters import (
    COMPILE_MIN_DRAWS,
    cms_transform,
    float32_uniforms,
    float64_uniform,
    kanter_transform,
    uniform_pair,
)

P_MIN = 1e-4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mix64_reference(z: int) -> int:
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def _counter_bits_reference(k1: int, k2: int, counter: int, word: int = 0) -> int:
    """SplitMix64 output ``counter + 1`` of state k1 (Vigna's C reference), finalized again after xor with k2."""
    mask = (1 << 64) - 1
    k2 = k2 ^ (0xA4093822299F31D0 if word else 0)
    return _mix64_reference(_mix64_reference((k1 + (counter + 1) * 0x9E3779B97F4A7C15) & mask) ^ (k2 & mask))


def _check_counter_uniforms(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], key: tuple[int, int],
                            count: int) -> None:
    k1, k2 = (torch.tensor(word, dtype=torch.int64) for word in key)
    u_v, u_w = fn(k1, k2, torch.arange(count), torch.float32)
    # head, a vector-width boundary, and the tail of a length that is not a multiple of the vector width
    for i in [0, 1, 2, 7, 8, 9, 15, 16, count // 2, count - 9, count - 2, count - 1]:
        z = _counter_bits_reference(key[0] % (1 << 64), key[1] % (1 << 64), i)
        assert u_v[i].item() == ((z >> 41) + 0.5) * 2.0**-23, i
        assert u_w[i].item() == ((z & 0x7FFFFF) + 0.5) * 2.0**-23, i
    f1, f2 = fn(k1, k2, torch.arange(count), torch.float64)
    for i in [0, 1, count - 1]:
        for word, u in enumerate((f1, f2)):
            z = _counter_bits_reference(key[0] % (1 << 64), key[1] % (1 << 64), i, word)
            assert u[i].item() == ((z >> 12) + 0.5) * 2.0**-52, (i, word)


@pytest.mark.parametrize("key", [(0, 0), (12345, -7), (-1234567890123456789, 99), ((1 << 63) - 1, -(1 << 63))])
def test_counter_uniforms_are_the_documented_splitmix64_words(key: tuple[int, int]) -> None:
    _check_counter_uniforms(uniform_pair, key, 1003)


def test_counter_uniforms_are_uniform_independent_and_strictly_inside_the_unit_interval() -> None:
    u_v, u_w = uniform_pair(torch.tensor(2024), torch.tensor(7), torch.arange(1 << 20), torch.float32)
    for u in (u_v, u_w):
        k = u.double() * 2.0**23 - 0.5  # on the grid (k + 0.5) * 2**-23, k in [0, 2**23)
        assert bool((k == k.round()).all()) and float(k.min()) >= 0 and float(k.max()) < 2**23
        assert scipy.stats.kstest(u.numpy(), "uniform").pvalue > P_MIN
    # joint uniformity of the pair on a 32 x 32 grid (chi-square), and of consecutive V's
    for a, b in [(u_v, u_w), (u_v[:-1], u_v[1:])]:
        cells = (a * 32).long() * 32 + (b * 32).long()
        counts = torch.bincount(cells, minlength=1024).numpy()
        assert scipy.stats.chisquare(counts).pvalue > P_MIN


def test_no_uniform_is_zero_or_one_so_no_draw_sits_on_an_atom() -> None:
    # The extreme words (all zero bits, all one bits) give the extreme uniforms: strictly inside (0, 1). Before, a
    # uniform of exactly 0 (probability 2**-24) was clamped to the smallest float, a 13-sigma Gaussian draw.
    extremes = torch.tensor([0, -1], dtype=torch.int64)
    for u in (*float32_uniforms(extremes), float64_uniform(extremes)):
        assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    low, _ = float32_uniforms(extremes)
    assert float(low.min()) == 2.0**-24 and float(low.max()) == 1 - 2.0**-24
    # so alpha = 2 draws (2 sin(V) sqrt(W)) are bounded by 2 sqrt(24 log 2), about 5.8 standard deviations of N(0, 2)
    bound = 2 * math.sqrt(-math.log(2.0**-24))
    x = sample_stable(2.0, 1 << 22, generator=gen(11))
    assert float(x.abs().max()) <= bound
    assert float(x.abs().max()) > 0.7 * bound  # the tail is still reached




@pytest.mark.slow
def test_compiled_counter_uniforms_are_the_documented_words() -> None:
    compiled = torch.compile(uniform_pair, dynamic=True)
    _check_counter_uniforms(compiled, (-1234567890123456789, 42), COMPILE_MIN_DRAWS + 3)




@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_endpoint_uniforms_give_finite_draws(dtype: torch.dtype) -> None:
    # The guards, at the extreme uniforms a draw can meet: (k + 0.5) * 2**-23 in float32 and (k + 0.5) * 2**-52 in
    # float64, so from 2**-24 (2**-53) up to 1 - 2**-24 (1 - 2**-53).
    bits = 24 if dtype == torch.float32 else 53
    edges = torch.tensor([2.0**-bits, 2.0**-24, 0.5, 1 - 2.0**-24, 1 - 2.0**-bits], dtype=dtype)
    assert float(edges.max()) < 1.0
    u_v, u_w = torch.meshgrid(edges, edges, indexing="ij")
    for alpha in [0.5, 0.51, 0.75, 0.99, 1.0, 1.01, 1.5, 1.99, 2.0]:
        x = cms_transform(u_v.ravel(), u_w.ravel(), alpha)
        assert bool(torch.isfinite(x).all()), (alpha, x)
        if alpha < 1.0:
            a = kanter_transform(u_v.ravel(), u_w.ravel(), alpha)
            assert bool(torch.isfinite(a).all() and (a > 0).all()), (alpha, a)


