r"""Exact sampling of symmetric alpha-stable laws on any torch device, counter-based.

Parametrization: ``X ~ SaS(c)`` has characteristic function

    E exp(i t X) = exp(-|c t|**alpha),    0 < alpha <= 2,  c > 0,

so ``alpha = 2`` is ``N(0, 2 c**2)`` and ``alpha = 1`` is the Cauchy law with scale ``c``.
For skewness ``beta = 0`` the S0 and S1 parametrizations of ``scipy.stats.levy_stable`` coincide, and
``sample_stable(alpha, n, scale=c)`` has the law of ``scipy.stats.levy_stable(alpha, 0.0, scale=c)``.

Draws use the Chambers-Mallows-Stuck (1976) transform of two uniforms, which is exact for every alpha:
with ``V ~ U(-pi/2, pi/2)`` and ``W ~ Exp(1)``,

    X = sin(alpha V) / cos(V)**(1/alpha) * (cos((1 - alpha) V) / W)**((1 - alpha)/alpha).

**Counter-based.** Every draw is a pure function of a 128-bit stream key and the draw's index in the stream: the
uniforms of draw ``i`` come from ``mix(mix(k1 + (i + 1) * GOLDEN) ^ k2)``, SplitMix64's output ``i + 1`` of state
``k1`` finalized once more with the second key word ``k2`` (so two keys whose SplitMix64 streams overlap still give
unrelated draws). Any block of a stream, or any scattered set of indices, is computed directly and in parallel, on any
device, with no generator state: a shard of a tensor draws exactly its slice of the whole tensor's draws.
``sample_stable`` with a ``torch.Generator`` draws the key from the generator.

**Uniforms strictly inside (0, 1).** In float32 a 64-bit word gives two 23-bit integers ``k`` and the uniforms
``(k + 0.5) * 2**-23`` (exact in float32); in float64 each uniform takes the top 52 bits of its own word,
``(k + 0.5) * 2**-52``. Neither end point can occur, so no atom sits at ``W = 0`` or ``V = +-pi/2``.

The arithmetic is done in float32 (float64 when asked) and cast at the end, never in fp16/bf16, whose range the
heavy tails overflow. ``V`` is kept inside the open interval and the power is bounded, so no draw is inf or NaN;
values beyond the target dtype's finite range (after scaling) are clipped to it.

References:
    J. M. Chambers, C. L. Mallows, B. W. Stuck, "A method for simulating stable random variables", JASA 1976.
    M. Kanter, "Stable densities under change of scale and total variation inequalities", Ann. Probab. 1975.
    J. P. Nolan, "Univariate Stable Distributions", Springer 2020 (parametrizations S0/S1).
    G. L. Steele, D. Lea, C. H. Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014 (SplitMix64).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_heavytail._checks import (
    check_alpha,
    check_draw_index,
    check_positive_finite,
    check_positive_stable_alpha,
    check_shape,
    check_stream_key,
    is_integer,
)
from lightning_heavytail._counters import COMPILE_MIN_DRAWS, SamplerPath, as_int64, choose_path, run
from lightning_heavytail._tensors import compute_dtype

__all__ = [
    "COMPILE_MIN_DRAWS",
    "StreamKey",
    "derive_key",
    "derive_seed",
    "normal_at",
    "positive_stable_at",
    "sample_positive_stable",
    "sample_stable",
    "stable_at",
]

StreamKey = tuple[int, int]
"""A 128-bit stream key: two 64-bit words, each as a signed int64 (see ``derive_key``)."""

_ShapeLike = int | Sequence[int] | torch.Size
_MASK64 = (1 << 64) - 1
# The two lanes of a 128-bit key start from different constants (hex digits of pi).
_LANES = (0x243F6A8885A308D3, 0x13198A2E03707344)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and ``keys``, for ``torch.Generator.manual_seed``.

    Strings are hashed with a fixed function (not Python's salted ``hash``), so the result is the same in every
    process, on every rank and after a restart. Nearby inputs give unrelated outputs (SplitMix64 finalizer). The
    noise itself is keyed by the 128-bit ``derive_key``; a 63-bit seed is for code that needs a torch generator.

    Args:
        seed: the base seed.
        *keys: counters and names, e.g. the step and the parameter name.

    Returns:
        A seed for ``torch.Generator.manual_seed``.

    Examples:
        >>> derive_seed(0, 5, "layer.weight") == derive_seed(0, 5, "layer.weight")
        True
        >>> derive_seed(0, 5, "layer.weight") == derive_seed(0, 6, "layer.weight")
        False
    """
    state = _splitmix64(seed & _MASK64)
    for key in keys:
        if isinstance(key, str):
            for byte in key.encode():
                state = _splitmix64(state ^ byte)
            state = _splitmix64(state ^ 0xFF)  # terminator: ("ab", "c") differs from ("a", "bc")
        else:
            state = _splitmix64(state ^ (key & _MASK64))
    return state >> 1


