"""PruneEvalCallback under FSDP2: real 2-process ModelParallelStrategy + fully_shard on the CPU (gloo).

The driver (tests/fsdp2_driver.py) trains the same module, seed and steps once sharded over two processes and once in
one process (only the noise moves the weights, bitwise equally), and evaluates the pruning curves of the mask methods,
the epsilon point and the compressibility report at the end of the epoch: on 9 batches, 5 on rank 0 and 4 on rank 1.
The module has an uneven shard (15 rows: 8 + 7) and a parameter rank 1 holds no part of (1 row). Run "prune" shards
each layer, "prune_root" the root alone (whose parameters FSDP2 keeps gathered after a forward).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lightning_heavytail.compressibility import compressibility_report
from lightning_heavytail.pruning import evaluate_at_epsilon, evaluate_pruning_curve, tensor_view
from tests.callbacks.test_prune_eval import counting_metrics
from tests.fsdp2_driver import PRUNE_LEVELS, PRUNE_METHODS, ShardedNet, eval_data

pytestmark = pytest.mark.slow
RUNS = ("prune", "prune_root")
# computed from the whole tensors' unit norms (or the gathered largest magnitudes): bitwise equal
EXACT = ("fraction_prunable/", "alpha_hill/", "alpha_hill_units/", "alpha_mohammadi_units/")


def gathered_model(params: dict[str, torch.Tensor]) -> ShardedNet:
    model = ShardedNet()
    model.load_state_dict(params)
    return model


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("run", RUNS)
def test_sharded_curves_are_the_single_process_curves_of_the_same_weights(fsdp2_runs: dict[str, Any],
                                                                          run: str) -> None:
    sharded, single = fsdp2_runs["sharded"][run], fsdp2_runs["single"][run]
    # hidden: 15 rows over 2 ranks (8 + 7); mid: 1 row, rank 1 holds none of it; the noise made them equal
    assert sharded["params"]["hidden.weight"].shape == (15, 8) and sharded["params"]["mid.weight"].shape == (1, 15)
    for name, value in single["params"].items():
        assert torch.equal(sharded["params"][name], value), name
    logged, expected = sharded["history"][-1], single["history"][-1]
    model = gathered_model(single["params"])
    for method in PRUNE_METHODS:
        curve = logged["curves"][method]
        assert curve == expected["curves"][method], method  # bitwise: thresholds, masks, metrics
        assert curve["params"] == ["hidden.weight", "mid.weight"]  # the output layer left out, as in one process
        assert curve["metrics"]["count"] == [68.0] * len(PRUNE_LEVELS)  # every sample once: none padded, none lost
        assert len(set(curve["metrics"]["accuracy"])) > 1  # the levels really prune
        alone = evaluate_pruning_curve(model, eval_data(), PRUNE_LEVELS, method=method, metrics=counting_metrics())
        assert curve == alone.to_dict(), method
    point = evaluate_at_epsilon(model, eval_data(), metrics=counting_metrics()).to_dict()
    assert {k: v for k, v in logged["at_epsilon"].items() if k not in ("sparsity", "removed")} == point
    assert logged["at_epsilon"] == expected["at_epsilon"]
    for name, value in expected["compressibility"].items():  # the per-unit tail index of the 1-unit layer is NaN
        assert same(logged["compressibility"][name], value), name
    assert {k: v for k, v in sharded["logged"].items() if k.startswith("pruning/")}.keys() == {
        k for k in single["logged"] if k.startswith("pruning/")}


@pytest.mark.parametrize("run", RUNS)
def test_sharded_compressibility_report_equals_the_one_of_the_gathered_weights(fsdp2_runs: dict[str, Any],
                                                                              run: str) -> None:
    sharded = fsdp2_runs["sharded"][run]
    report = sharded["history"][-1]["compressibility"]
    model = gathered_model(sharded["params"])
    reference = compressibility_report(tensor_view(model), params=lambda name, _: name in ("hidden.weight",
                                                                                         "mid.weight"),
                                       sparsities=(0.3, 0.9), epsilon=0.1)
    assert report.keys() == reference.keys()
    for key, value in reference.items():
        if key.startswith(EXACT):
            assert same(report[key], value), key
        else:  # float64 sums added in another order: best-k errors, Mohammadi's index of the entries
            assert report[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
    assert math.isfinite(report["alpha_hill/hidden.weight"]) and 0.0 < report["fraction_prunable/total"] < 1.0
