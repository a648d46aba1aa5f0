"""evaluate_pruning_curve and friends: metric values checked against models masked by hand, the model never changed."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_heavytail.pruning import (
    MASK_METHODS,
    PRUNING_METHODS,
    PruningCurve,
    check_prunable,
    evaluate_pruning_curve,
    level_label,
    validate_method,
    validate_sparsities,
)

LEVELS = (0.0, 0.3, 0.5, 0.8, 0.95)


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))


def batches(n_batches: int = 3, size: int = 10, features: int = 6, classes: int = 4, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, features, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n_batches)]


def accuracy_by_hand(model: nn.Module, data: list) -> float:
    with torch.no_grad():
        correct = sum(int((model(x).argmax(dim=1) == y).sum()) for x, y in data)
    return correct / sum(len(y) for _, y in data)


def masked_copy(model: nn.Module, method: str, level: float,
                names: list[str] | None = None) -> tuple[nn.Module, float]:
    """Prune a copy with numpy, by the definition in words: zero the k smallest entries / units, k = round(level n).

    ``names``: the tensors pruned; default: every tensor with 2+ dimensions.
    """
    clone = copy.deepcopy(model)
    weights = {name: p.detach().numpy().astype(np.float64) for name, p in clone.named_parameters()
               if (p.ndim >= 2 if names is None else name in names)}
    zero: dict[str, np.ndarray] = {name: np.zeros(w.shape, dtype=bool) for name, w in weights.items()}
    if method == "global":
        flat = np.concatenate([np.abs(w).ravel() for w in weights.values()])
        assert len(np.unique(flat)) == flat.size  # no ties, so "k smallest" is unambiguous
        chosen = np.zeros(flat.size, dtype=bool)
        chosen[np.argsort(flat)[: round(level * flat.size)]] = True
        offset = 0
        for name, w in weights.items():
            zero[name] = chosen[offset:offset + w.size].reshape(w.shape)
            offset += w.size
    elif method == "layerwise":
        for name, w in weights.items():
            chosen = np.zeros(w.size, dtype=bool)
            chosen[np.argsort(np.abs(w).ravel())[: round(level * w.size)]] = True
            zero[name] = chosen.reshape(w.shape)
    elif method == "neuron":
        for name, w in weights.items():
            norms = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
            rows = np.argsort(norms)[: round(level * w.shape[0])]
            zero[name][rows] = True
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, mask in zero.items():
            params[name][torch.from_numpy(mask)] = 0.0
    total = sum(m.size for m in zero.values())
    zeros = sum(int((params[name] == 0).sum()) for name in zero)
    return clone, zeros / total


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Bytes of every parameter and buffer, the mode of every submodule, requires_grad of every parameter."""
    return {
        "tensors": {name: t.detach().clone().reshape(-1).view(torch.uint8) for name, t in
                    [*model.named_parameters(), *model.named_buffers()]},
        "ptrs": {name: p.data_ptr() for name, p in model.named_parameters()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, raw in before["tensors"].items():
        assert torch.equal(after["tensors"][name], raw), f"{name} changed"
    assert after["ptrs"] == before["ptrs"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]


class StatefulNet(nn.Module):
    """BatchNorm (buffers), a submodule left in eval mode, a frozen weight, dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(16, 4)
        self.frozen = nn.Linear(6, 6)
        self.frozen.weight.requires_grad_(False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # a forward that writes a buffer
        with torch.no_grad():
            self.body[1].running_mean.normal_()
            self.body[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.head(self.body(x + 0.1 * self.frozen(x)))


def stateful_net() -> StatefulNet:
    torch.manual_seed(0)
    net = StatefulNet()
    net.train()
    net.body[3].eval()  # a mixed state that a blanket .train() on restore would get wrong
    return net


class FailingLoader:
    """Yields batches, then raises on the n-th batch counted over all passes (so mid-way through a pruned level)."""

    def __init__(self, data: list, fail_at: int) -> None:
        self.data, self.fail_at, self.served = data, fail_at, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data:
            if self.served == self.fail_at:
                raise RuntimeError("loader broke")
            self.served += 1
            yield batch


# ---------------------------------------------------------------------------------------------- exact values per level
@pytest.mark.parametrize("method", ["global", "layerwise", "neuron"])
@pytest.mark.parametrize(("params", "names"), [(None, ["0.weight"]), ("weights", ["0.weight", "2.weight"])])
def test_mask_methods_match_models_pruned_by_hand(method: str, params: str | None, names: list[str]) -> None:
    model, data = tiny_mlp(), batches()
    curve = evaluate_pruning_curve(model, data, LEVELS, method=method, params=params)
    assert curve.method == method and curve.requested == list(LEVELS)
    assert curve.params == names  # by default the output layer 2.weight is left alone
    for i, level in enumerate(LEVELS):
        pruned, sparsity = masked_copy(model, method, level, names)
        assert curve.sparsities[i] == pytest.approx(sparsity, abs=1e-12)
        assert curve.metrics["accuracy"][i] == pytest.approx(accuracy_by_hand(pruned, data), abs=1e-6)
    # the levels really prune: accuracy moves and the sparsity grows
    assert curve.sparsities[-1] > 0.9
    assert len(set(curve.metrics["accuracy"])) > 1


def test_methods_differ_and_agree_at_zero() -> None:
    model, data = tiny_mlp(), batches()
    curves = {m: evaluate_pruning_curve(model, data, (0.0, 0.5), method=m) for m in PRUNING_METHODS}
    unpruned = accuracy_by_hand(model, data)
    for curve in curves.values():
        assert curve.metrics["accuracy"][0] == pytest.approx(unpruned, abs=1e-6)
        assert curve.sparsities[0] == 0.0
    # neuron pruning zeroes whole rows: every zeroed weight row is entirely zero in the hand-made copy
    pruned, _ = masked_copy(model, "neuron", 0.5)
    rows = pruned[0].weight.detach()
    assert int((rows.abs().sum(dim=1) == 0).sum()) == 6


def test_metric_collection_and_single_metric_keys() -> None:
    model, data = tiny_mlp(), batches()
    collection = MetricCollection({"acc": MulticlassAccuracy(num_classes=4, average="micro"),
                                   "f1": MulticlassF1Score(num_classes=4, average="macro")})
    curve = evaluate_pruning_curve(model, data, (0.0, 0.6), metrics=collection)
    assert sorted(curve.metrics) == ["acc", "f1"]
    pruned, _ = masked_copy(model, "global", 0.6)
    assert curve.metrics["acc"][1] == pytest.approx(accuracy_by_hand(pruned, data), abs=1e-6)
    # macro F1 by hand with numpy
    with torch.no_grad():
        preds = torch.cat([pruned(x).argmax(1) for x, _ in data]).numpy()
    target = torch.cat([y for _, y in data]).numpy()
    f1s = []
    for c in range(4):
        tp_, fp, fn = np.sum((preds == c) & (target == c)), np.sum((preds == c) & (target != c)), np.sum(
            (preds != c) & (target == c))
        f1s.append(0.0 if tp_ == 0 else 2 * tp_ / (2 * tp_ + fp + fn))
    assert curve.metrics["f1"][1] == pytest.approx(np.mean(f1s), abs=1e-6)

    single = evaluate_pruning_curve(model, data, (0.0,), metrics=MulticlassAccuracy(num_classes=4))
    assert list(single.metrics) == ["MulticlassAccuracy"]


def test_forward_fn_for_dict_batches() -> None:
    model, data = tiny_mlp(), batches()
    dict_data = [{"features": x, "label": y} for x, y in data]
    curve = evaluate_pruning_curve(model, dict_data, (0.0, 0.5), method="layerwise",
                                   forward_fn=lambda m, b: (m(b["features"]), b["label"]))
    reference = evaluate_pruning_curve(model, data, (0.0, 0.5), method="layerwise")
    assert curve.metrics == reference.metrics and curve.sparsities == reference.sparsities


def test_ties_at_the_threshold_are_all_pruned_and_reported() -> None:
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight[:, :3] = 0.0  # 36 of the 120 selected entries are exact zeros (30%)
    curve = evaluate_pruning_curve(model, batches(), (0.0, 0.1, 0.5), method="global", params="weights")
    n = 12 * 6 + 4 * 12
    assert curve.sparsities[0] == pytest.approx(36 / n)  # measured, not the 0.0 asked for
    assert curve.sparsities[1] == pytest.approx(36 / n)  # the threshold 0 takes every tied zero
    assert curve.sparsities[2] == pytest.approx(round(0.5 * n) / n)


# ----------------------------------------------------------------------------------------------------- cost contract
def test_one_sort_per_call_and_no_model_copy_for_mask_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_heavytail.pruning import methods

    sorts: list[int] = []
    real_sort = methods.sort_ascending
    monkeypatch.setattr(methods, "sort_ascending", lambda v: sorts.append(v.numel()) or real_sort(v))
    copies: list[Any] = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: copies.append(obj) or real_deepcopy(obj, *a))
    model, data = tiny_mlp(), batches()
    evaluate_pruning_curve(model, data, LEVELS, method="global", params="weights")
    assert sorts == [12 * 6 + 4 * 12]  # one sort over all selected entries, not one per level
    sorts.clear()
    evaluate_pruning_curve(model, data, LEVELS, method="layerwise", params="weights")
    assert sorts == [72, 48]  # one per tensor
    assert not any(obj is model for obj in copies)  # (torchmetrics deep-copies its own states)


def test_global_threshold_above_2_pow_24_elements() -> None:
    torch.manual_seed(0)
    big = nn.Linear(4097, 4096, bias=False)  # 16,781,312 > 2**24 entries
    flat = big.weight.detach().flatten()
    assert flat.numel() > 2**24  # torch.quantile raises "input tensor is too large" here (after ~5 s of work)
    magnitudes = flat.abs().numpy()
    data = [(torch.randn(2, 4097), torch.randint(0, 4096, (2,)))]
    curve = evaluate_pruning_curve(big, data, (0.5, 0.9), params="weights")  # the output layer, on purpose
    for level, measured in zip((0.5, 0.9), curve.sparsities, strict=True):
        k = round(level * magnitudes.size)
        threshold = np.partition(magnitudes, k - 1)[k - 1]
        assert measured == (magnitudes <= threshold).sum() / magnitudes.size
    assert torch.equal(big.weight.detach().flatten(), flat)


# ------------------------------------------------------------------------------------------------ model never changes
@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_model_bitwise_unchanged_after_success(method: str) -> None:
    net, data = stateful_net(), batches()
    before = snapshot(net)
    curve = evaluate_pruning_curve(net, data, (0.0, 0.5, 0.9), method=method)
    assert curve.sparsities[-1] > 0.3  # it did prune
    assert_unchanged(net, before)


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_model_bitwise_unchanged_after_dataloader_fails_mid_way(method: str) -> None:
    net, data = stateful_net(), batches(n_batches=3)
    before = snapshot(net)
    # the second batch fails to load, after every level ran on the first: the model holds the highest level then
    loader = FailingLoader(data, fail_at=2)
    with pytest.raises(RuntimeError, match="loader broke"):
        evaluate_pruning_curve(net, loader, (0.0, 0.5, 0.9), method=method)
    assert_unchanged(net, before)


def test_model_unchanged_when_forward_fn_fails_and_inside_inference_mode() -> None:
    net, data = stateful_net(), batches()
    before = snapshot(net)
    calls = {"n": 0}

    def flaky(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyError("bad batch")
        return model(batch[0]), batch[1]

    with pytest.raises(KeyError):
        evaluate_pruning_curve(net, data, (0.0, 0.5), forward_fn=flaky)
    assert_unchanged(net, before)
    with torch.inference_mode():  # as inside Lightning's validation loop
        for method in PRUNING_METHODS:
            curve = evaluate_pruning_curve(net, data, (0.0, 0.5), method=method)
            assert curve.sparsities[1] > 0.0
    assert_unchanged(net, before)


# ------------------------------------------------------------------------------------------------------- structured
def test_structured_measures_the_fraction_of_parameters_removed() -> None:
    import torch_pruning as tp  # here: the GPU tests import this module on machines without torch-pruning

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    data = batches(features=8)
    levels = (0.0, 0.25, 0.5, 0.75)
    curve = evaluate_pruning_curve(mlp, data, levels, method="structured")
    total = (8 * 32 + 32) + (32 * 32 + 32) + (32 * 4 + 4)
    for level, measured in zip(levels, curve.sparsities, strict=True):
        width = int(32 * (1 - level))  # both hidden layers keep this many units; the output layer keeps its 4
        kept = (8 * width + width) + (width * width + width) + (width * 4 + 4)
        assert measured == pytest.approx(1 - kept / total)
    # metric at each level = the same torch-pruning call made here, with the output layer protected
    for i, level in enumerate(levels[1:], start=1):
        clone = copy.deepcopy(mlp)
        pruner = tp.pruner.BasePruner(clone, torch.randn(2, 8), importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=level, ignored_layers=[clone[4]])
        pruner.step()
        assert clone[4].out_features == 4
        assert curve.metrics["accuracy"][i] == pytest.approx(accuracy_by_hand(clone, data), abs=1e-6)


def test_structured_on_a_cnn_keeps_the_output_width() -> None:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g))]
    curve = evaluate_pruning_curve(cnn, data, (0.0, 0.5), method="structured", params="weights")
    total = sum(p.numel() for p in cnn.parameters())
    # conv1 8->4 and its BN, conv2 16->8, linear in 16->8
    kept = (3 * 4 * 9 + 4) + 2 * 4 + (4 * 8 * 9 + 8) + (8 * 5 + 5)
    assert curve.sparsities[1] == pytest.approx(1 - kept / total)


class DetachedHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x)).detach()  # breaks the autograd trace torch-pruning follows
        return self.out(torch.relu(self.fc2(h)))


class HardCodedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)).view(-1, 16))  # width 16 hard-coded


@pytest.mark.parametrize(("model_cls", "layer"), [(DetachedHidden, "'fc1'"), (HardCodedView, "'fc2'")])
def test_untraceable_model_names_the_layer_and_suggests_neuron(model_cls: type, layer: str) -> None:
    torch.manual_seed(0)
    model, data = model_cls(), batches()
    before = snapshot(model)
    with pytest.raises(ValueError, match="method='neuron'") as info:
        evaluate_pruning_curve(model, data, (0.0, 0.5), method="structured")
    assert layer in str(info.value)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="method='neuron'") as info:
        check_prunable(model, "structured", data[0])
    assert layer in str(info.value)
    # the suggestion works
    assert evaluate_pruning_curve(model, data, (0.0, 0.5), method="neuron").sparsities[1] > 0.4


def test_structured_refuses_a_model_that_cannot_be_copied() -> None:
    model = tiny_mlp()
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", 0.3)  # breaks deepcopy (pytorch #37322)
    with pytest.raises(ValueError, match=r"cannot be deep-copied.*method='neuron'"):
        check_prunable(model, "structured", params="weights")


def test_structured_refuses_when_only_the_output_layer_is_selected() -> None:
    with pytest.raises(ValueError, match="feed the model output"):
        evaluate_pruning_curve(tiny_mlp(), batches(), (0.0, 0.5), method="structured", params="2.weight")


# --------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("bad", "error"), [
    *((bad, ValueError) for bad in ([], [0.5, 0.3], [0.2, 0.2], [0.0, 1.0], [-0.1], [float("nan")])),
    *((bad, TypeError) for bad in ("0.5", 0.5, [True])),
])
def test_bad_sparsities_name_the_argument_and_the_value(bad: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="`sparsities`") as info:
        evaluate_pruning_curve(tiny_mlp(), batches(), bad)
    assert repr(bad) in str(info.value) or repr(bad[0]) in str(info.value)


def test_validators() -> None:
    assert validate_sparsities((0, 0.5)) == (0.0, 0.5)
    assert validate_method(("global", "structured")) == ("global", "structured")
    for bad, error in (("magnitude", ValueError), (["global", "global"], ValueError), ([], ValueError),
                       (None, TypeError), (["global", 3], TypeError)):
        with pytest.raises(error, match="`method`"):
            validate_method(bad)
    with pytest.raises(ValueError, match="`levels`"):
        validate_sparsities([2.0], argument="levels")


def test_bad_arguments_give_clear_errors() -> None:
    model, data = tiny_mlp(), batches()
    with pytest.raises(ValueError, match=r"`method` must be one of .*'magnitude'"):
        evaluate_pruning_curve(model, data, (0.5,), method="magnitude")
    with pytest.raises(ValueError, match="call once per method"):
        evaluate_pruning_curve(model, data, (0.5,), method=["global", "neuron"])
    with pytest.raises(ValueError, match=r"`params`='\*.nothing'.*selects no trainable parameter"):
        evaluate_pruning_curve(model, data, (0.5,), params="*.nothing")
    with pytest.raises(TypeError, match="`metrics` must be None, a torchmetrics Metric"):
        evaluate_pruning_curve(model, data, (0.5,), metrics="accuracy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`dataloader` yielded no batch"):
        evaluate_pruning_curve(model, [], (0.5,))
    with pytest.raises(TypeError, match="`dataloader` must be an iterable"):
        evaluate_pruning_curve(model, 3, (0.5,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`device`"):
        evaluate_pruning_curve(model, data, (0.5,), device="gpu7")
    with pytest.raises(ValueError, match="forward_fn"):
        evaluate_pruning_curve(model, [(x,) for x, _ in data], (0.5,))
    with pytest.raises(ValueError, match="`forward_fn` must return"):
        evaluate_pruning_curve(model, data, (0.5,), forward_fn=lambda m, b: m(b[0]))
    with pytest.raises(ValueError, match="Pass `metrics`"):
        evaluate_pruning_curve(nn.Linear(6, 1), data, (0.5,))  # one output: no classes to count
    with pytest.raises(ValueError, match="a pruning curve needs one number"):
        evaluate_pruning_curve(model, data, (0.5,), metrics=MulticlassAccuracy(num_classes=4, average="none"))
    with pytest.raises(TypeError, match="`exclude`"):
        evaluate_pruning_curve(model, data, (0.5,), exclude=[3])  # type: ignore[list-item]
    # a bare string is one pattern, not its characters
    curve = evaluate_pruning_curve(model, data, (0.0, 0.5), exclude="2.*")
    assert curve.sparsities[1] == pytest.approx(round(0.5 * 72) / 72)


def test_check_prunable() -> None:
    check_prunable(tiny_mlp(), PRUNING_METHODS, batches()[0])
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        check_prunable(tiny_mlp(), "neuron", params="*.bias", exclude=["*"])
    with pytest.raises(ValueError, match="belong to none"):
        check_prunable(nn.Sequential(nn.Embedding(10, 4), nn.Flatten()), "structured", params="weights")
    with pytest.raises(ValueError, match="`method`"):
        check_prunable(tiny_mlp(), "bogus")


# ------------------------------------------------------------------------------------------------------------ curve
def test_curve_to_dict_is_json_and_auc_matches_numpy() -> None:
    curve = evaluate_pruning_curve(tiny_mlp(), batches(), LEVELS)
    data = json.loads(json.dumps(curve.to_dict()))
    assert PruningCurve.from_dict(data) == curve
    x, y = np.array(curve.sparsities), np.array(curve.metrics["accuracy"])
    expected = np.trapezoid(y, x) / (x[-1] - x[0])
    assert curve.area_under_curve() == pytest.approx(float(expected))
    assert curve.area_under_curve("accuracy") == curve.area_under_curve()
    with pytest.raises(KeyError, match="has \\['accuracy'\\]"):
        curve.area_under_curve("f1")
    single = PruningCurve("global", [0.5], [0.5], {"accuracy": [0.7]})
    assert single.area_under_curve() == 0.7
    assert math.isnan(PruningCurve("global", [0.0, 0.5], [0.0, 0.5], {"a": [0.5, math.nan]}).area_under_curve("a"))


# ------------------------------------------------------------------------------------- issue 8: what is pruned (11, 14)
class SmallCNN(nn.Module):
    """The head is registered first and a spare weight last, so registration order says nothing about the output layer;
    the forward pass does."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 4)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.spare = nn.Linear(5, 5)  # never used by forward

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


def cnn_batches(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(10, 3, 6, 6, generator=g), torch.randint(0, 4, (10,), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_default_selection_leaves_the_output_layer_and_the_first_conv_alone(method: str) -> None:
    torch.manual_seed(0)
    model, data = SmallCNN(), cnn_batches()
    curve = evaluate_pruning_curve(model, data, (0.0, 0.5, 0.9), method=method)
    assert curve.params == ["conv2.weight"]
    check = check_prunable(model, method, data[0])
    assert check.params == ["conv2.weight"]
    assert check.left_out == {
        "head.weight": "the output layer: the last weight the forward pass uses",
        "conv1.weight": "the first conv: the first conv kernel the forward pass uses",
        "spare.weight": "not used to compute the predictions",
    }
    if method in MASK_METHODS:  # the curve is the model with conv2 alone masked by hand
        for i, level in enumerate((0.0, 0.5, 0.9)):
            pruned, sparsity = masked_copy(model, method, level, ["conv2.weight"])
            assert curve.sparsities[i] == pytest.approx(sparsity, abs=1e-12)
            assert curve.metrics["accuracy"][i] == pytest.approx(accuracy_by_hand(pruned, data), abs=1e-6)
    # "weights" still prunes every weight, the output layer included
    everything = evaluate_pruning_curve(model, data, (0.0, 0.5), method="global", params="weights")
    assert everything.params == ["head.weight", "conv1.weight", "conv2.weight", "spare.weight"]


def test_default_selection_with_only_an_output_layer_says_how_to_include_it() -> None:
    with pytest.raises(ValueError, match=r"params='weights' to prune the output layer too") as info:
        evaluate_pruning_curve(nn.Linear(6, 4), batches(), (0.0, 0.5))
    assert "weight: the output layer" in str(info.value)
    assert evaluate_pruning_curve(nn.Linear(6, 4), batches(), (0.0, 0.5), params="weights").params == ["weight"]
    with pytest.raises(ValueError, match="pass a batch"):
        check_prunable(tiny_mlp(), "global")


def test_the_default_needs_no_registration_order_and_no_trainable_output_layer() -> None:
    # a mean-field network: frozen output layer, still the output layer (and frozen: not pruned anyway)
    model = tiny_mlp()
    model[2].weight.requires_grad_(False)
    assert evaluate_pruning_curve(model, batches(), (0.0, 0.5)).params == ["0.weight"]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 6)
        self.hidden = nn.Linear(6, 6)

    def forward(self, idx: Tensor) -> Tensor:
        return torch.relu(self.hidden(self.embed(idx))) @ self.embed.weight.T  # the output layer is the embedding


def test_a_weight_shared_with_the_output_layer_is_left_out() -> None:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 4, (8,), generator=g), torch.randint(0, 4, (8,), generator=g))]
    assert evaluate_pruning_curve(Tied(), data, (0.0, 0.5)).params == ["hidden.weight"]