@functools.lru_cache(maxsize=1 << 14)
def string_word(text: str, lane: int) -> int:
    """A 64-bit hash of ``text`` in one lane (fixed function, cached: names repeat at every step)."""
    state = _splitmix64(lane)
    for byte in text.encode():
        state = _splitmix64(state ^ byte)
    return _splitmix64(state ^ 0xFF)  # terminator: ("ab", "c") differs from ("a", "bc")


def _key_word(key: int | str, lane: int) -> int:
    if isinstance(key, str):
        return string_word(key, lane)
    if not is_integer(key):
        raise TypeError(f"`keys` must be ints or strings, got {type(key).__name__}: {key!r}")
    return int(key) & _MASK64


def _key_state(seed: int, keys: Sequence[int | str], lane: int) -> int:
    state = _splitmix64((int(seed) ^ lane) & _MASK64)
    for key in keys:
        state = _splitmix64(state ^ _key_word(key, lane))
    return state


def derive_key(seed: int, *keys: int | str) -> StreamKey:
    """The 128-bit stream key of ``(seed, *keys)``: two independent SplitMix64 chains, one per 64-bit word.

    Each key (an int, or a string hashed with a fixed function, never Python's salted ``hash``) is mixed into both
    chains, so the key is the same in every process, on every rank and after a restart, and two different inputs share
    a key with probability about ``2**-128``. The noise of a parameter at a step uses
    ``derive_key(seed, step)`` combined with a hash of the name (``noise.noise_key``).

    Args:
        seed: the base seed.
        *keys: counters and names, e.g. the step and the parameter name.

    Returns:
        Two signed int64 words.

    Examples:
        >>> derive_key(0, 5, "layer.weight") == derive_key(0, 5, "layer.weight")
        True
        >>> derive_key(0, 5, "layer.weight") == derive_key(0, 6, "layer.weight")
        False
        >>> all(-(2**63) <= word < 2**63 for word in derive_key(3, "w"))
        True
    """
    return as_int64(_key_state(seed, keys, _LANES[0])), as_int64(_key_state(seed, keys, _LANES[1]))


