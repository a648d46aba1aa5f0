"""PruneEvalCallback's evaluation data: each rank's share of the loaders, and where the data comes from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from lightning_heavytail.callbacks._eval_data import EveryNth, ShardBatchSampler, ShardedBatches, loader_length, shard


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[Tensor]:
        return iter(torch.arange(11.0).split(1))


def sample_ids(batches: Any) -> list[float]:
    return [float(v) for batch in batches for v in (batch[0] if isinstance(batch, list) else batch).flatten()]


@pytest.mark.parametrize(
    "make",
    [
        lambda: DataLoader(torch.arange(11.0), batch_size=2),  # rebuilt around a sharded batch sampler
        lambda: DataLoader(torch.arange(11.0), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0)),
        lambda: DataLoader(Stream(), batch_size=2),  # iterable dataset: read in full, every 2nd batch kept
        lambda: [torch.arange(11.0)[i : i + 2] for i in range(0, 11, 2)],  # plain list of batches
    ],
)
def test_shards_cover_every_batch_exactly_once(make: Any) -> None:
    whole = sample_ids(make())
    shards = [sample_ids(shard(make(), rank, 2)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(whole) == [float(i) for i in range(11)]
    assert len(shards[0]) == 6 and len(shards[1]) == 5  # batches 0, 2, 4 (+ the last of 1) and 1, 3
    again = [sample_ids(shard(make(), rank, 2)) for rank in range(2)]
    assert again == shards  # re-iterable, same split each time


def test_a_shuffling_loader_is_sharded_in_dataset_order_whatever_each_rank_s_rng() -> None:
    # Each rank's unseeded shuffle would come from its own global RNG: overlapping shards. The dataset order cannot.
    torch.manual_seed(0)
    rank0 = sample_ids(shard(DataLoader(torch.arange(11.0), batch_size=2, shuffle=True), 0, 2))
    torch.manual_seed(1)
    rank1 = sample_ids(shard(DataLoader(torch.arange(11.0), batch_size=2, shuffle=True), 1, 2))
    assert sorted(rank0 + rank1) == [float(i) for i in range(11)]


@pytest.mark.parametrize("sized", [True, False])
def test_batches_are_dealt_over_all_loaders_so_every_rank_gets_one(sized: bool) -> None:
    # two loaders of one batch each over two ranks: dealt per loader, rank 1 would get nothing and hang the sync
    def loaders() -> list[Any]:
        if sized:
            return [DataLoader(torch.arange(2.0), batch_size=2), DataLoader(torch.arange(2.0, 5.0), batch_size=3)]
        return [OneBatch(torch.arange(2.0)), OneBatch(torch.arange(2.0, 5.0))]

    shards = [ShardedBatches(loaders(), rank, 2) for rank in range(2)]
    assert [len(sample_ids(shard)) for shard in shards] == [2, 3]
    assert sorted(sample_ids(shards[0]) + sample_ids(shards[1])) == [0.0, 1.0, 2.0, 3.0, 4.0]


class OneBatch:  # a re-iterable without a length, like a generator-backed stream
    def __init__(self, batch: Tensor) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[Tensor]:
        return iter([self.batch])


def test_shard_keeps_a_user_distributed_sampler() -> None:
    data = torch.arange(10.0)
    user = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    assert shard(user, 1, 2) is user
    single = DataLoader(data, batch_size=2)
    assert shard(single, 0, 1) is single


@pytest.mark.parametrize("offset", [0, 1, 2, 5])
def test_batch_sampler_shards_have_the_length_they_yield_and_deal_by_global_index(offset: int) -> None:
    sampler = [[i] for i in range(7)]  # 7 batches whose global indices start at `offset`
    shards = [ShardBatchSampler(sampler, rank, 3, offset) for rank in range(3)]
    for rank, part in enumerate(shards):
        got = [batch[0] for batch in part]
        assert len(part) == len(got)
        assert all((i + offset) % 3 == rank for i in got)
    assert sorted(batch[0] for part in shards for batch in part) == list(range(7))


def test_every_nth_reads_loaders_one_after_the_other() -> None:
    loaders = [[0, 1, 2], [3, 4]]
    assert [list(EveryNth(loaders, rank, 2)) for rank in range(2)] == [[0, 2, 4], [1, 3]]
    assert list(EveryNth(loaders, 0, 2, offset=1)) == [1, 3]  # global index 1 + position


def test_loader_length_is_none_without_a_length() -> None:
    assert loader_length(DataLoader(torch.arange(5.0), batch_size=2)) == 3
    assert loader_length(OneBatch(torch.zeros(1))) is None
