"""The global threshold of a sharded layer: the distributed selection against gathering the magnitudes, 2 processes.

A layer of ``--weights`` (default 10,000,000) float32 weights is split over 2 processes (gloo on the CPU), 5,000,000
each; the K = 7 thresholds of the callback's default levels are the k-th smallest magnitudes over both shards.

- **distributed selection** (``lightning_heavytail._distributed.kth_smallest_distributed``, what the pruning of
  sharded models uses): each rank sorts its own magnitudes' bit patterns, then 4 rounds of one all-reduce of
  7 x 256 counts; nothing is gathered.
- **all-gather**: ``dist.all_gather`` of the magnitudes to every rank, then one sort of all 10,000,000 and the k-th
  values (the way a single process finds them, on every rank).

Both must give bitwise the same thresholds (checked). Times are medians over interleaved rounds, measured on rank 0
between barriers. Peak memory: the growth of the peak resident set (``ru_maxrss``) of each rank while one way runs,
each way in fresh processes, with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``, set for the
processes this script starts): with its default dynamic threshold, freed large blocks stay in the heap and the
resident set keeps memory that is no longer used, which would be counted. Last, under FSDP2 (``fully_shard`` per
layer) with a 1000 -> 10,000 -> 10 MLP (10M weights in the pruned layer): the peak resident set during one plain
evaluation pass (FSDP2's own forward, which gathers each layer's weights) against the whole "global" 7-level curve;
the difference is what the evaluation holds besides.

Run:  python benchmarks/bench_sharded_selection.py                 (about 2 minutes on 2 CPU cores)
      python benchmarks/bench_sharded_selection.py --weights 2000000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

LEVELS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
WORLD = 2


def shard(weights: int, rank: int) -> torch.Tensor:
    """This rank's ``weights / 2`` magnitudes (heavy-tailed; ties occur: float32 has 2**23 values per octave)."""
    g = torch.Generator().manual_seed(rank)
    return (torch.randn(weights // WORLD, generator=g) ** 3).abs()


def distributed(local: torch.Tensor, ks: list[int]) -> list[float | None]:
    from lightning_heavytail._distributed import kth_smallest_distributed

    [column] = kth_smallest_distributed([local], [ks], torch.device("cpu"))
    return column


def gathered(local: torch.Tensor, ks: list[int]) -> list[float | None]:
    from lightning_heavytail._tensors import sort_ascending

    parts = [torch.empty_like(local) for _ in range(WORLD)]  # the shards are of equal size here
    dist.all_gather(parts, local)
    ranked = sort_ascending(torch.cat(parts))
    return [None if k == 0 else float(ranked[k - 1]) for k in ks]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - start, out


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _timing(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    local = shard(args.weights, rank)
    ks = [round(level * local.numel() * WORLD) for level in LEVELS]
    times: dict[str, list[float]] = {"distributed selection": [], "all-gather + sort": []}
    answers: dict[str, Any] = {}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, fn in (("distributed selection", distributed), ("all-gather + sort", gathered)):
            seconds, answers[name] = timed(lambda f=fn: f(local, ks))
            times[name].append(seconds)
    return {"times": {name: values[1:] for name, values in times.items()}, "answers": answers}


def _memory(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    local = shard(args.weights, rank)
    ks = [round(level * local.numel() * WORLD) for level in LEVELS]
    way = distributed if args.way == "distributed" else gathered
    way(local[:1000], [round(level * 1000 * WORLD) for level in LEVELS])  # imports and first calls, not measured
    before = peak_mb()
    way(local, ks)
    return {"peak growth MB": peak_mb() - before, "shard MB": local.numel() * 4 / 2**20}


def _curve(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_heavytail.pruning import evaluate_pruning_curve

    torch.manual_seed(0)
    width = args.weights // 1000
    net = nn.Sequential(nn.Linear(1000, width, bias=False), nn.ReLU(), nn.Linear(width, 10, bias=False))
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(64, 1000, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(2)]
    with torch.no_grad():
        for x, _ in data:  # a plain evaluation pass: FSDP2 gathers each layer for its forward
            net(x)
    plain = peak_mb()
    start = time.perf_counter()
    curve = evaluate_pruning_curve(net, data, LEVELS, method="global", params="0.weight")
    return {"plain pass peak MB": plain, "curve peak MB": peak_mb(), "seconds": time.perf_counter() - start,
            "sparsities": curve.sparsities, "shard MB": net[0].weight.to_local().numel() * 4 / 2**20}


def _worker(rank: int, port: int, job: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)  # one core per process
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        found = {"timing": _timing, "memory": _memory, "curve": _curve}[job](rank, args)
        torch.save(found, Path(out) / f"{job}{rank}.pt")
    finally:
        dist.destroy_process_group()


def run(job: str, args: argparse.Namespace, out: str) -> list[dict[str, Any]]:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, job, args, out), nprocs=WORLD, join=True)
    return [torch.load(Path(out) / f"{job}{rank}.pt", weights_only=False) for rank in range(WORLD)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # read by glibc when the processes start, see above
    print(f"torch {torch.__version__}, {WORLD} processes x 1 thread, gloo, load average {os.getloadavg()[0]:.1f} on"
          f" {os.cpu_count()} cores; {args.weights:,} float32 weights, K = {len(LEVELS)} levels")
    with tempfile.TemporaryDirectory() as out:
        timing = run("timing", args, out)
        answers = timing[0]["answers"]
        equal = answers["distributed selection"] == answers["all-gather + sort"] == timing[1]["answers"][
            "distributed selection"]
        print(f"\n{'way':<26}{'median s':>10}{'min-max s':>16}   (rank 0, {args.rounds} interleaved rounds)")
        for name, values in timing[0]["times"].items():
            print(f"{name:<26}{statistics.median(values):>10.3f}{min(values):>9.3f}-{max(values):.3f}")
        ratio = statistics.median(a / b for a, b in zip(timing[0]["times"]["all-gather + sort"],
                                                        timing[0]["times"]["distributed selection"], strict=True))
        print(f"all-gather / distributed = {ratio:.2f}x (median of per-round ratios); thresholds bitwise equal on"
              f" both ranks and both ways: {equal}")
        for way in ("distributed", "all-gather"):
            args.way = way
            memory = run("memory", args, out)
            print(f"peak memory growth while the {way} way runs: " + ", ".join(
                f"rank {r} {m['peak growth MB']:.0f} MB" for r, m in enumerate(memory))
                  + f" (the shard: {memory[0]['shard MB']:.0f} MB)")
        curve = run("curve", args, out)
        for rank, found in enumerate(curve):
            print(f"FSDP2, rank {rank}: peak resident {found['plain pass peak MB']:.0f} MB after a plain evaluation"
                  f" pass, {found['curve peak MB']:.0f} MB after the 7-level global curve (+"
                  f"{found['curve peak MB'] - found['plain pass peak MB']:.0f} MB; its shard of the pruned layer:"
                  f" {found['shard MB']:.0f} MB); curve {found['seconds']:.2f} s")


if __name__ == "__main__":
    main()