def _key_tensors(key: StreamKey | tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    if isinstance(key, (tuple, list)) and len(key) == 2:
        first, second = key
        if isinstance(first, Tensor) and isinstance(second, Tensor):
            return first.to(device), second.to(device)
    words = check_stream_key(key)
    return (torch.tensor(words[0], dtype=torch.int64, device=device),
            torch.tensor(words[1], dtype=torch.int64, device=device))


def _at(kind: str, alpha: float, key: StreamKey | tuple[Tensor, Tensor], index: Tensor | range,
        device: torch.device | str | None, dtype: torch.dtype, path: SamplerPath | None) -> Tensor:
    arithmetic = compute_dtype(dtype)
    check_draw_index(index)
    if isinstance(index, Tensor):
        dev = index.device
    else:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    chosen = path if path is not None else choose_path(index.numel() if isinstance(index, Tensor) else len(index), dev)
    draws, _ = run(kind, _key_tensors(key, dev), index, float(alpha), arithmetic, chosen)
    return _cast(draws, dtype)


def stable_at(alpha: float, key: StreamKey | tuple[Tensor, Tensor], index: Tensor | range, *,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
              path: SamplerPath | None = None) -> Tensor:
    """Standard SaS(1) draws number ``index`` of the stream ``key``: a pure function of (key, index, dtype, path).

    Args:
        alpha: stability index in (0, 2].
        key: a ``StreamKey`` from ``derive_key``, or two int64 tensors that broadcast with ``index`` (one stream
            per element).
        index: the draws' positions in the stream: an int64 tensor (its device is the output's) or a ``range``.
        device: output device for a ``range`` index (default CPU).
        dtype: output dtype; float64 computes in float64, every other dtype in float32 (then cast).
        path: ``"eager"`` or ``"compiled"``; None chooses by the request's size (see ``COMPILE_MIN_DRAWS``).

    Returns:
        A tensor shaped like ``index``.

    Examples:
        >>> key = derive_key(0, 7, "w")
        >>> whole = stable_at(1.5, key, range(10))
        >>> bool(torch.equal(whole[3:6], stable_at(1.5, key, range(3, 6))))  # a block is a slice of the whole
        True
        >>> bool(torch.equal(whole[[8, 1]], stable_at(1.5, key, torch.tensor([8, 1]))))
        True
    """
    check_alpha(alpha)
    return _at("stable", alpha, key, index, device, dtype, path)


def positive_stable_at(alpha: float, key: StreamKey | tuple[Tensor, Tensor], index: Tensor | range, *,
                       device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                       path: SamplerPath | None = None) -> Tensor:
    """Positive alpha-stable draws (``E exp(-s A) = exp(-s**alpha)``, alpha in (0, 1)) number ``index`` of ``key``.

    See ``stable_at`` for the arguments and ``sample_positive_stable`` for the law.

    Examples:
        >>> bool((positive_stable_at(0.8, derive_key(1), range(5)) > 0).all())
        True
    """
    check_positive_stable_alpha(alpha, allow_one=False)
    return _at("positive_stable", alpha, key, index, device, dtype, path)


def normal_at(key: StreamKey | tuple[Tensor, Tensor], index: Tensor | range, *,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
              path: SamplerPath | None = None) -> Tensor:
    """Standard normal draws number ``index`` of the stream ``key`` (Box-Muller), see ``stable_at``.

    Examples:
        >>> round(normal_at(derive_key(2), range(200_000)).std().item(), 1)
        1.0
    """
    return _at("normal", 2.0, key, index, device, dtype, path)


def _resolve(shape: _ShapeLike, device: torch.device | str | None, dtype: torch.dtype,
             generator: torch.Generator | None) -> tuple[torch.Size, torch.device, torch.dtype]:
    size = check_shape(shape)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return size, torch.device(device), compute_dtype(dtype)


def _key_from_generator(generator: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """A 128-bit stream key drawn from ``generator`` (torch's default generator when None), on ``device``."""
    gen_device = generator.device if generator is not None else device
    words = torch.randint(-(1 << 63), (1 << 63) - 1, (2,), generator=generator, dtype=torch.int64, device=gen_device)
    return words[0].to(device), words[1].to(device)


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, values beyond its finite range (inf included) clipped to it."""
    finfo = torch.finfo(dtype)
    return x.clamp(finfo.min, finfo.max).to(dtype)


def _scaled(x: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    # Clip after scaling: a finite draw times a large scale can overflow the compute dtype (sample_stable(0.1, n,
    # scale=1e3) reaches float32's max); the docs promise finite values.
    return _cast(x * scale if scale != 1.0 else x, dtype)


def sample_stable(
    alpha: float,
    shape: _ShapeLike,
    *,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Draw i.i.d. symmetric alpha-stable variables with characteristic function ``exp(-|scale * t|**alpha)``.

    Agrees in law with ``scipy.stats.levy_stable(alpha, 0.0, loc=0.0, scale=scale)`` (S0 and S1 coincide at
    beta = 0). ``alpha = 2`` gives ``N(0, 2 * scale**2)``, ``alpha = 1`` the Cauchy law with the given scale.

    A 128-bit key is drawn from ``generator`` and the draws are ``stable_at(alpha, key, range(n))``, so the result
    is a pure function of the generator's state (and of the kernel, see ``COMPILE_MIN_DRAWS``).

    Args:
        alpha: stability index in (0, 2]; smaller means heavier tails.
        shape: output shape.
        scale: scale parameter c > 0.
        generator: a ``torch.Generator`` for reproducible draws; its device is the default device.
        device: output device (CPU, CUDA, MPS, ...).
        dtype: output dtype. The arithmetic runs in float32 (float64 for a float64 output) and is cast at the end;
            values beyond the dtype's finite range are clipped to it, so no draw is inf or NaN.

    Returns:
        A tensor of the given shape, dtype and device.

    Raises:
        ValueError: if ``alpha`` is outside (0, 2], ``scale`` is not a positive finite number, or ``shape`` has a
            negative dimension.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = sample_stable(1.5, (2, 3), generator=g)
        >>> x.shape, x.dtype
        (torch.Size([2, 3]), torch.float32)
        >>> bool(torch.equal(x, sample_stable(1.5, (2, 3), generator=torch.Generator().manual_seed(0))))
        True
        >>> z = sample_stable(2.0, 200_000, generator=g)  # alpha = 2 is N(0, 2)
        >>> round(z.var().item(), 1)
        2.0
    """
    check_alpha(alpha)
    check_positive_finite(scale, "scale")
    size, dev, compute_dtype = _resolve(shape, device, dtype, generator)
    key = _key_from_generator(generator, dev)
    x, _ = run("stable", key, range(size.numel()), float(alpha), compute_dtype, choose_path(size.numel(), dev))
    return _scaled(x, float(scale), dtype).reshape(size)


def sample_positive_stable(
    alpha: float,
    shape: _ShapeLike,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Draw totally skewed positive alpha-stable variables A with Laplace transform ``E exp(-s A) = exp(-s**alpha)``.

    This is ``scipy.stats.levy_stable(alpha, 1.0, scale=cos(pi * alpha / 2) ** (1 / alpha))`` in the S1
    parametrization, for ``alpha`` in (0, 1], drawn with Kanter's (1975) representation

        A = sin(alpha pi U) / sin(pi U)**(1/alpha) * (sin((1 - alpha) pi U) / W)**((1 - alpha)/alpha),

    with ``U ~ U(0, 1)`` and ``W ~ Exp(1)``.

    It is the mixing variable of sub-Gaussian (elliptical) stable vectors: with ``G ~ N(0, 2 I)``,
    ``sqrt(A) * G`` for ``A`` drawn at ``alpha / 2`` has SaS(1) marginals of index ``alpha``.

    Args:
        alpha: index in (0, 1]; ``alpha = 1`` gives the constant 1.
        shape: output shape.
        generator: optional ``torch.Generator``.
        device: output device.
        dtype: output dtype (arithmetic in float32 or float64, then cast).

    Returns:
        Positive draws of the given shape.

    Examples:
        >>> a = sample_positive_stable(0.5, 100_000, generator=torch.Generator().manual_seed(0))
        >>> bool((a > 0).all())
        True
        >>> round(torch.exp(-a.double()).mean().item(), 2)  # Laplace transform at s = 1: exp(-1)
        0.37
    """
    check_positive_stable_alpha(alpha)
    size, dev, compute_dtype = _resolve(shape, device, dtype, generator)
    if alpha == 1.0:
        return torch.ones(size, device=dev, dtype=dtype)
    key = _key_from_generator(generator, dev)
    x, _ = run("positive_stable", key, range(size.numel()), float(alpha), compute_dtype,
                choose_path(size.numel(), dev))
    return _cast(x, dtype).reshape(size)
