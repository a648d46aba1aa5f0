"""Where the local part of a (possibly sharded) tensor sits in the whole tensor.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) and tensor parallelism, a parameter is a ``DTensor``: every rank
holds a block of the whole tensor, described by the DTensor's mesh and placements. Everything in this package that must
give a shard exactly its part of a whole-tensor result (the noise, drawn by global index; the pruning masks) works on
a ``LocalBlock``: the global shape and, along every dimension, the global indices that the local block holds.

The indices are found the way ``torch.distributed.tensor.distribute_tensor`` shards a tensor: for each mesh dimension
in order, a ``Shard(d)`` (or FSDP2's ``_StridedShard(d)``) placement splits the running index list of tensor dimension
``d`` with the placement's own splitting rule and keeps this rank's chunk; ``Replicate`` keeps everything. So uneven
shards (``torch.chunk`` semantics: the last ranks may hold fewer rows, or none) and any combination of data and tensor
parallel sharding come out as DTensor itself lays them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_heavytail._compat import split_indices

__all__ = ["LocalBlock", "fsdp_modules", "is_sharded", "local_part", "reshard"]

DimIndices = range | tuple[int, ...]
"""The global indices held along one dimension: a range when contiguous."""


@dataclass(frozen=True)
class LocalBlock:
    """The part of a whole tensor that a local tensor holds.

    Attributes:
        global_shape: the whole tensor's shape.
        indices: for every dimension, the global indices the local tensor holds along it, in local order.

    Examples:
        >>> block = LocalBlock.from_offsets((4, 3), (2, 0), (2, 3))  # rows 2 and 3 of a 4 x 3 tensor
        >>> block.local_shape, block.rows(), block.flat_index(torch.device("cpu"))
        (torch.Size([2, 3]), range(2, 4), range(6, 12))
    """

    global_shape: torch.Size
    indices: tuple[DimIndices, ...]

    @classmethod
    def whole(cls, shape: Sequence[int]) -> LocalBlock:
        """The block of an unsharded tensor: all of it."""
        size = torch.Size(shape)
        return cls(size, tuple(range(n) for n in size))

    @classmethod
    def from_offsets(
        cls, global_shape: Sequence[int], offsets: Sequence[int], local_shape: Sequence[int]
    ) -> LocalBlock:
        """A contiguous block: ``local_shape`` entries from ``offsets`` on, along every dimension."""
        return cls(torch.Size(global_shape), tuple(range(o, o + n) for o, n in zip(offsets, local_shape, strict=True)))

    @property
    def local_shape(self) -> torch.Size:
        """The shape of the local tensor."""
        return torch.Size(len(index) for index in self.indices)

    @property
    def is_whole(self) -> bool:
        """Whether the block is the whole tensor."""
        return all(index == range(n) for index, n in zip(self.indices, self.global_shape, strict=True))

    @property
    def whole_rows(self) -> bool:
        """Whether the block holds whole rows: every dimension after the first whole."""
        return all(index == range(n) for index, n in zip(self.indices[1:], self.global_shape[1:], strict=True))

    def rows(self) -> range | Tensor:
        """Global indices of the local units (slices along dim 0); ``range(1)`` for a 0-d tensor."""
        if len(self.global_shape) == 0:
            return range(1)
        return _as_range_or_tensor(self.indices[0])

    def flat_index(self, device: torch.device) -> range | Tensor:
        """Global row-major indices of the local entries, in local order: a range when they are contiguous."""
        shape, indices = self.global_shape, self.indices
        if len(shape) == 0:
            return range(1)
        rows = indices[0]
        if isinstance(rows, range) and self.whole_rows:
            row = math.prod(shape[1:])
            return range(rows.start * row, rows.stop * row)
        flat = torch.zeros((), dtype=torch.int64, device=device)
        for dim, index in enumerate(indices):
            view = [1] * len(indices)
            view[dim] = len(index)
            positions = torch.as_tensor(list(index), dtype=torch.int64, device=device)
            flat = flat + (positions * math.prod(shape[dim + 1:])).view(view)
        return flat.expand(self.local_shape).reshape(-1)


def _as_range_or_tensor(index: DimIndices) -> range | Tensor:
    return index if isinstance(index, range) else torch.tensor(index, dtype=torch.int64)


def _compact(values: Sequence[int]) -> DimIndices:
    """A range when the values are consecutive, else a tuple."""
    if len(values) > 0 and list(values) == list(range(values[0], values[0] + len(values))):
        return range(values[0], values[0] + len(values))
    return range(0) if len(values) == 0 else tuple(int(v) for v in values)


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2, tensor parallel): its data is spread over ranks."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The local tensor to read and write: a DTensor's local shard (``to_local``), a plain tensor itself.

    ``local_part`` also says where it sits in the whole; where that is not needed this is far cheaper.
    """
    return tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def local_part(tensor: Tensor) -> tuple[Tensor, LocalBlock]:
    """The local tensor to read and write, and where it sits in the whole.

    A plain tensor is its own whole. For a DTensor, the local tensor (writing to it writes the parameter) and the
    block its mesh coordinate and placements give; a rank outside the mesh holds an empty block.

    Examples:
        >>> local, block = local_part(torch.zeros(3, 2))
        >>> block.is_whole, tuple(local.shape)
        (True, (3, 2))
    """
    if not is_sharded(tensor):
        return tensor, LocalBlock.whole(tensor.shape)
    local = local_tensor(tensor)
    mesh, placements = tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    global_shape = torch.Size(tensor.shape)
    if coordinate is None:  # this rank holds no part of it
        return local, LocalBlock(global_shape, tuple(range(0) for _ in global_shape))
    running = [torch.arange(n, dtype=torch.int64) for n in global_shape]
    for mesh_dim, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        # The placement's own split rule, applied to the index list of its dimension.
        chunks = split_indices(placement, running[placement.dim], mesh.size(mesh_dim))
        running[placement.dim] = chunks[coordinate[mesh_dim]]
    block = LocalBlock(global_shape, tuple(_compact(index.tolist()) for index in running))
    if block.local_shape != local.shape:
        raise ValueError(
            f"the local part of a DTensor has shape {tuple(local.shape)}, but its placements {placements} give"
            f" {tuple(block.local_shape)}: this layout is not supported"
        )
    return local, block


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` that FSDP2 (``torch.distributed.fsdp.fully_shard``) manages, root included."""
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def reshard(modules: Sequence[nn.Module]) -> None:
    """Free the gathered parameters of FSDP2 ``modules`` (``FSDPModule.reshard``; a no-op where they are sharded).

    The next forward then gathers the shards again: FSDP2 keeps the root's parameters gathered after a forward, so a
    write into its shards would not be seen by the next forward without this.
    """
    for module in modules:
        module.reshard()  # type: ignore[operator]


def model_is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded over ranks (FSDP2 modules, or DTensor parameters).

    Asks the FSDP2 modules first: after a forward (Lightning's validation loop, say) FSDP2 leaves the root's
    parameters gathered, as plain tensors, which a look at the parameters alone would take for an unsharded model.
    They are resharded here, so that every rank then sees its shards.
    """
    modules = fsdp_modules(model)
    reshard(modules)
    return bool(modules) or any(is_sharded(p) for p in model.parameters())

