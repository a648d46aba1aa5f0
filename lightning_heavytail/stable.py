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
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_heavytail._checks import check_alpha, check_positive_finite, is_integer, is_real

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

SamplerPath = Literal["eager", "compiled"]

# Largest float32 strictly below pi/2: its cosine is positive (~1.2e-7); float32(pi/2) itself is above pi/2.
_V_MAX = math.nextafter(math.pi / 2, 0.0)
_V_MAX_F32 = float(torch.tensor(math.pi / 2, dtype=torch.float32).nextafter(torch.tensor(0.0)).item())
# Largest float below pi: sin of it is positive (float32(pi) is above pi, and its sine negative).
_PI_BELOW = {
    torch.float32: float(torch.tensor(math.pi, dtype=torch.float32).nextafter(torch.tensor(0.0)).item()),
    torch.float64: math.nextafter(math.pi, 0.0),
}
# exp() argument bound: the prefactor sin/cos is at most ~1/cos(V_MAX), so the product stays finite.
_EXP_ARG_MAX = {torch.float32: 72.0, torch.float64: 690.0}

COMPILE_MIN_DRAWS = 1 << 20
"""Requests of at least this many draws go through a torch.compile-fused kernel where one is available.

The compiled and the eager kernel compute the same formula but round differently in the last bits (about half of the
float32 draws differ, by about 1e-7 relative), so which one ran is part of what a draw is: callers that must be
reproducible decide from a size that does not depend on sharding (the noise uses the whole parameter's count) and
record the path. ``LIGHTNING_HEAVYTAIL_COMPILE=0`` turns compiling off.
"""
_COMPILE_ENV = "LIGHTNING_HEAVYTAIL_COMPILE"
# Chunk of the eager path: its temporaries (a few MB) stay in cache, with few passes per draw.
_EAGER_CHUNK = 1 << 18

_ShapeLike = int | Sequence[int] | torch.Size
_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """The signed int64 with the same 64 bits as the unsigned ``value``."""
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64 (Steele, Lea, Flood 2014; the generator Java's SplittableRandom uses and xoshiro's authors recommend for
# seeding): output i of the stream with state ``key`` is mix(key + i * GOLDEN), computed with int64 arithmetic that
# wraps modulo 2**64.
_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)
# The two lanes of a 128-bit key start from different constants (hex digits of pi).
_LANES = (0x243F6A8885A308D3, 0x13198A2E03707344)
# Tells the second word of a float64 draw from the first (more hex digits of pi). A second counter (2i + 1) would do,
# but inductor folds 2 * GOLDEN into a constant that overflows int64.
_SECOND_WORD = _as_int64(0xA4093822299F31D0)


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
def _string_word(text: str, lane: int) -> int:
    """A 64-bit hash of ``text`` in one lane (fixed function, cached: names repeat at every step)."""
    state = _splitmix64(lane)
    for byte in text.encode():
        state = _splitmix64(state ^ byte)
    return _splitmix64(state ^ 0xFF)  # terminator: ("ab", "c") differs from ("a", "bc")


def _key_word(key: int | str, lane: int) -> int:
    if isinstance(key, str):
        return _string_word(key, lane)
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
    return _as_int64(_key_state(seed, keys, _LANES[0])), _as_int64(_key_state(seed, keys, _LANES[1]))


def _srl(x: Tensor, shift: int) -> Tensor:
    """Logical (unsigned) right shift of int64 bits; torch's ``>>`` on int64 is arithmetic."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping arithmetic)."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def mix_key_words(state: Tensor, word: Tensor) -> Tensor:
    """``_splitmix64(state ^ word)`` on int64 tensors: one step of ``derive_key``'s chains, vectorized."""
    return _mix64((state ^ word) + _GOLDEN)


def _counter_bits(k1: Tensor, k2: Tensor, counter: Tensor, words: int = 1) -> list[Tensor]:
    """``words`` words of 64 random bits per counter.

    SplitMix64 output ``counter + 1`` of state ``k1``, finalized again after an xor with ``k2`` (the second word:
    with ``k2 ^ _SECOND_WORD``).
    """
    inner = _mix64((counter + 1) * _GOLDEN + k1)
    return [_mix64(inner ^ k2), _mix64(inner ^ (k2 ^ _SECOND_WORD))][:words]


def _float32_uniforms(z: Tensor) -> tuple[Tensor, Tensor]:
    """Two float32 uniforms ``(k + 0.5) * 2**-23`` from bits 41-63 and 0-22 of each word: strictly inside (0, 1)."""
    return (_srl(z, 41).to(torch.float32) + 0.5) * 2.0**-23, ((z & 0x7FFFFF).to(torch.float32) + 0.5) * 2.0**-23


