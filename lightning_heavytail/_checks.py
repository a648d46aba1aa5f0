"""Argument checks shared by the functional core and the callbacks; messages name the argument."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def check_alpha(alpha: Any, argument: str = "alpha") -> None:
    """Raise unless ``alpha`` is a real number in (0, 2]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 2.0:
        raise ValueError(f"`{argument}` must be a number in (0, 2], got {alpha!r}")


def check_positive_finite(value: Any, argument: str, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
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
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{argument}` must be {what}, got {value!r}")
