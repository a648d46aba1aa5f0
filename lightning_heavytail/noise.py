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

Reproducibility is counter-based: the noise of a parameter at a step is the stream ``noise_key(seed, step, name)``
read at the global index of each entry (or unit), so it does not depend on what ran before, on the process, on the
DDP rank or on sharding, and a resumed run draws exactly what an uninterrupted run draws. ``NoisePlan`` draws the
noise of many parameters in a few batched operations, bitwise as each would get it alone.

References:
    Y. Wan, M. Barsbey, A. Zaidi, U. Şimşekli, "Implicit Compressibility of Overparametrized Neural Networks
    Trained with Heavy-Tailed SGD", ICML 2024, arXiv:2306.08125.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_heavytail._checks import check_alpha, check_choice, check_int, check_noise_scale, check_positive_finite
from lightning_heavytail._names import NOISE_STRUCTURES, NoiseStructure
from lightning_heavytail._noise_draws import NoiseTarget, name_key, noise_key, standard_noise
from lightning_heavytail._noise_plan import NoisePlan, NoiseStats, NonFiniteParameterError
from lightning_heavytail._tensors import compute_dtype
from lightning_heavytail.sharding import LocalBlock

__all__ = [
    "NOISE_STRUCTURES",
    "NoisePlan",
    "NoiseStats",
    "NoiseTarget",
    "NonFiniteParameterError",
    "add_heavy_tailed_noise",
    "add_heavy_tailed_noise_groups",
    "check_noise_scale",
    "draw_noise",
    "name_key",
    "noise_key",
    "noise_scale",
]

NonFinitePolicy = Literal["raise", "skip", "ignore"]
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)


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
    noise by ``noise_key(seed, step, name)``.

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
    words = torch.randint(-(1 << 63), (1 << 63) - 1, (2,), generator=generator, dtype=torch.int64,
                          device=generator.device if generator is not None else dev).tolist()
    noise, _ = standard_noise(LocalBlock.whole(torch.Size(shape)), float(alpha), structure, (words[0], words[1]),
                              dev, compute_dtype(dtype))
    finfo = torch.finfo(dtype)
    return (noise * scale).clamp_(finfo.min, finfo.max).to(dtype)


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

    The noise of parameter ``name`` is the counter-based stream ``noise_key(seed, step, name)`` read at the global
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


@torch.no_grad()
def add_heavy_tailed_noise_groups(
    groups: Sequence[tuple[Sequence[tuple[str, Tensor] | NoiseTarget], float]],
    alpha: float,
    *,
    seed: int = 0,
    step: int = 0,
    structure: NoiseStructure = "iid",
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
        seed: base seed.
        step: the step counter.
        structure: ``"iid"``, ``"neuron"`` or ``"elliptical"``.
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
    scales = [float(scale) for items, scale in groups for _ in items]
    plan = NoisePlan([item for items, _ in groups for item in items], structure)
    return plan.apply(scales, float(alpha), seed=int(seed), step=int(step), on_nonfinite=on_nonfinite,
                      track_max=track_max)
