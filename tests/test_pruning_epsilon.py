"""evaluate_at_epsilon / evaluate_at_ratios against a plain-Python reading of the authors' criterion."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lightning_heavytail.compressibility import compressibility_report
from lightning_heavytail.pruning import (
    EpsilonPoint,
    evaluate_at_epsilon,
    evaluate_at_ratios,
    evaluate_pruning_curve,
    prunable_units,
)
from tests.test_pruning import FailingLoader, assert_unchanged, batches, snapshot, stateful_net


def deep_mlp(seed: int = 0) -> nn.Sequential:
    """Two hidden layers of different widths and row-norm spreads, bias-free like the paper's nets."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 20, bias=False), nn.ReLU(), nn.Linear(20, 14, bias=False), nn.ReLU(),
                        nn.Linear(14, 4, bias=False))
    with torch.no_grad():  # rows of very different norms, as after heavy-tailed training
        net[0].weight.mul_(torch.logspace(-2, 1, 20).unsqueeze(1))
        net[2].weight.mul_(torch.logspace(-1.5, 0.5, 14)[torch.randperm(14)].unsqueeze(1))
    return net


def rows_to_prune(w: np.ndarray, epsilon: float) -> list[int]:
    """The criterion in words: rows by squared norm, smallest first (lower index on ties), while the sum fits."""
    squared = [float(np.sum(row.astype(np.float64) ** 2)) for row in w.reshape(w.shape[0], -1)]
    order = sorted(range(len(squared)), key=lambda i: (squared[i], i))
    budget = epsilon * sum(squared[i] for i in order)
    chosen, total = [], 0.0
    for i in order:
        if total + squared[i] > budget:
            break
        total += squared[i]
        chosen.append(i)
    return chosen


def accuracy_by_hand(model: nn.Module, data: list) -> float:
    with torch.no_grad():
        correct = sum(int((model(x).argmax(dim=1) == y).sum()) for x, y in data)
    return correct / sum(len(y) for _, y in data)


def by_hand(model: nn.Module, data: list, epsilon: float, names: list[str]) -> tuple[dict[str, float], float, float]:
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    ratios, pruned, units = {}, 0, 0
    for name in names:
        rows = rows_to_prune(params[name].detach().numpy(), epsilon)
        with torch.no_grad():
            params[name][rows] = 0.0
        ratios[name] = len(rows) / params[name].shape[0]
        pruned, units = pruned + len(rows), units + params[name].shape[0]
    return ratios, pruned / units, accuracy_by_hand(clone, data)


@pytest.mark.parametrize("epsilon", [0.0, 0.02, 0.1, 0.3, 0.7, 1.0])
def test_matches_an_independent_computation_on_two_hidden_layers(epsilon: float) -> None:
    net, data = deep_mlp(), batches(n_batches=4, size=25)
    point = evaluate_at_epsilon(net, data, epsilon=epsilon)
    ratios, ratio, accuracy = by_hand(net, data, epsilon, ["0.weight", "2.weight"])
    assert point.epsilon == epsilon
    assert point.ratios == ratios  # "paper": both hidden weights, never the output layer
    assert point.ratio == pytest.approx(ratio, abs=0)
    assert point.metrics == {"accuracy": pytest.approx(accuracy, abs=1e-7)}
    if epsilon == 0.0:
        assert point.ratio == 0.0 and point.metrics["accuracy"] == pytest.approx(accuracy_by_hand(net, data))
    if epsilon == 1.0:
        assert point.ratios == {"0.weight": 1.0, "2.weight": 1.0}
    # the same ratio as the compressibility report's fraction prunable
    report = compressibility_report(net, params="paper", epsilon=epsilon)
    assert point.ratio == report["fraction_prunable/total"]
    assert point.ratios["0.weight"] == report["fraction_prunable/0.weight"]


