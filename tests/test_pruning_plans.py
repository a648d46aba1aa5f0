"""The one-pass evaluation: each batch loaded once, every level written per batch exactly as a full masked write."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_heavytail.pruning import (
    PRUNING_METHODS,
    evaluate_at_epsilon,
    evaluate_pruning,
    evaluate_pruning_curve,
)
from lightning_heavytail.pruning._plans import ThresholdPlan
from tests.test_pruning import assert_unchanged, batches, snapshot, stateful_net, tiny_mlp

LEVELS = (0.0, 0.3, 0.5, 0.8, 0.95)


def masked_by_hand(backup: Tensor, score: Tensor, threshold: float | None) -> Tensor:
    """The definition: entries (or whole units) whose score is at most the threshold zeroed; None none, NaN all."""
    if threshold is None:
        return backup.clone()
    if threshold != threshold:
        return torch.zeros_like(backup)
    return backup.masked_fill(score <= threshold, 0)


@pytest.mark.parametrize("layout", ["entries", "units", "channels_last"])
def test_writes_in_any_order_equal_a_full_masked_write(layout: str) -> None:
    torch.manual_seed(0)
    backup = torch.randn(6, 4, 3, 3)
    backup[1, 0, 0, 0] = float("nan")  # NaN scores sort last: zeroed only where the threshold is NaN
    backup[2, :2] = 0.0  # ties at 0
    if layout == "channels_last":
        backup = backup.contiguous(memory_format=torch.channels_last)
    if layout == "units":
        score = backup.reshape(6, -1).nan_to_num(nan=9.0).norm(dim=1).reshape(6, 1, 1, 1)
        thresholds = [None, float(score.flatten().sort().values[1]), float(score.max()), float("nan")]
    else:
        score = backup.abs()
        ranked = score.flatten().sort().values  # NaN last
        thresholds = [None, 0.0, float(ranked[40]), float(ranked[-2]), float("nan")]
    plan = ThresholdPlan([[t] for t in thresholds], [score])
    out = backup.clone()  # the model holds the unpruned values
    held: int | None = None
    # every order of visiting the levels, with jumps up and down, and a write from "another plan" in between
    top = len(thresholds) - 1
    for order in [range(top + 1), reversed(range(top + 1)), [3, 1, 2, 0, top, top, 2]]:
        for level in order:
            plan.write(level, 0, backup, out, held)
            expected = masked_by_hand(backup, score, thresholds[level])
            assert torch.equal(out.nan_to_num(nan=7.0), expected.nan_to_num(nan=7.0)), (order, level)
            assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
            held = level
        out.fill_(5.0)  # another plan's values
        held = None


def test_thresholds_must_not_decrease_over_the_levels() -> None:
    score = torch.arange(6.0)
    for thresholds in ([2.0, 1.0], [float("nan"), 1.0], [1.0, None]):
        with pytest.raises(ValueError, match="must not decrease"):
            ThresholdPlan([[t] for t in thresholds], [score])


class CountingLoader:
    """Re-iterable; counts the batches it yields and the passes started."""

    def __init__(self, data: list[Any]) -> None:
        self.data, self.loaded, self.passes = data, 0, 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        for batch in self.data:
            self.loaded += 1
            yield batch


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_each_batch_is_loaded_once_for_the_whole_curve(method: str) -> None:
    loader = CountingLoader(batches(n_batches=4))
    curve = evaluate_pruning_curve(tiny_mlp(), loader, LEVELS, method=method)
    assert len(curve.sparsities) == len(LEVELS)
    # one pass, its first batch also the one the output check ran on (before: one pass per level, plus one batch)
    assert (loader.passes, loader.loaded) == (1, 4)


def test_every_method_and_the_epsilon_point_in_one_pass_equal_separate_evaluations() -> None:
    net, data = stateful_net(), batches(n_batches=3)  # BatchNorm buffers, dropout, a forward that writes a buffer
    before = snapshot(net)
    rng = torch.get_rng_state()
    metric = MulticlassAccuracy(num_classes=4, average="micro")
    loader = CountingLoader(data)
    both = evaluate_pruning(net, loader, LEVELS, methods=PRUNING_METHODS, epsilon=0.1, metrics=metric)
    assert (loader.passes, loader.loaded) == (1, 3)
    assert_unchanged(net, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert metric.update_count == 0  # the metrics passed are copied for each state, never updated
    assert list(both.curves) == list(PRUNING_METHODS)
    for method in PRUNING_METHODS:
        alone = evaluate_pruning_curve(net, data, LEVELS, method=method, metrics=metric)
        assert both.curves[method] == alone, method
        assert len(set(alone.metrics["MulticlassAccuracy"])) > 1, method  # the levels differ: the test can fail
    assert both.at_epsilon == evaluate_at_epsilon(net, data, epsilon=0.1, metrics=metric)
    assert_unchanged(net, before)


def test_one_pass_equals_one_pass_per_level_bitwise_on_a_cnn() -> None:
    from lightning_heavytail.pruning import REGISTRY
    from lightning_heavytail.pruning._evaluator import CurveTask, levels_applied
    from lightning_heavytail.pruning._probe import prepare, select_targets

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    cnn[2].to(memory_format=torch.channels_last)  # a kernel whose storage is not row-major
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 3, 6, 6, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(3)]
    for method in ("global", "layerwise", "neuron", "svd"):
        curve = evaluate_pruning_curve(cnn, data, LEVELS, method=method, params="weights")
        # the way before: the same plan, each level written once and scored in a pass of its own
        run = prepare(cnn, data, None, None, None, (), None)
        targets, _ = select_targets(cnn, "weights", run.exclude, run.probe)
        with levels_applied(cnn, targets) as writer:
            task = CurveTask(method, cnn, targets, LEVELS, run.scorer, run.example, run.forward)
            states = REGISTRY[method].states(task, writer)
            alone = [run.scorer.score([state])[0]["accuracy"] for state in states]
        assert curve.metrics["accuracy"] == alone, method
        assert curve.sparsities == [state.sparsity for state in states], method


def test_a_state_is_written_once_when_it_is_alone() -> None:
    from lightning_heavytail.pruning import _plans

    writes: list[int] = []
    real = _plans.ThresholdPlan.write

    def counting(self: ThresholdPlan, *args: Any) -> None:
        writes.append(args[0])
        real(self, *args)

    model, data = tiny_mlp(), batches(n_batches=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_plans.ThresholdPlan, "write", counting)
        evaluate_pruning_curve(model, data, (0.5,))
        assert writes == [0]  # one level: written once for the pass, not once per batch
        writes.clear()
        evaluate_pruning_curve(model, data, (0.0, 0.5))
        assert writes == list(itertools.chain.from_iterable([[0, 1]] * 4))  # per batch, each level in turn


def test_structured_scores_its_copies_in_the_same_pass_as_the_mask_methods() -> None:
    model = copy.deepcopy(tiny_mlp())
    loader = CountingLoader(batches(n_batches=2))
    both = evaluate_pruning(model, loader, (0.0, 0.5), methods=("neuron", "structured"))
    assert (loader.passes, loader.loaded) == (1, 2)
    # at level 0 both are the unpruned model, although the neuron levels were written just before
    assert both.curves["structured"].metrics["accuracy"][0] == both.curves["neuron"].metrics["accuracy"][0]
    assert both.curves["structured"] == evaluate_pruning_curve(model, batches(n_batches=2), (0.0, 0.5),
                                                               method="structured")


def test_unit_ranks_past_float32_precision_zero_exactly_the_counted_units() -> None:
    # The epsilon point zeroes the units ranked 0 .. count - 1; past 2**24 units a float threshold compared in float32
    # took rank 2**24 + 1 for 2**24 and zeroed one unit too many.
    n, count = 2**24 + 2, 2**24 + 1
    ranks = torch.arange(n).reshape(-1, 1)
    plan = ThresholdPlan([[float(count - 1)]], [ranks])
    out = torch.ones(n, 1)
    plan.write(0, 0, torch.ones(n, 1), out, None)
    assert int((out == 0).sum()) == count and out[-1, 0] == 1.0