def _float64_uniform(z: Tensor) -> Tensor:
    """A float64 uniform ``(k + 0.5) * 2**-52`` from the top 52 bits of each word: strictly inside (0, 1)."""
    return (_srl(z, 12).to(torch.float64) + 0.5) * 2.0**-52


def _uniform_pair(k1: Tensor, k2: Tensor, index: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Two independent uniforms in (0, 1) per index: one word per draw in float32, two in float64."""
    if dtype == torch.float32:
        return _float32_uniforms(_counter_bits(k1, k2, index)[0])
    first, second = _counter_bits(k1, k2, index, words=2)
    return _float64_uniform(first), _float64_uniform(second)


def _cms_transform(u_v: Tensor, u_w: Tensor, alpha: Tensor | float) -> Tensor:
    """Map two uniforms in (0, 1) per draw to standard SaS(1) draws: ``u_v`` gives V, ``u_w`` gives W.

    Written as ``sin(aV)/cos V * (cos((1-a)V) / (W cos V))**((1-a)/a)``, algebraically equal to the CMS formula but
    with one power (one exp, one log) instead of two.
    """
    v_max = _V_MAX_F32 if u_v.dtype == torch.float32 else _V_MAX
    v = ((u_v - 0.5) * math.pi).clamp(-v_max, v_max)
    w = -torch.log(u_w)
    cos_v = torch.cos(v)
    power = (1.0 - alpha) / alpha * torch.log(torch.cos((1.0 - alpha) * v) / (w * cos_v))
    return torch.sin(alpha * v) / cos_v * torch.exp(power.clamp(max=_EXP_ARG_MAX[u_v.dtype]))


def _kanter_transform(u: Tensor, u_w: Tensor, alpha: Tensor | float) -> Tensor:
    """Positive alpha-stable draws (Laplace transform ``exp(-s**alpha)``) from two uniforms in (0, 1) per draw."""
    pu = (u * math.pi).clamp(max=_PI_BELOW[u.dtype])  # both sines positive
    log_a = torch.log(torch.sin(alpha * pu)) - torch.log(torch.sin(pu)) / alpha + (1.0 - alpha) / alpha * (
        torch.log(torch.sin((1.0 - alpha) * pu)) - torch.log(-torch.log(u_w))
    )
    return torch.exp(log_a.clamp(max=_EXP_ARG_MAX[u.dtype]))


def _box_muller(u_r: Tensor, u_angle: Tensor, alpha: Tensor | float) -> Tensor:
    """Standard normal draws (the cosine half of Box-Muller); ``alpha`` is unused."""
    return torch.sqrt(-2.0 * torch.log(u_r)) * torch.cos((2.0 * math.pi) * u_angle)


_TRANSFORMS: dict[str, Callable[[Tensor, Tensor, Tensor | float], Tensor]] = {
    "stable": _cms_transform,
    "positive_stable": _kanter_transform,
    "normal": _box_muller,
}


def _draws(kind: str, k1: Tensor, k2: Tensor, index: Tensor, alpha: Tensor | float, dtype: torch.dtype) -> Tensor:
    """Draws of ``kind`` at counter ``index`` of the streams ``(k1, k2)`` (int64 tensors broadcasting with index)."""
    u_a, u_b = _uniform_pair(k1, k2, index, dtype)
    return _TRANSFORMS[kind](u_a, u_b, alpha)


def _ranged_draws(kind: str, k1: Tensor, k2: Tensor, start: int, count: int, alpha: Tensor | float,
                  dtype: torch.dtype) -> Tensor:
    index = torch.arange(start, start + count, dtype=torch.int64, device=k1.device)
    return _draws(kind, k1, k2, index, alpha, dtype)


_compiled_lock = threading.Lock()
_compiled_fns: dict[str, Callable[..., Tensor]] = {}
_compile_failed: set[str] = set()


def compile_available(device: torch.device | str) -> bool:
    """Whether draws on ``device`` may go through the torch.compile'd kernel (see ``COMPILE_MIN_DRAWS``).

    False where ``LIGHTNING_HEAVYTAIL_COMPILE=0``, on devices other than CPU and CUDA, or after compiling failed once
    on that device type in this process.
    """
    device_type = torch.device(device).type
    setting = os.environ.get(_COMPILE_ENV, "auto").lower()
    return setting not in ("0", "false", "off", "no") and device_type in ("cpu", "cuda") and (
        device_type not in _compile_failed
    )


def _compiled(name: str) -> Callable[..., Tensor]:
    with _compiled_lock:
        if name not in _compiled_fns:
            fn = _ranged_draws if name == "ranged" else _draws
            _compiled_fns[name] = torch.compile(fn, dynamic=True)
    return _compiled_fns[name]


def choose_path(global_count: int, device: torch.device | str) -> SamplerPath:
    """The kernel that computes a request whose whole (unsharded) size is ``global_count`` draws on ``device``."""
    return "compiled" if global_count >= COMPILE_MIN_DRAWS and compile_available(device) else "eager"


def _run(kind: str, key: tuple[Tensor, Tensor], index: Tensor | range, alpha: float, dtype: torch.dtype,
         path: SamplerPath) -> tuple[Tensor, SamplerPath]:
    """Draws of ``kind`` at ``index`` with the chosen kernel; falls back to eager (and says so) if compiling fails."""
    k1, k2 = key
    alpha_t = torch.tensor(alpha, dtype=dtype, device=k1.device)  # a tensor: one graph serves every alpha
    if path == "compiled":
        try:
            if isinstance(index, range):
                return _compiled("ranged")(kind, k1, k2, index.start, len(index), alpha_t, dtype), "compiled"
            return _compiled("indexed")(kind, k1, k2, index, alpha_t, dtype), "compiled"
        except Exception:  # pragma: no cover - depends on the platform's compiler
            _compile_failed.add(k1.device.type)
    if isinstance(index, Tensor):
        return _draws(kind, k1, k2, index, alpha_t, dtype), "eager"
    out = torch.empty(len(index), dtype=dtype, device=k1.device)
    for offset in range(0, len(index), _EAGER_CHUNK):
        count = min(_EAGER_CHUNK, len(index) - offset)
        out[offset:offset + count] = _ranged_draws(kind, k1, k2, index.start + offset, count, alpha_t, dtype)
    return out, "eager"


def _key_tensors(key: StreamKey | tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    if isinstance(key[0], Tensor) and isinstance(key[1], Tensor):
        return key[0].to(device), key[1].to(device)
    if len(key) != 2 or not all(isinstance(word, int) and -(2**63) <= word < 2**63 for word in key):
        raise ValueError(f"`key` must be two signed 64-bit ints (see derive_key), got {key!r}")
    return (torch.tensor(key[0], dtype=torch.int64, device=device),
            torch.tensor(key[1], dtype=torch.int64, device=device))


def _counter_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"`dtype` must be a real floating point dtype, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def _at(kind: str, alpha: float, key: StreamKey | tuple[Tensor, Tensor], index: Tensor | range,
        device: torch.device | str | None, dtype: torch.dtype, path: SamplerPath | None) -> Tensor:
    compute_dtype = _counter_dtype(dtype)
    if isinstance(index, Tensor):
        if index.dtype != torch.int64:
            raise TypeError(f"`index` must be an int64 tensor or a range, got a {index.dtype} tensor")
        dev = index.device
    elif isinstance(index, range):
        if index.step != 1 or index.start < 0:
            raise ValueError(f"`index` must be a range with step 1 and a start >= 0, got {index!r}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
    else:
        raise TypeError(f"`index` must be an int64 tensor or a range, got {type(index).__name__}")
    chosen = path if path is not None else choose_path(index.numel() if isinstance(index, Tensor) else len(index), dev)
    draws, _ = _run(kind, _key_tensors(key, dev), index, float(alpha), compute_dtype, chosen)
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
    _check_positive_alpha(alpha, allow_one=False)
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


def _check_shape(shape: object) -> torch.Size:
    dims = [shape] if is_integer(shape) else shape
    if isinstance(dims, Sequence) and all(is_integer(d) and int(d) >= 0 for d in dims):
        return torch.Size([int(d) for d in dims])
    raise ValueError(f"`shape` must be an int >= 0 or a sequence of ints >= 0, got {shape!r}")


def _resolve(shape: _ShapeLike, device: torch.device | str | None, dtype: torch.dtype,
             generator: torch.Generator | None) -> tuple[torch.Size, torch.device, torch.dtype]:
    size = _check_shape(shape)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return size, torch.device(device), _counter_dtype(dtype)


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
    x, _ = _run("stable", key, range(size.numel()), float(alpha), compute_dtype, choose_path(size.numel(), dev))
    return _scaled(x, float(scale), dtype).reshape(size)


def _check_positive_alpha(alpha: object, *, allow_one: bool = True) -> None:
    ok = is_real(alpha) and 0.0 < float(alpha) <= 1.0  # type: ignore[arg-type]
    if not ok or (not allow_one and float(alpha) == 1.0):  # type: ignore[arg-type]
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"`alpha` of a positive stable law must be in {bound}, got {alpha!r}")


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
    _check_positive_alpha(alpha)
    size, dev, compute_dtype = _resolve(shape, device, dtype, generator)
    if alpha == 1.0:
        return torch.ones(size, device=dev, dtype=dtype)
    key = _key_from_generator(generator, dev)
    x, _ = _run("positive_stable", key, range(size.numel()), float(alpha), compute_dtype,
                choose_path(size.numel(), dev))
    return _cast(x, dtype).reshape(size)
