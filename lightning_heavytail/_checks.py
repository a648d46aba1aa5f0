"""Every argument check of the package, called by the functions and the callbacks that take the argument.

One exception policy: ``TypeError`` for a value of the wrong type (a string, ``None`` or a bool where a number is
expected, a number where a name is expected), ``ValueError`` for a value of the right type outside what is allowed.
Messages name the argument, say what is allowed and show the value given. Checks that need a package's own lists
(noise structures, pruning methods, selector presets) take them as an argument, so this module imports nothing from
the package.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection

SHARDING_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
"""Lightning's strategies that shard parameters across ranks (matched by class name, subclasses included)."""

MAX_NOISE_SCALE = 1e15
"""The largest noise scale: draws are bounded by ~1e20 for alpha >= 0.5 (see ``stable``), so below this scale a finite
float32/bfloat16/float64 parameter cannot overflow when noise is added."""


def is_real(value: Any) -> bool:
    """A real number that is not a bool: Python and numpy ints and floats alike (``numbers.Real``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An integer that is not a bool: Python and numpy ints alike (``numbers.Integral``)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _got(value: Any) -> str:
    return f"{type(value).__name__}: {value!r}"


def check_bool(value: Any, argument: str) -> None:
    """Raise a TypeError unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"`{argument}` must be True or False, got {value!r}")


def check_real(value: Any, argument: str, allowed: str) -> float:
    """``value`` as a float, or a TypeError saying it must be ``allowed`` (a number, not a bool or a string)."""
    if not is_real(value):
        raise TypeError(f"`{argument}` must be {allowed}, got {_got(value)}")
    return float(value)


def check_alpha(alpha: Any, argument: str = "alpha") -> None:
    """Raise unless ``alpha`` is a real number in (0, 2]."""
    if not 0.0 < check_real(alpha, argument, "a number in (0, 2]") <= 2.0:
        raise ValueError(f"`{argument}` must be a number in (0, 2], got {alpha!r}")


def check_positive_stable_alpha(alpha: Any, *, allow_one: bool = True) -> None:
    """Raise unless ``alpha`` is in (0, 1] (``allow_one``) or (0, 1): the index of a positive stable law."""
    bound = "(0, 1]" if allow_one else "(0, 1)"
    value = check_real(alpha, "alpha", f"a number in {bound}")
    if not 0.0 < value <= 1.0 or (not allow_one and value == 1.0):
        raise ValueError(f"`alpha` of a positive stable law must be in {bound}, got {alpha!r}")


