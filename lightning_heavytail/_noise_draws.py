"""One parameter's noise at one step: its key, its target (the tensor written and where it sits), its draws.

The stream of parameter ``name`` at ``step`` is ``noise_key(seed, step, name) = derive_key(seed, step) ^
name_key(name)`` (word by word), so the per-step key work for all parameters is one xor; ``name_key`` hashes a name
once. The elliptical mixing variables use that stream xor-ed with a fixed word. The draws of a parameter are read at
the global index of each of its units (``"neuron"``) or entries (``"iid"``, ``"elliptical"``), so a shard draws exactly
its slice of the whole parameter's noise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_heavytail._counters import SamplerPath, as_int64, choose_path, compile_available
from lightning_heavytail._tensors import compute_dtype
from lightning_heavytail.sharding import LocalBlock, is_sharded, local_part
from lightning_heavytail.stable import derive_key, normal_at, positive_stable_at, stable_at, string_word

NAME_LANES = (0x452821E638D01377, 0xBE5466CF34E90C6C)  # more hex digits of pi
MIXING_WORDS = (as_int64(0xC0AC29B7C97C50DD), as_int64(0x3F84D5B5B5470917))
# Draws are bounded by ~1e20 for alpha >= 0.5 (see stable.py), so below the scale bound of check_noise_scale a
# finite float32/bfloat16/float64 parameter cannot overflow when noise is added. Below alpha = 0.5 float32 draws reach
# ~1e38, so there, as for fp16, the sum is checked before it is written.
HEAVIEST_SAFE_ALPHA = 0.5


@dataclass(frozen=True)
class NoiseTarget:
    """One tensor to add noise to.

    Attributes:
        name: the parameter's name; with the seed and the step it keys the noise.
        tensor: what is written: the parameter itself, or the local part of a sharded one.
        block: where ``tensor`` sits in the whole parameter (``LocalBlock.whole`` for an unsharded one).
        sharded: whether other ranks hold other parts of the parameter (then every rank must agree on skipping it).
    """

    name: str
    tensor: Tensor
    block: LocalBlock
    sharded: bool = False

    @classmethod
    def of(cls, name: str, tensor: Tensor) -> NoiseTarget:
        """The target of a parameter: itself, or for a DTensor (FSDP2, tensor parallel) its local part."""
        local, block = local_part(tensor)
        return cls(name, local, block, is_sharded(tensor))


@functools.lru_cache(maxsize=1 << 14)
def name_key(name: str) -> tuple[int, int]:
    """The two 64-bit words a parameter name contributes to its noise key (a fixed hash, computed once per name).

    Examples:
        >>> name_key("hidden.weight") == name_key("hidden.weight") != name_key("out.weight")
        True
    """
    return as_int64(string_word(name, NAME_LANES[0])), as_int64(string_word(name, NAME_LANES[1]))


def noise_key(seed: int, step: int, name: str) -> tuple[int, int]:
    """The stream key of one parameter's noise at one step: ``derive_key(seed, step) ^ name_key(name)``.

    Two different (step, name) pairs share a key with probability about ``2**-128``.

    Examples:
        >>> noise_key(0, 1, "w") != noise_key(0, 2, "w") and noise_key(0, 1, "w") != noise_key(0, 1, "v")
        True
    """
    return stream_key(derive_key(seed, step), name)


def stream_key(step_key: tuple[int, int], name: str) -> tuple[int, int]:
    """The noise key of parameter ``name`` at the step whose key is ``step_key`` (``derive_key(seed, step)``)."""
    words = name_key(name)
    return step_key[0] ^ words[0], step_key[1] ^ words[1]


def mixing_key(key: tuple[int, int]) -> tuple[int, int]:
    """The stream of the elliptical mixing variables of the parameter whose noise key is ``key``."""
    return key[0] ^ MIXING_WORDS[0], key[1] ^ MIXING_WORDS[1]


def draw_count(shape: torch.Size, structure: str) -> int:
    """Draws per step of a tensor of ``shape``: one per unit (dim 0) for ``"neuron"``, else one per entry.

    Of the whole parameter (``block.global_shape``), it is the size the sampler kernel is chosen by.
    """
    return int(shape[0]) if structure == "neuron" and len(shape) > 0 else int(shape.numel())


def unit_shape(shape: torch.Size) -> torch.Size:
    """The shape of one value per unit (dim 0), broadcasting over a tensor of ``shape``."""
    return shape if len(shape) == 0 else torch.Size([shape[0]] + [1] * (len(shape) - 1))


def standard_noise(block: LocalBlock, alpha: float, structure: str, key: tuple[int, int], device: torch.device,
                   dtype: torch.dtype) -> tuple[Tensor, SamplerPath]:
    """Scale-1 noise of one block, shaped to broadcast over it, and the kernel that drew it.

    The kernel is chosen by the whole parameter's draw count, never the block's, so a shard draws what the whole
    tensor would.
    """
    path = choose_path(draw_count(block.global_shape, structure), device)
    if structure != "iid":  # the units' global indices
        rows = block.rows()
        rows = rows.to(device) if isinstance(rows, Tensor) else rows
    if structure == "neuron":
        noise = stable_at(alpha, key, rows, device=device, dtype=dtype, path=path)
        noise = noise.reshape(unit_shape(block.local_shape))
    elif structure == "iid":
        noise = stable_at(alpha, key, block.flat_index(device), device=device, dtype=dtype, path=path)
        noise = noise.reshape(block.local_shape)
    else:  # elliptical: sqrt(A) * G per unit, A positive (alpha/2)-stable (1 at alpha = 2), G ~ N(0, 2 I)
        noise = normal_at(key, block.flat_index(device), device=device, dtype=dtype, path=path)
        noise = noise.reshape(block.local_shape).mul_(math.sqrt(2.0))
        if alpha < 2.0:
            mixing = positive_stable_at(alpha / 2.0, mixing_key(key), rows, device=device, dtype=dtype, path=path)
            noise = noise.mul_(mixing.sqrt_().reshape(unit_shape(block.local_shape)))
    # a compile failure during the call falls back to eager: report what ran
    return noise, path if compile_available(device) else "eager"


def scaled_noise(target: NoiseTarget, alpha: float, scale: float, structure: str, key: tuple[int, int]) -> tuple[
        Tensor, SamplerPath]:
    """The noise of one target drawn alone, times ``scale``, clipped to the compute dtype (what a batch gives it)."""
    dtype = compute_dtype(target.tensor.dtype)  # float64 parameters get float64 noise, every other float32
    noise, path = standard_noise(target.block, alpha, structure, key, target.tensor.device, dtype)
    finfo = torch.finfo(dtype)
    return noise.mul_(scale).clamp_(finfo.min, finfo.max), path



def is_narrow(dtype: torch.dtype) -> bool:
    # fp16 (max 65504) overflows under heavy-tailed noise; bf16, fp32 and fp64 share float32's range or more.
    return torch.finfo(dtype).max < 1e38


def as_target(item: tuple[str, Tensor] | NoiseTarget) -> NoiseTarget:
    """A ``NoiseTarget`` from a ``(name, tensor)`` pair (or itself), refusing what cannot take noise."""
    target = item if isinstance(item, NoiseTarget) else NoiseTarget.of(*item)
    if not isinstance(target.name, str):
        raise TypeError(f"parameter names must be strings, got {type(target.name).__name__}: {target.name!r}")
    tensor = target.tensor
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        what = f"a {tensor.dtype} tensor" if isinstance(tensor, Tensor) else type(tensor).__name__
        raise TypeError(f"parameter {target.name!r} must be a real floating point tensor to get noise, got {what}")
    return target


def check_distinct(targets: Sequence[NoiseTarget]) -> None:
    """Refuse a name given twice (both tensors would get identical noise) or a tensor given twice (noised twice)."""
    names: set[str] = set()
    tensors: dict[int, str] = {}
    for target in targets:
        if target.name in names:
            raise ValueError(
                f"parameter name {target.name!r} is given twice: the noise is a function of (seed, step, name), so"
                " both tensors would get identical noise. Give every tensor its own name (e.g. prefix each model's"
                " named_parameters() with the model's name)."
            )
        names.add(target.name)
        owner = tensors.setdefault(id(target.tensor), target.name)
        if owner != target.name:
            raise ValueError(
                f"the same tensor is given as {owner!r} and as {target.name!r}; it would get noise twice per step"
            )


