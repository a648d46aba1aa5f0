r"""Heavy-tailed noise on parameters: the update of Wan, Barsbey, Zaidi and Şimşekli (ICML 2024).

After every optimizer step the iterate gets

    w <- w + sigma * eta**(1/alpha) * X,    X ~ SaS(1),

with ``eta`` the step's learning rate and ``X`` drawn afresh (see ``lightning_heavytail.stable`` for the
parametrization: ``alpha = 2`` is ``N(0, 2)``). The noise structures follow the authors' code:

- ``"iid"`` (their type 2): an independent draw for every coordinate.
- ``"neuron"`` (type 1, the structure the theory covers): one draw per output unit, i.e. per row of a Linear weight
  or per conv filter (dimension 0), broadcast over that unit's incoming weights.
- ``"elliptical"`` (type 3): per unit a sub-Gaussian stable vector ``sqrt(A) * G`` with ``G ~ N(0, 2 I)`` and ``A``
  positive (alpha/2)-stable with Laplace transform ``exp(-s**(alpha/2))``; each coordinate is SaS(1), the coordinates
  of a unit are dependent. (The authors use ``G ~ N(0, I)``, i.e. marginal scale ``2**-0.5``; here every structure
  has scale-1 marginals, so ``sigma`` means the same thing for all three.)

Reproducibility is counter-based: the noise of a parameter at a step is a pure function of ``(seed, step, name)``
(``derive_seed``), so it does not depend on what ran before, on the process, or on
the DDP rank, and a resumed run draws exactly what an uninterrupted run draws.

References:
    Y. Wan, M. Barsbey, A. Zaidi, U. Şimşekli, "Implicit Compressibility of Overparametrized Neural Networks
    Trained with Heavy-Tailed SGD", ICML 2024, arXiv:2306.08125.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lightning_heavytail._checks import check_alpha, check_choice, check_int, check_positive_finite
from lightning_heavytail.sharding import LocalBlock, is_sharded, local_part
from lightning_heavytail.stable import (
    SamplerPath,
    StreamKey,
    choose_path,
    compile_available,
    derive_key,
    normal_at,
    positive_stable_at,
    stable_at,
)

__all__ = [
    "NOISE_STRUCTURES",
    "NoiseStats",
    "NoiseTarget",
    "NonFiniteParameterError",
    "add_heavy_tailed_noise",
    "add_heavy_tailed_noise_groups",
    "check_noise_scale",
    "draw_noise",
    "noise_scale",
]

NOISE_STRUCTURES = ("iid", "neuron", "elliptical")
NONFINITE_POLICIES = ("raise", "skip", "ignore")
NoiseStructure = Literal["iid", "neuron", "elliptical"]
NonFinitePolicy = Literal["raise", "skip", "ignore"]

# Draws are bounded by ~1e20 for alpha >= 0.5 (see stable.py), so below this scale a finite float32/bfloat16/float64
# parameter cannot overflow when noise is added. Below alpha = 0.5 float32 draws reach ~1e38, so there, as for fp16,
# the sum is checked before it is written (see _may_overflow).
_MAX_SCALE = 1e15
_HEAVIEST_SAFE_ALPHA = 0.5


class NonFiniteParameterError(FloatingPointError):
    """A selected parameter holds inf or NaN at a noise step (the message names it and the step)."""


@dataclass
class NoiseStats:
    """What one call of ``add_heavy_tailed_noise`` did.

    Attributes:
        noised: names of the parameters that received noise.
        skipped: names of the parameters left untouched because they were (or would become) non-finite.
        max_abs_noise: the largest |noise| added, when asked for (``track_max=True``), else ``None``.
        paths: for each noised parameter, the sampler kernel that drew its noise, ``"eager"`` or ``"compiled"``
            (see ``lightning_heavytail.stable.COMPILE_MIN_DRAWS``): the two round differently in the last bits.
    """

    noised: list[str]
    skipped: list[str]
    max_abs_noise: float | None = None
    paths: dict[str, str] = field(default_factory=dict)


def noise_scale(sigma: float, lr: float, alpha: float, *, lr_scaling: bool = True) -> float:
    r"""The scale of the noise added after a step: ``sigma eta^{1/alpha}``, or ``sigma`` without scaling.

    The exponent ``1/alpha`` is what makes the noise the Euler discretization of an alpha-stable Lévy-driven SDE
    with step ``lr`` (a Lévy process increment over time ``lr`` has scale ``lr**(1/alpha)``).

    Args:
        sigma: noise level, >= 0.
        lr: learning rate of the step, >= 0.
        alpha: stability index in (0, 2].
        lr_scaling: if False the scale is ``sigma`` whatever the learning rate.

    Returns:
        The scale, >= 0.

    Examples:
        >>> round(noise_scale(0.003, 0.01, 1.75), 8)
        0.00021591
        >>> noise_scale(0.5, 0.1, 2.0, lr_scaling=False)
        0.5
    """
    if not lr_scaling:
        return float(sigma)
    if lr <= 0 or sigma == 0:
        return 0.0
    # In log space: lr**(1/alpha) overflows a Python float (OverflowError) for large lr and small alpha.
    log_scale = math.log(float(sigma)) + math.log(float(lr)) / alpha
    return math.exp(log_scale) if log_scale < 709.0 else math.inf


def _draw_count(block: LocalBlock, structure: str) -> int:
    """Draws per step of the whole parameter (not of the block): the size the sampler kernel is chosen by."""
    if structure == "neuron" and len(block.global_shape) > 0:
        return int(block.global_shape[0])
    return int(block.global_shape.numel())


def _unit_shape(block: LocalBlock) -> torch.Size:
    """The shape of one value per local unit (dim 0), broadcasting over the block."""
    shape = block.local_shape
    return shape if len(shape) == 0 else torch.Size([shape[0]] + [1] * (len(shape) - 1))


def _standard_noise(block: LocalBlock, alpha: float, structure: str, key: StreamKey, mixing_key: StreamKey,
                    device: torch.device, compute_dtype: torch.dtype) -> tuple[Tensor, SamplerPath]:
    """Scale-1 noise of ``block`` (SaS(1) marginals) shaped to broadcast over it, and the kernel that drew it.

    The kernel is chosen by the whole parameter's draw count, never the block's, so a shard draws what the whole
    tensor would.
    """
    path = choose_path(_draw_count(block, structure), device)
    rows = block.rows()
    rows = rows.to(device) if isinstance(rows, Tensor) else rows
    if structure == "neuron":
        noise = stable_at(alpha, key, rows, device=device, dtype=compute_dtype, path=path)
        noise = noise.reshape(_unit_shape(block))
    elif structure == "iid":
        noise = stable_at(alpha, key, block.flat_index(device), device=device, dtype=compute_dtype, path=path)
        noise = noise.reshape(block.local_shape)
    else:  # elliptical: sqrt(A) * G per unit, A positive (alpha/2)-stable (1 at alpha = 2), G ~ N(0, 2 I)
        noise = normal_at(key, block.flat_index(device), device=device, dtype=compute_dtype, path=path)
        noise = noise.reshape(block.local_shape).mul_(math.sqrt(2.0))
        if alpha < 2.0:
            mixing = positive_stable_at(alpha / 2.0, mixing_key, rows, device=device, dtype=compute_dtype, path=path)
            noise = noise.mul_(mixing.sqrt_().reshape(_unit_shape(block)))
    # a compile failure during the call falls back to eager: report what ran
    return noise, path if compile_available(device) else "eager"


def _stream_keys(seed: int, step: int, name: str) -> tuple[StreamKey, StreamKey]:
    """The keys of a parameter's noise at a step: the main stream, and the elliptical mixing variables' stream."""
    return derive_key(seed, step, name), derive_key(seed, step, name, "elliptical-mixing")


def draw_noise(
    shape: torch.Size | tuple[int, ...],
    alpha: float,
    *,
    structure: NoiseStructure = "iid",
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw the noise for one parameter of the given shape: ``scale * X`` with the chosen structure.

    Arithmetic runs in float32 (float64 for a float64 output) and is cast at the end. For ``"neuron"`` the result has
    shape ``(shape[0], 1, ..., 1)`` and broadcasts over the parameter; otherwise it has ``shape``. The stream keys
    come from ``generator`` (torch's default generator when None); the noise callback instead keys each parameter's
    noise by ``derive_key(seed, step, name)``.

    Args:
        shape: the parameter's shape; dimension 0 indexes output units.
        alpha: stability index in (0, 2].
        structure: ``"iid"``, ``"neuron"`` or ``"elliptical"`` (see the module docstring).
        scale: multiplies the scale-1 draws.
        generator: a ``torch.Generator``.
        device: where to draw.
        dtype: output dtype.

    Returns:
        The noise tensor.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> draw_noise((4, 3), 1.8, structure="neuron", generator=g).shape
        torch.Size([4, 1])
        >>> draw_noise((4, 3), 1.8, structure="elliptical", generator=g).shape
        torch.Size([4, 3])
    """
    check_alpha(alpha)
    check_choice(structure, NOISE_STRUCTURES, "structure")
    check_positive_finite(scale, "scale", allow_zero=True)
    dev = torch.device(device) if device is not None else (generator.device if generator else torch.device("cpu"))
    words = torch.randint(-(1 << 63), (1 << 63) - 1, (4,), generator=generator, dtype=torch.int64,
                          device=generator.device if generator is not None else dev).tolist()
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    noise, _ = _standard_noise(LocalBlock.whole(torch.Size(shape)), float(alpha), structure, (words[0], words[1]),
                               (words[2], words[3]), dev, compute_dtype)
    finfo = torch.finfo(dtype)
    return (noise * scale).clamp_(finfo.min, finfo.max).to(dtype)


