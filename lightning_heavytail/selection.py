"""Choosing which parameters a callback touches.

One selection rule serves both the noise and the pruning code, so "the weights" means the same thing everywhere:

- ``"weights"``: every trainable parameter with at least two dimensions (Linear weights, conv kernels, embeddings);
  biases and normalization parameters are left out.
- ``"paper"``: the weights, less the output layer (the last weight in registration order) and the first conv kernel,
  as in the authors' code (Wan et al., 2024) where noise goes to hidden weight matrices and kernels only.
- a glob pattern or a sequence of them, matched against parameter names (``"encoder.*.weight"``);
- a callable ``(name, parameter) -> bool``.

The presets read the model's structure, frozen parameters included: the output layer is the last weight whether or
not it is trainable (a mean-field network's frozen output layer is still its output layer). Frozen parameters
(``requires_grad=False``) are then left out, unless ``trainable_only=False`` (the noise callback selects its
candidates once and follows ``requires_grad`` at every step). Lazy parameters (``nn.LazyLinear`` before its first
forward) have no shape yet, so a selection that meets one raises ``UninitializedParameterError``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Literal, get_args

from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from lightning_heavytail._checks import check_exclude, check_selector

ParamSelector = str | Sequence[str] | Callable[[str, Tensor], bool]
"""What a ``params`` argument accepts: a preset name, glob pattern(s), or a predicate."""

SelectorPreset = Literal["weights", "paper"]
PRESETS: tuple[str, ...] = get_args(SelectorPreset)


class UninitializedParameterError(ValueError):
    """The selection met a lazy parameter (``nn.LazyLinear`` & co.) that has no shape until the first forward."""


def uninitialized_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module`` that are still lazy (no shape before the module's first forward).

    Examples:
        >>> uninitialized_parameters(nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2)))
        ['0.weight', '0.bias']
    """
    return [name for name, p in module.named_parameters() if isinstance(p, UninitializedParameter)]


def describe_parameters(named: Sequence[tuple[str, Tensor]] | list[tuple[str, Tensor]]) -> str:
    """``name (shape)`` for each pair, ``name (uninitialized)`` for a lazy parameter; "none" for no pair.

    Examples:
        >>> import torch
        >>> describe_parameters([("w", torch.zeros(2, 3)), ("lazy", UninitializedParameter())])
        'w (2, 3), lazy (uninitialized)'
    """
    parts = [
        f"{name} (uninitialized)" if isinstance(p, UninitializedParameter) else f"{name} {tuple(p.shape)}"
        for name, p in named
    ]
    return ", ".join(parts) or "none"


def validate_selector(params: object, argument: str = "params") -> None:
    """Check a ``params`` argument's type and patterns without a model, so constructors can fail early.

    Args:
        params: the value to check.
        argument: the argument name used in error messages.

    Raises:
        TypeError: if ``params`` is not a string, a sequence of strings or a callable.
        ValueError: if it is an empty sequence or an empty pattern.

    Examples:
        >>> validate_selector("weights")
        >>> validate_selector(3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: `params` must be 'weights', 'paper', a glob pattern, a sequence of patterns or a callable ...
    """
    check_selector(params, argument, PRESETS)


def validate_exclude(exclude: object, argument: str = "exclude") -> tuple[str, ...]:
    """Check an ``exclude`` argument and return it as a tuple of glob patterns (a bare string is one pattern).

    Args:
        exclude: the value to check.
        argument: the argument name used in error messages.

    Raises:
        TypeError: if ``exclude`` is neither a string nor a sequence of strings.

    Examples:
        >>> validate_exclude("out.*")
        ('out.*',)
        >>> validate_exclude(["out.*", "*.bias"])
        ('out.*', '*.bias')
    """
    return check_exclude(exclude, argument)


def _weight_names(named: dict[str, nn.Parameter]) -> list[str]:
    return [name for name, p in named.items() if p.ndim >= 2]


def _paper_names(named: dict[str, nn.Parameter]) -> list[str]:
    names = _weight_names(named)
    if not names:
        return names
    excluded = {names[-1]}  # the output layer
    conv_names = [name for name in names if named[name].ndim > 2]
    if conv_names:
        excluded.add(conv_names[0])  # the first conv
    return [name for name in names if name not in excluded]


def select_parameters(
    module: nn.Module,
    params: ParamSelector = "weights",
    *,
    exclude: Sequence[str] = (),
    argument: str = "params",
    trainable_only: bool = True,
) -> list[tuple[str, nn.Parameter]]:
    """Return the ``(name, parameter)`` pairs of ``module`` that ``params`` selects, in registration order.

    Args:
        module: the model.
        params: ``"weights"``, ``"paper"``, glob pattern(s) or a predicate, see the module docstring.
        exclude: glob pattern(s) of names to leave out after selection.
        argument: the argument name used in error messages.
        trainable_only: leave out parameters with ``requires_grad=False`` (the default). With False the frozen
            ones that ``params`` selects are returned too, and the error for an empty selection is only raised
            when nothing matches at all.

    Returns:
        The selected parameters, without duplicates (shared parameters appear once).

    Raises:
        UninitializedParameterError: if the module has a lazy parameter and ``params`` is a preset or a predicate
            (which need its shape), or a pattern matches a lazy parameter; run one forward pass first.
        ValueError: if the selection matches no (trainable) parameter; the message lists the names available.

    Examples:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> [name for name, _ in select_parameters(net)]
        ['0.weight', '2.weight']
        >>> [name for name, _ in select_parameters(net, "paper")]
        ['0.weight']
        >>> [name for name, _ in select_parameters(net, "*.bias")]
        ['0.bias', '2.bias']
    """
    validate_selector(params, argument)
    exclude = validate_exclude(exclude)
    named = dict(module.named_parameters())
    lazy = [name for name, p in named.items() if isinstance(p, UninitializedParameter)]
    needs_shapes = callable(params) or params in PRESETS  # patterns only read names
    if lazy and needs_shapes:
        raise UninitializedParameterError(
            f"`{argument}`={params!r} needs the shapes of the parameters of {type(module).__name__}, and {lazy} are"
            " lazy (uninitialized until the first forward pass): run one forward pass (or build the layers in"
            " configure_model) before selecting"
        )
    if callable(params):
        names = [name for name, p in named.items() if params(name, p)]
    elif params == "weights":
        names = _weight_names(named)
    elif params == "paper":
        names = _paper_names(named)
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        names = [name for name in named if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]
    names = [name for name in names if not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)]
    if trainable_only:
        names = [name for name in names if named[name].requires_grad]
    pending = [name for name in names if name in lazy]
    if pending:
        raise UninitializedParameterError(
            f"`{argument}`={params!r} selects lazy parameters of {type(module).__name__} that have no shape yet:"
            f" {pending}; run one forward pass (or build the layers in configure_model) before selecting"
        )
    if not names:
        what = "trainable parameter" if trainable_only else "parameter"
        pool = [(n, p) for n, p in named.items() if p.requires_grad or not trainable_only]
        raise ValueError(
            f"`{argument}`={params!r} (exclude={list(exclude)!r}) selects no {what} of"
            f" {type(module).__name__}. {what.capitalize()}s: {describe_parameters(pool)}"
        )
    return [(name, named[name]) for name in names]
