r"""Pruning curves: a model's metric at several sparsity levels, without changing the model.

Four methods, all ranking by magnitude (Barsbey et al., 2021; Wan et al., 2024):

- ``"global"``: one threshold over all selected weights. At sparsity ``s`` over ``n`` selected entries, with
  ``k = round(s * n)`` and ``t`` the ``k``-th smallest ``|w|``, every entry with
  ``|w| <= t`` is zeroed.
- ``"layerwise"``: the same rule inside each selected tensor, so every layer loses the same fraction.
- ``"neuron"``: in each selected tensor, the output units (rows of a Linear weight, filters of a conv kernel: slices
  along dim 0) with the smallest l2 norm are zeroed, ``round(s * n_units)`` of them.
  This is the structured pruning of the paper. Only the selected tensors are masked: a unit whose bias is not selected
  still emits its bias (the paper's networks have no biases).
- ``"structured"``: channels are physically removed from a deep copy of the model with torch-pruning's
  ``BasePruner`` (group l2 magnitude, the same channel ratio in each selected layer). Channels that reach
  the model's output are never removed. The ratio counts channels, so the curve's x-axis is the measured fraction of
  all model parameters removed.

For the three mask methods, ties at the threshold are all zeroed, so the measured sparsity, the fraction of the
selected entries that are zero, can exceed the level asked for (e.g. when many weights are exactly zero already);
the curve reports the measured value. ``round`` is Python's, as in ``torch.nn.utils.prune``.

Cost of the mask methods: one sort of the magnitudes per call (not one per level), one backup of the selected tensors,
masks written in place and the weights restored in a ``finally`` block; evaluation runs under ``torch.no_grad()``.
Thresholds come from the sort, never from ``torch.quantile``, which fails above ``2^{24}`` elements.

References:
    M. Barsbey, M. Sefidgaran, M. A. Erdogdu, G. Richard, U. Şimşekli, "Heavy tails in SGD and compressibility of
    overparametrized neural networks", NeurIPS 2021.
    Y. Wan, M. Barsbey, A. Zaidi, U. Şimşekli, "Implicit compressibility of overparametrized neural networks trained
    with heavy-tailed SGD", ICML 2024 (arXiv 2306.08125).
    G. Fang, X. Ma, M. Song, M. B. Mi, X. Wang, "DepGraph: towards any structural pruning", CVPR 2023 (torch-pruning).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lightning_heavytail.selection import ParamSelector, select_parameters, validate_exclude

__all__ = [
    "MASK_METHODS",
    "PRUNING_METHODS",
    "EpsilonPoint",
    "PruningCurve",
    "check_prunable",
    "evaluate_at_epsilon",
    "evaluate_at_ratios",
    "evaluate_pruning_curve",
    "prunable_units",
    "validate_epsilon",
    "validate_method",
    "validate_sparsities",
]

PRUNING_METHODS: tuple[str, ...] = ("global", "layerwise", "neuron", "structured")
"""The methods ``evaluate_pruning_curve`` accepts."""

MASK_METHODS: tuple[str, ...] = ("global", "layerwise", "neuron")
"""The methods that zero entries in place (no model copy)."""

DEFAULT_METRIC_KEY = "accuracy"

ForwardFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor]]
"""``forward_fn(model, batch) -> (preds, target)``."""


# --------------------------------------------------------------------------------------------------------------------
# The curve
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class PruningCurve:
    """A metric measured at several sparsity levels.

    Attributes:
        method: the pruning method, one of ``PRUNING_METHODS``.
        requested: the sparsity levels asked for.
        sparsities: the measured sparsity at each level: the fraction of the selected parameters' entries that are
            zero (mask methods), or the fraction of all model parameters removed (``"structured"``).
        metrics: metric name -> one value per level.

    Examples:
        >>> curve = PruningCurve("global", [0.0, 0.5, 1.0], [0.0, 0.5, 1.0], {"accuracy": [0.9, 0.8, 0.1]})
        >>> curve.area_under_curve()  # (0.85 * 0.5 + 0.45 * 0.5) / 1.0
        0.65
        >>> PruningCurve.from_dict(curve.to_dict()) == curve
        True
    """

    method: str
    requested: list[float]
    sparsities: list[float]
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict with the fields ``method``, ``requested``, ``sparsities``, ``metrics``."""
        return {
            "method": self.method,
            "requested": [float(s) for s in self.requested],
            "sparsities": [float(s) for s in self.sparsities],
            "metrics": {name: [float(v) for v in values] for name, values in self.metrics.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningCurve:
        """Rebuild a curve from ``to_dict``'s output."""
        return cls(
            method=str(data["method"]),
            requested=[float(s) for s in data["requested"]],
            sparsities=[float(s) for s in data["sparsities"]],
            metrics={str(k): [float(v) for v in vs] for k, vs in data["metrics"].items()},
        )

    def area_under_curve(self, metric: str = DEFAULT_METRIC_KEY) -> float:
        r"""Trapezoid area under ``metric`` vs. measured sparsity, divided by the sparsity span.

        ``AUC = sum_{i=1..K-1} (s_{i+1} - s_i) * (m_i + m_{i+1}) / 2 / (s_K - s_1)``

        with the points ordered by measured sparsity ``s``. The result is on the metric's own scale (for
        accuracy: the mean accuracy over the curve). With a single level, or when every level measured the same
        sparsity, it is the mean of the metric's values.

        Args:
            metric: the metric's key in ``metrics``.

        Raises:
            KeyError: if the curve has no metric of that name; the message lists the names it has.
        """
        if metric not in self.metrics:
            raise KeyError(f"`metric`={metric!r} is not in this curve; it has {sorted(self.metrics)!r}")
        points = sorted(zip(self.sparsities, self.metrics[metric], strict=True), key=lambda p: p[0])
        span = points[-1][0] - points[0][0]
        if span <= 0.0:
            return sum(v for _, v in points) / len(points)
        area = sum((s1 - s0) * (v0 + v1) / 2.0 for (s0, v0), (s1, v1) in itertools.pairwise(points))
        return area / span


# --------------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------------
def validate_sparsities(sparsities: Any, argument: str = "sparsities") -> tuple[float, ...]:
    """Check sparsity levels: a non-empty, strictly increasing sequence of numbers in [0, 1).

    Args:
        sparsities: the value to check.
        argument: the argument name used in error messages.

    Returns:
        The levels as a tuple of floats.

    Raises:
        ValueError: if ``sparsities`` is not such a sequence; the message names the argument and the value given.

    Examples:
        >>> validate_sparsities([0, 0.5, 0.9])
        (0.0, 0.5, 0.9)
        >>> validate_sparsities([0.5, 0.5])
        Traceback (most recent call last):
        ...
        ValueError: `sparsities` must be strictly increasing (no repeated level), got [0.5, 0.5]
    """
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Iterable):
        raise ValueError(
            f"`{argument}` must be a non-empty sequence of numbers in [0, 1), got {type(sparsities).__name__}:"
            f" {sparsities!r}"
        )
    levels = list(sparsities)
    if not levels:
        raise ValueError(f"`{argument}` must be a non-empty sequence of numbers in [0, 1), got {sparsities!r}")
    for level in levels:
        is_real = isinstance(level, numbers.Real) and not isinstance(level, bool)
        if not is_real or not 0.0 <= float(level) < 1.0:  # NaN fails the range test too
            raise ValueError(f"`{argument}` must hold numbers in [0, 1), got {level!r} in {sparsities!r}")
    values = tuple(float(level) for level in levels)
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"`{argument}` must be strictly increasing (no repeated level), got {sparsities!r}")
    return values


