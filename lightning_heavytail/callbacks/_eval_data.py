"""PruneEvalCallback's evaluation data: where it comes from, and each rank's share of it under DDP.

Under DDP every rank evaluates every ``world_size``-th batch of the same data (batches dealt by their index over all
loaders together), without the duplicates a padding ``DistributedSampler`` would add, and with rank 0's buffers.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from lightning_heavytail._compat import evaluation_data_sources


@contextlib.contextmanager
def rank_zero_buffers(module: nn.Module, world_size: int) -> Iterator[None]:
    """Run with global rank 0's buffers on every rank, and each rank's own put back afterwards.

    DDP keeps parameters equal, not buffers: each rank updates BatchNorm's running statistics with its own batches
    after DDP's broadcast at the start of the forward, so they drift apart. Rank 0's are the ones its checkpoints
    save; scoring every shard with them gives the curve of the saved model.
    """
    if world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    buffers = list(module.buffers())
    with torch.no_grad():
        own = [buffer.detach().clone() for buffer in buffers]
    try:
        with torch.no_grad():
            for buffer in buffers:  # the same order on every rank: the same model
                dist.broadcast(buffer, src=0)
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, own, strict=True):
                buffer.copy_(saved)


def find_lightning_source(trainer: Trainer) -> tuple[str, Any]:
    """``(description, Lightning's source)`` of the evaluation data: the test loop's, else the validation loop's.

    The raw loaders are used, not ``trainer.val_dataloaders``: under DDP those carry a DistributedSampler that pads
    with repeated samples, which would change the metrics.

    Raises:
        ValueError: if neither loop has data.
    """
    for hook, data_source in evaluation_data_sources(trainer):
        if data_source.is_defined() and data_source.instance is not None:
            if not data_source.is_module():
                return "the `val_dataloaders` passed to `trainer.fit`", data_source
            if data_source.instance is getattr(trainer, "datamodule", None):
                return f"the datamodule's `{hook}()`", data_source
            return f"the LightningModule's `{hook}()`", data_source
    raise ValueError(
        "PruneEvalCallback found no evaluation data: pass `dataloader=` to PruneEvalCallback, or give the"
        " datamodule (or the LightningModule) a `test_dataloader()` or a `val_dataloader()`, or pass"
        " `val_dataloaders=` to `trainer.fit`"
    )


def lightning_loaders(data_source: Any, description: str | None) -> list[Iterable[Any]]:
    """The raw (not distributed) dataloaders of the Lightning source found at setup, flattened into a list."""
    try:
        loaders = data_source.dataloader()
    except Exception as err:
        raise RuntimeError(
            f"PruneEvalCallback could not get its evaluation data from {description} during fit: {err!r}. If that"
            " dataset is only built in setup('test') or setup('validate'), build it in setup('fit') too, or pass"
            " `dataloader=` to PruneEvalCallback"
        ) from err
    return [loader for loader in CombinedLoader(loaders, mode="sequential").flattened if loader is not None]


class EveryNth:
    """Re-iterable view of the batches of ``loaders`` (one after the other) whose global index falls to ``rank``."""

    def __init__(self, loaders: Sequence[Iterable[Any]], rank: int, world: int, offset: int = 0) -> None:
        self.loaders = loaders
        self.rank = rank
        self.world = world
        self.offset = offset

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(itertools.chain.from_iterable(self.loaders), start=self.offset):
            if i % self.world == self.rank:
                yield batch


class ShardBatchSampler(EveryNth):
    """A batch sampler's batches whose global index falls to ``rank``, with a length (DataLoader asks for one)."""

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int, world: int, offset: int = 0) -> None:
        super().__init__([batch_sampler], rank, world, offset)
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        first = (self.rank - self.offset) % self.world
        return len(range(first, len(self.batch_sampler), self.world))  # type: ignore[arg-type]


