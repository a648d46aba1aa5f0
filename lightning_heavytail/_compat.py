"""Every read of a private attribute of Lightning, torchmetrics or torch, so that an upgrade touches one file.

Each function says what it reads and why no public API serves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torchmetrics import Metric

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


def evaluation_data_sources(trainer: Trainer) -> list[tuple[str, Any]]:
    """``(hook name, Lightning's _DataLoaderSource)`` of the test loop, then of the validation loop.

    Lightning records where each loop's dataloaders come from (``fit(...)`` arguments, datamodule or module hooks) in
    the loops' private ``_data_source``; the public ``trainer.val_dataloaders`` are the processed loaders, which under
    DDP carry a padding ``DistributedSampler``.
    """
    return [
        ("test_dataloader", trainer.test_loop._data_source),
        ("val_dataloader", trainer.fit_loop.epoch_loop.val_loop._data_source),
    ]


def batches_that_stepped(trainer: Trainer) -> int:
    """The step Lightning gives the metrics logged at the end of a training epoch (its loop's private counter)."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def unsynced(metrics: Iterable[nn.Module]) -> None:
    """Turn off the cross-rank sync of ``compute()`` (torchmetrics' private ``_to_sync``) for one rank's trial run."""
    for metric in metrics:
        if isinstance(metric, Metric):
            metric._to_sync = False


def forward_pre_hooks(module: nn.Module) -> list[Any]:
    """The forward pre-hooks registered on ``module`` (torch keeps them in the private ``_forward_pre_hooks``)."""
    return list(module._forward_pre_hooks.values())


def split_indices(placement: Any, indices: Tensor, chunks: int) -> Sequence[Tensor]:
    """Split a 1-D index tensor the way a DTensor ``Shard``/``_StridedShard`` placement splits a tensor dimension.

    The same placement acting on dim 0 splits the index list with the placement's own (private) ``_split_tensor``:
    ``torch.distributed.tensor`` has no public function that says which global indices each rank holds.

    Raises:
        ValueError: for a placement that is neither a shard nor a strided shard (e.g. a pending reduction).
    """
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(placement, _StridedShard):  # FSDP2 over tensor parallelism
        along_zero: Any = _StridedShard(0, split_factor=placement.split_factor)
    elif isinstance(placement, Shard):
        along_zero = Shard(0)
    else:
        raise ValueError(
            f"a DTensor placement {placement!r} (neither Shard nor Replicate, e.g. a pending reduction) is not"
            " supported: its local entries are not a part of the whole tensor"
        )
    parts, _ = along_zero._split_tensor(indices, chunks, with_padding=False)
    return list(parts)


def tensor_parallel_size(strategy: Any) -> int:
    """The tensor-parallel size of a ``ModelParallelStrategy``: its device mesh's once processes exist.

    Before that (a strategy not yet set up) it is the private ``_tensor_parallel_size`` it was built with, where
    ``"auto"`` stands for the number of processes; Lightning has no public accessor for it.
    """
    try:
        mesh = strategy.device_mesh
    except RuntimeError:  # "Accessing the device mesh before processes have initialized is not allowed"
        size = strategy._tensor_parallel_size
        return int(strategy.num_processes if size == "auto" else size)
    return int(mesh["tensor_parallel"].size())
