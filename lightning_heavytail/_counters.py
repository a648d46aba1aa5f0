"""The counter-based kernels behind the sampler: 64-bit words from (key, index), uniforms, transforms, kernels.

Everything here is a pure function of the 128-bit key and the draw's index (see ``lightning_heavytail.stable`` for
the scheme and the law). Two kernels compute the same draws: ``"eager"``, plain torch operations, and ``"compiled"``,
the same functions fused by ``torch.compile``; they round differently in the last bits, so the kernel is part of what a
draw is (``choose_path`` picks it from a size that sharding does not change).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

SamplerPath = Literal["eager", "compiled"]

# Largest float32 strictly below pi/2: its cosine is positive (~1.2e-7); float32(pi/2) itself is above pi/2.
V_MAX = math.nextafter(math.pi / 2, 0.0)
V_MAX_F32 = float(torch.tensor(math.pi / 2, dtype=torch.float32).nextafter(torch.tensor(0.0)).item())
# Largest float below pi: sin of it is positive (float32(pi) is above pi, and its sine negative).
PI_BELOW = {
    torch.float32: float(torch.tensor(math.pi, dtype=torch.float32).nextafter(torch.tensor(0.0)).item()),
    torch.float64: math.nextafter(math.pi, 0.0),
}
# exp() argument bound: the prefactor sin/cos is at most ~1/cos(V_MAX), so the product stays finite.
EXP_ARG_MAX = {torch.float32: 72.0, torch.float64: 690.0}

COMPILE_MIN_DRAWS = 1 << 20
"""Requests of at least this many draws go through a torch.compile-fused kernel where one is available.