def test_layers_are_pruned_to_different_ratios_and_something_is_pruned_at_0_1() -> None:
    point = evaluate_at_epsilon(deep_mlp(), batches(), epsilon=0.1)
    assert 0.0 < point.ratios["2.weight"] < point.ratios["0.weight"] < 1.0
    assert point.ratio == pytest.approx((point.ratios["0.weight"] * 20 + point.ratios["2.weight"] * 14) / 34)


def test_ties_zero_exactly_the_counted_units_lower_index_first() -> None:
    net = nn.Sequential(nn.Linear(2, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))
    with torch.no_grad():  # squared norms 4, 1, 1, 1, 25: total 32
        net[0].weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [3.0, 4.0]]))
    seen: list[Tensor] = []

    def forward_fn(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        seen.append(model[0].weight.detach().clone())
        return model(batch[0]), batch[1]

    data = batches(n_batches=1, features=2, classes=3)
    point = evaluate_at_epsilon(net, data, epsilon=2.5 / 32, forward_fn=forward_fn)  # budget 2.5: two of three ties
    assert point.ratios == {"0.weight": 0.4}
    zero_rows = [i for i in range(5) if bool((seen[-1][i] == 0).all())]  # seen[0]: the unpruned output check
    assert zero_rows == [1, 2]
    # the neuron curve zeroes every tied unit at its threshold instead: 3 rows at level 0.4, so 7 of the 10 entries
    # are zero (the 6 of rows 1-3 and the 0 already in row 0)
    curve = evaluate_pruning_curve(net, data, [0.4], method="neuron", params="paper")
    assert curve.sparsities == [pytest.approx(0.7)]


def test_units_of_norm_zero_are_pruned_at_epsilon_0() -> None:
    net = deep_mlp()
    with torch.no_grad():
        net[0].weight[[3, 7]] = 0.0
    point = evaluate_at_epsilon(net, batches(), epsilon=0.0)
    assert point.ratios == {"0.weight": 2 / 20, "2.weight": 0.0}
    assert prunable_units(net[0].weight, 0.0) == (2, 20)


def test_params_exclude_and_metrics() -> None:
    from torchmetrics.classification import MulticlassF1Score

    net, data = deep_mlp(), batches()
    only_first = evaluate_at_epsilon(net, data, exclude=["2.*"])
    assert list(only_first.ratios) == ["0.weight"]
    everything = evaluate_at_epsilon(net, data, params="weights")
    assert list(everything.ratios) == ["0.weight", "2.weight", "4.weight"]
    f1 = evaluate_at_epsilon(net, data, metrics=MulticlassF1Score(num_classes=4))
    assert list(f1.metrics) == ["MulticlassF1Score"]


def test_model_bitwise_unchanged_after_success_and_after_a_failure() -> None:
    net, data = stateful_net(), batches()
    before = snapshot(net)
    point = evaluate_at_epsilon(net, data, epsilon=0.5, params="weights")
    assert point.ratio > 0.1  # it did prune
    assert_unchanged(net, before)
    with pytest.raises(RuntimeError, match="loader broke"):
        evaluate_at_epsilon(net, FailingLoader(data, fail_at=1), epsilon=0.5, params="weights")
    assert_unchanged(net, before)
    evaluate_at_ratios(net, data, {"head.weight": 0.5})
    assert_unchanged(net, before)


def test_to_dict_is_json_and_round_trips() -> None:
    point = evaluate_at_epsilon(deep_mlp(), batches())
    data = json.loads(json.dumps(point.to_dict()))
    assert set(data) == {"epsilon", "ratios", "ratio", "metrics"}
    assert EpsilonPoint.from_dict(data) == point


def test_ratios_of_one_layer_agree_with_the_neuron_curve() -> None:
    net, data = deep_mlp(), batches(n_batches=4, size=25)
    for ratio in (0.0, 0.25, 0.5, 0.95):
        curve = evaluate_pruning_curve(net, data, [ratio], method="neuron", params="0.weight")
        assert curve.sparsities == [pytest.approx(round(ratio * 20) / 20)]  # no ties here
        assert evaluate_at_ratios(net, data, {"0.weight": ratio}) == {"accuracy": curve.metrics["accuracy"][0]}


def test_ratios_per_layer_match_by_hand_and_reproduce_an_epsilon_point() -> None:
    net, data = deep_mlp(), batches(n_batches=4, size=25)
    point = evaluate_at_epsilon(net, data, epsilon=0.2)
    # the same model pruned to its own epsilon ratios is the epsilon point
    assert evaluate_at_ratios(net, data, point.ratios) == point.metrics
    # another model of the same shape pruned to those ratios, by hand: the k smallest rows of each layer
    other = deep_mlp(seed=5)
    clone = copy.deepcopy(other)
    params = dict(clone.named_parameters())
    for name, ratio in point.ratios.items():
        w = params[name].detach().numpy().astype(np.float64)
        k = round(ratio * w.shape[0])
        rows = np.argsort(np.sum(w**2, axis=1), kind="stable")[:k]
        with torch.no_grad():
            params[name][torch.from_numpy(rows)] = 0.0
    assert evaluate_at_ratios(other, data, point.ratios) == {"accuracy": pytest.approx(accuracy_by_hand(clone, data))}


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda net, data: evaluate_at_epsilon(net, data, epsilon=1.5), ValueError,
     r"`epsilon` must be a number in \[0, 1\].*1.5"),
    (lambda net, data: evaluate_at_epsilon(net, data, epsilon=True), TypeError, "`epsilon`.*True"),
    (lambda net, data: evaluate_at_epsilon(net, data, epsilon="0.1"), TypeError, "`epsilon`.*'0.1'"),
    (lambda net, data: evaluate_at_epsilon("net", data), TypeError, "`model` must be a torch.nn.Module"),
    (lambda net, data: evaluate_at_epsilon(net, 3), TypeError, "`dataloader` must be an iterable"),
    (lambda net, data: evaluate_at_epsilon(net, []), ValueError, "`dataloader` yielded no batch"),
    (lambda net, data: evaluate_at_epsilon(net, data, metrics="acc"), TypeError, "`metrics` must be None"),
    (lambda net, data: evaluate_at_epsilon(net, data, params="*.nothing"), ValueError,
     "`params`.*selects no trainable"),
    (lambda net, data: evaluate_at_epsilon(net, data, exclude=[3]), TypeError, "`exclude`"),
    (lambda net, data: evaluate_at_epsilon(net, data, device="gpu7"), ValueError, "`device`"),
    (lambda net, data: evaluate_at_ratios(net, data, {}), ValueError, "`ratios` must be a non-empty mapping"),
    (lambda net, data: evaluate_at_ratios(net, data, [("0.weight", 0.5)]), TypeError,
     "`ratios` must be a non-empty mapping"),
    (lambda net, data: evaluate_at_ratios(net, data, {"hidden.weight": 0.5}), ValueError,
     r"'hidden.weight'.*'0.weight'"),
    (lambda net, data: evaluate_at_ratios(net, data, {"0.weight": 1.2}), ValueError, r"`ratios\['0.weight'\]`.*1.2"),
    (lambda net, data: evaluate_at_ratios(net, data, {"0.weight": 0.5}, metrics=1), TypeError,
     "`metrics` must be None"),
])
def test_bad_arguments_name_the_argument(call: Any, error: type[Exception], match: str) -> None:
    net = deep_mlp()
    before = snapshot(net)
    with pytest.raises(error, match=match):
        call(net, batches())
    assert_unchanged(net, before)


def test_a_forward_fn_that_is_not_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="`forward_fn` must be None or a callable"):
        evaluate_at_epsilon(deep_mlp(), batches(), forward_fn=3)  # type: ignore[arg-type]


def test_non_finite_weights_are_refused_naming_the_parameter() -> None:
    net = deep_mlp()
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'2\.weight' holds NaN or infinity"):
        evaluate_at_epsilon(net, batches())
    with pytest.raises(ValueError, match=r"'2\.weight' holds NaN or infinity"):
        evaluate_at_ratios(net, batches(), {"2.weight": 0.5})