def weight_normed(seed: int = 0) -> nn.Sequential:
    model = tiny_mlp(seed)
    model[0] = torch.nn.utils.parametrizations.weight_norm(model[0])
    return model


@pytest.mark.parametrize("method", MASK_METHODS)
@pytest.mark.parametrize("params", [None, "weights"])
def test_parametrized_weight_is_pruned_as_its_effective_weight(method: str, params: str | None) -> None:
    model, data = weight_normed(), batches()
    with torch.no_grad():  # unequal row norms, so that neuron pruning has something to rank
        model[0].parametrizations.weight.original0.mul_(torch.linspace(0.2, 2.0, 12).unsqueeze(1))
    before = snapshot(model)
    curve = evaluate_pruning_curve(model, data, LEVELS, method=method, params=params)
    # the effective weight 0.weight, once: neither the magnitude g (2-D) nor the direction v as weights of their own
    expected_names = ["0.weight"] if params is None else ["0.weight", "2.weight"]
    assert curve.params == expected_names
    assert_unchanged(model, before)
    assert len(model[0].parametrizations.weight) == 1  # the evaluation's mask parametrization is gone
    # the same curve as the plain model with the same effective weight, pruned by hand
    plain = copy.deepcopy(model)
    torch.nn.utils.parametrize.remove_parametrizations(plain[0], "weight")
    for i, level in enumerate(LEVELS):
        pruned, sparsity = masked_copy(plain, method, level, expected_names)
        assert curve.sparsities[i] == pytest.approx(sparsity, abs=1e-12)
        assert curve.metrics["accuracy"][i] == pytest.approx(accuracy_by_hand(pruned, data), abs=1e-6)
    assert len(set(curve.metrics["accuracy"])) > 1


