"""Scoring one model state: the evaluation's forward, the checks on its output, the metrics over the data."""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from lightning_heavytail._compat import unsynced
from lightning_heavytail._distributed import every_rank, refused_elsewhere
from lightning_heavytail._tensors import all_finite
from lightning_heavytail.pruning.curve import DEFAULT_METRIC_KEY

ForwardFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor]]
"""``forward_fn(model, batch) -> (preds, target)``."""

OutputKey = str | int
"""``output_key``: a key of a dict output (``"logits"``) or an index of a tuple output."""

_END = object()  # the end of an iterator


def describe(value: Any) -> str:
    """A short description of a model output, for error messages."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)!r}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


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


def _pick_output(out: Any, output_key: OutputKey | None) -> Any:
    """The predictions in the model's output: the output itself, or its entry ``output_key``."""
    if output_key is None:
        if isinstance(out, (Mapping, tuple, list)):
            raise ValueError(
                f"The model returned {describe(out)} where the evaluation needs a tensor of predictions. Pass"
                " `output_key` to read one entry (output_key='logits' for a Hugging Face-style output, output_key=0"
                " for the first element of a tuple), or `forward_fn=lambda model, batch: (preds, target)`."
            )
        return out
    try:
        return out[output_key]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(
            f"`output_key`={output_key!r} cannot be read from the model's output, {describe(out)}; pass a key or"
            " index it has, or `forward_fn=lambda model, batch: (preds, target)`."
        ) from err