def _is_finite(tensor: Tensor) -> bool:
    # A sum is one cheap reduction and is finite whenever every entry is; only when it is not (NaN/inf, or an
    # overflow of the sum itself) is the exact elementwise test worth its cost.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _is_narrow(dtype: torch.dtype) -> bool:
    # fp16 (max 65504) overflows under heavy-tailed noise; bf16, fp32 and fp64 share float32's range or more.
    return torch.finfo(dtype).max < 1e38


def _may_overflow(dtype: torch.dtype, alpha: float) -> bool:
    """Whether ``param + noise`` can overflow ``dtype`` although both are finite (see _MAX_SCALE)."""
    return _is_narrow(dtype) or (alpha < _HEAVIEST_SAFE_ALPHA and dtype != torch.float64)


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


def _noise_for(target: NoiseTarget, alpha: float, scale: float, structure: NoiseStructure, seed: int,
               step: int) -> tuple[Tensor, SamplerPath]:
    """The noise of one target at one step, a pure function of (seed, step, name, global index), and its kernel."""
    param = target.tensor
    # float64 parameters get float64 noise; every other dtype gets float32 arithmetic.
    compute_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    key, mixing_key = _stream_keys(seed, step, target.name)
    noise, path = _standard_noise(target.block, alpha, structure, key, mixing_key, param.device, compute_dtype)
    finfo = torch.finfo(compute_dtype)
    return noise.mul_(scale).clamp_(finfo.min, finfo.max), path