def validate_method(method: Any, argument: str = "method") -> tuple[str, ...]:
    """Check a pruning method name, or a sequence of distinct names, against ``PRUNING_METHODS``.

    Args:
        method: one name or a sequence of names.
        argument: the argument name used in error messages.

    Returns:
        The names as a tuple.

    Raises:
        ValueError: on an unknown name, an empty sequence or a repeated name.

    Examples:
        >>> validate_method("global")
        ('global',)
        >>> validate_method(["neuron", "global"])
        ('neuron', 'global')
        >>> validate_method("magnitude")
        Traceback (most recent call last):
        ...
        ValueError: `method` must be one of ('global', 'layerwise', 'neuron', 'structured') or a sequence of them, got 'magnitude'
    """  # noqa: E501
    names = [method] if isinstance(method, str) else method
    allowed = f"one of {PRUNING_METHODS!r} or a sequence of them"
    if not isinstance(names, Sequence) or not names:
        raise ValueError(f"`{argument}` must be {allowed}, got {method!r}")
    for name in names:
        if name not in PRUNING_METHODS:
            context = "" if name is method else f" in {method!r}"
            raise ValueError(f"`{argument}` must be {allowed}, got {name!r}{context}")
    if len(set(names)) != len(names):
        raise ValueError(f"`{argument}` must not repeat a method, got {method!r}")
    return tuple(names)


def _validate_single_method(method: Any) -> str:
    names = validate_method(method)
    if len(names) != 1:
        raise ValueError(f"`method` must name one method here (call once per method), got {method!r}")
    return names[0]