The compiled and the eager kernel compute the same formula but round differently in the last bits (about half of the
float32 draws differ, by about 1e-7 relative), so which one ran is part of what a draw is: callers that must be
reproducible decide from a size that does not depend on sharding (the noise uses the whole parameter's count) and
record the path. ``LIGHTNING_HEAVYTAIL_COMPILE=0`` turns compiling off.
"""
COMPILE_ENV = "LIGHTNING_HEAVYTAIL_COMPILE"
# Chunk of the eager path. On the CPU its temporaries (a few MB) stay in cache; on a GPU each of the ~40 operations
# of a chunk is a kernel launch, so chunks are larger (measured on an H200: 2**18 made 16.7M draws 60x slower).
EAGER_CHUNK = {"cpu": 1 << 18}
EAGER_CHUNK_OTHER = 1 << 23

def as_int64(value: int) -> int:
    """The signed int64 with the same 64 bits as the unsigned ``value``."""
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64 (Steele, Lea, Flood 2014; the generator Java's SplittableRandom uses and xoshiro's authors recommend for
# seeding): output i of the stream with state ``key`` is mix(key + i * GOLDEN), computed with int64 arithmetic that
# wraps modulo 2**64.
GOLDEN = as_int64(0x9E3779B97F4A7C15)
MIX1 = as_int64(0xBF58476D1CE4E5B9)
MIX2 = as_int64(0x94D049BB133111EB)
# The two lanes of a 128-bit key start from different constants (hex digits of pi).

# Tells the second word of a float64 draw from the first (more hex digits of pi). A second counter (2i + 1) would do,
# but inductor folds 2 * GOLDEN into a constant that overflows int64.
SECOND_WORD = as_int64(0xA4093822299F31D0)


def srl(x: Tensor, shift: int) -> Tensor:
    """Logical (unsigned) right shift of int64 bits; torch's ``>>`` on int64 is arithmetic."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix64(z: Tensor) -> Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping arithmetic)."""
    z = (z ^ srl(z, 30)) * MIX1
    z = (z ^ srl(z, 27)) * MIX2
    return z ^ srl(z, 31)


def counter_bits(k1: Tensor, k2: Tensor, counter: Tensor, words: int = 1,
                 golden: Tensor | int = GOLDEN) -> list[Tensor]:
    """``words`` words of 64 random bits per counter.

    SplitMix64 output ``counter + 1`` of state ``k1``, finalized again after an xor with ``k2`` (the second word:
    with ``k2 ^ SECOND_WORD``). ``golden`` is ``GOLDEN``, as a 0-dim int64 tensor in compiled kernels: given as a
    number, inductor folds ``counter * GOLDEN`` into the kernel's index arithmetic, which Triton computes in int32
    and refuses ("Scalar ... is out of range for type int32"); loaded from a tensor it is int64 data.
    """
    inner = mix64((counter + 1) * golden + k1)
    return [mix64(inner ^ k2), mix64(inner ^ (k2 ^ SECOND_WORD))][:words]


def float32_uniforms(z: Tensor) -> tuple[Tensor, Tensor]:
    """Two float32 uniforms ``(k + 0.5) * 2**-23`` from bits 41-63 and 0-22 of each word: strictly inside (0, 1)."""
    return (srl(z, 41).to(torch.float32) + 0.5) * 2.0**-23, ((z & 0x7FFFFF).to(torch.float32) + 0.5) * 2.0**-23


def float64_uniform(z: Tensor) -> Tensor:
    """A float64 uniform ``(k + 0.5) * 2**-52`` from the top 52 bits of each word: strictly inside (0, 1)."""
    return (srl(z, 12).to(torch.float64) + 0.5) * 2.0**-52


def uniform_pair(k1: Tensor, k2: Tensor, index: Tensor, dtype: torch.dtype,
                 golden: Tensor | int = GOLDEN) -> tuple[Tensor, Tensor]:
    """Two independent uniforms in (0, 1) per index: one word per draw in float32, two in float64."""
    if dtype == torch.float32:
        return float32_uniforms(counter_bits(k1, k2, index, golden=golden)[0])
    first, second = counter_bits(k1, k2, index, words=2, golden=golden)
    return float64_uniform(first), float64_uniform(second)


def cms_transform(u_v: Tensor, u_w: Tensor, alpha: Tensor | float) -> Tensor:
    """Map two uniforms in (0, 1) per draw to standard SaS(1) draws: ``u_v`` gives V, ``u_w`` gives W.

    Written as ``sin(aV)/cos V * (cos((1-a)V) / (W cos V))**((1-a)/a)``, algebraically equal to the CMS formula but
    with one power (one exp, one log) instead of two.
    """
    v_max = V_MAX_F32 if u_v.dtype == torch.float32 else V_MAX
    v = ((u_v - 0.5) * math.pi).clamp(-v_max, v_max)
    w = -torch.log(u_w)
    cos_v = torch.cos(v)
    power = (1.0 - alpha) / alpha * torch.log(torch.cos((1.0 - alpha) * v) / (w * cos_v))
    return torch.sin(alpha * v) / cos_v * torch.exp(power.clamp(max=EXP_ARG_MAX[u_v.dtype]))


def kanter_transform(u: Tensor, u_w: Tensor, alpha: Tensor | float) -> Tensor:
    """Positive alpha-stable draws (Laplace transform ``exp(-s**alpha)``) from two uniforms in (0, 1) per draw."""
    pu = (u * math.pi).clamp(max=PI_BELOW[u.dtype])  # both sines positive
    log_a = torch.log(torch.sin(alpha * pu)) - torch.log(torch.sin(pu)) / alpha + (1.0 - alpha) / alpha * (
        torch.log(torch.sin((1.0 - alpha) * pu)) - torch.log(-torch.log(u_w))
    )
    return torch.exp(log_a.clamp(max=EXP_ARG_MAX[u.dtype]))


def box_muller(u_r: Tensor, u_angle: Tensor, alpha: Tensor | float) -> Tensor:
    """Standard normal draws (the cosine half of Box-Muller); ``alpha`` is unused."""
    return torch.sqrt(-2.0 * torch.log(u_r)) * torch.cos((2.0 * math.pi) * u_angle)


TRANSFORMS: dict[str, Callable[[Tensor, Tensor, Tensor | float], Tensor]] = {
    "stable": cms_transform,
    "positive_stable": kanter_transform,
    "normal": box_muller,
}


def counter_draws(kind: str, k1: Tensor, k2: Tensor, index: Tensor, alpha: Tensor | float,
                  dtype: torch.dtype, golden: Tensor | int = GOLDEN) -> Tensor:
    """Draws of ``kind`` at counter ``index`` of the streams ``(k1, k2)`` (int64 tensors broadcasting with index)."""
    u_a, u_b = uniform_pair(k1, k2, index, dtype, golden)
    return TRANSFORMS[kind](u_a, u_b, alpha)


def ranged_draws(kind: str, k1: Tensor, k2: Tensor, start: int, count: int, alpha: Tensor | float,
                 dtype: torch.dtype, golden: Tensor | int = GOLDEN) -> Tensor:
    index = torch.arange(start, start + count, dtype=torch.int64, device=k1.device)
    return counter_draws(kind, k1, k2, index, alpha, dtype, golden)


_compiled_lock = threading.Lock()
_compiled_fns: dict[str, Callable[..., Tensor]] = {}
compile_failed: set[str] = set()


def compile_available(device: torch.device | str) -> bool:
    """Whether draws on ``device`` may go through the torch.compile'd kernel (see ``COMPILE_MIN_DRAWS``).

    False where ``LIGHTNING_HEAVYTAIL_COMPILE=0``, on devices other than CPU and CUDA, or after compiling failed once
    on that device type in this process.
    """
    device_type = torch.device(device).type
    setting = os.environ.get(COMPILE_ENV, "auto").lower()
    return setting not in ("0", "false", "off", "no") and device_type in ("cpu", "cuda") and (
        device_type not in compile_failed
    )


def _compiled(name: str) -> Callable[..., Tensor]:
    with _compiled_lock:
        if name not in _compiled_fns:
            fn = ranged_draws if name == "ranged" else counter_draws
            _compiled_fns[name] = torch.compile(fn, dynamic=True)
    return _compiled_fns[name]


def choose_path(global_count: int, device: torch.device | str) -> SamplerPath:
    """The kernel that computes a request whose whole (unsharded) size is ``global_count`` draws on ``device``."""
    return "compiled" if global_count >= COMPILE_MIN_DRAWS and compile_available(device) else "eager"


def run(kind: str, key: tuple[Tensor, Tensor], index: Tensor | range, alpha: float, dtype: torch.dtype,
         path: SamplerPath) -> tuple[Tensor, SamplerPath]:
    """Draws of ``kind`` at ``index`` with the chosen kernel; falls back to eager (and says so) if compiling fails."""
    k1, k2 = key
    alpha_t = torch.tensor(alpha, dtype=dtype, device=k1.device)  # a tensor: one graph serves every alpha
    if path == "compiled":
        golden = torch.tensor(GOLDEN, dtype=torch.int64, device=k1.device)  # data, not a constant: see counter_bits
        try:
            if isinstance(index, range):
                return _compiled("ranged")(kind, k1, k2, index.start, len(index), alpha_t, dtype, golden), "compiled"
            return _compiled("indexed")(kind, k1, k2, index, alpha_t, dtype, golden), "compiled"
        except Exception:  # pragma: no cover - depends on the platform's compiler
            compile_failed.add(k1.device.type)
    if isinstance(index, Tensor):
        return counter_draws(kind, k1, k2, index, alpha_t, dtype), "eager"
    out = torch.empty(len(index), dtype=dtype, device=k1.device)
    chunk = EAGER_CHUNK.get(k1.device.type, EAGER_CHUNK_OTHER)
    for offset in range(0, len(index), chunk):
        count = min(chunk, len(index) - offset)
        out[offset:offset + count] = ranged_draws(kind, k1, k2, index.start + offset, count, alpha_t, dtype)
    return out, "eager"