def check_positive_finite(value: Any, argument: str, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    number = check_real(value, argument, f"a finite number {bound}")
    if not math.isfinite(number) or not (number >= 0 if allow_zero else number > 0):
        raise ValueError(f"`{argument}` must be a finite number {bound}, got {value!r}")


def check_shape(shape: Any) -> torch.Size:
    """``shape`` (an int >= 0 or a sequence of them) as a ``torch.Size``."""
    dims = [shape] if is_integer(shape) else shape
    allowed = "an int >= 0 or a sequence of ints >= 0"
    if not isinstance(dims, Sequence) or not all(is_integer(d) for d in dims):
        raise TypeError(f"`shape` must be {allowed}, got {_got(shape)}")
    if any(int(d) < 0 for d in dims):
        raise ValueError(f"`shape` must be {allowed}, got {shape!r}")
    return torch.Size([int(d) for d in dims])


def check_stream_key(key: Any) -> tuple[int, int]:
    """A 128-bit stream key: two signed 64-bit ints (see ``stable.derive_key``)."""
    allowed = "two signed 64-bit ints (see derive_key)"
    if not isinstance(key, (tuple, list)) or len(key) != 2 or not all(is_integer(word) for word in key):
        raise TypeError(f"`key` must be {allowed}, got {key!r}")
    if not all(-(2**63) <= word < 2**63 for word in key):
        raise ValueError(f"`key` must be {allowed}, got {key!r}")
    return int(key[0]), int(key[1])


def check_draw_index(index: Any) -> None:
    """The positions of draws in a stream: an int64 tensor, or a range with step 1 from a start >= 0."""
    if isinstance(index, torch.Tensor):
        if index.dtype != torch.int64:
            raise TypeError(f"`index` must be an int64 tensor or a range, got a {index.dtype} tensor")
    elif isinstance(index, range):
        if index.step != 1 or index.start < 0:
            raise ValueError(f"`index` must be a range with step 1 and a start >= 0, got {index!r}")
    else:
        raise TypeError(f"`index` must be an int64 tensor or a range, got {type(index).__name__}")


def check_noise_scale(scale: Any, argument: str = "scale") -> None:
    """Check that a noise scale is finite, >= 0 and at most ``MAX_NOISE_SCALE`` (heavier noise overflows float32).

    Raises:
        TypeError: if ``scale`` is not a number.
        ValueError: naming ``argument``, the allowed range and the value.
    """
    check_positive_finite(scale, argument, allow_zero=True)
    if scale > MAX_NOISE_SCALE:
        raise ValueError(
            f"`{argument}` must be at most {MAX_NOISE_SCALE:g} (heavier noise overflows float32), got {scale!r}"
        )


def check_choice(value: Any, allowed: Collection[Any], argument: str) -> None:
    """Raise unless ``value`` is one of ``allowed`` (a TypeError when it is not even of their type)."""
    if value in allowed:
        return
    error = ValueError if any(isinstance(value, type(a)) for a in allowed) else TypeError
    raise error(f"`{argument}` must be one of {sorted(allowed)!r}, got {value!r}")


def check_weight(weight: Any, argument: str = "weight") -> torch.Tensor:
    """``weight`` detached: a tensor with at least one dimension and one entry."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim == 0 or weight.numel() == 0:
        raise ValueError(
            f"`{argument}` must have at least one dimension and one entry, got shape {tuple(weight.shape)}"
        )
    return weight.detach()


def check_metric_name(name: Any, known: Collection[str], argument: str) -> None:
    """Raise unless ``name`` is one of the metric names ``known`` (those the evaluation computes)."""
    if name not in known:
        raise ValueError(f"`{argument}` must be one of {sorted(known)!r} (the metrics computed), got {name!r}")


def check_names(value: Any, allowed: Sequence[str], argument: str) -> tuple[str, ...]:
    """One name of ``allowed``, or a non-empty sequence of distinct ones, as a tuple."""
    names = [value] if isinstance(value, str) else value
    what = f"one of {tuple(allowed)!r} or a sequence of them"
    if not isinstance(names, Sequence) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"`{argument}` must be {what}, got {_got(value)}")
    if not names:
        raise ValueError(f"`{argument}` must be {what}, got {value!r}")
    for name in names:
        if name not in allowed:
            context = "" if name is value else f" in {value!r}"
            raise ValueError(f"`{argument}` must be {what}, got {name!r}{context}")
    if len(set(names)) != len(names):
        raise ValueError(f"`{argument}` must not repeat a name, got {value!r}")
    return tuple(names)


def check_int(value: Any, argument: str, *, minimum: int = 0, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an int >= ``minimum`` (or None with ``allow_none``)."""
    if value is None and allow_none:
        return
    what = f"an int >= {minimum}" + (" or None" if allow_none else "")
    if not is_integer(value):
        raise TypeError(f"`{argument}` must be {what}, got {_got(value)}")
    if value < minimum:
        raise ValueError(f"`{argument}` must be {what}, got {value!r}")


def check_fraction(value: Any, argument: str, *, what: str = "", upper_open: bool = False) -> float:
    """``value`` as a float in [0, 1] ([0, 1) with ``upper_open``); ``what`` says what it is a share of."""
    allowed = f"a number in [0, {'1)' if upper_open else '1]'}" + (f" ({what})" if what else "")
    number = check_real(value, argument, allowed)
    if not (0.0 <= number < 1.0 if upper_open else 0.0 <= number <= 1.0):  # NaN fails too
        raise ValueError(f"`{argument}` must be {allowed}, got {value!r}")
    return number


def validate_epsilon(epsilon: Any, argument: str = "epsilon") -> float:
    """Check an epsilon budget: a real number in [0, 1] (a share of the squared norm).

    Raises:
        TypeError: if ``epsilon`` is not a number.
        ValueError: naming the argument and the value given, if it is outside [0, 1].

    Examples:
        >>> validate_epsilon(0.1)
        0.1
        >>> validate_epsilon(2)
        Traceback (most recent call last):
        ...
        ValueError: `epsilon` must be a number in [0, 1] (a share of the squared norm), got 2
    """
    return check_fraction(epsilon, argument, what="a share of the squared norm")


def validate_sparsities(sparsities: Any, argument: str = "sparsities") -> tuple[float, ...]:
    """Check sparsity levels: a non-empty, strictly increasing sequence of numbers in [0, 1).

    Args:
        sparsities: the value to check.
        argument: the argument name used in error messages.

    Returns:
        The levels as a tuple of floats.

    Raises:
        TypeError: if ``sparsities`` is not a sequence of numbers.
        ValueError: if it is empty, a level is outside [0, 1), or the levels are not strictly increasing; the
            message names the argument and the value given.

    Examples:
        >>> validate_sparsities([0, 0.5, 0.9])
        (0.0, 0.5, 0.9)
        >>> validate_sparsities([0.5, 0.5])
        Traceback (most recent call last):
        ...
        ValueError: `sparsities` must be strictly increasing (no repeated level), got [0.5, 0.5]
    """
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Iterable):
        raise TypeError(f"`{argument}` must be a non-empty sequence of numbers in [0, 1), got {_got(sparsities)}")
    levels = list(sparsities)
    if not levels:
        raise ValueError(f"`{argument}` must be a non-empty sequence of numbers in [0, 1), got {sparsities!r}")
    for level in levels:
        if not is_real(level):
            raise TypeError(f"`{argument}` must hold numbers in [0, 1), got {level!r} in {sparsities!r}")
        if not 0.0 <= float(level) < 1.0:  # NaN fails the range test too
            raise ValueError(f"`{argument}` must hold numbers in [0, 1), got {level!r} in {sparsities!r}")
    values = tuple(float(level) for level in levels)
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"`{argument}` must be strictly increasing (no repeated level), got {sparsities!r}")
    return values


