"""What PruneEvalCallback checks at setup: the strategy, the other PruneEvalCallbacks, the metric names known early.

Sharded training is supported through ``ModelParallelStrategy`` with FSDP2 (``fully_shard``) for the mask methods.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from torchmetrics import Metric, MetricCollection

from lightning_heavytail._checks import check_strategy, is_strategy
from lightning_heavytail._compat import tensor_parallel_size
from lightning_heavytail.pruning import DEFAULT_METRIC_KEY, MASK_METHODS

_FSDP2 = (
    "For sharded training use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with"
    " torch.distributed.fsdp.fully_shard applied in configure_model (FSDP2), and a mask method"
)


def check_strategy_supported(strategy: object, methods: Sequence[str]) -> None:
    """Refuse what the pruning evaluation cannot do under ``strategy``.

    Single-device and DDP-family strategies, and ``ModelParallelStrategy`` with FSDP2 sharding alone
    (``tensor_parallel_size=1``) for the mask methods, are supported. FSDP1 (``FSDPStrategy``) and DeepSpeed keep
    parameters in layouts (flattened shards, partitions) that are not DTensors; under sharding ``"structured"``
    (which changes shapes) and ``"svd"`` (which factors whole matrices) are refused, and so is tensor parallelism,
    whose ranks share batches within a tensor-parallel group, which the evaluation's sharding of the data and sync of
    the metrics (over all ranks) do not allow for.

    Raises:
        ValueError: naming the strategy or the methods, and what works instead.
    """
    check_strategy(
        strategy, "PruneEvalCallback", supported=("ModelParallelStrategy",),
        why="it shards parameters in a layout whose entries cannot be mapped to the whole tensors",
        instead=f"{_FSDP2} {MASK_METHODS}; or a single-device or DDP-family strategy.",
    )
    if not is_strategy(strategy, "ModelParallelStrategy"):
        return
    refused = [method for method in methods if method not in MASK_METHODS]
    if refused:
        raise ValueError(
            f"PruneEvalCallback: method {refused} cannot prune the sharded parameters of {type(strategy).__name__}"
            " ('structured' removes channels, changing the shapes the shards are cut from; 'svd' factors whole"
            f" matrices). Use the mask methods {MASK_METHODS}: 'neuron' zeroes whole units, the paper's structured"
            " pruning."
        )
    size = tensor_parallel_size(strategy)
    if size != 1:
        raise ValueError(
            f"PruneEvalCallback supports {type(strategy).__name__} with tensor_parallel_size=1 (FSDP2 sharding alone),"
            f" got tensor_parallel_size={size}: the ranks of a tensor-parallel group share their batches, and the"
            " evaluation deals batches to every rank and syncs the metrics over all of them."
            f" {_FSDP2} {MASK_METHODS}."
        )


def check_distinct(callback: Any, callbacks: Iterable[Any]) -> None:
    """Refuse another PruneEvalCallback with the same ``log_prefix``, or writing the same history files."""
    for other in callbacks:
        if other is callback or type(other) is not type(callback):
            continue
        if other.log_prefix == callback.log_prefix:
            raise ValueError(
                f"Two PruneEvalCallbacks have `log_prefix`={callback.log_prefix!r}: their logged names and history"
                " files would overwrite each other. Give each a distinct `log_prefix`."
            )
        if callback.history_stem is not None and other.history_stem == callback.history_stem:
            raise ValueError(
                f"Two PruneEvalCallbacks (log_prefix {callback.log_prefix!r} and {other.log_prefix!r}) would write"
                f" the same history files {callback.history_stem}.json/.csv. Give them distinct `filename`s."
            )


def known_metric_names(metrics: Metric | MetricCollection | None) -> Collection[str] | None:
    """The names the curve's metrics will have, where they are known before any evaluation."""
    if metrics is None:
        return {DEFAULT_METRIC_KEY}
    if isinstance(metrics, MetricCollection):
        return {str(key) for key in metrics.keys(keep_base=False)}
    return None  # a single Metric may return one value (named after its class) or a dict