def _nonfinite_problem(target: NoiseTarget, alpha: float, scale: float, structure: NoiseStructure, seed: int,
                       step: int) -> str | None:
    """Why adding noise to the target now would train on inf/NaN, or None when it is safe."""
    name, param = target.name, target.tensor
    if not _is_finite(param):
        return (
            f"parameter {name!r} holds inf or NaN at noise step {step}, before noise was added: the optimizer step"
            " produced it (check the loss, the learning rate and the gradients)."
        )
    if _may_overflow(param.dtype, alpha):
        # The noise is a pure function of (seed, step, name): draw it here to check, and again to apply, rather
        # than hold a float32 copy of every fp16 parameter. Out of place: param.float() is param itself for fp32.
        updated = param.float() + _noise_for(target, alpha, scale, structure, seed, step)[0]
        if not bool(updated.abs().max() <= torch.finfo(param.dtype).max):
            return (
                f"noise would overflow parameter {name!r} ({param.dtype}) at noise step {step}; nothing was changed."
                " Lower sigma or keep master weights in float32."
            )
    return None


@torch.no_grad()
def add_heavy_tailed_noise(
    named_params: Iterable[tuple[str, Tensor] | NoiseTarget],
    alpha: float,
    scale: float,
    *,
    structure: NoiseStructure = "iid",
    seed: int = 0,
    step: int = 0,
    on_nonfinite: NonFinitePolicy = "raise",
    track_max: bool = False,
) -> NoiseStats:
    """Add ``scale * X`` in place to each parameter, X SaS(1) with the given structure, reproducibly.

    The noise of parameter ``name`` is the counter-based stream ``derive_key(seed, step, name)`` read at the global
    index of each entry (``"iid"``) or unit (``"neuron"``), on the parameter's own device, so it depends only on
    ``(seed, step, name)``: every DDP rank draws the same noise, a resumed run the same as an uninterrupted one, and
    a shard (see ``NoiseTarget``) exactly its slice. Names must therefore be distinct.

    Args:
        named_params: ``(name, parameter)`` pairs, e.g. from ``select_parameters``, or ``NoiseTarget``s.
        alpha: stability index in (0, 2].
        scale: noise scale, usually ``noise_scale`` of the step's learning rate; 0 adds nothing.
        structure: ``"iid"``, ``"neuron"`` or ``"elliptical"``.
        seed: base seed.
        step: the step counter that makes each step's noise fresh.
        on_nonfinite: what to do when a parameter is non-finite before the noise (the optimizer step produced it)
            or would become so (an fp16 overflow): ``"raise"`` a ``NonFiniteParameterError`` naming the parameter
            and step, before anything is changed; ``"skip"`` that parameter and report it in ``skipped``; or
            ``"ignore"`` (no check, fastest).
        track_max: also return the largest |noise| added (one extra reduction per parameter).

    Returns:
        A ``NoiseStats``.

    Raises:
        NonFiniteParameterError: with ``on_nonfinite="raise"``, see above.
        ValueError: on a bad argument, or a name given twice (two models' ``named_parameters()`` concatenated: prefix
            them), or one tensor under two names.
        TypeError: for a tensor that is not real floating point.

    Examples:
        >>> from torch import nn
        >>> net = nn.Linear(3, 2, bias=False)
        >>> before = net.weight.detach().clone()
        >>> stats = add_heavy_tailed_noise(net.named_parameters(), alpha=1.8, scale=0.01, seed=1, step=0)
        >>> stats.noised, bool((net.weight != before).all())
        (['weight'], True)
    """
    return add_heavy_tailed_noise_groups([(list(named_params), scale)], alpha, structure=structure, seed=seed,
                                         step=step, on_nonfinite=on_nonfinite, track_max=track_max)


