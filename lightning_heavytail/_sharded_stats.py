"""The compressibility report's quantities of sharded (DTensor) tensors, from each rank's local parts.

A rank never holds a whole selected tensor nor all its magnitudes. What each quantity reads, and how it compares with
the one-process value of the same weights:

- fraction prunable, and the per-unit tail indices: one number per unit of the whole tensor, on every rank
  (``Layout.unit_values``; rows are whole on one rank under FSDP2), then the one-process code on that vector:
  **bitwise equal** where rows are whole.
- best-k errors: the k-th smallest magnitude by the distributed selection (``Layout.kth_smallest``), then sums of
  squares below it, float64, added over the ranks: equal **up to float64 rounding** (the one-process sum adds the same
  squares in sorted order).
- Hill's tail index of the entries: each rank's ``k + 1`` largest magnitudes (``k = isqrt(n)``, n the nonzero
  entries of the whole tensor) are gathered, and the one-process estimator runs on them: **bitwise equal**. It reads
  ``ranks * (isqrt(n) + 1)`` values.
- Mohammadi's tail index of the entries: each rank sums its nonzero entries into the estimator's blocks of ``m``
  consecutive entries (in the whole tensor's flattened order), the ``n / m`` block sums are added over the ranks
  (every rank then holds ``isqrt(n)`` of them), and the means of the logs are float64 sums over the ranks: equal **up
  to float64 rounding**. It needs each rank's part to be a contiguous range of the flattened whole tensor (FSDP2's
  sharding along dim 0); tensors sharded along another dimension (tensor parallelism) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_heavytail._distributed import Layout, as_units
from lightning_heavytail._tensors import ACCUMULATE_DTYPE, compute_dtype, sort_ascending
from lightning_heavytail.compressibility import TAIL_KEYS, hill_alpha, mohammadi_alpha
from lightning_heavytail.pruning.epsilon import count_prunable, unit_squared_norms
from lightning_heavytail.sharding import local_tensor


def _or_nan(estimate: Callable[[], float]) -> float:
    try:
        return float(estimate())
    except ValueError:  # too few nonzero entries: no estimate
        return math.nan


def _gathered(value: Any) -> list[Any]:
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


class ShardedStats:
    """``compressibility_report``'s quantities of sharded tensors; every rank calls every method, in the same order."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.locals = [local_tensor(t.detach()) for t in tensors]
        self.layout = Layout.of(tensors, self.locals[0].device)

    def finite(self) -> list[bool]:
        """Per tensor, whether all of it is finite."""
        return self.layout.all_finite(self.locals)

    def prunable_units(self, index: int, epsilon: float) -> tuple[int, int]:
        """``prunable_units`` of whole tensor ``index``."""
        squared = unit_squared_norms(self.layout, index, self.locals[index])
        return count_prunable(squared, epsilon), int(squared.numel())

    def best_k_errors(self, indices: Sequence[int], levels: Sequence[float]) -> list[float]:
        """The relative best-k errors of the whole tensors ``indices`` pooled, at each level."""
        dtype = compute_dtype(*(self.locals[i].dtype for i in indices))
        mine = torch.cat([self.layout.counted_part(i, self.locals[i].abs().to(dtype)) for i in indices])
        ks = [round(level * sum(self.layout.size(i) for i in indices)) for level in levels]
        [thresholds] = self.layout.kth_smallest([mine], [ks])
        ordered = sort_ascending(mine)
        sums = [ordered.to(ACCUMULATE_DTYPE).square().sum()]
        for threshold in thresholds:  # the squares below the threshold, and how many they are
            below = 0 if threshold is None else int(torch.searchsorted(ordered, threshold, side="left").item())
            sums += [ordered[:below].to(ACCUMULATE_DTYPE).square().sum(), torch.tensor(float(below))]
        total, *parts = self.layout.sum_(torch.stack(sums).to(ACCUMULATE_DTYPE).to(self.layout.device)).tolist()
        if total == 0.0:
            return [0.0 for _ in levels]  # the zero tensor loses nothing
        errors = []
        for k, threshold, (below_sum, below) in zip(ks, thresholds, zip(parts[::2], parts[1::2], strict=True),
                                                    strict=True):
            tied = 0.0 if threshold is None else (k - below) * float(threshold) ** 2  # the k-th value's ties
            errors.append(math.sqrt((below_sum + tied) / total))
        return errors

    def tail_indices(self, index: int, finite: bool) -> dict[str, float]:
        """The four tail indices of whole tensor ``index`` (NaN if it is not finite)."""
        if not finite:
            return dict.fromkeys(TAIL_KEYS, math.nan)
        local, shape = self.locals[index], self.layout.blocks[index].global_shape
        row = shape.numel() // shape[0] if len(shape) > 1 else 1  # entries per unit
        means = self.layout.unit_values(index, as_units(local), whole=lambda r: r.to(ACCUMULATE_DTYPE).mean(dim=1),
                                        partial=lambda r: r.to(ACCUMULATE_DTYPE).sum(dim=1),
                                        finish=lambda sums: sums / row)
        return dict(zip(TAIL_KEYS, (self._mohammadi(index), self._hill(index), _or_nan(lambda: mohammadi_alpha(means)),
                                    _or_nan(lambda: hill_alpha(means))), strict=True))

    def _nonzero(self, index: int) -> Tensor:
        """This rank's counted nonzero entries of tensor ``index``, float64, in flattened order."""
        flat = self.layout.counted_part(index, self.locals[index]).to(ACCUMULATE_DTYPE)
        return flat[flat != 0]

    def _hill(self, index: int) -> float:
        mine = self._nonzero(index).abs()
        count = int(self.layout.sum_(torch.tensor([mine.numel()], device=self.layout.device)).item())
        order = math.isqrt(count)
        if order < 1 or order >= count:
            return math.nan
        top = mine.topk(min(order + 1, mine.numel())).values.cpu()
        return _or_nan(lambda: hill_alpha(torch.cat(_gathered(top)), k=order))

    def _mohammadi(self, index: int) -> float:
        mine = self._nonzero(index)
        flat = self.layout.blocks[index].flat_index(torch.device("cpu"))
        start = flat.start if isinstance(flat, range) else -1
        everyone = _gathered((start, mine.numel(), self.layout.counted[index]))
        if any(s < 0 and n > 0 for s, n, counted in everyone if counted):
            raise ValueError(
                "compressibility_report of a tensor sharded along a dimension other than 0 (tensor parallelism) is not"
                " supported: Mohammadi's estimator reads the entries in their flattened order"
            )
        offset = sum(n for s, n, counted in everyone if counted and s < start)
        count = sum(n for _, n, counted in everyone if counted)
        block = math.isqrt(count)
        if block < 2 or block > count:
            return math.nan
        blocks = count // block
        positions = torch.arange(offset, offset + mine.numel(), device=mine.device)
        kept = positions < blocks * block
        sums = torch.zeros(blocks, dtype=ACCUMULATE_DTYPE, device=mine.device)
        sums.index_add_(0, positions[kept] // block, mine[kept])
        sums = self.layout.sum_(sums.to(self.layout.device))
        log_x = self.layout.sum_(mine[kept].abs().log().sum().reshape(1).to(self.layout.device)).item()
        y = sums[sums != 0]
        gap = y.abs().log().mean().item() - log_x / (blocks * block)
        return 2.0 if gap <= 0.0 else min(math.log(block) / gap, 2.0)
