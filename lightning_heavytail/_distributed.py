"""Sums and selections over the ranks that hold the parts of sharded (DTensor) tensors, without gathering them.

Pruning and the compressibility metrics of a sharded model must equal those of the same model in one process, and no
rank may hold a whole selected tensor. A ``Layout`` says, for a list of tensors, which part of each whole tensor the
local part is (``sharding.local_part``) and whether this rank **counts** it: where several ranks hold the same block
(a replicated tensor, a plain parameter next to sharded ones, FSDP2 with replication), the lowest of them counts it,
so that every entry of every whole tensor is counted exactly once. On a model without DTensors the layout is local
and every function here is the one-process computation itself: no collective, nothing changes.

``kth_smallest`` is the distributed selection of a global threshold: a radix select on the magnitudes' bit patterns,
8 bits per round (4 rounds for float32, 8 for float64), each round one all-reduce of 256 counts per query, the counts
taken from each rank's local values sorted once. Its answer is exactly the k-th smallest of all values, bitwise the
element a sort of the gathered values would give (NaN last, like the sort).

``unit_values`` gives every rank one number per unit (slice along dim 0) of a whole tensor: per-row values computed
on the rank that holds the whole row and summed into place (exact: the other ranks add zeros), or, where a row is
split between ranks (tensor parallelism), float64 partial sums added over the ranks (equal to one process up to
float64 rounding).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_heavytail._tensors import all_finite
from lightning_heavytail.sharding import LocalBlock, is_sharded, local_part

_RADIX_BITS = 8
_BUCKETS = 1 << _RADIX_BITS
_KEY_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}


def _signature(block: LocalBlock) -> tuple[tuple[int, ...], ...]:
    """A comparable description of a block: the global indices it holds along every dimension."""
    return tuple((index.start, index.stop, -1) if isinstance(index, range) else tuple(index) for index in block.indices)


@dataclass
class Layout:
    """Where the local parts of some tensors sit in the whole tensors, and which of them this rank counts.

    Attributes:
        blocks: per tensor, the block of the whole tensor that the local part is.
        counted: per tensor, whether this rank counts its block (exactly one holder of each block does).
        whole_rows: per tensor, whether every rank's block holds whole rows (slices along dim 0).
        device: where counts and sums are reduced (the backend's device: the CPU for gloo, the GPU for NCCL).
        sharded: whether any tensor is a DTensor; if not, nothing is reduced.
    """

    blocks: list[LocalBlock]
    counted: list[bool]
    whole_rows: list[bool]
    device: torch.device
    sharded: bool

    @classmethod
    def of(cls, tensors: Sequence[Tensor], device: torch.device) -> Layout:
        """The layout of ``tensors``; a collective (every rank calls it, with the same tensors) if one is sharded.

        Raises:
            ValueError: if the ranks' blocks of a tensor overlap without being equal, or leave entries out (a layout
                in which an entry is not counted exactly once).
        """
        blocks = [local_part(t)[1] for t in tensors]
        if not any(is_sharded(t) for t in tensors):
            return cls(blocks, [True] * len(blocks), [True] * len(blocks), device, False)
        mine = [(_signature(b), b.whole_rows, b.local_shape.numel()) for b in blocks]
        everyone: list[list[tuple[tuple[tuple[int, ...], ...], bool, int]]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(everyone, mine)
        rank = dist.get_rank()
        counted, whole_rows = [], []
        for index, (tensor, block) in enumerate(zip(tensors, blocks, strict=True)):
            holders: dict[tuple[tuple[int, ...], ...], tuple[int, int]] = {}  # block -> (lowest holder, size)
            for other, described in enumerate(everyone):
                signature, _, size = described[index]
                if size > 0:
                    holders.setdefault(signature, (other, size))
            if sum(size for _, size in holders.values()) != tensor.numel():
                raise ValueError(
                    f"the ranks' parts of a sharded tensor of shape {tuple(tensor.shape)} do not cover it exactly once"
                    f" (they hold {sum(size for _, size in holders.values())} distinct entries): this layout is not"
                    " supported"
                )
            counted.append(holders.get(_signature(block), (-1, 0))[0] == rank)
            whole_rows.append(all(described[index][1] for described in everyone))
        return cls(blocks, counted, whole_rows, device, True)

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place (nothing to do in one process); returns it."""
        if self.sharded:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


    def all_finite(self, locals_: Sequence[Tensor]) -> list[bool]:
        """Per tensor, whether every rank's part is finite (the same answer on every rank; one reduction)."""
        return finite_everywhere(locals_, self.device, self.sharded)

    def local_units(self, index: int, values: Tensor) -> Tensor:
        """The entries of ``values`` (one per unit of whole tensor ``index``) for this rank's units, in local order."""
        rows = self.blocks[index].rows()
        if isinstance(rows, range):
            return values if rows == range(values.shape[0]) else values[rows.start:rows.stop]
        return values[rows.to(values.device)]

    def size(self, index: int | None = None) -> int:
        """The number of entries of whole tensor ``index``, or of all of them."""
        blocks = self.blocks if index is None else [self.blocks[index]]
        return sum(block.global_shape.numel() for block in blocks)

    def count_all(self, masks: Sequence[Tensor]) -> int:
        """How many entries of the whole tensors are True, from each tensor's local ``masks[index]`` (one reduction)."""
        mine = sum(int(mask.sum().item()) for index, mask in enumerate(masks) if self.counted[index])
        return int(self.sum_(torch.tensor([mine], dtype=torch.int64, device=self.device)).item())

    def unit_values(self, index: int, local: Tensor, whole: Callable[[Tensor], Tensor],
                    partial: Callable[[Tensor], Tensor], finish: Callable[[Tensor], Tensor]) -> Tensor:
        """One value per unit of the whole tensor ``index``, on every rank.

        ``local`` is this rank's part, shaped ``(local rows, -1)``. ``whole(rows)`` computes the values of whole
        rows (in one process, of the whole tensor: exactly the one-process values); where rows are split between
        ranks, ``partial(rows)`` gives float64 partial sums, added over the ranks, and ``finish(sums)`` the values.
        """
        if not self.sharded:
            return whole(local)
        block = self.blocks[index]
        rows = block.rows()
        units = block.global_shape[0] if len(block.global_shape) else 1
        values = whole(local) if self.whole_rows[index] else partial(local)
        totals = torch.zeros(units, dtype=values.dtype, device=values.device)
        if self.counted[index] and values.numel():
            positions = torch.arange(rows.start, rows.stop) if isinstance(rows, range) else rows
            totals.index_add_(0, positions.to(values.device), values)
        totals = self.sum_(totals.to(self.device)).to(values.device)
        return totals if self.whole_rows[index] else finish(totals)

    def counted_part(self, index: int, local: Tensor) -> Tensor:
        """``local``, flattened, if this rank counts tensor ``index``'s block, else an empty tensor like it."""
        return local.flatten() if self.counted[index] else local.new_empty(0)

    def kth_smallest(self, values: Sequence[Tensor], ks: Sequence[Sequence[int]]) -> list[list[float | None]]:
        """The ``k``-th smallest of ``values[group]`` over all ranks, for each ``k`` of ``ks[group]``.

        ``values[group]`` is this rank's counted share of the group (1-D float32 or float64, see ``counted_part``);
        ``k`` is 1-based, 0 gives None; NaN is larger than every number. A collective: ``kth_smallest_distributed``,
        once per dtype.
        """
        answers: list[list[float | None]] = [[] for _ in values]
        for dtype in sorted({v.dtype for v in values}, key=str):  # the same order on every rank
            groups = [g for g, v in enumerate(values) if v.dtype == dtype]
            found = kth_smallest_distributed([values[g] for g in groups], [ks[g] for g in groups], self.device)
            for g, column in zip(groups, found, strict=True):
                answers[g] = column
        return answers