def check_noise_scale(scale: float, argument: str = "scale") -> None:
    """Check that a noise scale is finite, >= 0 and at most the bound below which float32 parameters cannot overflow.

    Raises:
        ValueError: naming ``argument``, the allowed range and the value.
    """
    check_positive_finite(scale, argument, allow_zero=True)
    if scale > _MAX_SCALE:
        raise ValueError(
            f"`{argument}` must be at most {_MAX_SCALE:g} (heavier noise overflows float32), got {scale!r}"
        )


@torch.no_grad()
def add_heavy_tailed_noise_groups(
    groups: Sequence[tuple[Sequence[tuple[str, Tensor] | NoiseTarget], float]],
    alpha: float,
    *,
    structure: NoiseStructure = "iid",
    seed: int = 0,
    step: int = 0,
    on_nonfinite: NonFinitePolicy = "raise",
    track_max: bool = False,
) -> NoiseStats:
    """``add_heavy_tailed_noise`` for several groups of parameters, each with its own scale, all or nothing.

    Every check (the scales, then non-finite values and overflows of every parameter of every group) runs before any
    parameter is written, so an error leaves all of them as they were: this is what an optimizer step with several
    param groups (and learning rates) needs.

    Args:
        groups: ``(named_params, scale)`` pairs; ``named_params`` as in ``add_heavy_tailed_noise``.
        alpha: stability index in (0, 2].
        structure: ``"iid"``, ``"neuron"`` or ``"elliptical"``.
        seed: base seed.
        step: the step counter.
        on_nonfinite: ``"raise"``, ``"skip"`` or ``"ignore"``, as in ``add_heavy_tailed_noise``.
        track_max: also return the largest |noise| added.

    Returns:
        A ``NoiseStats`` over all groups.

    Examples:
        >>> from torch import nn
        >>> a, b = nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False)
        >>> b.weight.data[0, 0] = float("nan")
        >>> before = a.weight.detach().clone()
        >>> try:
        ...     add_heavy_tailed_noise_groups([(list(a.named_parameters()), 0.1), ([("b", b.weight)], 0.2)], 1.8)
        ... except NonFiniteParameterError:
        ...     print("raised; a unchanged:", bool(torch.equal(a.weight, before)))
        raised; a unchanged: True
    """
    check_alpha(alpha)
    for _, scale in groups:
        check_noise_scale(scale)
    check_choice(structure, NOISE_STRUCTURES, "structure")
    check_choice(on_nonfinite, NONFINITE_POLICIES, "on_nonfinite")
    check_int(seed, "seed", minimum=-(2**63))
    check_int(step, "step")
    grouped = [([_as_target(item) for item in items], float(scale)) for items, scale in groups]
    _check_distinct([target for targets, _ in grouped for target in targets])
    stats = NoiseStats(noised=[], skipped=[], max_abs_noise=0.0 if track_max else None)
    work = [(targets, scale) for targets, scale in grouped if scale > 0.0]
    seed, step = int(seed), int(step)
    # Check everything before writing anything, so that "raise" leaves every parameter as the optimizer left it.
    skipped: set[str] = set()
    if on_nonfinite != "ignore":
        checked = [(target, _nonfinite_problem(target, alpha, scale, structure, seed, step))
                   for targets, scale in work for target in targets]
        for target, problem in _agreed_across_ranks(checked, step):
            if problem is None:
                continue
            if on_nonfinite == "raise":
                raise NonFiniteParameterError(problem + " Pass on_nonfinite='skip' to leave such parameters alone.")
            skipped.add(target.name)
            stats.skipped.append(target.name)
    sharded = any(target.sharded for targets, _ in grouped for target in targets)
    largest = torch.zeros((), dtype=torch.float64)
    for targets, scale in work:
        for target in targets:
            if target.name in skipped:
                continue
            param = target.tensor
            noise, stats.paths[target.name] = _noise_for(target, alpha, scale, structure, seed, step)
            if track_max and noise.numel() > 0:
                largest = torch.maximum(largest, noise.abs().max().double().cpu())
            if _is_narrow(param.dtype):
                param.copy_(param.float().add_(noise))  # add in float32, round once
            else:
                param.add_(noise.to(param.dtype))
            stats.noised.append(target.name)
    if track_max:
        # the largest over the whole parameters: under sharding each rank saw only its part
        stats.max_abs_noise = float(_all_ranks_max(largest) if sharded else largest)
    return stats


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    )