def _check_evaluation_arguments(model: Any, dataloader: Any, metrics: Any, forward_fn: Any) -> None:
    """The checks every evaluation entry point makes on its common arguments."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable):
        raise ValueError(f"`dataloader` must be an iterable of batches, got {type(dataloader).__name__}")
    if metrics is not None and not isinstance(metrics, (Metric, MetricCollection)):
        raise ValueError(
            f"`metrics` must be None, a torchmetrics Metric or a MetricCollection, got {type(metrics).__name__}"
        )
    if forward_fn is not None and not callable(forward_fn):
        raise ValueError(
            f"`forward_fn` must be None or a callable (model, batch) -> (preds, target), got {forward_fn!r}"
        )


def _resolve_device(model: nn.Module, device: Any) -> torch.device:
    if device is None:
        first = next(iter((*model.parameters(), *model.buffers())), None)
        return first.device if first is not None else torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must be None, a torch.device or a device string, got {device!r}") from err


# --------------------------------------------------------------------------------------------------------------------
# Evaluation of one model state
# --------------------------------------------------------------------------------------------------------------------
def _split_batch(batch: Any) -> tuple[Any, Any]:
    """(inputs, target) from a default-layout batch, or a ValueError pointing to ``forward_fn``."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        layout = f"{type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else (
            type(batch).__name__
        )
        raise ValueError(
            f"Without `forward_fn` a batch must be (inputs, target); got a {layout}. Pass"
            " `forward_fn=lambda model, batch: (preds, target)` for other batch layouts."
        )
    return batch[0], batch[1]


def _default_forward(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    inputs, target = _split_batch(batch)
    return model(inputs), target


class _Evaluator:
    """Runs the model over the data once per call and returns the metrics as floats."""

    def __init__(self, dataloader: Iterable[Any], metrics: Metric | MetricCollection | None,
                 forward_fn: ForwardFn | None, device: torch.device) -> None:
        self.dataloader = dataloader
        self.forward_fn: ForwardFn = forward_fn if forward_fn is not None else _default_forward
        self.device = device
        self.collection: MetricCollection | None = None
        if isinstance(metrics, MetricCollection):
            self.collection = metrics
        elif isinstance(metrics, Metric):
            self.collection = MetricCollection(metrics)  # keyed by class name; the metric itself, not a copy
        if self.collection is not None:
            self.collection.to(device)

    def _outputs(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        out = self.forward_fn(model, batch)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError(f"`forward_fn` must return (preds, target), got {type(out).__name__}")
        return out[0], out[1]

    def _default_collection(self, preds: Tensor) -> MetricCollection:
        from torchmetrics.classification import MulticlassAccuracy

        if preds.ndim < 2 or preds.shape[1] < 2:
            raise ValueError(
                "The default metric (multiclass accuracy) needs class scores of shape (N, C) with C >= 2, got preds"
                f" of shape {tuple(preds.shape)}. Pass `metrics` (a torchmetrics Metric or MetricCollection)."
            )
        accuracy = MulticlassAccuracy(num_classes=int(preds.shape[1]), average="micro")
        return MetricCollection({DEFAULT_METRIC_KEY: accuracy}).to(self.device)

    def example_batch(self) -> Any:
        """The first batch, on the evaluation device."""
        for batch in self.dataloader:
            return move_data_to_device(batch, self.device)
        raise ValueError("`dataloader` yielded no batch")

    def __call__(self, model: nn.Module) -> dict[str, float]:
        if self.collection is not None:
            self.collection.reset()
        seen = False
        for batch in self.dataloader:
            preds, target = self._outputs(model, move_data_to_device(batch, self.device))
            if self.collection is None:
                self.collection = self._default_collection(preds)
            self.collection.update(preds, target)
            seen = True
        if not seen or self.collection is None:
            raise ValueError("`dataloader` yielded no batch")
        return {name: _as_float(name, value) for name, value in self.collection.compute().items()}


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Metric {name!r} returned a tensor of shape {tuple(value.shape)}; a pruning curve needs one number"
                " per level (e.g. use average='micro' or 'macro')."
            )
        return float(value.item())
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"Metric {name!r} returned {type(value).__name__}; a pruning curve needs one number per level")


@contextlib.contextmanager
def _model_preserved(model: nn.Module, touched: Sequence[tuple[Tensor, Tensor]] = ()) -> Iterator[None]:
    """Snapshot what evaluation may change and put it back on exit, also on an exception.

    ``touched`` holds ``(parameter, backup)`` pairs for the parameters the caller writes to; they and all buffers (a
    forward may update some even in eval mode) are restored bitwise. Train/eval flags are restored per submodule, not
    through ``.train()``, which modules may override; requires_grad per parameter.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    with torch.no_grad():
        backups = [*touched, *((buf, buf.detach().clone()) for buf in model.buffers())]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, backup in backups:
                tensor.copy_(backup)
        for module, mode in training:
            module.training = mode
        for param, flag in requires_grad:
            param.requires_grad_(flag)


# --------------------------------------------------------------------------------------------------------------------
# Mask methods
# --------------------------------------------------------------------------------------------------------------------
def _sort_ascending(values: Tensor) -> Tensor:
    """The values of a 1-D tensor in ascending order (NaN last).

    On the CPU numpy's value-only sort is about 10x faster than ``torch.sort``, which also builds an int64 index
    (measured 0.25 s vs 2.7 s for 2**24 floats on 2 cores); elsewhere ``torch.sort``.
    """
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(values.numpy()))
    return values.sort().values


def _kth_threshold(sorted_scores: Tensor, level: float) -> float | None:
    """Largest score to zero at ``level``: the k-th smallest, k = round(level * n); None when nothing is pruned."""
    k = round(level * sorted_scores.numel())
    return None if k == 0 else float(sorted_scores[k - 1].item())


def _magnitudes(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    mag = tensor.abs()
    return mag if mag.dtype == dtype else mag.to(dtype)


def _unit_norms(tensor: Tensor) -> Tensor:
    """L2 norm of each slice along dim 0, shaped to broadcast against ``tensor``."""
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    norms: Tensor = tensor.reshape(tensor.shape[0], -1).to(dtype).norm(dim=1)
    return norms.reshape(-1, *([1] * (tensor.ndim - 1)))


def _mask_thresholds(method: str, backups: Sequence[Tensor], levels: Sequence[float],
                     scores: Sequence[Tensor] | None) -> list[list[float | None]]:
    """thresholds[level][tensor] from one sort (global) or one sort per tensor (layerwise, neuron)."""
    if method == "global":
        dtype = _score_dtype(backups)
        ranked = _sort_ascending(torch.cat([_magnitudes(b, dtype).flatten() for b in backups]))
        per_level = [_kth_threshold(ranked, level) for level in levels]
        del ranked
        return [[t] * len(backups) for t in per_level]
    sources = scores if scores is not None else [b.abs() for b in backups]
    by_tensor = []
    for src in sources:
        ranked = _sort_ascending(src.flatten())
        by_tensor.append([_kth_threshold(ranked, level) for level in levels])
    return [list(col) for col in zip(*by_tensor, strict=True)]


def _score_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _apply_mask(param: Tensor, backup: Tensor, score: Tensor, threshold: float | None) -> None:
    param.copy_(backup)
    if threshold is None:
        return
    if math.isnan(threshold):  # the k-th smallest is NaN (NaNs sort last): everything up to it is pruned
        param.zero_()
        return
    param.masked_fill_(score <= threshold, 0)


def _mask_curve(model: nn.Module, method: str, selected: Sequence[Tensor], backups: Sequence[Tensor],
                levels: Sequence[float], evaluate: _Evaluator) -> tuple[list[float], list[dict[str, float]]]:
    """Mask, evaluate, repeat; the caller restores ``selected`` from ``backups`` afterwards."""
    unit_scores = [_unit_norms(b) for b in backups] if method == "neuron" else None
    thresholds = _mask_thresholds(method, backups, levels, unit_scores)
    dtype = _score_dtype(backups)
    total = sum(p.numel() for p in selected)
    measured: list[float] = []
    values: list[dict[str, float]] = []
    with torch.no_grad():
        for level_thresholds in thresholds:
            for i, (param, backup, threshold) in enumerate(zip(selected, backups, level_thresholds, strict=True)):
                if unit_scores is not None:
                    score = unit_scores[i]
                elif method == "global":
                    score = _magnitudes(backup, dtype)  # compare in the dtype the threshold was ranked in
                else:
                    score = backup.abs()
                _apply_mask(param, backup, score, threshold)
            zeros = sum(int((p == 0).sum().item()) for p in selected)
            measured.append(zeros / total)
            values.append(evaluate(model))
    return measured, values


# --------------------------------------------------------------------------------------------------------------------
# Structured method (torch-pruning on a copy)
# --------------------------------------------------------------------------------------------------------------------
_ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LSTM)
"""Layers whose output channels torch-pruning removes (its default root module types)."""


class _LayerTracker:
    """Forward hooks that record which module is running, to name the layer where a forward fails."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.last_done: str | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave(name)))

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.stack.append(name)
        return hook

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            self.last_done = name
        return hook

    def describe(self, model: nn.Module) -> str:
        modules = dict(model.named_modules())
        if self.stack and self.stack[-1]:
            name = self.stack[-1]
            return f"layer {name!r} ({type(modules[name]).__name__})"
        where = f"the forward of {type(model).__name__}"
        return where + (f", after layer {self.last_done!r}" if self.last_done else "")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _traceable_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters track gradients, so torch-pruning can trace grad_fn (also under inference_mode)."""
    try:
        clone = copy.deepcopy(model)
    except Exception as err:  # e.g. torch.nn.utils.prune hooks (pytorch #37322)
        raise ValueError(
            f"method='structured' works on a deep copy, and {type(model).__name__} cannot be deep-copied ({err})."
            " Use method='neuron' (or another mask method), which needs no copy."
        ) from err
    for param in clone.parameters():
        param.requires_grad_(True)
    return clone.eval()


def _output_shapes(out: Any) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    apply_to_collection(out, Tensor, lambda t: shapes.append(tuple(t.shape)))
    return shapes


def _as_grad_tensors(batch: Any) -> Any:
    # Tensors made under inference_mode cannot be saved for backward; tracing needs ordinary tensors.
    return apply_to_collection(batch, Tensor, lambda t: t.clone() if t.is_inference() else t)


def _channels_reach_output(node: Any) -> bool:
    """Whether a layer's output channels reach the model's output without passing through another root layer."""
    from torch_pruning import ops

    stack, seen = list(node.outputs), set()
    if not stack:
        return True
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.type == ops.OPTYPE.OUTPUT or not current.outputs:
            if not isinstance(current.module, _ROOT_TYPES):
                return True
            continue
        if isinstance(current.module, _ROOT_TYPES):
            continue  # consumes the channels as its inputs
        stack.extend(current.outputs)
    return False


class _StructuredPlan:
    """What to prune and what to keep, worked out once per call by tracing one copy of the model."""

    def __init__(self, model: nn.Module, selected_names: Sequence[str], example: Any,
                 forward_fn: ForwardFn | None) -> None:
        import torch_pruning as tp

        self.example = example
        self.trace_forward: Callable[[nn.Module, Any], Any] = (
            (lambda m, batch: forward_fn(m, batch)[0]) if forward_fn is not None else (lambda m, inputs: m(inputs))
        )
        self.model_name = type(model).__name__
        root_names = _selected_root_layers(model, selected_names)
        all_roots = [name for name, module in model.named_modules() if isinstance(module, _ROOT_TYPES)]
        with _grad_mode():
            clone = _traceable_copy(model)
            tracker = _LayerTracker(clone)
            try:
                graph = tp.DependencyGraph().build_dependency(
                    clone, example_inputs=_as_grad_tensors(example), forward_fn=self.trace_forward, verbose=False
                )
            except Exception as err:
                raise ValueError(
                    f"torch-pruning could not trace {self.model_name}: {type(err).__name__} in"
                    f" {tracker.describe(clone)}: {err}. Use method='neuron' (zeroes units without tracing)."
                ) from err
            finally:
                tracker.remove()
            with torch.no_grad():
                self.output_shapes = _output_shapes(self.trace_forward(clone, _as_grad_tensors(example)))
        name_of = {module: name for name, module in clone.named_modules()}
        traced = {name_of[m]: node for m, node in graph.module2node.items() if m in name_of}
        untraced = [name for name in root_names if name not in traced]
        if untraced:
            layer_type = type(dict(model.named_modules())[untraced[0]]).__name__
            raise ValueError(
                f"torch-pruning could not trace layer {untraced[0]!r} ({layer_type})"
                f" of {self.model_name}: its output does not reach the model output through autograd (detached,"
                " computed without grad, or unused in forward). Use method='neuron', or leave the layer out with"
                f" exclude=[{untraced[0] + '.*'!r}]."
            )
        protected = {name for name in root_names if _channels_reach_output(traced[name])}
        self.prunable = [name for name in root_names if name not in protected]
        if not self.prunable:
            raise ValueError(
                f"method='structured' has no selected layer to remove channels from in {self.model_name}: the selected"
                f" layers {root_names!r} all feed the model output, whose width must not change. Select more layers"
                " with `params`, or use a mask method."
            )
        self.ignored = [name for name in all_roots if name not in self.prunable]

    def pruned_copy(self, model: nn.Module, level: float) -> nn.Module:
        """A copy of ``model`` with ``level`` of the channels of each prunable layer removed."""
        import torch_pruning as tp

        with _grad_mode():
            clone = _traceable_copy(model)
            modules = dict(clone.named_modules())
            try:
                pruner = tp.pruner.BasePruner(
                    clone,
                    _as_grad_tensors(self.example),
                    importance=tp.importance.MagnitudeImportance(p=2),
                    pruning_ratio=level,
                    ignored_layers=[modules[name] for name in self.ignored],
                    root_module_types=list(_ROOT_TYPES),
                    forward_fn=self.trace_forward,
                )
                pruner.step()
            except Exception as err:
                raise ValueError(
                    f"torch-pruning failed to remove channels from {self.model_name}: {type(err).__name__}: {err}."
                    " Use method='neuron' (zeroes units without changing shapes)."
                ) from err
        for param in clone.parameters():
            param.requires_grad_(False)
        tracker = _LayerTracker(clone)
        try:
            with torch.no_grad():
                shapes = _output_shapes(self.trace_forward(clone, self.example))
        except Exception as err:
            raise ValueError(
                f"After torch-pruning removed channels, {tracker.describe(clone)} of {self.model_name} fails:"
                f" {type(err).__name__}: {err}. The model uses shapes torch-pruning cannot trace (e.g. a hard-coded"
                " view/reshape); use method='neuron', which zeroes units without changing shapes."
            ) from err
        finally:
            tracker.remove()
        if shapes != self.output_shapes:
            raise ValueError(
                f"Structured pruning changed the output shapes of {self.model_name} from {self.output_shapes} to"
                f" {shapes}; exclude the output layer with `exclude`, or use method='neuron'."
            )
        return clone


@contextlib.contextmanager
def _grad_mode() -> Iterator[None]:
    # torch-pruning traces grad_fn: grad must be on, also when called from Lightning's inference_mode loops.
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _selected_root_layers(model: nn.Module, selected_names: Sequence[str]) -> list[str]:
    """Names of the Linear/Conv/LSTM layers that own a selected parameter."""
    chosen = set(selected_names)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, _ROOT_TYPES):
            continue
        own = {f"{name}.{pname}" if name else pname for pname, _ in module.named_parameters(recurse=False)}
        if own & chosen:
            names.append(name)
    if not names:
        raise ValueError(
            f"method='structured' removes channels of Linear/Conv/LSTM layers, and the selected parameters"
            f" {list(selected_names)!r} of {type(model).__name__} belong to none. Select layer weights with `params`,"
            " or use method='neuron'."
        )
    return names


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _structured_curve(model: nn.Module, selected_names: Sequence[str], levels: Sequence[float],
                      evaluate: _Evaluator, forward_fn: ForwardFn | None) -> tuple[list[float], list[dict[str, float]]]:
    example = evaluate.example_batch()
    if forward_fn is None:
        example = _split_batch(example)[0]
    plan = _StructuredPlan(model, selected_names, example, forward_fn)
    total = _parameter_count(model)
    measured: list[float] = []
    values: list[dict[str, float]] = []
    for level in levels:
        clone = plan.pruned_copy(model, level) if level > 0.0 else model  # the caller put `model` in eval mode
        measured.append(1.0 - _parameter_count(clone) / total)
        with torch.no_grad():
            values.append(evaluate(clone))
        del clone
    return measured, values


# --------------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------------
def evaluate_pruning_curve(
    model: nn.Module,
    dataloader: Iterable[Any],
    sparsities: Sequence[float],
    *,
    method: str = "global",
    metrics: Metric | MetricCollection | None = None,
    forward_fn: ForwardFn | None = None,
    params: ParamSelector = "weights",
    exclude: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> PruningCurve:
    """Evaluate ``model`` pruned to each sparsity level, leaving ``model`` exactly as it was.

    Args:
        model: any ``nn.Module`` (a LightningModule works too).
        dataloader: any iterable of batches, iterated once per level.
        sparsities: strictly increasing levels in [0, 1).
        method: one of ``PRUNING_METHODS``, see the module docstring.
        metrics: a torchmetrics ``Metric`` (key: its class name) or ``MetricCollection`` (its keys). Reset before each
            level; ``compute()`` is called on every process, so under DDP each rank passes its own shard and gets the
            synced value. ``None``: micro-averaged multiclass accuracy with the number of classes read from the
            model's output width, key ``"accuracy"``.
        forward_fn: ``forward_fn(model, batch) -> (preds, target)`` for batches that are not ``(inputs, target)``.
        params: which parameters to prune, as in ``select_parameters``
            (default: every trainable parameter with at least 2 dimensions, output layer included).
        exclude: glob patterns of parameter names to leave unpruned.
        device: where batches and metrics go; default: the device of the model's first parameter. The model is not
            moved.

    Returns:
        The curve; ``curve.sparsities`` are measured, ``curve.requested`` are the levels asked for.

    Raises:
        ValueError: on a bad argument (named in the message), an empty dataloader, no prunable parameter, or (for
            ``"structured"``) a model torch-pruning cannot trace; the message names the layer and suggests
            ``method="neuron"``.

    After return or an exception, every parameter and buffer of ``model`` is bitwise equal to before, and the
    train/eval mode of every submodule and each parameter's ``requires_grad`` are as they were.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
        >>> curve = evaluate_pruning_curve(net, data, [0.0, 0.5, 0.75])
        >>> curve.sparsities  # 112 selected entries: 56 and 84 of them zeroed
        [0.0, 0.5, 0.75]
        >>> list(curve.metrics), len(curve.metrics["accuracy"])
        (['accuracy'], 3)
        >>> net.training  # untouched
        True
    """
    levels = validate_sparsities(sparsities)
    method_name = _validate_single_method(method)
    exclude = validate_exclude(exclude)
    _check_evaluation_arguments(model, dataloader, metrics, forward_fn)
    selected = select_parameters(model, params, exclude=exclude)
    evaluate = _Evaluator(dataloader, metrics, forward_fn, _resolve_device(model, device))

    touched = [p for _, p in selected] if method_name in MASK_METHODS else []
    with torch.no_grad():
        backups = [p.detach().clone() for p in touched]  # the one copy of the weights the mask methods write to
    with _model_preserved(model, list(zip(touched, backups, strict=True))):
        model.eval()
        if method_name == "structured":
            measured, values = _structured_curve(model, [n for n, _ in selected], levels, evaluate, forward_fn)
        else:
            measured, values = _mask_curve(model, method_name, touched, backups, levels, evaluate)

    names = list(values[0])
    return PruningCurve(
        method=method_name,
        requested=list(levels),
        sparsities=measured,
        metrics={name: [level_values[name] for level_values in values] for name in names},
    )


def check_prunable(
    model: nn.Module,
    method: str | Sequence[str],
    *,
    params: ParamSelector = "weights",
    exclude: Sequence[str] = (),
    example_input: Any = None,
    forward_fn: ForwardFn | None = None,
) -> None:
    """Fail early, before any evaluation, if ``model`` cannot be pruned with ``method``.

    Checks that ``params``/``exclude`` select at least one parameter, and for ``"structured"`` that the model can be
    deep-copied, that a selected parameter belongs to a Linear/Conv/LSTM layer and, given ``example_input``, that
    torch-pruning traces the model and the model still runs after channels are removed (a trial prune at 0.5 on a
    copy).

    Args:
        model: the model.
        method: a method name or a sequence of them.
        params: parameter selection, as in ``evaluate_pruning_curve``.
        exclude: glob patterns of names to leave out.
        example_input: for ``"structured"``: the model's input (or, with ``forward_fn``, a whole batch) used to trace.
            Without it the trace is not checked.
        forward_fn: ``forward_fn(model, batch) -> (preds, target)``, as in ``evaluate_pruning_curve``.

    Raises:
        ValueError: naming the argument, or the layer that cannot be traced with a suggested method.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> check_prunable(net, ["global", "structured"], example_input=torch.randn(2, 4))
        >>> check_prunable(net, "global", params="*.running_mean")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `params`='*.running_mean' (exclude=[]) selects no trainable parameter of Sequential. ...
    """
    methods = validate_method(method)
    exclude = validate_exclude(exclude)
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    selected = select_parameters(model, params, exclude=exclude)
    if "structured" not in methods:
        return
    names = [name for name, _ in selected]
    if example_input is None:
        _selected_root_layers(model, names)
        with _grad_mode():
            _traceable_copy(model)
        return
    with _model_preserved(model):
        plan = _StructuredPlan(model, names, example_input, forward_fn)
        plan.pruned_copy(model, 0.5)


# --------------------------------------------------------------------------------------------------------------------
# The epsilon point: the paper's measure of compressibility
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class EpsilonPoint:
    """The model pruned at the epsilon point of Wan et al. (2024), see ``evaluate_at_epsilon``.

    Attributes:
        epsilon: the budget, a share of each layer's squared Frobenius norm.
        ratios: parameter name -> pruned units / units of that parameter.
        ratio: pruned units summed / units summed over the parameters.
        metrics: metric name -> value of the model with exactly those units zeroed (no fine-tuning).

    Examples:
        >>> point = EpsilonPoint(0.1, {"hidden.weight": 0.5}, 0.5, {"accuracy": 0.9})
        >>> EpsilonPoint.from_dict(point.to_dict()) == point
        True
    """

    epsilon: float
    ratios: dict[str, float]
    ratio: float
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict with the fields ``epsilon``, ``ratios``, ``ratio``, ``metrics``."""
        return {
            "epsilon": float(self.epsilon),
            "ratios": {str(k): float(v) for k, v in self.ratios.items()},
            "ratio": float(self.ratio),
            "metrics": {str(k): float(v) for k, v in self.metrics.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpsilonPoint:
        """Rebuild a point from ``to_dict``'s output."""
        return cls(
            epsilon=float(data["epsilon"]),
            ratios={str(k): float(v) for k, v in data["ratios"].items()},
            ratio=float(data["ratio"]),
            metrics={str(k): float(v) for k, v in data["metrics"].items()},
        )


def validate_epsilon(epsilon: Any, argument: str = "epsilon") -> float:
    """Check an epsilon budget: a real number in [0, 1] (a share of the squared norm).

    Raises:
        ValueError: naming the argument and the value given.

    Examples:
        >>> validate_epsilon(0.1)
        0.1
        >>> validate_epsilon(2)
        Traceback (most recent call last):
        ...
        ValueError: `epsilon` must be a number in [0, 1] (a share of the squared norm), got 2
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0.0 <= float(epsilon) <= 1.0:
        raise ValueError(f"`{argument}` must be a number in [0, 1] (a share of the squared norm), got {epsilon!r}")
    return float(epsilon)


def _unit_squared_norms(weight: Tensor) -> Tensor:
    """Squared l2 norm of each unit (slice along dim 0; every entry of a 1-D tensor), in float64."""
    return weight.detach().reshape(weight.shape[0], -1).to(torch.float64).square().sum(dim=1)


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
    cumulative = _sort_ascending(_unit_squared_norms(weight)).cumsum(dim=0)
    budget = epsilon * cumulative[-1].item()
    return int((cumulative <= budget).sum().item()), int(cumulative.numel())


def _smallest_unit_ranks(weight: Tensor) -> Tensor:
    """Each unit's position in ascending order of squared norm (ties by index), shaped to broadcast on ``weight``."""
    order = torch.argsort(_unit_squared_norms(weight), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks.reshape(-1, *([1] * (weight.ndim - 1)))


def _evaluate_units_zeroed(model: nn.Module, selected: Sequence[tuple[str, Tensor]], counts: dict[str, int],
                           evaluate: _Evaluator) -> dict[str, float]:
    """Metrics of ``model`` with the ``counts[name]`` smallest units of each selected tensor zeroed; model restored."""
    with torch.no_grad():
        backups = [(param, param.detach().clone()) for _, param in selected]
    with _model_preserved(model, backups):
        model.eval()
        with torch.no_grad():
            for (name, param), (_, backup) in zip(selected, backups, strict=True):
                count = counts[name]
                # the ranks are unique, so exactly `count` units are zeroed, also when norms tie
                _apply_mask(param, backup, _smallest_unit_ranks(backup), float(count - 1) if count else None)
            return evaluate(model)


def _check_finite(selected: Sequence[tuple[str, Tensor]]) -> None:
    for name, param in selected:
        if not bool(torch.isfinite(param.detach()).all().item()):
            raise ValueError(f"Parameter {name!r} holds NaN or infinity: its units cannot be ranked by norm")


def evaluate_at_epsilon(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    epsilon: float = 0.1,
    metrics: Metric | MetricCollection | None = None,
    forward_fn: ForwardFn | None = None,
    params: ParamSelector = "paper",
    exclude: Sequence[str] = (),
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
        metrics: as in ``evaluate_pruning_curve`` (default: micro-averaged multiclass accuracy, key ``"accuracy"``).
        forward_fn: ``forward_fn(model, batch) -> (preds, target)`` for batches that are not ``(inputs, target)``.
        params: which parameters are pruned, as in ``select_parameters``; default ``"paper"``: the hidden weights,
            never the output layer (nor a first conv).
        exclude: glob patterns of parameter names to leave unpruned.
        device: where batches and metrics go; default: the device of the model's first parameter.

    Returns:
        ``EpsilonPoint`` with ``ratios[name]`` = pruned units / units of that parameter, ``ratio`` = pruned units
        summed / units summed (the definition of ``compressibility_report``'s ``fraction_prunable/total``) and the
        metrics of the pruned model.

    Raises:
        ValueError: on a bad argument (named in the message), an empty dataloader, nothing selected, or a selected
            parameter holding NaN or infinity.

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
    exclude = validate_exclude(exclude)
    _check_evaluation_arguments(model, dataloader, metrics, forward_fn)
    selected = select_parameters(model, params, exclude=exclude)
    _check_finite(selected)
    counted = {name: prunable_units(param, eps) for name, param in selected}
    evaluate = _Evaluator(dataloader, metrics, forward_fn, _resolve_device(model, device))
    values = _evaluate_units_zeroed(model, selected, {name: k for name, (k, _) in counted.items()}, evaluate)
    return EpsilonPoint(
        epsilon=eps,
        ratios={name: k / units for name, (k, units) in counted.items()},
        ratio=sum(k for k, _ in counted.values()) / sum(units for _, units in counted.values()),
        metrics=values,
    )


def evaluate_at_ratios(
    model: nn.Module,
    dataloader: Iterable[Any],
    ratios: Mapping[str, float],
    *,
    metrics: Metric | MetricCollection | None = None,
    forward_fn: ForwardFn | None = None,
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
        ratios: parameter name (as in ``model.named_parameters()``) -> share of its units to zero, in [0, 1].
        metrics: as in ``evaluate_pruning_curve``.
        forward_fn: as in ``evaluate_pruning_curve``.
        device: as in ``evaluate_pruning_curve``.

    Returns:
        Metric name -> value of the pruned model. The model is left bitwise as it was, as in
        ``evaluate_at_epsilon``.

    Raises:
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
    _check_evaluation_arguments(model, dataloader, metrics, forward_fn)
    if not isinstance(ratios, Mapping) or not ratios:
        raise ValueError(f"`ratios` must be a non-empty mapping of parameter names to shares in [0, 1], got {ratios!r}")
    named = dict(model.named_parameters())
    for name, ratio in ratios.items():
        if name not in named:
            raise ValueError(
                f"`ratios` names {name!r}, which is not a parameter of {type(model).__name__}; it has {sorted(named)!r}"
            )
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"`ratios[{name!r}]` must be a number in [0, 1] (a share of the units), got {ratio!r}")
    selected = [(name, named[name]) for name in ratios]
    _check_finite(selected)
    counts = {name: round(float(ratios[name]) * param.shape[0]) for name, param in selected}
    evaluate = _Evaluator(dataloader, metrics, forward_fn, _resolve_device(model, device))
    return _evaluate_units_zeroed(model, selected, counts, evaluate)
