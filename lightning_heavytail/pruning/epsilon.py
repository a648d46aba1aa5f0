"""The paper's measurement of compressibility: each layer pruned at its epsilon point, and pruning to given ratios."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lightning_heavytail._checks import check_model, check_ratios, validate_epsilon
from lightning_heavytail._distributed import Layout, as_units, squared_sums
from lightning_heavytail._tensors import sort_ascending
from lightning_heavytail.pruning._evaluator import LevelState, LevelWriter, scored_in_one_pass
from lightning_heavytail.pruning._plans import ThresholdPlan
from lightning_heavytail.pruning._probe import prepare, select_targets
from lightning_heavytail.pruning._scoring import ForwardFn, OutputKey, Scorer
from lightning_heavytail.pruning._targets import Target, targets_named, tensor_view
from lightning_heavytail.pruning.curve import EpsilonPoint
from lightning_heavytail.selection import ParamSelector

__all__ = ["evaluate_at_epsilon", "evaluate_at_ratios", "prunable_units"]


def unit_squared_norms(layout: Layout, index: int, local: Tensor) -> Tensor:
    """The squared l2 norm of every unit of whole tensor ``index`` (float64 sums), on every rank.

    Units are the slices along dim 0 (every entry of a 1-D tensor); ``local`` is this rank's part.
    """
    return layout.unit_values(index, as_units(local.detach()), whole=squared_sums, partial=squared_sums,
                              finish=lambda sums: sums)


def count_prunable(squared_norms: Tensor, epsilon: float) -> int:
    """``prunable_units`` from the units' squared norms (float64)."""
    cumulative = sort_ascending(squared_norms).cumsum(dim=0)
    budget = epsilon * cumulative[-1].item()
    return int((cumulative <= budget).sum().item())


def prunable_units(weight: Tensor, epsilon: float) -> tuple[int, int]:
    r"""The paper's rule: how many units of ``weight`` can be zeroed within ``epsilon`` of its squared norm.

    Units are the slices along dim 0 (rows of a Linear weight, filters of a conv kernel; every entry of a 1-D
    tensor). With their squared l2 norms in ascending order, ``q_(1) <= ... <= q_(N)``, the count is the largest
    ``j`` with ``q_(1) + ... + q_(j) <= epsilon * (q_(1) + ... + q_(N))`` (Wan et al., 2024). Sums are float64
    cumulative sums in that order (so ``epsilon = 1`` counts every unit); the comparison is exact (``<=``). Units of
    norm 0 always count, also at ``epsilon = 0``.

    Args:
        weight: a finite tensor with at least one dimension (not checked here; see ``fraction_prunable``).
        epsilon: the budget in [0, 1] (not checked here; see ``validate_epsilon``).

    Returns:
        ``(prunable, units)``.

    Examples:
        >>> import torch
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [0.0, 3.0]])  # squared norms 1, 1, 8, 9
        >>> prunable_units(w, 0.1), prunable_units(w, 0.2), prunable_units(w, 1.0)  # budgets 1.9, 3.8, 19
        ((1, 4), (2, 4), (4, 4))
    """
    squared = squared_sums(as_units(weight.detach()))
    return count_prunable(squared, epsilon), int(squared.numel())