def test_parametrized_weights_refused_where_they_cannot_be_pruned() -> None:
    model, data = weight_normed(), batches()
    with pytest.raises(ValueError, match=r"parametrized.*method='neuron'"):
        evaluate_pruning_curve(model, data, (0.0, 0.5), method="structured")
    with pytest.raises(ValueError, match=r"parametrized.*method='neuron'"):
        check_prunable(model, "structured", data[0])
    old_style = tiny_mlp()
    torch.nn.utils.weight_norm(old_style[0])  # the deprecated hook-based one
    with pytest.raises(ValueError, match=r"deprecated torch.nn.utils.weight_norm.*parametrizations.weight_norm"):
        evaluate_pruning_curve(old_style, data, (0.0, 0.5), method="neuron")


class CosineHidden(nn.Module):
    """Rows normalized in the forward: a zeroed row gives 0/0 = NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(6, 12, bias=False), nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        w = self.hidden.weight / self.hidden.weight.norm(dim=1, keepdim=True)
        return self.out(torch.relu(x @ w.T))


def test_nan_predictions_are_never_scored() -> None:
    torch.manual_seed(0)
    model, data = CosineHidden(), batches()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"NaN or infinity \(method='neuron' at sparsity 0.5\).*pruning made them"):
        evaluate_pruning_curve(model, data, (0.0, 0.5), method="neuron")
    assert_unchanged(model, before)
    broken = tiny_mlp()
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Parameter '0.weight' holds NaN or infinity.*nothing is scored"):
        evaluate_pruning_curve(broken, batches(), (0.0, 0.5))
    with pytest.raises(ValueError, match="the unpruned model gives them"):  # finite weights, infinite inputs
        evaluate_pruning_curve(tiny_mlp(), [(torch.full((4, 6), float("inf")), torch.zeros(4, dtype=torch.long))],
                               (0.0, 0.5))


# ---------------------------------------------------------------------------- issue 8: what cannot be scored (12)
class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_mlp()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        logits = self.body(x)
        return {"loss": logits.sum(), "logits": logits}


class TupleOutput(DictOutput):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.body(x), x


def test_dict_and_tuple_outputs_are_refused_with_the_fix_and_read_with_output_key() -> None:
    data = batches()
    with pytest.raises(ValueError, match=r"returned a dict with keys \['loss', 'logits'\].*output_key='logits'"):
        evaluate_pruning_curve(DictOutput(), data, (0.0, 0.5))
    with pytest.raises(ValueError, match=r"returned a tuple of 2 \(Tensor, Tensor\).*output_key=0"):
        check_prunable(TupleOutput(), "global", data[0])
    with pytest.raises(ValueError, match=r"`output_key`='scores' cannot be read .*keys \['loss', 'logits'\]"):
        evaluate_pruning_curve(DictOutput(), data, (0.0, 0.5), output_key="scores")
    with pytest.raises(ValueError, match="Pass `forward_fn` or `output_key`"):
        evaluate_pruning_curve(DictOutput(), data, (0.0,), output_key="logits", forward_fn=lambda m, b: b)
    reference = evaluate_pruning_curve(tiny_mlp(), data, LEVELS, method="neuron")
    for model, key in ((DictOutput(), "logits"), (TupleOutput(), 0)):
        curve = evaluate_pruning_curve(model, data, LEVELS, method="neuron", output_key=key)
        assert curve.metrics == reference.metrics and curve.sparsities == reference.sparsities
        assert curve.params == ["body.0.weight"]
    structured = evaluate_pruning_curve(DictOutput(), data, (0.0, 0.5), method="structured", output_key="logits")
    assert structured.metrics == evaluate_pruning_curve(tiny_mlp(), data, (0.0, 0.5), method="structured").metrics


@pytest.mark.parametrize(
    ("model", "data", "kwargs", "match"),
    [
        (tiny_mlp(), [(torch.randn(8, 6), torch.randn(8))], {},
         r"integer class labels as target, got torch.float32 .*regression metric"),
        (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)), batches(), {},
         r"shape \(N, C\) with C >= 2, got preds of shape \(10, 1\).*BinaryAccuracy"),
        (tiny_mlp(), batches(), {"metrics": MulticlassAccuracy(num_classes=2)},
         r"`metrics` cannot score the model's output: .*preds \(10, 4\) torch.float32, target \(10,\) torch.int64"),
        (tiny_mlp(), batches(), {"forward_fn": lambda m, b: ({"logits": m(b[0])}, b[1])},
         r"predictions must be a tensor, got a dict with keys \['logits'\]"),
        (tiny_mlp(), batches(), {"forward_fn": lambda m, b: (m(b[0]).to(torch.complex64), b[1])},
         r"predictions are complex \(torch.complex64"),
    ],
)
def test_what_cannot_be_scored_is_refused_before_any_pruning(model: nn.Module, data: list, kwargs: dict[str, Any],
                                                            match: str) -> None:
    before = snapshot(model)
    loader = FailingLoader(data, fail_at=len(data) + 1)  # anything beyond the first batch and one level would fail
    for call in (lambda: evaluate_pruning_curve(model, loader, (0.0, 0.5), **kwargs),
                 lambda: check_prunable(model, "global", data[0], **kwargs)):
        with pytest.raises(ValueError, match=match):
            call()
    assert_unchanged(model, before)


def test_complex_weights_are_refused() -> None:
    model = tiny_mlp()
    model.register_parameter("phase", nn.Parameter(torch.randn(3, 3, dtype=torch.complex64)))
    with pytest.raises(ValueError, match=r"complex tensors \['phase'\]"):
        evaluate_pruning_curve(model, batches(), (0.0, 0.5), params="weights")


def test_the_probe_leaves_model_and_rng_as_they_were() -> None:
    net, data = stateful_net(), batches()
    before = snapshot(net)
    rng = torch.get_rng_state()
    check = check_prunable(net, PRUNING_METHODS, data[0])
    assert check.params == ["body.0.weight", "frozen.weight"][:1]  # the frozen weight is not trainable
    assert check.metrics == ["accuracy"]
    assert_unchanged(net, before)
    assert torch.equal(torch.get_rng_state(), rng)


class LazyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.LazyLinear(12), nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(x)))


def test_a_lazy_model_is_checked_on_a_copy_and_refused_for_evaluation() -> None:
    model, data = LazyNet(), batches()
    assert check_prunable(model, ("neuron", "structured"), data[0]).params == ["hidden.weight"]
    assert isinstance(model.hidden.weight, torch.nn.parameter.UninitializedParameter)  # still lazy
    with pytest.raises(ValueError, match="lazy parameters"):
        evaluate_pruning_curve(model, data, (0.0, 0.5))


# ------------------------------------------------------------------------------------------- issue 8: level labels (16)
def test_level_labels_tell_any_two_levels_apart() -> None:
    assert [level_label(s) for s in (0.0, 0.9, 0.99, 0.995)] == ["0.00", "0.90", "0.99", "0.995"]
    g = np.random.default_rng(0)
    rounded = zip(g.uniform(0, 1, 2000), g.integers(1, 8, 2000), strict=True)
    levels = sorted({round(float(x), int(d)) for x, d in rounded} - {1.0})
    levels += [float(x) for x in g.uniform(0, 1, 100)]  # full-precision levels too
    labels = [level_label(s) for s in levels]
    assert len(set(labels)) == len(set(levels))
    assert all(float(label) == level for label, level in zip(labels, levels, strict=True))  # exact


def test_epsilon_point_of_a_parametrized_weight_is_that_of_its_effective_weight() -> None:
    from lightning_heavytail.pruning import evaluate_at_epsilon

    model, data = weight_normed(), batches()
    with torch.no_grad():
        model[0].parametrizations.weight.original0.mul_(torch.logspace(-2, 1, 12).unsqueeze(1))
    before = snapshot(model)
    point = evaluate_at_epsilon(model, data, epsilon=0.1)
    plain = copy.deepcopy(model)
    torch.nn.utils.parametrize.remove_parametrizations(plain[0], "weight")
    assert point == evaluate_at_epsilon(plain, data, epsilon=0.1)  # same ratios and accuracy, by the name 0.weight
    assert list(point.ratios) == ["0.weight"] and 0.0 < point.ratio < 1.0
    assert_unchanged(model, before)
