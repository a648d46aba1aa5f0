r"""Exact sampling of symmetric alpha-stable laws on any torch device.

Parametrization: ``X ~ SaS(c)`` has characteristic function

    E exp(i t X) = exp(-|c t|**alpha),    0 < alpha <= 2,  c > 0,

so ``alpha = 2`` is ``N(0, 2 c**2)`` and ``alpha = 1`` is the Cauchy law with scale ``c``.
For skewness ``beta = 0`` the S0 and S1 parametrizations of ``scipy.stats.levy_stable`` coincide, and
``sample_stable(alpha, n, scale=c)`` has the law of ``scipy.stats.levy_stable(alpha, 0.0, scale=c)``.

Draws use the Chambers-Mallows-Stuck (1976) transform of two uniforms, which is exact for every alpha:
with ``V ~ U(-pi/2, pi/2)`` and ``W ~ Exp(1)``,

    X = sin(alpha V) / cos(V)**(1/alpha) * (cos((1 - alpha) V) / W)**((1 - alpha)/alpha).

The arithmetic is done in float32 (float64 when asked) and cast at the end, never in fp16/bf16, whose range the
heavy tails overflow. Endpoints are guarded (``V`` stays inside the open interval, ``W > 0``, the power is bounded)
so no draw is inf or NaN; values beyond the target dtype's finite range are clipped to it. Probability mass that
these guards move is below the resolution of the float32 uniforms (about ``1e-7``).

References:
    J. M. Chambers, C. L. Mallows, B. W. Stuck, "A method for simulating stable random variables", JASA 1976.
    M. Kanter, "Stable densities under change of scale and total variation inequalities", Ann. Probab. 1975.
    J. P. Nolan, "Univariate Stable Distributions", Springer 2020 (parametrizations S0/S1).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_heavytail._checks import check_alpha, check_positive_finite

__all__ = ["derive_seed", "sample_positive_stable", "sample_stable"]

# Largest float32 strictly below pi/2: its cosine is positive (~1.2e-7); float32(pi/2) itself is above pi/2.
_V_MAX = math.nextafter(math.pi / 2, 0.0)
_V_MAX_F32 = float(torch.tensor(math.pi / 2, dtype=torch.float32).nextafter(torch.tensor(0.0)).item())
# exp() argument bound: the prefactor sin/cos is at most ~1/cos(V_MAX), so the product stays finite.
_EXP_ARG_MAX = {torch.float32: 72.0, torch.float64: 690.0}

# Tensors at least this large are "large": on the CPU their float32 uniforms come from a counter-based generator (see
# _counter_uniforms) rather than torch.rand, and on CPU/CUDA they go through a torch.compile-fused kernel when one is
# available (see _compiled). LIGHTNING_HEAVYTAIL_COMPILE=0 turns compiling off; the draws are the same either way.
_LARGE_NUMEL = 1 << 20
_COMPILE_MIN_NUMEL = _LARGE_NUMEL
_COMPILE_ENV = "LIGHTNING_HEAVYTAIL_COMPILE"
# Chunk of the eager counter path: its temporaries (a few MB) stay in cache, with few passes per draw.
_EAGER_CHUNK = 1 << 18

_ShapeLike = int | Sequence[int] | torch.Size


def _as_int64(value: int) -> int:
    """The signed int64 with the same 64 bits as the unsigned ``value``."""
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64 (Steele, Lea, Flood 2014; the generator Java's SplittableRandom uses and xoshiro's authors recommend for
# seeding): the i-th output of the stream with state ``key`` is mix(key + i * GOLDEN), so any block of the stream is
# computed directly from its indices, in parallel, with int64 arithmetic that wraps modulo 2**64.
_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)
_U24 = 2.0**-24  # float32 uniforms on the grid k * 2**-24, k in [0, 2**24): the grid of torch.rand in float32


def _srl(x: Tensor, shift: int) -> Tensor:
    """Logical (unsigned) right shift of int64 bits; torch's ``>>`` on int64 is arithmetic."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _counter_uniforms(key: Tensor, start: int, count: int) -> tuple[Tensor, Tensor]:
    """Two independent float32 uniforms per index: outputs ``start + 1 .. start + count`` of SplitMix64 from ``key``.

    Each 64-bit output gives two disjoint 24-bit fields (bits 40-63 and 0-23), so the uniforms lie on the same grid
    ``k * 2**-24`` as ``torch.rand(dtype=torch.float32)``, which the endpoint guards of ``_cms_transform`` assume.
    """
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=key.device) * _GOLDEN + key
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    z = z ^ _srl(z, 31)
    return _srl(z, 40).to(torch.float32) * _U24, (z & 0xFFFFFF).to(torch.float32) * _U24