def several_ranks() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def finite_everywhere(tensors: Sequence[Tensor], device: torch.device, sharded: bool) -> list[bool]:
    """Per tensor, whether it is finite on this rank and, if ``sharded``, on every rank (one all-reduce)."""
    finite = [all_finite(t) for t in tensors]
    return every_rank(finite, device) if sharded else finite


def collective_device() -> torch.device:
    """Where the default group's backend reduces: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def every_rank(flags: Sequence[bool], device: torch.device) -> list[bool]:
    """Per flag, whether it holds on every rank of the default group (one all-reduce; the same answer everywhere)."""
    failing = torch.tensor([0 if flag else 1 for flag in flags], dtype=torch.int64, device=device)
    dist.all_reduce(failing, op=dist.ReduceOp.SUM)
    return [int(count) == 0 for count in failing.tolist()]


def refused_elsewhere() -> ValueError:
    """The error of the ranks where the evaluation did not fail, when it failed on another one."""
    return ValueError("The evaluation was refused on another rank (see its error)")


@contextlib.contextmanager
def failing_together(device: torch.device, sharded: bool) -> Iterator[None]:
    """Run the body; if it raises on any rank, raise on every rank (sharded: one all-reduce after the body).

    The rank where it failed raises its own error, the others ``refused_elsewhere()``. A check that fails on one rank
    only must stop every rank before the next collective: the others would wait there for it forever.
    """
    failure: Exception | None = None
    try:
        yield
    except Exception as err:
        failure = err
    if sharded and not every_rank([failure is None], device)[0] and failure is None:
        raise refused_elsewhere()
    if failure is not None:
        raise failure


def squared_sums(rows: Tensor) -> Tensor:
    """Each row's sum of squares, in float64 (partial sums of split rows add up over the ranks)."""
    return rows.to(torch.float64).square().sum(dim=1)


