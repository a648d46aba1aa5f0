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

What is pruned: ``params=None`` (the default) prunes the weights (tensors with 2+ dimensions) the forward pass uses
to compute the predictions, less the output layer (the last weight used before the predictions are made) and the first
conv (the first conv kernel used), for every method, as the paper does. Both are found by recording, on one forward
pass, which torch calls receive which parameter (a ``TorchFunctionMode``), so registration order, a frozen output
layer or a weight tied to an embedding do not mislead it. A parametrized tensor (``torch.nn.utils.parametrize``, e.g.
``parametrizations.weight_norm``) is pruned as the effective tensor the module computes, named like a plain one
(``0.weight``; see ``tensor_view``): the mask is a parametrization appended for the evaluation, and the originals (the
magnitude ``g`` and direction ``v`` of a weight norm) are never written.

What is checked first: the evaluation's forward runs once on the first batch, the way the evaluation runs it (eval
mode, no grad, model and RNG left as they were), and an output that cannot be scored is refused with an error saying
what came back and how to fix it: a dict or tuple (``output_key``, ``forward_fn``), ``(N, 1)`` scores or float targets
with the default accuracy (a binary or regression metric), complex predictions, a metric that fails on the output. NaN
or infinite predictions are refused there and at every level: they are never scored.

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
import fnmatch
import itertools
import math
import numbers
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torchmetrics import Metric, MetricCollection

from lightning_heavytail.selection import (
    ParamSelector,
    UninitializedParameterError,
    select_parameters,
    uninitialized_parameters,
    validate_exclude,
)