def validate_forward(forward_fn: Any, output_key: Any) -> None:
    """Check ``forward_fn`` (None or a callable) and ``output_key`` (None, a dict key or a tuple index), not both.

    Raises:
        TypeError: for a ``forward_fn`` that is not callable, an ``output_key`` that is not a str or an int.
        ValueError: for an empty ``output_key``, or both given.

    Examples:
        >>> validate_forward(None, "logits")
        >>> validate_forward(None, 1.5)
        Traceback (most recent call last):
        ...
        TypeError: `output_key` must be None, a key (str) or an index (int) of the model's output, got float: 1.5
    """
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(
            f"`forward_fn` must be None or a callable (model, batch) -> (preds, target), got {forward_fn!r}"
        )
    if output_key is None:
        return
    if isinstance(output_key, bool) or not isinstance(output_key, (str, int)):
        raise TypeError(
            f"`output_key` must be None, a key (str) or an index (int) of the model's output, got {_got(output_key)}"
        )
    if output_key == "":
        raise ValueError("`output_key` must not be empty")
    if forward_fn is not None:
        raise ValueError(
            f"Pass `forward_fn` or `output_key`, not both: `forward_fn` returns the predictions itself (got"
            f" output_key={output_key!r})"
        )


def check_metrics(metrics: Any) -> None:
    """Raise a TypeError unless ``metrics`` is None, a torchmetrics Metric or a MetricCollection."""
    if metrics is not None and not isinstance(metrics, (Metric, MetricCollection)):
        raise TypeError(
            f"`metrics` must be None, a torchmetrics Metric or a torchmetrics MetricCollection, got {_got(metrics)}"
        )