def _cms_transform(u_v: Tensor, u_w: Tensor, alpha: Tensor | float, v_max: float, exp_arg_max: float) -> Tensor:
    """Map two uniforms in [0, 1) per draw to standard SaS(1) draws: ``u_v`` gives V, ``u_w`` gives W.

    Written as ``sin(aV)/cos V * (cos((1-a)V) / (W cos V))**((1-a)/a)``, algebraically equal to the CMS formula but
    with one power (one exp, one log) instead of two.
    """
    v = ((u_v - 0.5) * math.pi).clamp(-v_max, v_max)
    w = -torch.log(u_w.clamp_min(torch.finfo(u_w.dtype).tiny))
    cos_v = torch.cos(v)
    power = (1.0 - alpha) / alpha * torch.log(torch.cos((1.0 - alpha) * v) / (w * cos_v))
    return torch.sin(alpha * v) / cos_v * torch.exp(power.clamp(max=exp_arg_max))


def _counter_draws(key: Tensor, start: int, count: int, alpha: Tensor | float, v_max: float,
                   exp_arg_max: float) -> Tensor:
    """Standard SaS(1) draws ``start .. start + count - 1`` of the counter-based stream ``key`` (float32)."""
    u_v, u_w = _counter_uniforms(key, start, count)
    return _cms_transform(u_v, u_w, alpha, v_max, exp_arg_max)


_compiled_lock = threading.Lock()
_compiled_fns: dict[str, Callable[..., Tensor]] = {}
_compile_failed = False


def _compiled(name: str, device: torch.device) -> Callable[..., Tensor] | None:
    """The torch.compile'd ``_cms_transform`` or ``_counter_draws`` (by name).

    None where compiling is off, unsupported or failed once before.
    """
    setting = os.environ.get(_COMPILE_ENV, "auto").lower()
    if setting in ("0", "false", "off", "no") or _compile_failed or device.type not in ("cpu", "cuda"):
        return None
    with _compiled_lock:
        if name not in _compiled_fns:
            fn = _counter_draws if name == "counter" else _cms_transform
            _compiled_fns[name] = torch.compile(fn, dynamic=True)
    return _compiled_fns[name]


def _counter_draws_eager(key: Tensor, numel: int, alpha: float, v_max: float, exp_arg_max: float) -> Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=key.device)
    for start in range(0, numel, _EAGER_CHUNK):
        count = min(_EAGER_CHUNK, numel - start)
        out[start:start + count] = _counter_draws(key, start, count, alpha, v_max, exp_arg_max)
    return out


