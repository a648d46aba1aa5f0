"""Pruning curves of any ``nn.Module``: ``evaluate_pruning_curve``, and ``check_prunable`` to fail early."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torchmetrics import Metric, MetricCollection

from lightning_heavytail._checks import resolve_device, validate_epsilon, validate_sparsities
from lightning_heavytail.pruning._evaluator import CurveState, CurveTask, StateBuilder, scored_in_one_pass
from lightning_heavytail.pruning._probe import (
    Probe,
    Run,
    check_common,
    materialized_copy,
    prepare,
    probe,
    select_targets,
)
from lightning_heavytail.pruning._scoring import (
    ForwardFn,
    OutputKey,
    make_forward,
)
from lightning_heavytail.pruning._targets import Target
from lightning_heavytail.pruning.curve import EpsilonPoint, PruningCurve
from lightning_heavytail.pruning.epsilon import at_epsilon, epsilon_point
from lightning_heavytail.pruning.methods import REGISTRY, method_named, require_methods, validate_method
from lightning_heavytail.selection import ParamSelector, uninitialized_parameters
from lightning_heavytail.sharding import model_is_sharded

__all__ = ["PruningCheck", "PruningEvaluation", "check_prunable", "evaluate_pruning", "evaluate_pruning_curve"]


def evaluate_pruning_curve(
    model: nn.Module,
    dataloader: Iterable[Any],
    sparsities: Sequence[float],
    *,
    method: str = "global",
    metrics: Metric | MetricCollection | None = None,
    forward_fn: ForwardFn | None = None,
    output_key: OutputKey | None = None,
    params: ParamSelector | None = None,
    exclude: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> PruningCurve:
    """Evaluate ``model`` pruned to each sparsity level, leaving ``model`` exactly as it was.

    The first batch is run once before anything is pruned, the way the evaluation runs it, and an output that cannot
    be scored is refused there (see ``lightning_heavytail.pruning``); the same batch tells which weights the forward
    pass uses, for the default selection.

    Args:
        model: any ``nn.Module`` (a LightningModule works too).
        dataloader: any iterable of batches, iterated once: each batch is loaded once and every level runs on it
            (the first batch also checks the output before anything is pruned).
        sparsities: strictly increasing levels in [0, 1).
        method: one of ``PRUNING_METHODS``, see ``lightning_heavytail.pruning.methods``.
        metrics: a torchmetrics ``Metric`` (key: its class name) or ``MetricCollection`` (its keys). Each level
            scores into its own copy (the metrics passed are never updated); ``compute()`` is called on every process,
            so under DDP each rank passes its own shard and gets the synced value. ``None``: micro-averaged
            multiclass accuracy with the number of classes read from the model's output width, key ``"accuracy"``.
        forward_fn: ``forward_fn(model, batch) -> (preds, target)`` for batches that are not ``(inputs, target)``.
        output_key: read the predictions from the model's output ``model(inputs)[output_key]`` (a dict key such as
            ``"logits"``, or a tuple index); only without ``forward_fn``.
        params: which tensors to prune, as in ``select_parameters`` (read on ``tensor_view(model)``). ``None`` (the
            default): the weights the forward pass uses, less the output layer and the first conv, see
            ``lightning_heavytail.pruning``. ``"weights"`` prunes the output layer too.
        exclude: glob patterns of tensor names to leave unpruned.
        device: where batches and metrics go; default: the device of the model's first parameter. The model is not
            moved.

    Returns:
        The curve; ``curve.sparsities`` are measured, ``curve.requested`` are the levels asked for, ``curve.params``
        the tensors pruned.

    Raises:
        TypeError: for an argument of the wrong type (named in the message).
        ValueError: on a bad argument value (named in the message), an empty dataloader, an output that cannot be
            scored (the message says what came back and how to fix it), no prunable parameter, predictions that turn
            NaN, or (for ``"structured"``) a model torch-pruning cannot trace; the message names the layer and
            suggests ``method="neuron"``.
        ModuleNotFoundError: for ``"structured"`` without torch-pruning (the message names the extra to install).

    After return or an exception, every parameter and buffer of ``model`` is bitwise equal to before, and the
    train/eval mode of every submodule, each parameter's ``requires_grad`` and the module's parametrizations are as
    they were.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
        >>> curve = evaluate_pruning_curve(net, data, [0.0, 0.5, 0.75])
        >>> curve.params  # the output layer 2.weight is left alone
        ['0.weight']
        >>> curve.sparsities  # 64 selected entries: 32 and 48 of them zeroed
        [0.0, 0.5, 0.75]
        >>> list(curve.metrics), len(curve.metrics["accuracy"])
        (['accuracy'], 3)
        >>> net.training  # untouched
        True
    """
    levels = validate_sparsities(sparsities)
    name, _ = method_named(method)
    run = prepare(model, dataloader, metrics, forward_fn, output_key, exclude, device)
    targets, _ = select_targets(model, params, run.exclude, run.probe)
    return _in_one_pass(model, run, targets, levels, (name,), None).curves[name]


@dataclass(frozen=True)
class PruningEvaluation:
    """What ``evaluate_pruning`` returns.

    Attributes:
        curves: method name -> its curve, in the order of the methods asked for.
        at_epsilon: the epsilon point of the same tensors (``evaluate_at_epsilon``), if ``epsilon`` was given.
    """

    curves: dict[str, PruningCurve]
    at_epsilon: EpsilonPoint | None


def evaluate_pruning(
    model: nn.Module,
    dataloader: Iterable[Any],
    sparsities: Sequence[float],
    *,
    methods: str | Sequence[str] = ("global",),
    params: ParamSelector | None = None,
    exclude: Sequence[str] = (),
    epsilon: float | None = None,
    metrics: Metric | MetricCollection | None = None,
    forward_fn: ForwardFn | None = None,
    output_key: OutputKey | None = None,
    device: torch.device | str | None = None,
) -> PruningEvaluation:
    """The curves of several methods, and the epsilon point, in one pass over the data (``PruneEvalCallback``'s way).

    Each batch is loaded once and runs every level of every method (and the epsilon point); the results are those of
    ``evaluate_pruning_curve`` per method and ``evaluate_at_epsilon`` on the curves' tensors, bitwise.

    Args:
        model: as in ``evaluate_pruning_curve``; left exactly as it was.
        dataloader: any iterable of batches, iterated once.
        sparsities: strictly increasing levels in [0, 1).
        methods: one or more of ``PRUNING_METHODS``.
        params: as in ``evaluate_pruning_curve``; the epsilon point prunes the same tensors.
        exclude: as in ``evaluate_pruning_curve``.
        epsilon: the budget of the epsilon point in [0, 1]; None: no epsilon point.
        metrics: as in ``evaluate_pruning_curve``.
        forward_fn: as in ``evaluate_pruning_curve``.
        output_key: as in ``evaluate_pruning_curve``.
        device: as in ``evaluate_pruning_curve``.

    Returns:
        The curves and the epsilon point.

    Raises:
        TypeError, ValueError, ModuleNotFoundError: as ``evaluate_pruning_curve`` and ``evaluate_at_epsilon`` do.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_heavytail.pruning import evaluate_at_epsilon
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> g = torch.Generator().manual_seed(0)
        >>> data = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
        >>> both = evaluate_pruning(net, data, [0.0, 0.5], methods=["global", "neuron"], epsilon=0.1)
        >>> list(both.curves), both.curves["neuron"] == evaluate_pruning_curve(net, data, [0.0, 0.5], method="neuron")
        (['global', 'neuron'], True)
        >>> both.at_epsilon == evaluate_at_epsilon(net, data, epsilon=0.1)
        True
    """
    levels = validate_sparsities(sparsities)
    names = validate_method(methods, "methods")
    require_methods(names)
    eps = None if epsilon is None else validate_epsilon(epsilon)
    run = prepare(model, dataloader, metrics, forward_fn, output_key, exclude, device)
    targets, _ = select_targets(model, params, run.exclude, run.probe)
    return _in_one_pass(model, run, targets, levels, names, eps)


def _in_one_pass(model: nn.Module, run: Run, targets: Sequence[Target], levels: Sequence[float],
                 names: Sequence[str], epsilon: float | None) -> PruningEvaluation:
    """Every level of every method (and the epsilon point) scored in one pass over the data."""
    builders: list[StateBuilder] = [
        functools.partial(REGISTRY[name].states, CurveTask(name, model, targets, levels, run.scorer, run.example,
                                                           run.forward))
        for name in names
    ]
    point_builder = None if epsilon is None else at_epsilon(model, targets, epsilon)
    if point_builder is not None:
        builders.append(point_builder)
    in_place = point_builder is not None or any(REGISTRY[name].in_place for name in names)
    groups = scored_in_one_pass(model, targets if in_place else [], run.scorer, builders)
    curves = {name: _curve(name, levels, targets, group) for name, group in zip(names, groups, strict=False)}
    point = None
    if point_builder is not None and epsilon is not None:
        point = epsilon_point(epsilon, point_builder.counted, groups[-1][0][1])
    return PruningEvaluation(curves, point)


def _curve(name: str, levels: Sequence[float], targets: Sequence[Target],
           scored: Sequence[tuple[CurveState, dict[str, float]]]) -> PruningCurve:
    measured = [state.sparsity for state, _ in scored]
    if any(value is None for value in measured):
        raise RuntimeError(f"method={name!r}: a level was scored without being written")
    return PruningCurve(
        method=name,
        requested=list(levels),
        sparsities=[float(value) for value in measured if value is not None],
        metrics={metric: [values[metric] for _, values in scored] for metric in scored[0][1]},
        params=[t.name for t in targets],
    )


@dataclass(frozen=True)
class PruningCheck:
    """What ``check_prunable`` found.

    Attributes:
        params: the names of the tensors that will be pruned (as in ``tensor_view``).
        left_out: with the default ``params=None``, the weights left out and why (output layer, first conv, not used
            by the forward pass); empty otherwise.
        metrics: the names of the metrics the evaluation will report (known once a batch was scored; empty without
            ``batch``).
    """

    params: list[str]
    left_out: dict[str, str]
    metrics: list[str]


def check_prunable(
    model: nn.Module,
    method: str | Sequence[str],
    batch: Any = None,
    *,
    params: ParamSelector | None = None,
    exclude: Sequence[str] = (),
    forward_fn: ForwardFn | None = None,
    output_key: OutputKey | None = None,
    metrics: Metric | MetricCollection | None = None,
) -> PruningCheck:
    """Fail early, before any evaluation, if ``model`` cannot be pruned and scored as asked.

    With a ``batch``, the evaluation's forward runs on it once, as ``evaluate_pruning_curve`` runs it (the same checks,
    the same messages): an output that cannot be scored is refused, the metrics score it once (on a copy), and the
    default selection is worked out. Then ``params``/``exclude`` must select at least one tensor, and each method
    checks what it needs: ``"svd"`` tensors of 2 or more dimensions; ``"structured"`` torch-pruning, a deep-copyable
    model, a selected tensor that belongs to a Linear/Conv/LSTM layer and, given ``batch``, a model torch-pruning can
    trace and that still runs after channels are removed (a trial prune at 0.5 on a copy). A model with lazy
    parameters is checked on a copy materialized by that forward.

    Args:
        model: the model; it is left exactly as it was.
        method: a method name or a sequence of them.
        batch: one batch of the evaluation data, in the layout ``forward_fn`` (or the default ``(inputs, target)``)
            reads. Needed for the default ``params=None``.
        params: tensor selection, as in ``evaluate_pruning_curve``.
        exclude: glob patterns of names to leave out.
        forward_fn: ``forward_fn(model, batch) -> (preds, target)``, as in ``evaluate_pruning_curve``.
        output_key: as in ``evaluate_pruning_curve``.
        metrics: as in ``evaluate_pruning_curve``.

    Returns:
        The tensors to prune, the weights the default selection leaves out, and the metric names.

    Raises:
        TypeError: for an argument of the wrong type.
        ValueError: naming the argument, saying what the model returned and how to fix it, or naming the layer that
            cannot be traced with a suggested method.
        ModuleNotFoundError: for ``"structured"`` without torch-pruning.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> batch = (torch.randn(2, 4), torch.tensor([0, 2]))
        >>> check = check_prunable(net, ["global", "structured"], batch)
        >>> check.params, check.left_out, check.metrics
        (['0.weight'], {'2.weight': 'the output layer: the last weight the forward pass uses'}, ['accuracy'])
        >>> check_prunable(net, "global", (torch.randn(2, 4), torch.rand(2)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: The default metric (multiclass accuracy) needs integer class labels as target, got torch.float32 ...
    """
    methods = validate_method(method)
    require_methods(methods)
    exclude = check_common(model, forward_fn, output_key, metrics, exclude)
    forward = make_forward(forward_fn, output_key)
    found: Probe | None = None
    names: list[str] = []
    if batch is not None:
        device = resolve_device(model, None)
        batch = move_data_to_device(batch, device)
        if uninitialized_parameters(model):
            model = materialized_copy(model, batch, forward, device)
        found = probe(model, batch, forward, metrics, device, model_is_sharded(model))
        names = found.metric_names
    targets, left_out = select_targets(model, params, exclude, found)
    for name in methods:
        REGISTRY[name].check(model, targets, batch, forward)
    return PruningCheck(params=[t.name for t in targets], left_out=left_out, metrics=names)
