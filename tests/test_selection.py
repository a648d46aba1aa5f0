"""Parameter selection: presets, patterns, predicates, exclusion, frozen and shared parameters, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_heavytail.selection import select_parameters, validate_exclude, validate_selector


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)


def names(module: nn.Module, params: object = "weights", **kwargs: object) -> list[str]:
    return [name for name, _ in select_parameters(module, params, **kwargs)]  # type: ignore[arg-type]


def test_weights_preset_takes_every_trainable_tensor_with_two_or_more_dims_in_registration_order() -> None:
    assert names(ConvNet()) == ["stem.weight", "conv.weight", "embed.weight", "head.weight"]


def test_paper_preset_leaves_out_the_first_conv_and_the_output_layer() -> None:
    assert names(ConvNet(), "paper") == ["conv.weight", "embed.weight"]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert names(mlp, "paper") == ["0.weight", "2.weight"]


def test_patterns_predicates_and_exclude() -> None:
    net = ConvNet()
    assert names(net, "*.bias") == ["stem.bias", "norm.bias", "conv.bias", "head.bias"]
    assert names(net, ["stem.*", "head.weight"]) == ["stem.weight", "stem.bias", "head.weight"]
    assert names(net, lambda name, p: p.ndim == 4) == ["stem.weight", "conv.weight"]
    assert names(net, exclude=["head.*", "embed.*"]) == ["stem.weight", "conv.weight"]
    assert names(net, exclude="head.*") == ["stem.weight", "conv.weight", "embed.weight"]  # one pattern, not chars


def test_frozen_parameters_are_never_selected_and_shared_ones_appear_once() -> None:
    net = ConvNet()
    net.conv.weight.requires_grad_(False)
    assert "conv.weight" not in names(net)
    assert "conv.weight" not in names(net, "conv.*")
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    selected = select_parameters(tied)
    assert len(selected) == 1 and selected[0][1] is tied[0].weight


def test_selection_returns_the_module_s_own_parameter_objects() -> None:
    net = ConvNet()
    for name, param in select_parameters(net):
        assert param is net.get_parameter(name)


def test_no_match_names_the_argument_and_lists_what_is_available() -> None:
    with pytest.raises(ValueError, match=r"`params`='nothing\.\*'.*Trainable parameters: stem\.weight \(4, 3, 3, 3\)"):
        select_parameters(ConvNet(), "nothing.*")
    with pytest.raises(ValueError, match="`prune_params`"):
        select_parameters(ConvNet(), "weights", exclude=["*"], argument="prune_params")
    with pytest.raises(ValueError, match="none"):
        select_parameters(nn.ReLU())


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [(3, TypeError, "got int: 3"), ([], ValueError, "at least one"), ([""], ValueError, "non-empty"),
     (["a", 1], TypeError, "sequence of patterns")],
)
def test_bad_selectors_fail_without_a_model(params: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        validate_selector(params, "params")


@pytest.mark.parametrize("exclude", [3, ["a", None], torch.zeros(2)])
def test_bad_exclude_names_the_argument(exclude: object) -> None:
    with pytest.raises(TypeError, match="`exclude` must be a glob pattern or a sequence of patterns"):
        validate_exclude(exclude)


def test_paper_preset_reads_the_structure_so_a_frozen_output_layer_is_still_the_output_layer() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    mlp[2].weight.requires_grad_(False)  # a mean-field network's fixed second layer
    assert names(mlp, "paper") == ["0.weight"]
    mlp[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        select_parameters(mlp, "paper")
    assert names(mlp, "paper", trainable_only=False) == ["0.weight"]
    assert names(mlp, "weights", trainable_only=False) == ["0.weight", "2.weight"]


def test_lazy_parameters_are_refused_by_shape_rules_and_named_in_the_message() -> None:
    from lightning_heavytail.selection import UninitializedParameterError, uninitialized_parameters

    net = nn.Sequential(nn.LazyLinear(8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    assert uninitialized_parameters(net) == ["0.weight"]
    for params in ("weights", "paper", lambda name, p: True):
        with pytest.raises(UninitializedParameterError, match=r"\['0\.weight'\] are lazy"):
            select_parameters(net, params)
    assert names(net, "2.*") == ["2.weight"]  # patterns read names only
    with pytest.raises(UninitializedParameterError, match="selects lazy parameters"):
        select_parameters(net, "0.*")
    with pytest.raises(ValueError, match=r"0\.weight \(uninitialized\)"):  # the message itself must not crash
        select_parameters(net, "nothing")
    net(torch.zeros(2, 5))
    assert uninitialized_parameters(net) == [] and names(net, "paper") == ["0.weight"]
