"""Tests of the alpha-stable sampler against scipy.stats references.

Distribution tests use fixed seeds and reject only at p < P_MIN, so a correct sampler fails a given test with
probability below 1e-4 before the seed is fixed (and then never). Kolmogorov-Smirnov statistics against
scipy.stats.levy_stable are taken over a grid of the sample's own quantiles: the supremum over any set of points is at
most the full KS statistic, so the Kolmogorov p-value of the grid statistic is conservative, and the slow
levy_stable.cdf is evaluated at ~200 points instead of at every draw.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import scipy.stats
import torch

from lightning_heavytail import derive_seed, sample_positive_stable, sample_stable
from lightning_heavytail import stable as stable_module
from lightning_heavytail._counters import COMPILE_ENV, choose_path, compile_failed, counter_draws

P_MIN = 1e-4
ALPHAS = [0.5, 1.0, 1.5, 1.8, 2.0]
LARGE = stable_module.COMPILE_MIN_DRAWS  # from here on, draws go through the compiled kernel where available


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid_ks_pvalue(sample: torch.Tensor | np.ndarray, cdf: Callable[[np.ndarray], np.ndarray]) -> float:
    """Conservative one-sample KS p-value: the statistic is taken at ~200 quantiles of the sample (and its tails)."""
    x = np.sort(np.asarray(sample, dtype=np.float64).ravel())
    n = x.size
    probs = np.concatenate([[1e-4, 1e-3], np.linspace(0.005, 0.995, 199), [1 - 1e-3, 1 - 1e-4]])
    grid = np.unique(x[(probs * (n - 1)).astype(np.int64)])
    reference = np.asarray(cdf(grid), dtype=np.float64)
    assert np.all(np.isfinite(reference))
    right = np.searchsorted(x, grid, side="right") / n  # F_n(t)
    left = np.searchsorted(x, grid, side="left") / n  # F_n(t-)
    d = max(np.abs(right - reference).max(), np.abs(left - reference).max())
    return float(scipy.stats.kstwo.sf(d, n))


def stable_cdf(alpha: float, scale: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    # beta = 0: S0 and S1 coincide, so the module-level parameterization does not matter here.
    return lambda x: scipy.stats.levy_stable.cdf(x, alpha, 0.0, scale=scale)


@pytest.fixture
def no_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(COMPILE_ENV, "0")


@pytest.fixture
def levy_stable_s1() -> Iterator[None]:
    previous = scipy.stats.levy_stable.parameterization
    scipy.stats.levy_stable.parameterization = "S1"
    try:
        yield
    finally:
        scipy.stats.levy_stable.parameterization = previous


# ---------------------------------------------------------------------------------------------------- the law


@pytest.mark.parametrize("alpha", ALPHAS)
def test_ks_against_scipy_levy_stable(alpha: float) -> None:
    x = sample_stable(alpha, 200_000, generator=_gen(1))
    assert grid_ks_pvalue(x, stable_cdf(alpha)) > P_MIN


@pytest.mark.parametrize("alpha", [0.7, 1.25, 1.75])
def test_ks_against_scipy_levy_stable_other_alphas(alpha: float) -> None:
    x = sample_stable(alpha, 200_000, generator=_gen(2))
    assert grid_ks_pvalue(x, stable_cdf(alpha)) > P_MIN


def test_ks_has_power_against_a_wrong_alpha() -> None:
    # The same machinery rejects a nearby law, so the passes above mean something.
    x = sample_stable(1.5, 200_000, generator=_gen(3))
    assert grid_ks_pvalue(x, stable_cdf(1.6)) < 1e-6


@pytest.mark.parametrize("alpha", ALPHAS)
def test_ks_two_sample_against_scipy_rvs(alpha: float) -> None:
    ours = sample_stable(alpha, 100_000, generator=_gen(4)).numpy()
    theirs = scipy.stats.levy_stable.rvs(alpha, 0.0, size=100_000, random_state=np.random.default_rng(4))
    assert scipy.stats.ks_2samp(ours, theirs).pvalue > P_MIN


@pytest.mark.parametrize("scale", [1.0, 0.3, 7.0])
def test_alpha_two_is_gaussian_with_variance_two_scale_squared(scale: float) -> None:
    x = sample_stable(2.0, 1_000_000, scale=scale, generator=_gen(5)).double().numpy()
    assert scipy.stats.kstest(x, scipy.stats.norm(0.0, math.sqrt(2.0) * scale).cdf).pvalue > P_MIN
    # and it is not the N(0, scale^2) of the authors' code
    assert scipy.stats.kstest(x, scipy.stats.norm(0.0, scale).cdf).pvalue < 1e-6


@pytest.mark.parametrize("scale", [1.0, 0.3, 7.0])
def test_alpha_one_is_cauchy(scale: float) -> None:
    x = sample_stable(1.0, 1_000_000, scale=scale, generator=_gen(6)).double().numpy()
    assert scipy.stats.kstest(x, scipy.stats.cauchy(0.0, scale).cdf).pvalue > P_MIN


@pytest.mark.parametrize("alpha", ALPHAS)
def test_sum_stability(alpha: float) -> None:
    # X1 + X2 has the law of 2**(1/alpha) X.
    x = sample_stable(alpha, (3, 200_000), generator=_gen(7)).double()
    summed = (x[0] + x[1]) / 2.0 ** (1.0 / alpha)
    assert scipy.stats.ks_2samp(summed.numpy(), x[2].numpy()).pvalue > P_MIN
    if alpha < 2.0:
        # power check: the Gaussian normalisation sqrt(2) is rejected for a heavy-tailed law
        assert scipy.stats.ks_2samp((x[0] + x[1]).numpy() / math.sqrt(2.0), x[2].numpy()).pvalue < 1e-6


@pytest.mark.parametrize(("alpha", "scale"), [(0.5, 0.01), (1.5, 3.0), (1.8, 0.2)])
def test_scale(alpha: float, scale: float) -> None:
    scaled = sample_stable(alpha, 200_000, scale=scale, generator=_gen(8))
    assert grid_ks_pvalue(scaled, stable_cdf(alpha, scale)) > P_MIN
    assert grid_ks_pvalue(scaled, stable_cdf(alpha, 1.0)) < 1e-6
    # and the scale multiplies the scale-1 draws of the same seed
    unit = sample_stable(alpha, 200_000, generator=_gen(8))
    torch.testing.assert_close(scaled, unit * scale)


def test_float64_path() -> None:
    x = sample_stable(1.5, 200_000, generator=_gen(9), dtype=torch.float64)
    assert x.dtype == torch.float64
    assert bool(torch.isfinite(x).all())
    # computed in float64, not float32 cast up
    assert bool((x.float().double() != x).any())
    assert grid_ks_pvalue(x, stable_cdf(1.5)) > P_MIN


def test_shape_and_dtype() -> None:
    assert sample_stable(1.5, (2, 3, 4), generator=_gen(0)).shape == (2, 3, 4)
    assert sample_stable(1.5, 7, generator=_gen(0)).shape == (7,)
    assert sample_stable(1.5, torch.Size([5, 0]), generator=_gen(0)).shape == (5, 0)
    assert sample_stable(1.5, 3, generator=_gen(0), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_stream_keys_have_128_bits_and_no_step_repeats_another_over_300k_steps() -> None:
    # Before, the CPU generator kept 32 bits of the seed: over 300k steps of one parameter some steps drew exactly the
    # noise of an earlier one. Every step's first draws must differ.
    from lightning_heavytail.stable import derive_key

    keys = torch.tensor([derive_key(0, step, "hidden.weight") for step in range(300_000)], dtype=torch.int64)
    assert torch.unique(keys, dim=0).shape[0] == keys.shape[0]
    assert torch.unique(keys[:, 0]).numel() == keys.shape[0]  # each 64-bit word alone is already distinct
    draws = counter_draws("stable", keys[:, :1], keys[:, 1:], torch.arange(4), 1.8, torch.float32)
    assert torch.unique(draws, dim=0).shape[0] == keys.shape[0]


def test_a_block_of_a_stream_is_the_same_slice_of_the_whole_stream_on_both_kernels() -> None:
    from lightning_heavytail.stable import derive_key, stable_at

    key = derive_key(5, 1, "w")
    whole = stable_at(1.7, key, range(5000), path="eager")
    assert torch.equal(whole[1234:3210], stable_at(1.7, key, range(1234, 3210), path="eager"))
    scattered = torch.tensor([4999, 0, 17, 17, 2500])
    assert torch.equal(whole[scattered], stable_at(1.7, key, scattered, path="eager"))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.8])
def test_large_tensors_eager_path_law(alpha: float, no_compile: None) -> None:
    x = sample_stable(alpha, LARGE + 1, generator=_gen(10))
    assert grid_ks_pvalue(x, stable_cdf(alpha)) > P_MIN


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_path_agrees_with_eager_path_to_rounding(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    shape = (1024, 1024 + 3)  # >= 2**20 elements, not a multiple of the vector width
    for alpha in (0.5, 1.0, 1.5, 1.8, 2.0):
        monkeypatch.setenv(COMPILE_ENV, "1")
        assert choose_path(math.prod(shape), "cpu") == "compiled"
        compiled = sample_stable(alpha, shape, generator=_gen(13), dtype=dtype)
        assert not compile_failed
        monkeypatch.setenv(COMPILE_ENV, "0")
        assert choose_path(math.prod(shape), "cpu") == "eager"
        eager = sample_stable(alpha, shape, generator=_gen(13), dtype=dtype)
        assert compiled.dtype == eager.dtype == dtype
        # the same formula, rounded differently by the fused kernel: equal to float rounding, not bitwise
        torch.testing.assert_close(compiled, eager, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0.0)


@pytest.mark.slow
def test_compiled_blocks_are_slices_of_the_compiled_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a sharded run relies on: on one kernel, a block (range or scattered indices) of a stream is bitwise the
    # slice of the whole, whatever its length and offset (vector-width tails included).
    from lightning_heavytail.stable import derive_key, stable_at

    monkeypatch.setenv(COMPILE_ENV, "1")
    key = derive_key(9, 3, "big")
    for dtype in (torch.float32, torch.float64):
        whole = stable_at(1.75, key, range(LARGE + 5), dtype=dtype, path="compiled")
        for start, count in [(1, 1000), (3, 77), (12345, 513), (LARGE, 5), (7, LARGE // 2)]:
            part = stable_at(1.75, key, range(start, start + count), dtype=dtype, path="compiled")
            assert torch.equal(part, whole[start:start + count]), (dtype, start, count)
        scattered = torch.randint(0, LARGE + 5, (4099,), generator=_gen(0))
        assert torch.equal(stable_at(1.75, key, scattered, dtype=dtype, path="compiled"), whole[scattered])


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.5, 1.8])
def test_large_tensors_compiled_path_law(alpha: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(COMPILE_ENV, "1")
    x = sample_stable(alpha, 4 * LARGE, generator=_gen(14))
    assert grid_ks_pvalue(x, stable_cdf(alpha)) > P_MIN


# ---------------------------------------------------------------------------------- determinism, dtypes, guards


@pytest.mark.parametrize("n", [1000, LARGE])
def test_seeded_generator_determinism(n: int, no_compile: None) -> None:
    a = sample_stable(1.3, n, generator=_gen(15))
    assert torch.equal(a, sample_stable(1.3, n, generator=_gen(15)))
    assert not torch.equal(a, sample_stable(1.3, n, generator=_gen(16)))
    g = _gen(15)
    first, second = sample_stable(1.3, n, generator=g), sample_stable(1.3, n, generator=g)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances
    torch.manual_seed(15)  # generator=None uses torch's default generator
    b = sample_stable(1.3, n)
    torch.manual_seed(15)
    assert torch.equal(b, sample_stable(1.3, n))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [200_000, LARGE])
def test_half_precision_is_float32_arithmetic_clipped(dtype: torch.dtype, n: int, no_compile: None) -> None:
    low = sample_stable(0.5, n, generator=_gen(17), dtype=dtype)
    assert low.dtype == dtype
    assert bool(torch.isfinite(low).all())
    full = sample_stable(0.5, n, generator=_gen(17))
    finfo = torch.finfo(dtype)
    assert torch.equal(low, full.clamp(finfo.min, finfo.max).to(dtype))
    if dtype == torch.float16:
        # alpha = 0.5 has |x| > 65504 with probability ~1e-2: the clipping is exercised, not hypothetical
        assert float(low.abs().max()) == finfo.max


@pytest.mark.slow
def test_no_nan_or_inf_in_float32_over_millions_of_draws() -> None:
    for alpha in [0.5, 0.55, 0.75, 0.9, 0.99, 1.0, 1.01, 1.25, 1.5, 1.75, 1.9, 1.99, 2.0]:
        x = sample_stable(alpha, 1 << 22, generator=_gen(18))  # compiled where available
        assert bool(torch.isfinite(x).all()), alpha
        y = sample_stable(alpha, LARGE - 1, generator=_gen(18))  # eager
        assert bool(torch.isfinite(y).all()), alpha


# ------------------------------------------------------------------------------------- positive stable


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.75, 0.9])
def test_positive_stable_laplace_transform(alpha: float) -> None:
    a = sample_positive_stable(alpha, 200_000, generator=_gen(19), dtype=torch.float64)
    assert bool((a > 0).all())
    for s in (0.25, 1.0, 4.0):
        values = torch.exp(-s * a)
        stderr = float(values.std()) / math.sqrt(a.numel())
        assert abs(float(values.mean()) - math.exp(-(s**alpha))) < 6 * stderr + 1e-12, (alpha, s)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.75, 0.9])
def test_positive_stable_against_scipy_s1(alpha: float, levy_stable_s1: None) -> None:
    a = sample_positive_stable(alpha, 200_000, generator=_gen(20))
    scale = math.cos(math.pi * alpha / 2) ** (1 / alpha)
    assert grid_ks_pvalue(a, lambda x: scipy.stats.levy_stable.cdf(x, alpha, 1.0, scale=scale)) > P_MIN
    if alpha == 0.5:  # the Levy law, in closed form
        assert grid_ks_pvalue(a, scipy.stats.levy(scale=0.5).cdf) > P_MIN


def test_positive_stable_s1_matters(levy_stable_s1: None) -> None:
    # In S0 the same numbers describe a shifted law, which the test detects: the S1 setting is not decoration.
    a = sample_positive_stable(0.75, 200_000, generator=_gen(21))
    scale = math.cos(math.pi * 0.75 / 2) ** (1 / 0.75)
    scipy.stats.levy_stable.parameterization = "S0"
    assert grid_ks_pvalue(a, lambda x: scipy.stats.levy_stable.cdf(x, 0.75, 1.0, scale=scale)) < 1e-6


def test_positive_stable_alpha_one_and_determinism() -> None:
    assert torch.equal(sample_positive_stable(1.0, (3, 2)), torch.ones(3, 2))
    a = sample_positive_stable(0.6, 1000, generator=_gen(22))
    assert torch.equal(a, sample_positive_stable(0.6, 1000, generator=_gen(22)))
    assert not torch.equal(a, sample_positive_stable(0.6, 1000, generator=_gen(23)))
    assert sample_positive_stable(0.6, 1000, generator=_gen(22), dtype=torch.float16).dtype == torch.float16


def test_elliptical_mixing_gives_stable_marginals() -> None:
    # The documented use: sqrt(A) * G with A positive (alpha/2)-stable and G ~ N(0, 2) is SaS(1) of index alpha.
    alpha = 1.5
    a = sample_positive_stable(alpha / 2, 200_000, generator=_gen(24), dtype=torch.float64)
    g = torch.randn(200_000, generator=_gen(25), dtype=torch.float64) * math.sqrt(2.0)
    assert grid_ks_pvalue(a.sqrt() * g, stable_cdf(alpha)) > P_MIN


# ------------------------------------------------------------------------------------- derive_seed


def test_derive_seed_is_a_pure_63_bit_function() -> None:
    s = derive_seed(7, 3, "layer.weight")
    assert s == derive_seed(7, 3, "layer.weight")
    assert isinstance(s, int) and 0 <= s < 2**63
    torch.Generator().manual_seed(s)  # usable as a torch seed
    assert derive_seed(7, 3, "layer.weight") != derive_seed(7, 4, "layer.weight")
    assert derive_seed(7, 3, "layer.weight") != derive_seed(8, 3, "layer.weight")
    assert derive_seed(7, 3, "layer.weight") != derive_seed(7, 3, "layer.bias")
    assert derive_seed(7, "ab", "c") != derive_seed(7, "a", "bc")
    assert derive_seed(7, 3, 4) != derive_seed(7, 4, 3)
    assert derive_seed(7) != derive_seed(7, 0)


def test_derive_seed_spreads_nearby_inputs() -> None:
    seeds = [derive_seed(0, step, "w") for step in range(20_000)]
    assert len(set(seeds)) == len(seeds)
    flips = [bin(a ^ b).count("1") for a, b in itertools.pairwise(seeds)]
    assert 30.0 < float(np.mean(flips)) < 33.0  # ~31.5 of 63 bits flip between consecutive steps
    top = np.array([s >> 59 for s in seeds])  # top 4 bits uniform over 16 values
    assert scipy.stats.chisquare(np.bincount(top, minlength=16)).pvalue > P_MIN


def test_derive_seed_does_not_depend_on_the_process() -> None:
    # Another interpreter with another string-hash salt computes the same seed (Python's hash() would not). The child
    # runs the function's own source, so it does not pay for importing torch and lightning.
    source = "\n".join(
        ["_MASK64 = (1 << 64) - 1", inspect.getsource(stable_module._splitmix64), inspect.getsource(derive_seed)]
    )
    code = source + "\nprint(derive_seed(123, 45, 'net.0.weight'))"
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(result.stdout.strip()) == derive_seed(123, 45, "net.0.weight")


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("alpha", "error"), [
    *((alpha, ValueError) for alpha in (0.0, -1.0, 2.0001, 3, float("nan"), float("inf"))),
    *((alpha, TypeError) for alpha in (True, "1.5", None)),
])
def test_bad_alpha_names_the_argument(alpha: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"`alpha`.*\(0, 2\].*got"):
        sample_stable(alpha, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("scale", "error"), [
    *((scale, ValueError) for scale in (0.0, -1.0, float("nan"), float("inf"))),
    *((scale, TypeError) for scale in ("1", None)),
])
def test_bad_scale_names_the_argument(scale: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"`scale`.*got"):
        sample_stable(1.5, 3, scale=scale)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_bad_dtype_names_the_argument(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=r"`dtype`"):
        sample_stable(1.5, 3, dtype=dtype)
    with pytest.raises(TypeError, match=r"`dtype`"):
        sample_positive_stable(0.5, 3, dtype=dtype)


@pytest.mark.parametrize("alpha", [0.0, 1.5, 2.0, -0.5, float("nan")])
def test_bad_positive_stable_alpha_names_the_argument(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"`alpha`.*\(0, 1\].*got"):
        sample_positive_stable(alpha, 3)


def test_a_scale_that_overflows_float32_is_clipped_to_the_finite_range() -> None:
    # alpha 0.1 reaches ~1e35: times 1e3 overflowed float32 to inf, though the docs promise no inf
    x = sample_stable(0.1, 10**6, scale=1e3, generator=_gen(30))
    assert bool(torch.isfinite(x).all())
    assert float(x.abs().max()) == torch.finfo(torch.float32).max  # the clip is exercised


@pytest.mark.parametrize(("shape", "error"), [
    (-1, ValueError), ((2, -3), ValueError), ((2.5,), TypeError), ("3", TypeError), ((True, 2), TypeError),
])
def test_bad_shape_names_the_argument(shape: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"`shape` must be an int >= 0 or a sequence of ints >= 0, got"):
        sample_stable(1.5, shape)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"`shape`"):
        sample_positive_stable(0.5, shape)  # type: ignore[arg-type]


def test_numpy_scalars_are_accepted_like_python_numbers() -> None:
    a = sample_stable(np.float64(1.5), np.int64(5), scale=np.float32(2.0), generator=_gen(31))
    b = sample_stable(1.5, 5, scale=2.0, generator=_gen(31))
    assert torch.equal(a, b)
    assert sample_stable(1.5, (np.int64(2), np.int32(3)), generator=_gen(31)).shape == (2, 3)
    assert sample_positive_stable(np.float64(0.5), 4, generator=_gen(31)).shape == (4,)
