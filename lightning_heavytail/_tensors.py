"""Tensor helpers shared by the core: the compute dtype rule, the ascending sort, the finiteness test.

**One compute dtype rule.** Arithmetic on parameters (stable draws and noise, unit norms and magnitude rankings for
pruning, singular values) runs in float64 when a float64 tensor is involved and in float32 otherwise, then is cast
back: fp16 and bf16 overflow under heavy-tailed draws and lose digits in sums, and float32 holds every fp16/bf16
value exactly, so rankings are exact too. **Accumulations** (squared-norm sums, cumulative sums, logs and means of
weights: the epsilon point, best-k errors, tail indices) differ on purpose: they always run in ``ACCUMULATE_DTYPE``,
float64, whatever the weights' dtype, because they sum millions of terms whose order of magnitude differs widely.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ACCUMULATE_DTYPE = torch.float64
"""The dtype of sums, cumulative sums, logs and means of weights (see the module docstring)."""


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of ``dtypes`` is float64, else float32 (see the module docstring).

    Raises:
        TypeError: for a dtype that is not real floating point.

    Examples:
        >>> compute_dtype(torch.float16), compute_dtype(torch.bfloat16, torch.float64)
        (torch.float32, torch.float64)
    """
    for dtype in dtypes:
        if not dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"`dtype` must be a real floating point dtype, got {dtype}")
    return torch.float64 if torch.float64 in dtypes else torch.float32


def sort_ascending(values: Tensor) -> Tensor:
    """The values of a 1-D tensor in ascending order (NaN last).

    On the CPU numpy's value-only sort is about 10x faster than ``torch.sort``, which also builds an int64 index
    (measured 0.25 s vs 2.7 s for 2**24 floats on 2 cores); elsewhere ``torch.sort``.
    """
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(values.numpy()))
    return values.sort().values


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite (no NaN, no infinity); integer tensors always are."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    return bool(torch.isfinite(tensor.detach()).all().item())