def check_model(model: Any) -> None:
    """Raise a TypeError unless ``model`` is a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")


def check_dataloader(dataloader: Any, *, reiterable: bool = False, allow_none: bool = False) -> None:
    """Raise unless ``dataloader`` is an iterable of batches (``reiterable``: not one-shot), or None if allowed."""
    if dataloader is None and allow_none:
        return
    if isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable):
        allowed = "None or an iterable" if allow_none else "an iterable"
        raise TypeError(f"`dataloader` must be {allowed} of batches (a DataLoader), got {type(dataloader).__name__}")
    if reiterable and isinstance(dataloader, Iterator):
        raise ValueError(
            "`dataloader` must be re-iterable (it is read once per sparsity level and epoch), such as a DataLoader or"
            f" a list of batches, got a one-shot iterator {type(dataloader).__name__}"
        )


def resolve_device(model: nn.Module, device: Any) -> torch.device:
    """``device`` as a ``torch.device``; None: the device of the model's first parameter or buffer (else the CPU)."""
    if device is None:
        first = next(iter((*model.parameters(), *model.buffers())), None)
        return first.device if first is not None else torch.device("cpu")
    allowed = "None, a torch.device or a device string"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"`device` must be {allowed}, got {_got(device)}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"`device` must be {allowed}, got {device!r}") from err


def check_ratios(ratios: Any, names: Collection[str], owner: str) -> None:
    """Check ``ratios``: a non-empty mapping from names of ``owner``'s tensors (``names``) to shares in [0, 1]."""
    allowed = "a non-empty mapping of parameter names to shares in [0, 1]"
    if not isinstance(ratios, Mapping):
        raise TypeError(f"`ratios` must be {allowed}, got {_got(ratios)}")
    if not ratios:
        raise ValueError(f"`ratios` must be {allowed}, got {ratios!r}")
    for name, ratio in ratios.items():
        if name not in names:
            raise ValueError(f"`ratios` names {name!r}, which is not a parameter of {owner}; it has {sorted(names)!r}")
        check_fraction(ratio, f"ratios[{name!r}]", what="a share of the units")


def check_selector(params: Any, argument: str, presets: Sequence[str]) -> None:
    """Check a ``params`` selector: a preset of ``presets``, glob pattern(s) or a callable (name, param) -> bool."""
    if callable(params):
        return
    patterns = [params] if isinstance(params, str) else params
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"`{argument}` must be {', '.join(repr(p) for p in presets)}, a glob pattern, a sequence of patterns"
            f" or a callable (name, param) -> bool, got {_got(params)}"
        )
    if len(patterns) == 0 or any(p == "" for p in patterns):
        raise ValueError(f"`{argument}` must name at least one non-empty pattern, got {params!r}")


def check_exclude(exclude: Any, argument: str = "exclude") -> tuple[str, ...]:
    """``exclude`` as a tuple of glob patterns (a bare string is one pattern), or a TypeError."""
    # A bare string would otherwise be iterated character by character.
    patterns = (exclude,) if isinstance(exclude, str) else exclude
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"`{argument}` must be a glob pattern or a sequence of patterns, got {exclude!r}")
    return tuple(patterns)


def check_name(value: Any, argument: str, *, allow_none: bool = False, file_name: bool = False,
               prefix: bool = False) -> None:
    """A non-empty string (or None with ``allow_none``); ``file_name``: no directory; ``prefix``: no trailing '/'."""
    if value is None and allow_none:
        return
    what = "None or a non-empty string" if allow_none else "a non-empty string"
    what += " not ending in '/'" if prefix else ""
    what += " without a directory" if file_name else ""
    if not isinstance(value, str):
        raise TypeError(f"`{argument}` must be {what}, got {_got(value)}")
    if not value or (prefix and value.endswith("/")) or (file_name and (os.sep in value or "/" in value)):
        raise ValueError(f"`{argument}` must be {what}, got {value!r}")


def is_strategy(strategy: object, name: str) -> bool:
    """Whether ``strategy`` is Lightning's strategy class ``name`` or a subclass (by name: no Lightning import)."""
    return name in {cls.__name__ for cls in type(strategy).__mro__}


def check_strategy(strategy: object, owner: str, *, supported: Collection[str] = (), why: str, instead: str) -> None:
    """Refuse a sharding strategy (see ``SHARDING_STRATEGIES``) that ``owner`` does not support.

    Raises:
        ValueError: naming the strategy, ``why`` it is refused and what to use ``instead``.
    """
    for sharding in SHARDING_STRATEGIES:
        if is_strategy(strategy, sharding) and sharding not in supported:
            raise ValueError(f"{owner} does not support {type(strategy).__name__}: {why}. {instead}")