def _standard_draws(alpha: float, numel: int, generator: torch.Generator | None, device: torch.device,
                    compute_dtype: torch.dtype) -> Tensor:
    """``numel`` standard SaS(1) draws in ``compute_dtype``.

    The uniforms come from ``torch.rand`` on ``generator``, except for large float32 draws on the CPU: there
    ``torch.rand`` is a serial Mersenne Twister whose 2 uniforms per draw would cost more than the whole transform, so
    one 64-bit key is drawn from ``generator`` and the uniforms are SplitMix64 outputs computed from their indices
    (in parallel, inside the fused kernel). The draws are a pure function of the generator's state either way, and the
    compiled and eager paths use identical uniforms.
    """
    global _compile_failed
    v_max = _V_MAX_F32 if compute_dtype == torch.float32 else _V_MAX
    exp_arg_max = _EXP_ARG_MAX[compute_dtype]
    large = numel >= _LARGE_NUMEL
    if large and device.type == "cpu" and compute_dtype == torch.float32:
        key = torch.randint(-(1 << 63), (1 << 63) - 1, (), generator=generator, dtype=torch.int64, device=device)
        fused = _compiled("counter", device)
        if fused is not None:
            try:
                # alpha as a tensor: one compiled graph serves every alpha, no recompilation per value.
                return fused(key, 0, numel, torch.tensor(alpha, dtype=compute_dtype), v_max, exp_arg_max)
            except Exception:  # pragma: no cover - depends on the platform's compiler
                _compile_failed = True
        return _counter_draws_eager(key, numel, alpha, v_max, exp_arg_max)
    u = torch.rand((2, numel), generator=generator, device=device, dtype=compute_dtype)
    fused = _compiled("transform", device) if large else None
    if fused is not None:
        try:
            return fused(u[0], u[1], torch.tensor(alpha, dtype=compute_dtype, device=device), v_max, exp_arg_max)
        except Exception:  # pragma: no cover - depends on the platform's compiler
            _compile_failed = True
    return _cms_transform(u[0], u[1], alpha, v_max, exp_arg_max)


def _resolve(shape: _ShapeLike, device: torch.device | str | None, dtype: torch.dtype,
             generator: torch.Generator | None) -> tuple[torch.Size, torch.device, torch.dtype]:
    size = torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be a floating point dtype, got {dtype}")
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return size, device, compute_dtype


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    if x.dtype != dtype:
        finfo = torch.finfo(dtype)
        x = x.clamp(finfo.min, finfo.max).to(dtype)  # fp16 tops out at 65504: clip instead of inf
    return x


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

    Args:
        alpha: stability index in (0, 2]; smaller means heavier tails.
        shape: output shape.
        scale: scale parameter c > 0.
        generator: a ``torch.Generator`` for reproducible draws; its device is the default device.
        device: output device (CPU, CUDA, MPS, ...).
        dtype: output dtype. The arithmetic runs in float32 (float64 for a float64 output) and is cast at the end,
            clipping to the dtype's finite range.

    Returns:
        A tensor of the given shape, dtype and device.

    Raises:
        ValueError: if ``alpha`` is outside (0, 2] or ``scale`` is not a positive finite number.

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
    x = _standard_draws(float(alpha), size.numel(), generator, dev, compute_dtype)
    if scale != 1.0:
        x = x * scale
    return _cast(x.reshape(size), dtype)


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
    if not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"`alpha` of a positive stable law must be in (0, 1], got {alpha!r}")
    size, dev, compute_dtype = _resolve(shape, device, dtype, generator)
    if alpha == 1.0:
        return torch.ones(size, device=dev, dtype=dtype)
    tiny = torch.finfo(compute_dtype).tiny
    u = torch.rand((2, size.numel()), generator=generator, device=dev, dtype=compute_dtype)
    # U strictly inside (0, 1): both sines positive.
    pu = u[0].clamp(tiny, 1.0 - torch.finfo(compute_dtype).eps) * math.pi
    w = -torch.log(u[1].clamp_min(tiny))
    log_a = torch.log(torch.sin(alpha * pu)) - torch.log(torch.sin(pu)) / alpha + (1.0 - alpha) / alpha * (
        torch.log(torch.sin((1.0 - alpha) * pu)) - torch.log(w)
    )
    return _cast(torch.exp(log_a.clamp(max=_EXP_ARG_MAX[compute_dtype])).reshape(size), dtype)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and ``keys`` (counter-based seeding).

    Strings are hashed with a fixed function (not Python's salted ``hash``), so the result is the same in every
    process, on every rank and after a restart. Nearby inputs give unrelated outputs (SplitMix64 finalizer).

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
