"""Argument checks shared by the functional core and the callbacks; messages name the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any


def is_real(value: Any) -> bool:
    """A real number that is not a bool: Python and numpy ints and floats alike (``numbers.Real``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An integer that is not a bool: Python and numpy ints alike (``numbers.Integral``)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_alpha(alpha: Any, argument: str = "alpha") -> None:
    """Raise unless ``alpha`` is a real number in (0, 2]."""
    if not is_real(alpha) or not 0.0 < float(alpha) <= 2.0:
        raise ValueError(f"`{argument}` must be a number in (0, 2], got {alpha!r}")


def check_positive_finite(value: Any, argument: str, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    ok = is_real(value) and math.isfinite(float(value))
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{argument}` must be a finite number {bound}, got {value!r}")


def check_choice(value: Any, allowed: Collection[Any], argument: str) -> None:
    """Raise unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{argument}` must be one of {sorted(allowed)!r}, got {value!r}")


def check_int(value: Any, argument: str, *, minimum: int = 0, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an int >= ``minimum`` (or None with ``allow_none``)."""
    if value is None and allow_none:
        return
    if not is_integer(value) or value < minimum:
        what = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{argument}` must be {what}, got {value!r}")