def _all_ranks_max(values: Tensor) -> Tensor:
    """The elementwise max of ``values`` over all ranks (a no-op outside a process group)."""
    if not _distributed():
        return values
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    reduced = values.to(device)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    return reduced.to(values.device)


def _agreed_across_ranks(checked: list[tuple[NoiseTarget, str | None]],
                         step: int) -> list[tuple[NoiseTarget, str | None]]:
    """Make every rank reach the same verdict on every sharded target, whichever rank's part holds the problem.

    Without this, the rank whose shard holds a NaN would raise (or skip) while the others went on: a hang in the next
    collective, or a parameter noised on some ranks only. One all-reduce of one flag per target, only when a target
    is sharded.
    """
    if not any(target.sharded for target, _ in checked) or not _distributed():
        return checked
    flags = _all_ranks_max(torch.tensor([problem is not None for _, problem in checked], dtype=torch.int32))
    return [
        (target, problem if problem is not None or not bool(flag) else (
            f"parameter {target.name!r} holds inf or NaN, or would overflow, in another rank's part at noise step"
            f" {step}; nothing was changed on any rank."
        ))
        for (target, problem), flag in zip(checked, flags.tolist(), strict=True)
    ]


def _as_target(item: tuple[str, Tensor] | NoiseTarget) -> NoiseTarget:
    target = item if isinstance(item, NoiseTarget) else NoiseTarget.of(*item)
    if not isinstance(target.name, str):
        raise TypeError(f"parameter names must be strings, got {type(target.name).__name__}: {target.name!r}")
    tensor = target.tensor
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        what = f"a {tensor.dtype} tensor" if isinstance(tensor, Tensor) else type(tensor).__name__
        raise TypeError(f"parameter {target.name!r} must be a real floating point tensor to get noise, got {what}")
    return target


def _check_distinct(targets: Sequence[NoiseTarget]) -> None:
    """Refuse a name given twice (both tensors would get identical noise) or a tensor given twice (noised twice)."""
    names: dict[str, int] = {}
    tensors: dict[int, str] = {}
    for target in targets:
        if target.name in names:
            raise ValueError(
                f"parameter name {target.name!r} is given twice: the noise is a function of (seed, step, name), so"
                " both tensors would get identical noise. Give every tensor its own name (e.g. prefix each model's"
                " named_parameters() with the model's name)."
            )
        names[target.name] = 1
        owner = tensors.setdefault(id(target.tensor), target.name)
        if owner != target.name:
            raise ValueError(
                f"the same tensor is given as {owner!r} and as {target.name!r}; it would get noise twice per step"
            )
