"""The methods registry and the "svd" method, against torch.linalg.svd and matrices built by hand."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from lightning_heavytail._extras import REQUIREMENTS
from lightning_heavytail.pruning import (
    MASK_METHODS,
    PRUNING_METHODS,
    REGISTRY,
    check_prunable,
    evaluate_pruning_curve,
)
from tests.test_pruning import accuracy_by_hand, assert_unchanged, batches, snapshot, stateful_net, tiny_mlp

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (0.0, 0.25, 0.5, 0.75, 0.95)


def test_the_registry_is_the_list_of_methods() -> None:
    assert PRUNING_METHODS == tuple(REGISTRY) == ("global", "layerwise", "neuron", "svd", "structured")
    assert MASK_METHODS == ("global", "layerwise", "neuron")  # svd writes low-rank values, not zeros
    assert [name for name, method in REGISTRY.items() if not method.in_place] == ["structured"]


def low_rank_by_hand(weight: Tensor, level: float) -> Tensor:
    """``weight`` as an (out, -1) matrix without its round(level * r) smallest singular values, in float64."""
    matrix = weight.detach().reshape(weight.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = s.numel() - round(level * s.numel())
    return (u[:, :keep] @ torch.diag(s[:keep]) @ vh[:keep]).reshape(weight.shape)


class Recorder:
    """A forward_fn that keeps the weights the model holds when it scores the first batch, level by level.

    The evaluation loads each batch once and runs every level on it, in order, so the calls after the probe's come
    level by level on the first batch. The first call, the probe's (before anything is pruned), is not recorded: the
    probe also records which torch calls use which weight, and a copy made here would count as a use.
    """

    def __init__(self, names: list[str], levels: int = len(LEVELS)) -> None:
        self.names, self.calls, self.levels, self.count = names, 0, [], levels

    def __call__(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        if 0 < self.calls <= self.count:
            tensors = dict(model.named_parameters())
            self.levels.append({name: tensors[name].detach().clone() for name in self.names})
        self.calls += 1
        return model(batch[0]), batch[1]


@pytest.mark.parametrize("params", [None, "weights"])
def test_svd_writes_the_best_low_rank_approximation_of_each_weight(params: str | None) -> None:
    model, data = tiny_mlp(), batches()
    names = ["0.weight"] if params is None else ["0.weight", "2.weight"]
    before = snapshot(model)
    recorder = Recorder(names)
    curve = evaluate_pruning_curve(model, data, LEVELS, method="svd", params=params, forward_fn=recorder)
    assert curve.params == names
    assert_unchanged(model, before)
    ranks = {name: min(dict(model.named_parameters())[name].shape) for name in names}  # 6, and 4 for 2.weight
    weights = dict(model.named_parameters())
    for i, level in enumerate(LEVELS):
        written = recorder.levels[i]
        for name in names:
            torch.testing.assert_close(written[name].double(), low_rank_by_hand(weights[name], level),
                                       atol=1e-5, rtol=0)
        dropped = sum(round(level * r) for r in ranks.values())
        assert curve.sparsities[i] == dropped / sum(ranks.values())  # the fraction of singular values dropped
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            for name in names:
                dict(pruned.named_parameters())[name].copy_(low_rank_by_hand(weights[name], level))
        assert curve.metrics["accuracy"][i] == pytest.approx(accuracy_by_hand(pruned, data), abs=1e-6)
    assert all(torch.equal(recorder.levels[0][name], weights[name]) for name in names)  # level 0: exactly the weight
    assert len(set(curve.metrics["accuracy"])) > 1


def test_svd_of_matrices_built_by_hand() -> None:
    # rows and columns of diag(5, 4, 3, 2, 1) permuted with signs flipped: singular values exactly 5, 4, 3, 2, 1
    diag = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]))
    rows, cols = torch.tensor([3, 0, 4, 1, 2]), torch.tensor([1, 4, 0, 2, 3])
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])
    permuted = (diag[rows][:, cols] * signs.unsqueeze(1)).contiguous()
    # rank one: u v^T has one nonzero singular value, so dropping zeros changes nothing
    rank_one = torch.outer(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.0, 1.0, -1.0]))
    net = nn.Sequential(nn.Linear(5, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False), nn.ReLU(),
                        nn.Linear(3, 4, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(permuted)
        net[4].weight.copy_(rank_one.T)  # (4, 3): rank 1 of 3
    recorder = Recorder(["0.weight", "4.weight"], levels=3)
    data = [(torch.randn(4, 5), torch.randint(0, 4, (4,))) for _ in range(3)]
    evaluate_pruning_curve(net, data, (0.0, 0.4, 0.6), method="svd", params=["0.weight", "4.weight"],
                           forward_fn=recorder)
    at_zero, at_04, at_06 = recorder.levels
    assert torch.equal(at_zero["0.weight"], permuted)
    # 0.4 of 5 singular values: the two smallest, 1 and 2, go: the entries of magnitude 1 and 2 become 0
    torch.testing.assert_close(at_04["0.weight"], permuted * (permuted.abs() > 2.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(at_06["0.weight"], permuted * (permuted.abs() > 3.5), atol=1e-6, rtol=0)
    # rank one of 3: 0.4 drops round(1.2) = 1 and 0.6 drops round(1.8) = 2 singular values, all of them zero
    torch.testing.assert_close(at_04["4.weight"], rank_one.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(at_06["4.weight"], rank_one.T, atol=1e-6, rtol=0)


def test_svd_reshapes_a_conv_kernel_to_out_by_the_rest() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 4))
    kernel = conv[2].weight  # (8, 6, 3, 3): an 8 x 54 matrix, rank 8
    data = [(torch.randn(5, 3, 6, 6), torch.randint(0, 4, (5,))) for _ in range(3)]
    recorder = Recorder(["2.weight"], levels=2)
    curve = evaluate_pruning_curve(conv, data, (0.0, 0.5), method="svd", forward_fn=recorder)
    assert curve.params == ["2.weight"]  # the default: not the first conv, not the output layer
    assert curve.sparsities == [0.0, 0.5]
    torch.testing.assert_close(recorder.levels[1]["2.weight"].double(), low_rank_by_hand(kernel, 0.5), atol=1e-5,
                               rtol=0)
    assert torch.linalg.matrix_rank(recorder.levels[1]["2.weight"].reshape(8, -1)) == 4


def test_svd_of_a_parametrized_weight_is_that_of_its_effective_weight() -> None:
    model, data = tiny_mlp(), batches()
    model[0] = weight_norm(model[0])
    before = snapshot(model)
    curve = evaluate_pruning_curve(model, data, (0.0, 0.5), method="svd")
    assert_unchanged(model, before)
    assert len(model[0].parametrizations.weight) == 1
    plain = copy.deepcopy(model)
    torch.nn.utils.parametrize.remove_parametrizations(plain[0], "weight")
    assert curve == evaluate_pruning_curve(plain, data, (0.0, 0.5), method="svd")


def test_svd_refuses_what_has_no_singular_values() -> None:
    model, data = tiny_mlp(), batches()
    with pytest.raises(ValueError, match=r"\['0.bias', '2.bias'\] of Sequential have fewer than 2 dimensions"):
        evaluate_pruning_curve(model, data, (0.0, 0.5), method="svd", params="*")
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        check_prunable(model, "svd", params="*")
    net = stateful_net()
    with torch.no_grad():
        net.body[0].weight[0, 0] = float("inf")
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"'body\.0\.weight' holds NaN or infinity"):
        evaluate_pruning_curve(net, data, (0.0, 0.5), method="svd", params=["body.0.weight"])
    assert_unchanged(net, before)


def test_structured_without_torch_pruning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REQUIREMENTS, "structured", RequirementCache("torch-pruning-not-installed-here"))
    model, data = tiny_mlp(), batches()
    for call in (lambda: evaluate_pruning_curve(model, data, (0.0, 0.5), method="structured"),
                 lambda: check_prunable(model, ["neuron", "structured"], data[0])):
        with pytest.raises(ModuleNotFoundError, match=r"method='structured'.*'lightning-heavytail\[structured\]'"):
            call()
    assert evaluate_pruning_curve(model, data, (0.0, 0.5), method="neuron").sparsities[1] == 0.5  # others still work


@pytest.mark.slow
def test_a_failing_import_of_an_optional_package_names_the_extra() -> None:
    # A real import failure in a fresh interpreter: the package is hidden from the import system.
    code = (
        "import sys, torch\n"
        "from lightning_heavytail.pruning import evaluate_pruning_curve\n"
        "from lightning_heavytail.callbacks._prune_history import curves_figure\n"
        "sys.modules['torch_pruning'] = None; sys.modules['matplotlib.figure'] = None  # import now fails\n"
        "data = [(torch.randn(4, 6), torch.randint(0, 4, (4,)))]\n"
        "net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))\n"
        "for call in (lambda: evaluate_pruning_curve(net, data, [0.0, 0.5], method='structured'),\n"
        "             lambda: curves_figure([], 'global', 't')):\n"
        "    try:\n"
        "        call()\n"
        "    except ModuleNotFoundError as err:\n"
        "        print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "method='structured' needs torch-pruning>=1.5" in lines[0] and "[structured]" in lines[0]
    assert "figures" in lines[1] and "import matplotlib.figure failed" in lines[1]