def _smallest_first(squared_norms: Tensor) -> Tensor:
    """Each unit's position in ascending order of squared norm (ties by index)."""
    order = torch.argsort(squared_norms, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


class UnitsZeroed:
    """Builds the state of ``model`` with the ``how_many(name, squared norms)`` smallest units of each target zeroed.

    Called inside the pass (``scored_in_one_pass``), on the writer's backups; ``counted[name]`` is then
    ``(units zeroed, units)``. Units are ranked by squared norm, ties by index, so exactly that many are zeroed.
    Sharded tensors: the norms of all units come to every rank (``unit_squared_norms``), each zeroes its own units.
    """

    def __init__(self, model: nn.Module, targets: Sequence[Target], how_many: Callable[[str, Tensor], int],
                 where: str) -> None:
        self.model, self.targets, self.how_many, self.where = model, targets, how_many, where
        self.counted: dict[str, tuple[int, int]] = {}

    def __call__(self, writer: LevelWriter) -> list[LevelState]:
        layout = writer.layout
        finite = layout.all_finite(writer.backups)
        for target, ok in zip(self.targets, finite, strict=True):
            if not ok:
                raise ValueError(f"Parameter {target.name!r} holds NaN or infinity: its units cannot be ranked by norm")
        ranks: list[Tensor] = []
        thresholds: list[float | None] = []
        for index, (target, backup) in enumerate(zip(self.targets, writer.backups, strict=True)):
            squared = unit_squared_norms(layout, index, backup)
            count = self.how_many(target.name, squared)
            self.counted[target.name] = (count, int(squared.numel()))
            ranks.append(layout.local_units(index, _smallest_first(squared)).reshape(-1, *([1] * (backup.ndim - 1))))
            thresholds.append(float(count - 1) if count else None)
        plan = ThresholdPlan([thresholds], ranks, layout)
        return [LevelState(self.model, writer, plan, 0, self.where, any(k for k, _ in self.counted.values()))]


def _scored_alone(model: nn.Module, targets: Sequence[Target], builder: UnitsZeroed,
                  scorer: Scorer) -> dict[str, float]:
    [[(_, values)]] = scored_in_one_pass(model, targets, scorer, [builder])
    return values


def at_epsilon(model: nn.Module, targets: Sequence[Target], epsilon: float) -> UnitsZeroed:
    """The builder of the epsilon point's state (``UnitsZeroed`` with the paper's count)."""
    return UnitsZeroed(model, targets, lambda _, squared: count_prunable(squared, epsilon),
                       f"the epsilon point (epsilon={epsilon})")


def epsilon_point(epsilon: float, counted: Mapping[str, tuple[int, int]], metrics: dict[str, float]) -> EpsilonPoint:
    """The point from the counts of an ``at_epsilon`` builder and the metrics of the model pruned there."""
    return EpsilonPoint(
        epsilon=epsilon,
        ratios={name: k / units for name, (k, units) in counted.items()},
        ratio=sum(k for k, _ in counted.values()) / sum(units for _, units in counted.values()),
        metrics=metrics,
    )


def evaluate_at_epsilon(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    epsilon: float = 0.1,
    params: ParamSelector | None = None,
    exclude: Sequence[str] = (),
    metrics: Metric | MetricCollection | None = None,
    forward_fn: ForwardFn | None = None,
    output_key: OutputKey | None = None,
    device: torch.device | str | None = None,
) -> EpsilonPoint:
    r"""The paper's measurement: prune each selected layer at the epsilon point and evaluate, no fine-tuning.

    For each selected parameter, independently: units are the slices along dim 0 (rows of a Linear weight, filters
    of a conv kernel), ranked by squared l2 norm, smallest first; the largest number of them whose squared norms sum
    to at most ``epsilon * ||W||_F^2`` is zeroed (``prunable_units``; the authors' criterion, ``epsilon = 0.1`` in
    their code). Where norms tie at the cut, the units of lower index go first, so exactly that many units are
    zeroed. The model is then evaluated once with all those units zeroed.

    Args:
        model: any ``nn.Module``.
        dataloader: any iterable of batches, iterated once.
        epsilon: the budget per layer, a share of its squared Frobenius norm, in [0, 1].
        params: which tensors are pruned, as in ``evaluate_pruning_curve``; default ``None``: the weights the forward
            pass uses, never the output layer (nor the first conv). A parametrized weight is pruned as its effective
            weight.
        exclude: glob patterns of parameter names to leave unpruned.
        metrics: as in ``evaluate_pruning_curve`` (default: micro-averaged multiclass accuracy, key ``"accuracy"``).
        forward_fn: ``forward_fn(model, batch) -> (preds, target)`` for batches that are not ``(inputs, target)``.
        output_key: as in ``evaluate_pruning_curve``.
        device: where batches and metrics go; default: the device of the model's first parameter.

    Returns:
        ``EpsilonPoint`` with ``ratios[name]`` = pruned units / units of that parameter, ``ratio`` = pruned units
        summed / units summed (the definition of ``compressibility_report``'s ``fraction_prunable/total``) and the
        metrics of the pruned model.

    Raises:
        TypeError: for an argument of the wrong type (named in the message).
        ValueError: on a bad argument value (named in the message), an empty dataloader, an output that cannot be
            scored (as in ``evaluate_pruning_curve``), nothing selected, or a selected parameter holding NaN or
            infinity.

    After return or an exception, every parameter and buffer of ``model`` is bitwise equal to before, and the
    train/eval mode of every submodule and each parameter's ``requires_grad`` are as they were.

    To prune another model to the ratios found here (e.g. a vanilla network to a heavy-tailed one's ratio), pass
    ``point.ratios`` to ``evaluate_at_ratios``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[0.1, 0.0], [0.0, 0.2], [1.0, 0.0], [0.0, 1.0]]))
        >>> data = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
        >>> point = evaluate_at_epsilon(net, data)  # squared norms 0.01, 0.04, 1, 1: budget 0.205 fits two
        >>> point.ratios, point.ratio, list(point.metrics)
        ({'0.weight': 0.5}, 0.5, ['accuracy'])
    """
    eps = validate_epsilon(epsilon)
    run = prepare(model, dataloader, metrics, forward_fn, output_key, exclude, device)
    targets, _ = select_targets(model, params, run.exclude, run.probe)
    builder = at_epsilon(model, targets, eps)
    metrics_values = _scored_alone(model, targets, builder, run.scorer)
    return epsilon_point(eps, builder.counted, metrics_values)


def evaluate_at_ratios(
    model: nn.Module,
    dataloader: Iterable[Any],
    ratios: Mapping[str, float],
    *,
    metrics: Metric | MetricCollection | None = None,
    forward_fn: ForwardFn | None = None,
    output_key: OutputKey | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` with a given share of the smallest units of each named parameter zeroed.

    For each ``name, r`` in ``ratios``, the ``round(r * units)`` units (slices along dim 0) of parameter ``name``
    with the smallest l2 norm are zeroed, ties broken by index as in ``evaluate_at_epsilon``; each parameter gets its
    own ratio. Passing the ``ratios`` of an ``EpsilonPoint`` of a model of the same shape zeroes exactly as many units
    per layer as that point did (``r = k / units``, so ``round(r * units) = k``): "model A pruned to model B's
    epsilon ratio".

    For a single layer this is the ``"neuron"`` method of ``evaluate_pruning_curve`` at the level ``r``, which
    also zeroes the ``round(r * units)`` units of smallest norm, except when norms tie at its threshold (there it
    zeroes every tied unit). For several layers, the curve applies one level to every layer; this function applies
    each layer its own ratio, which is what pruning to another model's per-layer epsilon point needs.

    Args:
        model: any ``nn.Module``.
        dataloader: any iterable of batches, iterated once.
        ratios: tensor name (as in ``tensor_view(model)``: the parameter's name, or a parametrized layer's
            ``layer.weight``) -> share of its units to zero, in [0, 1].
        metrics: as in ``evaluate_pruning_curve``.
        forward_fn: as in ``evaluate_pruning_curve``.
        output_key: as in ``evaluate_pruning_curve``.
        device: as in ``evaluate_pruning_curve``.

    Returns:
        Metric name -> value of the pruned model. The model is left bitwise as it was, as in
        ``evaluate_at_epsilon``.

    Raises:
        TypeError: if ``ratios`` is not a mapping or holds a value that is not a number.
        ValueError: on a bad argument: ``ratios`` empty, naming a parameter the model does not have (the message
            lists the names it has), or holding a value outside [0, 1]; a named parameter holding NaN or infinity.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
        >>> data = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
        >>> list(evaluate_at_ratios(net, data, {"0.weight": 0.5}))
        ['accuracy']
    """
    check_model(model)
    check_ratios(ratios, dict(tensor_view(model).named_parameters()), type(model).__name__)
    run = prepare(model, dataloader, metrics, forward_fn, output_key, (), device)
    targets = targets_named(model, list(ratios))
    builder = UnitsZeroed(model, targets, lambda name, squared: round(float(ratios[name]) * squared.numel()),
                          "the given ratios")
    return _scored_alone(model, targets, builder, run.scorer)