def as_units(tensor: Tensor) -> Tensor:
    """``tensor`` as ``(units, -1)``: units are the slices along dim 0 (of a 1-D tensor, its entries)."""
    return tensor.flatten(1) if tensor.ndim > 1 else tensor.reshape(-1, 1)


def ordered_keys(values: Tensor) -> Tensor:
    """Integers in the order of the floats ``values`` (float32 -> int32, float64 -> int64).

    Every NaN becomes one value above +inf; ``from_key`` reads a key back.
    """
    key_dtype = _KEY_DTYPES[values.dtype]
    keys = values.view(key_dtype).clone()  # one buffer, changed in place: the size of the values, no more
    keys.masked_fill_(torch.isnan(values), _nan_key(values.dtype))
    negative = keys < 0
    if bool(negative.any()):  # negative floats: reverse their order, keep the sign bit
        keys[negative] = keys[negative] ^ torch.iinfo(key_dtype).max
    return keys


def _nan_key(dtype: torch.dtype) -> int:
    """The bits of the positive quiet NaN of ``dtype``, as a signed integer."""
    return int(torch.tensor([math.nan], dtype=dtype).abs().view(_KEY_DTYPES[dtype]).item())


def from_key(key: int, dtype: torch.dtype) -> float:
    """The float whose ``ordered_keys`` is ``key``."""
    key_dtype = _KEY_DTYPES[dtype]
    bits = key ^ torch.iinfo(key_dtype).max if key < 0 else key
    return float(torch.tensor([bits], dtype=key_dtype).view(dtype).item())


def kth_smallest_distributed(values: Sequence[Tensor], ks: Sequence[Sequence[int]],
                             device: torch.device) -> list[list[float | None]]:
    """``Layout.kth_smallest`` over all ranks: a radix select on ``ordered_keys``, nothing gathered.

    Each rank sorts its keys once; every round narrows each query's key range to one of 256 buckets, counting its
    keys up to each bucket's end (a binary search in the sorted keys), all-reducing the counts, and keeping the first
    bucket whose count reaches ``k``. After ``bits / 8`` rounds the range is one key: the k-th smallest, exactly.
    Every rank must call it with the same groups, dtypes and ``ks``.
    """
    dtype = next(iter(v.dtype for v in values), torch.float32)
    if any(v.dtype != dtype for v in values):
        raise ValueError(f"kth_smallest needs one dtype for every group, got {sorted({str(v.dtype) for v in values})}")
    bits = torch.iinfo(_KEY_DTYPES[dtype]).bits
    keys = [ordered_keys(v.detach()).cpu().numpy() for v in values]
    for array in keys:
        array.sort()  # in place: no copy
    queries = [(group, k) for group, group_ks in enumerate(ks) for k in group_ks if k > 0]
    low = [-(1 << (bits - 1))] * len(queries)  # each query's range: [low, low + width)
    width = 1 << bits
    while width > 1 and queries:
        step = width // _BUCKETS
        counts = np.empty((len(queries), _BUCKETS), dtype=np.int64)
        for q, (group, _) in enumerate(queries):
            # bucket j ends at low + step * j - 1 (Python ints: every end fits the keys' range, sums may not)
            pivots = np.array([low[q] + step * j - 1 for j in range(1, _BUCKETS + 1)], dtype=keys[group].dtype)
            counts[q] = np.searchsorted(keys[group], pivots, side="right")
        total = torch.from_numpy(counts).to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        reached = total.cpu().numpy() >= np.array([k for _, k in queries], dtype=np.int64)[:, None]
        for q in range(len(queries)):
            low[q] += step * int(np.argmax(reached[q]))
        width = step
    answers = iter(from_key(key, dtype) for key in low)
    return [[next(answers) if k > 0 else None for k in group_ks] for group_ks in ks]