def shard(loader: Iterable[Any], rank: int, world: int, offset: int = 0) -> Iterable[Any]:
    """This rank's share of ``loader``, whose first batch has the global index ``offset`` among all loaders.

    A plain map-style ``DataLoader`` is rebuilt around a sharded batch sampler, so a rank loads only its own batches
    (a shuffling one in the dataset's order: shuffles drawn on each rank's own RNG would overlap, and the metrics do
    not depend on the order); any other iterable is read in full and its batches kept by global index. A
    ``DataLoader`` that already has a ``DistributedSampler`` is used as it is (the user sharded it).
    """
    if world == 1:
        return loader
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler):
        sampler = loader.sampler
        if not sampler.drop_last and len(sampler.dataset) % sampler.num_replicas != 0:  # type: ignore[arg-type]
            rank_zero_warn(
                "PruneEvalCallback: the evaluation DataLoader has a DistributedSampler that pads the dataset with"
                " repeated samples, so the pruning metrics count them twice; pass a DataLoader without a sampler and"
                " the callback shards it exactly"
            )
        return loader
    if type(loader) is DataLoader and loader.batch_sampler is not None and not isinstance(
        loader.dataset, IterableDataset
    ):
        batch_sampler: Iterable[list[int]] = loader.batch_sampler
        if isinstance(loader.sampler, RandomSampler) and loader.batch_size is not None:
            dataset: Any = loader.dataset  # map-style, so sized
            batch_sampler = BatchSampler(SequentialSampler(dataset), loader.batch_size, loader.drop_last)
        kwargs: dict[str, Any] = {
            "batch_sampler": ShardBatchSampler(batch_sampler, rank, world, offset),
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "generator": loader.generator,
            "persistent_workers": loader.persistent_workers,
            "pin_memory_device": loader.pin_memory_device,
        }
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        if hasattr(loader, "in_order"):
            kwargs["in_order"] = loader.in_order
        return DataLoader(loader.dataset, **kwargs)
    return EveryNth([loader], rank, world, offset)


def loader_length(loader: Iterable[Any]) -> int | None:
    """Number of batches of ``loader`` over all ranks, ``None`` if it has no length."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


class ShardedBatches:
    """This rank's share of one or more loaders, read one after the other; re-iterable.

    Batches are dealt to ranks by their index over all loaders together, so every rank gets a batch whenever there
    are at least as many batches as ranks, however they are split between loaders.
    """

    def __init__(self, loaders: Sequence[Iterable[Any]], rank: int, world: int) -> None:
        lengths = [loader_length(loader) for loader in loaders]
        self.total_batches: int | None = None if None in lengths else sum(n for n in lengths if n is not None)
        self.parts: list[Iterable[Any]]
        if self.total_batches is None:
            self.parts = [EveryNth(loaders, rank, world)] if world > 1 else list(loaders)
        else:
            offsets = itertools.accumulate([0, *(n for n in lengths if n is not None)])
            self.parts = [shard(loader, rank, world, offset) for loader, offset in zip(loaders, offsets, strict=False)]
        # what rank 0 evaluates (it shows the progress): batches 0, world, 2 world, ...
        self.rank_zero_batches = None if self.total_batches is None else len(range(0, self.total_batches, world))

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part

    def first_batch(self, device: torch.device) -> Any:
        """This rank's first batch, on ``device`` (None if it has none)."""
        for batch in self:
            return move_data_to_device(batch, device)
        return None


def sharded_batches(loaders: Sequence[Iterable[Any]], trainer: Trainer, description: str | None,
                    device: torch.device) -> ShardedBatches:
    """This rank's share of ``loaders``; a ValueError on every rank together if there are fewer batches than ranks."""
    batches = ShardedBatches(loaders, trainer.global_rank, trainer.world_size)
    total = batches.total_batches
    if total is None and trainer.world_size > 1:
        # No length to check: count this rank's batches (one pass) and take the fewest over the ranks, so that
        # every rank raises together rather than one waiting forever in the metric sync.
        mine = torch.tensor(sum(1 for _ in batches), device=device)
        fewest = int(trainer.strategy.all_gather(mine).min())
        total = trainer.world_size if fewest > 0 else 0
    if total is not None and total < trainer.world_size:
        # the same on every rank, so every rank raises (a rank without batches would hang the metric sync)
        raise ValueError(
            f"PruneEvalCallback's evaluation data ({description}) has {total} batch(es), fewer than the"
            f" {trainer.world_size} ranks; give it at least one batch per rank"
        )
    return batches
