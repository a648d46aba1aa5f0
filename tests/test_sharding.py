"""LocalBlock and local_part against DTensor's own layout, and the functional noise on DTensors (2 processes, gloo).

``distribute_tensor`` of ``arange(n).view(shape)`` leaves on each rank exactly the global flat indices of its local
entries, so the block the package computes from the mesh and placements can be checked against DTensor itself.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_heavytail.noise import NonFiniteParameterError, add_heavy_tailed_noise
from lightning_heavytail.sharding import LocalBlock, local_part


def test_local_block_of_a_plain_tensor_is_the_whole() -> None:
    tensor = torch.zeros(4, 3)
    local, block = local_part(tensor)
    assert local is tensor and block.is_whole and block.rows() == range(4)
    assert block.flat_index(torch.device("cpu")) == range(12)
    part = LocalBlock.from_offsets((4, 3), (1, 1), (2, 2))
    assert part.local_shape == (2, 2) and not part.is_whole
    assert part.flat_index(torch.device("cpu")).tolist() == [4, 5, 7, 8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _layouts() -> list[tuple[tuple[int, ...], list[Any]]]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return [
        ((5, 3), [Shard(0)]),  # FSDP2: rows, uneven (3 + 2)
        ((1, 4), [Shard(0)]),  # rank 1 holds nothing
        ((4, 5), [Shard(1)]),  # tensor parallel, row-wise: columns, uneven
        ((2, 3, 7), [Shard(2)]),
        ((6, 2), [Replicate()]),
        ((8, 3), [_StridedShard(0, split_factor=2)]),  # FSDP2 over tensor parallelism: rows not contiguous
    ]


def _worker(rank: int, port: int, results: Any) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        out: dict[str, Any] = {"layouts": [], "noise": {}}
        for shape, placements in _layouts():
            index = torch.arange(torch.Size(shape).numel()).view(shape)
            dtensor = distribute_tensor(index, mesh, placements)
            local, block = local_part(dtensor)
            flat = block.flat_index(torch.device("cpu"))
            flat = torch.tensor(list(flat)) if isinstance(flat, range) else flat
            out["layouts"].append((torch.equal(local.reshape(-1), flat), tuple(block.local_shape), tuple(local.shape)))
        for structure in ("iid", "neuron", "elliptical"):
            for dim in (0, 1):  # FSDP2 rows, tensor-parallel columns
                whole = torch.zeros(7, 5)
                param = distribute_tensor(whole.clone(), mesh, [Shard(dim)])
                stats = add_heavy_tailed_noise([("w", param)], 1.6, 0.1, structure=structure, seed=2, step=3,
                                               track_max=True)
                add_heavy_tailed_noise([("w", whole)], 1.6, 0.1, structure=structure, seed=2, step=3)
                out["noise"][structure, dim] = (torch.equal(param.full_tensor(), whole), stats.max_abs_noise,
                                                float(whole.abs().max()))
        # a NaN in rank 0's part only: every rank must refuse (or skip) it, none may go on alone
        bad = distribute_tensor(torch.zeros(6, 2), mesh, [Shard(0)])
        if rank == 0:
            bad.to_local()[0, 0] = float("nan")
        try:
            add_heavy_tailed_noise([("bad", bad)], 1.8, 0.1)
            out["raised"] = None
        except NonFiniteParameterError as err:
            out["raised"] = str(err)
        skipped = add_heavy_tailed_noise([("bad", bad)], 1.8, 0.1, on_nonfinite="skip")
        out["skipped"] = skipped.skipped
        out["untouched"] = bool((bad.to_local().nan_to_num(0.0) == 0).all())
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_blocks_match_dtensor_layouts_and_sharded_noise_is_the_whole_noise() -> None:
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_worker, args=(_free_port(), results), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        out = results[rank]
        for (matches, block_shape, local_shape), (shape, placements) in zip(out["layouts"], _layouts(), strict=True):
            assert matches and block_shape == local_shape, (rank, shape, placements)
        for structure, (equal, tracked, largest) in out["noise"].items():
            assert equal, (rank, structure)
            assert tracked == pytest.approx(largest, rel=1e-6), (rank, structure)  # the max over all shards
        assert out["raised"] is not None and "'bad'" in out["raised"], rank
        assert out["skipped"] == ["bad"] and out["untouched"], rank
    assert "another rank's part" in results[1]["raised"]  # rank 1's part is finite: it learns it from rank 0
