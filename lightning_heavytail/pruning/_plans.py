"""What a rule computes once per evaluation (a ``LevelPlan``), and how a level is written from it, batch after batch.

A one-pass evaluation writes every level into the model for every batch, so a write must cost far less than a
forward pass. ``ThresholdPlan`` (the mask methods, the epsilon point) keeps, per tensor, the entries (or units) each
level zeroes beyond the level before it, as bands of indices found once: going up one level zeroes one more band in
place (``index_fill_``), and only a jump back (to level 0 at the next batch, or from another plan's values) copies
the backup in full. Measured in CPU time on one thread, for all 7 default levels of a 784x5000 weight: 9.7 ms, against
58 ms for ``torch.where`` per level and 56 ms for ``masked_fill_`` of a per-entry level mask (and 6.6 ms for 7 plain
copies, the floor of writing every level in full). The indices are stored as int32 (4 bytes per entry zeroed at the
highest level; int64 only for tensors of 2**31 entries or more) and widened in chunks of ``_CHUNK`` as they are
written (int64 all through was 8.0 ms, for twice the memory). ``SingularValuePlan`` holds each level's values,
computed once: writing a level is one copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lightning_heavytail._distributed import Layout

_CHUNK = 1 << 22
"""Indices widened to int64 at a time when a band is written (a 32 MiB transient). Large: on a shared CPU every small
parallel op can wait a time slice for its other threads (2**18 at a time cost 10x their CPU time in wall time)."""


class ThresholdPlan:
    """Zero the entries whose score is at most a threshold (``thresholds[level][tensor]``; None: none, NaN: all).

    ``scores[tensor]`` holds one score per entry of the tensor, or one per unit (shape ``(units, 1, ...)``, then whole
    units are zeroed). The thresholds of a tensor must not decrease from one level to the next (None first, NaN
    last), so that each level zeroes what the level before it zeroes, and more. ``scores`` may be a generator: each
    is read once, in turn, and not kept. Held: per tensor the indices of the entries (units) zeroed at the highest
    level, grouped by level, int32.
    """

    def __init__(self, thresholds: Sequence[Sequence[float | None]], scores: Iterable[Tensor],
                 layout: Layout | None = None) -> None:
        self.layout = layout  # where the tensors' local parts sit (None: whole tensors), for the measured sparsity
        self.by_unit: list[bool] = []  # per tensor: the scores are per unit (whole slices along dim 0 are zeroed)
        self.bands: list[Tensor] = []  # per tensor: the zeroed indices, level 0's first, then each level's new ones
        self.ends: list[list[int]] = []  # per tensor: ends[level] = how many of bands[tensor] that level zeroes
        for index, score in enumerate(scores):
            self.by_unit.append(score.ndim > 1 and all(n == 1 for n in score.shape[1:]))
            bands, ends = _zeroed_by_level(score.reshape(-1), [column[index] for column in thresholds])
            self.bands.append(bands)
            self.ends.append(ends)

    def write(self, level: int, index: int, backup: Tensor, out: Tensor, held: int | None) -> None:
        """``backup`` with level ``level``'s entries zeroed, into ``out``, which holds level ``held`` (None: other)."""
        ends = self.ends[index]
        if held is None or held > level:
            out.copy_(backup)
            start = 0
        else:
            start = ends[held]
        if ends[level] > start:
            _zero(out, self.bands[index][start:ends[level]], self.by_unit[index])

    def sparsity(self, level: int, written: Sequence[Tensor]) -> float:
        """The fraction of the written entries that are zero (of the whole tensors, under sharding)."""
        if self.layout is None:
            return sum(int((t == 0).sum().item()) for t in written) / sum(t.numel() for t in written)
        return self.layout.count_all([t == 0 for t in written]) / self.layout.size()


def _zeroed_by_level(score: Tensor, thresholds: Sequence[float | None]) -> tuple[Tensor, list[int]]:
    """The indices each level zeroes beyond the level before it (ascending within a level), concatenated; the ends."""
    bands: list[Tensor] = []
    ends: list[int] = []
    zeroed: Tensor | None = None  # what the level before zeroes
    count = 0
    previous: float | None = None
    for threshold in thresholds:
        if threshold is not None:
            if previous is not None and not (math.isnan(threshold) or threshold >= previous):
                raise ValueError(f"the thresholds of a tensor must not decrease over the levels, got {thresholds}")
            # integer scores (unit ranks) compare with an int: against a Python float torch compares in float32,
            # which above 2**24 units zeroes one unit too many
            bound = threshold if score.is_floating_point() or math.isnan(threshold) else int(threshold)
            now = torch.ones_like(score, dtype=torch.bool) if math.isnan(threshold) else score <= bound
            new = now if zeroed is None else now & ~zeroed
            band = new.nonzero().flatten()
            bands.append(band.to(torch.int32) if score.numel() < 2**31 else band)
            count += band.numel()
            zeroed, previous = now, threshold
        elif previous is not None:
            raise ValueError(f"the thresholds of a tensor must not decrease over the levels, got {thresholds}")
        ends.append(count)
    empty = torch.empty(0, dtype=torch.int32, device=score.device)
    return (torch.cat(bands) if bands else empty), ends


def _zero(out: Tensor, indices: Tensor, by_unit: bool) -> None:
    """Zero the units (slices along dim 0) or the entries (row-major flat indices) ``indices`` of ``out``."""
    for start in range(0, indices.numel(), _CHUNK):
        chunk = indices[start:start + _CHUNK].long()
        if by_unit:
            out.index_fill_(0, chunk, 0)
        elif out.is_contiguous():
            out.view(-1).index_fill_(0, chunk, 0)
        else:  # e.g. a channels-last kernel: the flat indices are positions in row-major order
            out.index_put_(torch.unravel_index(chunk, out.shape), torch.zeros((), dtype=out.dtype, device=out.device))


class SingularValuePlan:
    """Each tensor as an ``(out, -1)`` matrix, its ``drops[level][tensor]`` smallest singular values dropped.

    ``values[level][tensor]`` is the tensor's value at that level, computed once (None where nothing is dropped: the
    backup itself, not its rounded reconstruction); ``ranks[tensor]`` its number of singular values.
    """

    def __init__(self, values: list[list[Tensor | None]], drops: list[list[int]], ranks: list[int]) -> None:
        self.values = values
        self.drops = drops
        self.ranks = ranks

    def write(self, level: int, index: int, backup: Tensor, out: Tensor, held: int | None) -> None:
        """The tensor's value at ``level`` (the best approximation of the rank left), into ``out``."""
        value = self.values[level][index]
        out.copy_(backup if value is None else value)

    def sparsity(self, level: int, written: Sequence[Tensor]) -> float:
        """The fraction of the singular values dropped, over all tensors."""
        return sum(self.drops[level]) / sum(self.ranks)