def make_forward(forward_fn: ForwardFn | None, output_key: OutputKey | None) -> ForwardFn:
    """The evaluation's ``(model, batch) -> (preds, target)``: ``forward_fn``, or the default one."""
    if forward_fn is not None:
        return forward_fn

    def forward(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, target = _split_batch(batch)
        return _pick_output(model(inputs), output_key), target

    return forward


def checked_outputs(out: Any) -> tuple[Tensor, Any]:
    """``(preds, target)`` from a forward, or a ValueError saying what came back instead."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"`forward_fn` must return (preds, target), got {describe(out)}")
    preds, target = out
    if not isinstance(preds, Tensor):
        raise ValueError(
            f"The predictions must be a tensor, got {describe(preds)}. Pass `output_key` to read one entry of the"
            " model's output, or return a tensor from `forward_fn`."
        )
    if preds.is_complex():
        raise ValueError(
            f"The predictions are complex ({preds.dtype}, shape {tuple(preds.shape)}); metrics need real scores."
            " Return real ones (e.g. their magnitude) from `forward_fn`."
        )
    return preds, target


def check_finite_predictions(preds: Tensor, where: str, pruned: bool) -> None:
    """Refuse to score NaN or infinite predictions: a metric of them would be a number that means nothing."""
    if not all_finite(preds):
        cause = (
            "pruning made them: a layer that divides by its weights' norm (a normalized or cosine layer) gives NaN"
            " when a unit is zeroed; leave it out with `exclude`" if pruned else "the unpruned model gives them"
        )
        raise ValueError(f"The model's predictions hold NaN or infinity ({where}); nothing is scored: {cause}.")


def check_default_metric_inputs(preds: Tensor, target: Any) -> None:
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
                         f" {describe(target)}")
    if target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"The default metric (multiclass accuracy) needs integer class labels as target, got {target.dtype}"
            f" targets of shape {tuple(target.shape)}, which it would score as accuracy 0. For regression pass a"
            " regression metric (metrics=torchmetrics.MeanSquaredError()); for class labels stored as floats,"
            " return them as integers from `forward_fn`."
        )


def metric_collection(metrics: Metric | MetricCollection | None, preds: Tensor,
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


def as_float(name: str, value: Any) -> float:
    """One metric value as a float, or a ValueError: a pruning curve needs one number per level."""
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


def metric_names(collection: MetricCollection, preds: Tensor, target: Any) -> list[str]:
    """Score one batch with a copy of the metrics (not synced across ranks): their names, or the error they raise."""
    trial = copy.deepcopy(collection)
    unsynced(trial.modules())  # one rank's trial: a sync here would wait for ranks that are not computing
    trial.reset()
    target_info = f"{tuple(target.shape)} {target.dtype}" if isinstance(target, Tensor) else describe(target)
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
        as_float(name, value)  # one number per level, or an error now rather than after an epoch
    return [str(name) for name in values]


class State(Protocol):
    """One model state scored over a pass: a level of a method, a pruned copy, the epsilon point."""

    where: str  # what is scored, for error messages
    pruned: bool  # whether anything is pruned (says where NaN predictions come from)

    def activate(self) -> nn.Module:
        """Make the state current (write its values, or pick its copy); return the module to run on the batch."""


class Scorer:
    """Runs model states over the data, in one pass, and returns each state's metrics as floats.

    The first batch is loaded once: ``example_batch`` keeps the loader's iterator open after it, and the next pass
    starts with that batch and goes on with the same iterator. ``score`` loads each batch once and scores every state
    on it, each into its own copy of the metrics.

    With ``sharded`` parameters (FSDP2) every forward is a collective (the shards are gathered), so the ranks keep in
    step: before each batch they agree (one all-reduce) whether any rank still has one, a rank out of batches reruns
    its last batch without scoring it, and predictions refused on one rank make every rank raise at that point.
    """

    def __init__(self, dataloader: Iterable[Any], forward: ForwardFn, device: torch.device,
                 sharded: bool = False) -> None:
        self.dataloader = dataloader
        self.forward = forward
        self.device = device
        self.sharded = sharded
        self.collection: MetricCollection | None = None  # set from the probe's output
        self._held: tuple[Any, Iterator[Any]] | None = None  # the first batch, and the iterator after it

    def example_batch(self) -> Any:
        """The first batch, on the evaluation device; the next pass starts with it rather than loading it again."""
        iterator = iter(self.dataloader)
        first = next(iterator, _END)
        if self.sharded and not every_rank([first is not _END], self.device)[0]:
            raise ValueError(
                "`dataloader` yielded no batch on some rank: with sharded parameters every rank runs every forward"
                " (the shards are gathered), so every rank needs at least one batch of the evaluation data"
            )
        if first is _END:
            raise ValueError("`dataloader` yielded no batch")
        moved = move_data_to_device(first, self.device)
        self._held = (moved, iterator)
        return moved

    def batches(self) -> Iterator[Any]:
        """The batches, each moved to the evaluation device as it is loaded."""
        held, self._held = self._held, None
        if held is not None:
            first, rest = held
            yield first
            for batch in rest:
                yield move_data_to_device(batch, self.device)
            return
        seen = False
        for batch in self.dataloader:
            seen = True
            yield move_data_to_device(batch, self.device)
        if not seen:
            raise ValueError("`dataloader` yielded no batch")

    def update(self, collection: MetricCollection, model: nn.Module, batch: Any, where: str, pruned: bool) -> None:
        """Score ``model`` on one batch into ``collection``; ``where`` and ``pruned`` say what is scored, for errors."""
        preds, target = checked_outputs(self.forward(model, batch))
        check_finite_predictions(preds, where, pruned)
        collection.update(preds, target)

    def _score_in_step(self, states: Sequence[State], collections: Sequence[MetricCollection]) -> None:
        """The pass under sharded parameters: every rank runs every state on as many batches as the rank with most."""
        batches = self.batches()
        last: Any = None
        failure: Exception | None = None  # a refusal on this rank, raised when the ranks next agree
        while True:
            batch = next(batches, _END)
            has_batch, failed = (batch is not _END), failure is not None
            none_has_batch, none_failed = every_rank([not has_batch, not failed], self.device)
            if not none_failed:
                raise failure or refused_elsewhere()
            if none_has_batch:
                return
            last = batch if has_batch else last
            for state, collection in zip(states, collections, strict=True):
                model = state.activate()
                out = self.forward(model, last)  # a collective: every rank runs it
                if not has_batch or failure is not None:
                    continue  # the forward keeps this rank in step; nothing is scored
                try:
                    preds, target = checked_outputs(out)
                    check_finite_predictions(preds, state.where, state.pruned)
                    collection.update(preds, target)
                except Exception as err:  # raised when the ranks next agree, so that none waits for this one
                    failure = err

    @staticmethod
    def compute(collection: MetricCollection) -> dict[str, float]:
        """The metrics a collection holds, as floats (under DDP ``compute`` syncs: every rank calls it)."""
        return {name: as_float(name, value) for name, value in collection.compute().items()}

    def score(self, states: Sequence[State]) -> list[dict[str, float]]:
        """The metrics of every state over the data, in one pass: each batch is loaded once and runs every state.

        Each state has its own copy of the metrics (the ones passed in are copied, never updated), reset first and
        computed at the end, in the order of ``states`` (the same order on every rank).
        """
        if self.collection is None:
            raise RuntimeError("Scorer used before its metrics were set")
        collections = [copy.deepcopy(self.collection) for _ in states]
        for collection in collections:
            collection.reset()
        if self.sharded:
            self._score_in_step(states, collections)
        else:
            for batch in self.batches():
                for state, collection in zip(states, collections, strict=True):
                    self.update(collection, state.activate(), batch, state.where, state.pruned)
        return [self.compute(collection) for collection in collections]