__all__ = [
    "MASK_METHODS",
    "PRUNING_METHODS",
    "EpsilonPoint",
    "PruningCheck",
    "PruningCurve",
    "check_prunable",
    "evaluate_at_epsilon",
    "evaluate_at_ratios",
    "evaluate_pruning_curve",
    "level_label",
    "prunable_units",
    "rng_preserved",
    "tensor_view",
    "validate_epsilon",
    "validate_forward",
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

OutputKey = str | int
"""``output_key``: a key of a dict output (``"logits"``) or an index of a tuple output."""


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
        params: the names of the tensors pruned (as in ``tensor_view``); empty in curves saved before it existed.

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
    params: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of the curve's fields (``PruningCurve.from_dict`` reads it back)."""
        return {
            "method": self.method,
            "requested": [float(s) for s in self.requested],
            "sparsities": [float(s) for s in self.sparsities],
            "metrics": {name: [float(v) for v in values] for name, values in self.metrics.items()},
            "params": [str(name) for name in self.params],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningCurve:
        """Rebuild a curve from ``to_dict``'s output."""
        return cls(
            method=str(data["method"]),
            requested=[float(s) for s in data["requested"]],
            sparsities=[float(s) for s in data["sparsities"]],
            metrics={str(k): [float(v) for v in vs] for k, vs in data["metrics"].items()},
            params=[str(name) for name in data.get("params", [])],
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


def _describe(value: Any) -> str:
    """A short description of a model output, for error messages."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)!r}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _pick_output(out: Any, output_key: OutputKey | None) -> Any:
    """The predictions in the model's output: the output itself, or its entry ``output_key``."""
    if output_key is None:
        if isinstance(out, (Mapping, tuple, list)):
            raise ValueError(
                f"The model returned {_describe(out)} where the evaluation needs a tensor of predictions. Pass"
                " `output_key` to read one entry (output_key='logits' for a Hugging Face-style output, output_key=0"
                " for the first element of a tuple), or `forward_fn=lambda model, batch: (preds, target)`."
            )
        return out
    try:
        return out[output_key]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(
            f"`output_key`={output_key!r} cannot be read from the model's output, {_describe(out)}; pass a key or"
            " index it has, or `forward_fn=lambda model, batch: (preds, target)`."
        ) from err


def _make_forward(forward_fn: ForwardFn | None, output_key: OutputKey | None) -> ForwardFn:
    """The evaluation's ``(model, batch) -> (preds, target)``: ``forward_fn``, or the default one."""
    if forward_fn is not None:
        return forward_fn

    def forward(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, target = _split_batch(batch)
        return _pick_output(model(inputs), output_key), target

    return forward


def _checked_outputs(out: Any) -> tuple[Tensor, Any]:
    """``(preds, target)`` from a forward, or a ValueError saying what came back instead."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"`forward_fn` must return (preds, target), got {_describe(out)}")
    preds, target = out
    if not isinstance(preds, Tensor):
        raise ValueError(
            f"The predictions must be a tensor, got {_describe(preds)}. Pass `output_key` to read one entry of the"
            " model's output, or return a tensor from `forward_fn`."
        )
    if preds.is_complex():
        raise ValueError(
            f"The predictions are complex ({preds.dtype}, shape {tuple(preds.shape)}); metrics need real scores."
            " Return real ones (e.g. their magnitude) from `forward_fn`."
        )
    return preds, target


def _check_finite(preds: Tensor, where: str, pruned: bool) -> None:
    """Refuse to score NaN or infinite predictions: a metric of them would be a number that means nothing."""
    if preds.is_floating_point() and not bool(torch.isfinite(preds).all()):
        cause = (
            "pruning made them: a layer that divides by its weights' norm (a normalized or cosine layer) gives NaN"
            " when a unit is zeroed; leave it out with `exclude`" if pruned else "the unpruned model gives them"
        )
        raise ValueError(f"The model's predictions hold NaN or infinity ({where}); nothing is scored: {cause}.")


def _check_default_metric_inputs(preds: Tensor, target: Any) -> None:
    """What the default metric (multiclass accuracy) cannot score, refused with the fix."""
    if preds.ndim < 2 or preds.shape[1] < 2:
        raise ValueError(
            "The default metric (multiclass accuracy) needs class scores of shape (N, C) with C >= 2, got preds"
            f" of shape {tuple(preds.shape)}. Pass `metrics` (a torchmetrics Metric or MetricCollection): for a"
            " single-logit binary classifier torchmetrics.classification.BinaryAccuracy(), for regression a"
            " regression metric such as torchmetrics.MeanSquaredError()."
        )
    if not isinstance(target, Tensor):
        raise ValueError(f"The default metric (multiclass accuracy) needs a tensor of class labels as target, got"
                         f" {_describe(target)}")
    if target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"The default metric (multiclass accuracy) needs integer class labels as target, got {target.dtype}"
            f" targets of shape {tuple(target.shape)}, which it would score as accuracy 0. For regression pass a"
            " regression metric (metrics=torchmetrics.MeanSquaredError()); for class labels stored as floats,"
            " return them as integers from `forward_fn`."
        )


def _metric_collection(metrics: Metric | MetricCollection | None, preds: Tensor,
                       device: torch.device) -> MetricCollection:
    """The collection the evaluation updates: the user's metric(s) themselves, or multiclass accuracy."""
    if isinstance(metrics, MetricCollection):
        collection = metrics
    elif isinstance(metrics, Metric):
        collection = MetricCollection(metrics)  # keyed by class name; the metric itself, not a copy
    else:
        from torchmetrics.classification import MulticlassAccuracy

        accuracy = MulticlassAccuracy(num_classes=int(preds.shape[1]), average="micro")
        collection = MetricCollection({DEFAULT_METRIC_KEY: accuracy})
    return collection.to(device)


def _metric_names(collection: MetricCollection, preds: Tensor, target: Any) -> list[str]:
    """Score one batch with a copy of the metrics (not synced across ranks): their names, or the error they raise."""
    trial = copy.deepcopy(collection)
    for metric in trial.modules():
        if isinstance(metric, Metric):
            metric._to_sync = False  # one rank's trial: a sync here would wait for ranks that are not computing
    trial.reset()
    target_info = f"{tuple(target.shape)} {target.dtype}" if isinstance(target, Tensor) else _describe(target)
    try:
        trial.update(preds, target)
        values = trial.compute()
    except Exception as err:
        raise ValueError(
            f"`metrics` cannot score the model's output: {type(err).__name__}: {err} (preds {tuple(preds.shape)}"
            f" {preds.dtype}, target {target_info}). Pass metrics that fit the task, or `forward_fn` to return"
            " (preds, target) in the form they expect."
        ) from err
    for name, value in values.items():
        _as_float(name, value)  # one number per level, or an error now rather than after an epoch
    return [str(name) for name in values]


class _Evaluator:
    """Runs the model over the data once per call and returns the metrics as floats."""

    def __init__(self, dataloader: Iterable[Any], forward: ForwardFn, device: torch.device) -> None:
        self.dataloader = dataloader
        self.forward = forward
        self.device = device
        self.collection: MetricCollection | None = None  # set from the probe's output

    def example_batch(self) -> Any:
        """The first batch, on the evaluation device."""
        for batch in self.dataloader:
            return move_data_to_device(batch, self.device)
        raise ValueError("`dataloader` yielded no batch")

    def __call__(self, model: nn.Module, where: str, pruned: bool) -> dict[str, float]:
        """The metrics of ``model`` over the data; ``where`` and ``pruned`` say what is scored, for errors."""
        if self.collection is None:
            raise RuntimeError("_Evaluator used before its metrics were set")
        self.collection.reset()
        seen = False
        for batch in self.dataloader:
            preds, target = _checked_outputs(self.forward(model, move_data_to_device(batch, self.device)))
            _check_finite(preds, where, pruned)
            self.collection.update(preds, target)
            seen = True
        if not seen:
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


def _tensors_in(value: Any) -> Iterator[Tensor]:
    """The tensors in a torch call's arguments (nested in tuples, lists and dicts, as an LSTM's flat weights are)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


class _UseRecorder(TorchFunctionMode):
    """Records, by identity, the order in which torch functions receive the model's parameters.

    Each call is numbered; for each tensor name the first and last call that used it, and for each tensor a call
    returned, that call's number (to find when the predictions were made).
    """

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.calls = 0
        self.first: dict[str, int] = {}
        self.uses: dict[str, list[int]] = {}
        self.made: dict[int, tuple[weakref.ref[Tensor], int]] = {}  # id -> (the tensor, weakly; its call)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.calls += 1
        for tensor in _tensors_in((args, kwargs)):
            name = self.names.get(id(tensor))
            if name is not None:
                self.first.setdefault(name, self.calls)
                self.uses.setdefault(name, []).append(self.calls)
        result = func(*args, **kwargs)
        if isinstance(result, Tensor):
            self.made[id(result)] = (weakref.ref(result), self.calls)
        return result

    def last_use(self, preds: Tensor) -> dict[str, int]:
        """For each tensor, the last call that used it before the predictions were made (all calls if unknown)."""
        ref, made_at = self.made.get(id(preds), (None, None))
        if ref is None or ref() is not preds or made_at is None:
            made_at = self.calls
        last = {name: max((c for c in calls if c <= made_at), default=0) for name, calls in self.uses.items()}
        return {name: call for name, call in last.items() if call > 0}


@dataclass
class _Probe:
    """What one forward pass on one batch, run as the evaluation runs it, tells about the model."""

    preds: Tensor
    target: Any
    first_use: dict[str, int]  # tensor name (as in tensor_view) -> number of the first torch call that used it
    last_use: dict[str, int]  # ... the last call that used it up to the one that made the predictions


def _probe(model: nn.Module, batch: Any, forward: ForwardFn, default_metric: bool, device: torch.device) -> _Probe:
    """Run the evaluation's forward on ``batch`` (eval mode, no grad) and refuse an output that cannot be scored.

    The model (parameters, buffers, modes) and the global RNGs are left as they were.
    """
    recorder = _UseRecorder(_view_names_by_id(model))
    with _model_preserved(model), rng_preserved(device), torch.no_grad():
        model.eval()
        with recorder:
            out = forward(model, batch)
    preds, target = _checked_outputs(out)
    if preds.is_floating_point() and not bool(torch.isfinite(preds).all()):
        for name, tensor in tensor_view(model).named_parameters():
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"Parameter {name!r} holds NaN or infinity, and the model's predictions on the first batch are not"
                    " finite: nothing is scored."
                )
    _check_finite(preds, "the unpruned model, on the first batch", pruned=False)
    if default_metric:
        _check_default_metric_inputs(preds, target)
    return _Probe(preds, target, recorder.first, recorder.last_use(preds))


@contextlib.contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Run with torch's global RNGs (the CPU's, and ``device``'s if it is a GPU) restored afterwards.

    Iterating a DataLoader draws a seed from torch's global generator; an evaluation inside training must not move
    the training's shuffles and dropout.
    """
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


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
# What is pruned: the tensors, and the default selection
# --------------------------------------------------------------------------------------------------------------------
def _parametrized_originals(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """Id of each parametrization original -> (name of the effective tensor, its module, its attribute)."""
    originals: dict[int, tuple[str, nn.Module, str]] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations:
            name = f"{module_name}.{attr}" if module_name else attr
            for original in _parametrizations(module, attr).parameters(recurse=False):
                originals[id(original)] = (name, module, attr)
    return originals


def _parametrizations(module: nn.Module, attr: str) -> parametrize.ParametrizationList:
    """The parametrizations of ``module.<attr>``, which hold its originals."""
    return cast(parametrize.ParametrizationList, module.parametrizations[attr])  # type: ignore[index]


def _view_names_by_id(model: nn.Module) -> dict[int, str]:
    """Id of each parameter of ``model`` -> the name of the tensor it is part of in ``tensor_view(model)``."""
    originals = _parametrized_originals(model)
    return {id(p): originals[id(p)][0] if id(p) in originals else name for name, p in model.named_parameters()}


def _refuse_hook_reparametrizations(model: nn.Module) -> None:
    """Refuse the deprecated hook-based weight_norm / spectral_norm.

    They recompute ``weight`` from other parameters at every forward: pruning those does not prune the weight used.
    """
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
                raise ValueError(
                    f"Layer {module_name!r} of {type(model).__name__} uses the deprecated torch.nn.utils.{kind}, which"
                    f" recomputes its weight from other parameters at every forward, so pruning them does not prune"
                    f" the weight. Use torch.nn.utils.parametrizations.{kind}, whose effective weight is pruned."
                )


def tensor_view(model: nn.Module) -> nn.Module:
    """A module whose parameters are the tensors pruning works on, under the names pruning uses.

    These are the parameters of ``model``, except that a parametrized tensor (``torch.nn.utils.parametrize``, e.g.
    ``torch.nn.utils.parametrizations.weight_norm``) appears once, as its effective value, under the name the module
    uses (``0.weight``, not ``0.parametrizations.weight.original0`` and ``original1``): the magnitude ``g`` of a weight
    norm is not a weight of its own. Plain parameters share storage with ``model``; effective tensors are computed
    now and detached. ``requires_grad`` follows the model's parameters. ``params`` selectors (``select_parameters``)
    and ``compressibility_report`` read the view like any module.

    Args:
        model: the model, only read.

    Returns:
        A module of the same class name holding the tensors, in the model's parameter order.

    Raises:
        UninitializedParameterError: if ``model`` has lazy parameters.

    Examples:
        >>> from torch import nn
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> net = nn.Sequential(weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 3))
        >>> [name for name, _ in net.named_parameters()]
        ['0.bias', '0.parametrizations.weight.original0', '0.parametrizations.weight.original1', '2.weight', '2.bias']
        >>> [(name, tuple(t.shape)) for name, t in tensor_view(net).named_parameters()]
        [('0.bias', (8,)), ('0.weight', (8, 4)), ('2.weight', (3, 8)), ('2.bias', (3,))]
    """
    lazy = uninitialized_parameters(model)
    if lazy:
        raise UninitializedParameterError(
            f"{type(model).__name__} has lazy parameters {lazy} with no shape yet: run one forward pass (or build the"
            " layers in configure_model) before pruning"
        )
    originals = _parametrized_originals(model)
    view: nn.Module = type(type(model).__name__, (nn.Module,), {})()  # the model's class name, for messages
    done: set[str] = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in originals:
                name, module, attr = originals[id(param)]
                if name in done:
                    continue
                trainable = any(p.requires_grad for p in _parametrizations(module, attr).parameters(recurse=False))
                tensor = nn.Parameter(getattr(module, attr).detach(), requires_grad=trainable)
            else:
                tensor = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
            done.add(name)
            *path, leaf = name.split(".")
            node = view
            for part in path:
                child = node._modules.get(part)
                if child is None:
                    child = nn.Module()
                    node.add_module(part, child)
                node = child
            node.register_parameter(leaf, tensor)
    return view


class _Target:
    """One tensor that is pruned.

    A parameter is masked in place; the effective tensor of a parametrized module is masked by a parametrization
    appended for the evaluation (its originals are never written).
    """

    def __init__(self, name: str, param: Tensor | None, module: nn.Module | None = None, attr: str = "") -> None:
        self.name = name
        self.param = param
        self.module = module
        self.attr = attr
        self.mask: _ZeroMask | None = None

    def current(self) -> Tensor:
        """The tensor as the forward pass sees it now."""
        if self.param is not None:
            return self.param
        return getattr(self.module, self.attr)  # type: ignore[no-any-return]

    def prune(self, backup: Tensor, score: Tensor, threshold: float | None) -> None:
        """Zero the entries whose ``score`` is at most ``threshold`` (``None``: nothing; NaN: everything)."""
        if self.param is not None:
            _apply_mask(self.param, backup, score, threshold)
        elif self.mask is not None:
            if threshold is None:
                self.mask.drop = None
            elif math.isnan(threshold):  # the k-th smallest is NaN (NaNs sort last): everything up to it is pruned
                self.mask.drop = torch.ones(backup.shape, dtype=torch.bool, device=backup.device)
            else:
                self.mask.drop = (score <= threshold).expand(backup.shape)


class _ZeroMask(nn.Module):
    """A parametrization that zeroes the entries ``drop`` marks (none while ``drop`` is None)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return x if self.drop is None else x.masked_fill(self.drop, 0)


@contextlib.contextmanager
def _masks_attached(targets: Sequence[_Target]) -> Iterator[None]:
    """Append a ``_ZeroMask`` to the parametrizations of each parametrized target; remove them all on exit."""
    attached: list[_Target] = []
    try:
        for target in targets:
            if target.param is None and target.module is not None:
                target.mask = _ZeroMask()
                parametrize.register_parametrization(target.module, target.attr, target.mask)
                attached.append(target)
        yield
    finally:
        for target in attached:
            plist = _parametrizations(target.module, target.attr)  # type: ignore[arg-type]
            if len(plist) and plist[-1] is target.mask:
                del plist[-1]
            target.mask = None


def _default_selection(view: nn.Module, probe: _Probe) -> tuple[list[str], dict[str, str]]:
    """The weights the forward pass uses, less the output layer and the first conv: (names, {left out: why})."""
    weights = [name for name, t in view.named_parameters() if t.ndim >= 2]
    order = {name: i for i, name in enumerate(weights)}
    unused = "not used to compute the predictions"
    left_out: dict[str, str] = {name: unused for name in weights if name not in probe.last_use}
    used = [name for name in weights if name in probe.last_use]
    if used:
        output = max(used, key=lambda n: (probe.last_use[n], order[n]))
        left_out[output] = "the output layer: the last weight the forward pass uses"
        shapes = dict(view.named_parameters())
        convs = [name for name in used if shapes[name].ndim > 2 and name != output]
        if convs:
            first_conv = min(convs, key=lambda n: (probe.first_use[n], order[n]))
            left_out[first_conv] = "the first conv: the first conv kernel the forward pass uses"
    return [name for name in used if name not in left_out], left_out


def _describe_left_out(left_out: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in left_out.items()) or "nothing"


def _select_targets(model: nn.Module, params: ParamSelector | None, exclude: Sequence[str],
                    probe: _Probe | None) -> tuple[list[_Target], dict[str, str]]:
    """The tensors to prune, and the weights the default selection left out (with the reason)."""
    _refuse_hook_reparametrizations(model)
    view = tensor_view(model)
    left_out: dict[str, str] = {}
    if params is None:
        if probe is None:
            raise ValueError(
                "The default `params=None` finds the output layer and the first conv by running the model: pass a"
                " batch (or name the parameters to prune with `params`)"
            )
        chosen, left_out = _default_selection(view, probe)
        chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, pat) for pat in exclude)]
        trainable = dict(view.named_parameters())
        if not any(trainable[n].requires_grad for n in chosen):
            raise ValueError(
                f"`params`=None (the default) selects no trainable weight of {type(model).__name__}: it prunes the"
                f" weights the forward pass uses except the output layer and the first conv (left out:"
                f" {_describe_left_out(left_out)}; exclude={list(exclude)!r}). Pass params='weights' to prune the"
                " output layer too, or name the parameters with `params`."
            )
        selector: ParamSelector = lambda name, _: name in chosen  # noqa: E731
        selected = select_parameters(view, selector, exclude=exclude)
    else:
        selected = select_parameters(view, params, exclude=exclude)
    complex_names = [name for name, t in selected if t.is_complex()]
    if complex_names:
        raise ValueError(
            f"`params` selects complex tensors {complex_names} of {type(model).__name__}; magnitude pruning is defined"
            " here for real weights only. Leave them out with `exclude`."
        )
    return _targets(model, [name for name, _ in selected]), left_out


def _targets(model: nn.Module, names: Sequence[str]) -> list[_Target]:
    """The tensors of ``model`` named as in ``tensor_view``, as targets to prune."""
    originals = _parametrized_originals(model)
    effective = {name: (module, attr) for name, module, attr in originals.values()}
    real = dict(model.named_parameters())
    return [_Target(name, None, *effective[name]) if name in effective else _Target(name, real[name]) for name in names]


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


def _mask_curve(model: nn.Module, method: str, targets: Sequence[_Target], backups: Sequence[Tensor],
                levels: Sequence[float], evaluate: _Evaluator) -> tuple[list[float], list[dict[str, float]]]:
    """Mask, evaluate, repeat; the caller restores the parameters from ``backups`` afterwards."""
    unit_scores = [_unit_norms(b) for b in backups] if method == "neuron" else None
    thresholds = _mask_thresholds(method, backups, levels, unit_scores)
    dtype = _score_dtype(backups)
    total = sum(b.numel() for b in backups)
    measured: list[float] = []
    values: list[dict[str, float]] = []
    with torch.no_grad(), _masks_attached(targets):
        for level, level_thresholds in zip(levels, thresholds, strict=True):
            for i, (target, backup, threshold) in enumerate(zip(targets, backups, level_thresholds, strict=True)):
                if unit_scores is not None:
                    score = unit_scores[i]
                elif method == "global":
                    score = _magnitudes(backup, dtype)  # compare in the dtype the threshold was ranked in
                else:
                    score = backup.abs()
                target.prune(backup, score, threshold)
            zeros = sum(int((t.current() == 0).sum().item()) for t in targets)
            measured.append(zeros / total)
            values.append(evaluate(model, f"method={method!r} at sparsity {level}", level > 0.0))
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

    def __init__(self, model: nn.Module, selected_names: Sequence[str], example: Any, forward: ForwardFn) -> None:
        import torch_pruning as tp

        self.example = example  # one whole batch: torch-pruning traces the evaluation's own forward on it
        self.trace_forward: Callable[[nn.Module, Any], Any] = lambda m, batch: forward(m, batch)[0]
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


def _structured_curve(model: nn.Module, targets: Sequence[_Target], levels: Sequence[float], evaluate: _Evaluator,
                      example: Any, forward: ForwardFn) -> tuple[list[float], list[dict[str, float]]]:
    plan = _structured_plan(model, targets, example, forward)
    total = _parameter_count(model)
    measured: list[float] = []
    values: list[dict[str, float]] = []
    for level in levels:
        clone = plan.pruned_copy(model, level) if level > 0.0 else model  # the caller put `model` in eval mode
        measured.append(1.0 - _parameter_count(clone) / total)
        with torch.no_grad():
            values.append(evaluate(clone, f"method='structured' at sparsity {level}", level > 0.0))
        del clone
    return measured, values


def _structured_plan(model: nn.Module, targets: Sequence[_Target], example: Any, forward: ForwardFn) -> _StructuredPlan:
    parametrized = [target.name for target in targets if target.param is None]
    if parametrized:
        raise ValueError(
            f"method='structured' removes channels with torch-pruning, which does not follow parametrizations, and"
            f" {parametrized} of {type(model).__name__} are parametrized. Use method='neuron' (it prunes their"
            " effective weights), or leave them out with `exclude`."
        )
    return _StructuredPlan(model, [target.name for target in targets], example, forward)


# --------------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------------
def _validate_common(model: Any, forward_fn: Any, output_key: Any, metrics: Any, exclude: Any) -> tuple[str, ...]:
    """Checks shared by ``evaluate_pruning_curve`` and ``check_prunable``; returns ``exclude`` as a tuple."""
    patterns = validate_exclude(exclude)
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if metrics is not None and not isinstance(metrics, (Metric, MetricCollection)):
        raise ValueError(
            f"`metrics` must be None, a torchmetrics Metric or a MetricCollection, got {type(metrics).__name__}"
        )
    validate_forward(forward_fn, output_key)
    return patterns


@dataclass
class _Run:
    """What every evaluation entry point sets up before pruning anything."""

    evaluate: _Evaluator
    example: Any  # the first batch, on the device
    forward: ForwardFn
    probe: _Probe
    exclude: tuple[str, ...]


def _prepare_evaluation(model: Any, dataloader: Any, metrics: Any, forward_fn: Any, output_key: Any, exclude: Any,
                        device: Any) -> _Run:
    """Check the common arguments, run the first batch once (refusing what cannot be scored), set up the metrics."""
    if isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable):
        raise ValueError(f"`dataloader` must be an iterable of batches, got {type(dataloader).__name__}")
    patterns = _validate_common(model, forward_fn, output_key, metrics, exclude)
    device_ = _resolve_device(model, device)
    forward = _make_forward(forward_fn, output_key)
    tensor_view(model)  # lazy parameters: refused before any forward could materialize them
    evaluate = _Evaluator(dataloader, forward, device_)
    example = evaluate.example_batch()
    probe = _probe(model, example, forward, metrics is None, device_)
    evaluate.collection = _metric_collection(metrics, probe.preds, device_)
    _metric_names(evaluate.collection, probe.preds, probe.target)
    return _Run(evaluate, example, forward, probe, patterns)


def validate_forward(forward_fn: Any, output_key: Any) -> None:
    """Check ``forward_fn`` (None or a callable) and ``output_key`` (None, a dict key or a tuple index), not both.

    Raises:
        TypeError: for a ``forward_fn`` that is not callable, an ``output_key`` that is not a str or an int.
        ValueError: for an empty ``output_key``, or both given.

    Examples:
        >>> validate_forward(None, "logits")
        >>> validate_forward(None, 1.5)
        Traceback (most recent call last):
        ...
        TypeError: `output_key` must be None, a key (str) or an index (int) of the model's output, got float: 1.5
    """
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(
            f"`forward_fn` must be None or a callable (model, batch) -> (preds, target), got {forward_fn!r}"
        )
    if output_key is None:
        return
    if isinstance(output_key, bool) or not isinstance(output_key, (str, int)):
        raise TypeError(
            f"`output_key` must be None, a key (str) or an index (int) of the model's output, got"
            f" {type(output_key).__name__}: {output_key!r}"
        )
    if output_key == "":
        raise ValueError("`output_key` must not be empty")
    if forward_fn is not None:
        raise ValueError(
            f"Pass `forward_fn` or `output_key`, not both: `forward_fn` returns the predictions itself (got"
            f" output_key={output_key!r})"
        )


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
    be scored is refused there (see the module docstring); the same batch tells which weights the forward pass uses,
    for the default selection.

    Args:
        model: any ``nn.Module`` (a LightningModule works too).
        dataloader: any iterable of batches, iterated once per level (and once for its first batch).
        sparsities: strictly increasing levels in [0, 1).
        method: one of ``PRUNING_METHODS``, see the module docstring.
        metrics: a torchmetrics ``Metric`` (key: its class name) or ``MetricCollection`` (its keys). Reset before each
            level; ``compute()`` is called on every process, so under DDP each rank passes its own shard and gets the
            synced value. ``None``: micro-averaged multiclass accuracy with the number of classes read from the
            model's output width, key ``"accuracy"``.
        forward_fn: ``forward_fn(model, batch) -> (preds, target)`` for batches that are not ``(inputs, target)``.
        output_key: read the predictions from the model's output ``model(inputs)[output_key]`` (a dict key such as
            ``"logits"``, or a tuple index); only without ``forward_fn``.
        params: which tensors to prune, as in ``select_parameters`` (read on ``tensor_view(model)``). ``None`` (the
            default): the weights the forward pass uses, less the output layer and the first conv, see the module
            docstring. ``"weights"`` prunes the output layer too.
        exclude: glob patterns of tensor names to leave unpruned.
        device: where batches and metrics go; default: the device of the model's first parameter. The model is not
            moved.

    Returns:
        The curve; ``curve.sparsities`` are measured, ``curve.requested`` are the levels asked for, ``curve.params``
        the tensors pruned.

    Raises:
        ValueError: on a bad argument (named in the message), an empty dataloader, an output that cannot be scored
            (the message says what came back and how to fix it), no prunable parameter, predictions that turn NaN,
            or (for ``"structured"``) a model torch-pruning cannot trace; the message names the layer and suggests
            ``method="neuron"``.

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
    method_name = _validate_single_method(method)
    run = _prepare_evaluation(model, dataloader, metrics, forward_fn, output_key, exclude, device)
    targets, _ = _select_targets(model, params, run.exclude, run.probe)
    evaluate, example, forward = run.evaluate, run.example, run.forward

    masked = targets if method_name in MASK_METHODS else []
    with torch.no_grad():
        backups = [t.current().detach().clone() for t in masked]  # the one copy of what the mask methods change
    touched = [(t.param, b) for t, b in zip(masked, backups, strict=True) if t.param is not None]
    with _model_preserved(model, touched):
        model.eval()
        if method_name == "structured":
            measured, values = _structured_curve(model, targets, levels, evaluate, example, forward)
        else:
            measured, values = _mask_curve(model, method_name, targets, backups, levels, evaluate)

    names = list(values[0])
    return PruningCurve(
        method=method_name,
        requested=list(levels),
        sparsities=measured,
        metrics={name: [level_values[name] for level_values in values] for name in names},
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
    default selection is worked out. Then ``params``/``exclude`` must select at least one tensor, and for
    ``"structured"`` the model must be deep-copyable, a selected tensor must belong to a Linear/Conv/LSTM layer and,
    given ``batch``, torch-pruning must trace the model and the model must still run after channels are removed (a
    trial prune at 0.5 on a copy). A model with lazy parameters is checked on a copy materialized by that forward.

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
        ValueError: naming the argument, saying what the model returned and how to fix it, or naming the layer that
            cannot be traced with a suggested method.

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
    exclude = _validate_common(model, forward_fn, output_key, metrics, exclude)
    forward = _make_forward(forward_fn, output_key)
    probe: _Probe | None = None
    names: list[str] = []
    if batch is not None:
        device = _resolve_device(model, None)
        batch = move_data_to_device(batch, device)
        if uninitialized_parameters(model):
            model = _materialized_copy(model, batch, forward, device)
        probe = _probe(model, batch, forward, metrics is None, device)
        names = _metric_names(_metric_collection(metrics, probe.preds, device), probe.preds, probe.target)
    targets, left_out = _select_targets(model, params, exclude, probe)
    if "structured" in methods:
        if batch is None:
            _selected_root_layers(model, [t.name for t in targets])
            with _grad_mode():
                _traceable_copy(model)
        else:
            with _model_preserved(model):
                _structured_plan(model, targets, batch, forward).pruned_copy(model, 0.5)
    return PruningCheck(params=[t.name for t in targets], left_out=left_out, metrics=names)


def _materialized_copy(model: nn.Module, batch: Any, forward: ForwardFn, device: torch.device) -> nn.Module:
    """A copy of a model with lazy parameters, materialized by one forward (the model itself is not run)."""
    try:
        clone = copy.deepcopy(model)
    except Exception as err:
        raise ValueError(
            f"{type(model).__name__} has lazy parameters {uninitialized_parameters(model)}, and checking it before"
            f" its first forward needs a copy, which failed ({err}). Build the layers in configure_model."
        ) from err
    with rng_preserved(device), torch.no_grad():
        clone.eval()
        forward(clone, batch)
    return clone


def level_label(level: float) -> str:
    """The label of a sparsity level in logged names and report keys: two decimals, more where the level has them.

    The shortest decimal that reads back as exactly ``level``, padded to at least two decimals, so two different
    levels never share a label, and a level has the same label wherever it appears.

    Examples:
        >>> [level_label(s) for s in (0.0, 0.5, 0.9, 0.99, 0.995, 0.999, 1e-05)]
        ['0.00', '0.50', '0.90', '0.99', '0.995', '0.999', '0.00001']
    """
    text = np.format_float_positional(float(level), trim="-", unique=True)
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


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


def _evaluate_units_zeroed(model: nn.Module, targets: Sequence[_Target], counts: dict[str, int],
                           evaluate: _Evaluator, where: str) -> dict[str, float]:
    """Metrics of ``model`` with the ``counts[name]`` smallest units of each target zeroed; model restored."""
    with torch.no_grad():
        backups = [t.current().detach().clone() for t in targets]
    touched = [(t.param, b) for t, b in zip(targets, backups, strict=True) if t.param is not None]
    with _model_preserved(model, touched):
        model.eval()
        with torch.no_grad(), _masks_attached(targets):
            for target, backup in zip(targets, backups, strict=True):
                count = counts[target.name]
                # the ranks are unique, so exactly `count` units are zeroed, also when norms tie
                target.prune(backup, _smallest_unit_ranks(backup), float(count - 1) if count else None)
            return evaluate(model, where, any(counts.values()))


def _check_finite_weights(targets: Sequence[_Target]) -> None:
    for target in targets:
        if not bool(torch.isfinite(target.current().detach()).all().item()):
            raise ValueError(f"Parameter {target.name!r} holds NaN or infinity: its units cannot be ranked by norm")


def evaluate_at_epsilon(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    epsilon: float = 0.1,
    metrics: Metric | MetricCollection | None = None,
    forward_fn: ForwardFn | None = None,
    output_key: OutputKey | None = None,
    params: ParamSelector | None = None,
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
        output_key: as in ``evaluate_pruning_curve``.
        params: which tensors are pruned, as in ``evaluate_pruning_curve``; default ``None``: the weights the forward
            pass uses, never the output layer (nor the first conv). A parametrized weight is pruned as its effective
            weight.
        exclude: glob patterns of parameter names to leave unpruned.
        device: where batches and metrics go; default: the device of the model's first parameter.

    Returns:
        ``EpsilonPoint`` with ``ratios[name]`` = pruned units / units of that parameter, ``ratio`` = pruned units
        summed / units summed (the definition of ``compressibility_report``'s ``fraction_prunable/total``) and the
        metrics of the pruned model.

    Raises:
        ValueError: on a bad argument (named in the message), an empty dataloader, an output that cannot be scored
            (as in ``evaluate_pruning_curve``), nothing selected, or a selected parameter holding NaN or infinity.

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
    run = _prepare_evaluation(model, dataloader, metrics, forward_fn, output_key, exclude, device)
    targets, _ = _select_targets(model, params, run.exclude, run.probe)
    _check_finite_weights(targets)
    counted = {t.name: prunable_units(t.current(), eps) for t in targets}
    counts = {name: k for name, (k, _) in counted.items()}
    values = _evaluate_units_zeroed(model, targets, counts, run.evaluate, f"the epsilon point (epsilon={eps})")
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
    if not isinstance(ratios, Mapping) or not ratios:
        raise ValueError(f"`ratios` must be a non-empty mapping of parameter names to shares in [0, 1], got {ratios!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    named = dict(tensor_view(model).named_parameters())
    for name, ratio in ratios.items():
        if name not in named:
            raise ValueError(
                f"`ratios` names {name!r}, which is not a parameter of {type(model).__name__}; it has {sorted(named)!r}"
            )
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"`ratios[{name!r}]` must be a number in [0, 1] (a share of the units), got {ratio!r}")
    run = _prepare_evaluation(model, dataloader, metrics, forward_fn, output_key, (), device)
    targets = _targets(model, list(ratios))
    _check_finite_weights(targets)
    counts = {t.name: round(float(ratios[t.name]) * t.current().shape[0]) for t in targets}
    return _evaluate_units_zeroed(model, targets, counts, run.evaluate, "the given ratios")
