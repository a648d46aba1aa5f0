"""Choosing which parameters a callback touches.

One selection rule serves both the noise and the pruning code, so "the weights" means the same thing everywhere:

- ``"weights"``: every trainable parameter with at least two dimensions (Linear weights, conv kernels, embeddings);
  biases and normalization parameters are left out.
- ``"paper"``: the weights, less the output layer (the last weight in registration order) and the first conv kernel,
  as in the authors' code (Wan et al., 2024) where noise goes to hidden weight matrices and kernels only.
- a glob pattern or a sequence of them, matched against parameter names (``"encoder.*.weight"``);
- a callable ``(name, parameter) -> bool``.

Frozen parameters (``requires_grad=False``) are never selected.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from torch import Tensor, nn

ParamSelector = str | Sequence[str] | Callable[[str, Tensor], bool]
"""What a ``params`` argument accepts: a preset name, glob pattern(s), or a predicate."""

PRESETS = ("weights", "paper")


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
    if callable(params):
        return
    patterns = [params] if isinstance(params, str) else params
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"`{argument}` must be {', '.join(repr(p) for p in PRESETS)}, a glob pattern, a sequence of patterns"
            f" or a callable (name, param) -> bool, got {type(params).__name__}: {params!r}"
        )
    if len(patterns) == 0 or any(p == "" for p in patterns):
        raise ValueError(f"`{argument}` must name at least one non-empty pattern, got {params!r}")


def validate_exclude(exclude: object, argument: str = "exclude") -> tuple[str, ...]:
    """Check an ``exclude`` argument and return it as a tuple of glob patterns (a bare string is one pattern).

    Args:
        exclude: the value to check.
        argument: the argument name used in error messages.

    Raises:
        ValueError: if ``exclude`` is neither a string nor a sequence of strings.

    Examples:
        >>> validate_exclude("out.*")
        ('out.*',)
        >>> validate_exclude(["out.*", "*.bias"])
        ('out.*', '*.bias')
    """
    # A bare string would otherwise be iterated character by character.
    patterns = (exclude,) if isinstance(exclude, str) else exclude
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"`{argument}` must be a glob pattern or a sequence of patterns, got {exclude!r}")
    return tuple(patterns)


def _weight_names(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad and p.ndim >= 2]


def _paper_names(module: nn.Module) -> list[str]:
    names = _weight_names(module)
    if not names:
        return names
    excluded = {names[-1]}  # the output layer
    conv_names = [name for name in names if dict(module.named_parameters())[name].ndim > 2]
    if conv_names:
        excluded.add(conv_names[0])  # the first conv
    return [name for name in names if name not in excluded]


def select_parameters(
    module: nn.Module,
    params: ParamSelector = "weights",
    *,
    exclude: Sequence[str] = (),
    argument: str = "params",
) -> list[tuple[str, nn.Parameter]]:
    """Return the ``(name, parameter)`` pairs of ``module`` that ``params`` selects, in registration order.

    Args:
        module: the model.
        params: ``"weights"``, ``"paper"``, glob pattern(s) or a predicate, see the module docstring.
        exclude: glob pattern(s) of names to leave out after selection.
        argument: the argument name used in error messages.

    Returns:
        The selected trainable parameters, without duplicates (shared parameters appear once).

    Raises:
        ValueError: if the selection matches no trainable parameter; the message lists the names available.

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
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if callable(params):
        names = [name for name, p in trainable.items() if params(name, p)]
    elif params == "weights":
        names = _weight_names(module)
    elif params == "paper":
        names = _paper_names(module)
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        names = [name for name in trainable if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]
    names = [name for name in names if not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)]
    if not names:
        available = ", ".join(f"{n} {tuple(p.shape)}" for n, p in trainable.items()) or "none"
        raise ValueError(
            f"`{argument}`={params!r} (exclude={list(exclude)!r}) selects no trainable parameter of"
            f" {type(module).__name__}. Trainable parameters: {available}"
        )
    return [(name, trainable[name]) for name in names]
