"""Before anything is pruned: the evaluation's forward on the first batch, and what it tells.

The probe runs the forward once the way the evaluation runs it (eval mode, no grad, model and RNG left as they were)
and refuses an output that cannot be scored. While it runs, a ``TorchFunctionMode`` records which torch calls receive
which parameter: the default selection (``params=None``) is read from that record, so registration order, a frozen
output layer or a weight tied to an embedding do not mislead it.
"""

from __future__ import annotations

import copy
import fnmatch
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torchmetrics import Metric, MetricCollection

from lightning_heavytail._checks import (
    check_dataloader,
    check_exclude,
    check_metrics,
    check_model,
    resolve_device,
    validate_forward,
)
from lightning_heavytail._distributed import failing_together, finite_everywhere
from lightning_heavytail._tensors import all_finite
from lightning_heavytail.pruning._evaluator import model_preserved, rng_preserved
from lightning_heavytail.pruning._scoring import (
    ForwardFn,
    Scorer,
    check_default_metric_inputs,
    check_finite_predictions,
    checked_outputs,
    make_forward,
    metric_collection,
    metric_names,
)
from lightning_heavytail.pruning._targets import (
    Target,
    refuse_hook_reparametrizations,
    refuse_lazy,
    targets_named,
    tensor_view,
    view_names_by_id,
)
from lightning_heavytail.selection import ParamSelector, select_parameters, uninitialized_parameters
from lightning_heavytail.sharding import fsdp_modules, local_tensor, model_is_sharded, reshard


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
    returned, that call's number (to find when the predictions were made). Reading an attribute counts as a use only
    if it gives a tensor (``weight.T`` does; ``weight.dtype``, ``.device``, ``.requires_grad``, which FSDP2 reads
    around every forward, do not). A parameter used that it does not know yet (FSDP2 puts gathered parameters in
    place of the sharded ones for the forward) is looked up among the model's parameters as they are at that moment.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = view_names_by_id(model)
        self.strangers: set[int] = set()  # ids of parameters that are none of the model's
        self.calls = 0
        self.first: dict[str, int] = {}
        self.uses: dict[str, list[int]] = {}
        self.made: dict[int, tuple[weakref.ref[Tensor], int]] = {}  # id -> (the tensor, weakly; its call)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.calls += 1
        call = self.calls
        result = func(*args, **kwargs)  # the mode is off inside: no call is counted twice
        if isinstance(result, Tensor):
            self.made[id(result)] = (weakref.ref(result), call)
        if getattr(func, "__name__", "") == "__get__" and not isinstance(result, Tensor):
            return result  # metadata, not a use of the values
        for tensor in _tensors_in((args, kwargs)):
            if isinstance(tensor, nn.Parameter) and id(tensor) not in self.names and id(tensor) not in self.strangers:
                self.names.update(view_names_by_id(self.model))
                if id(tensor) not in self.names:
                    self.strangers.add(id(tensor))
            name = self.names.get(id(tensor))
            if name is not None:
                self.first.setdefault(name, call)
                self.uses.setdefault(name, []).append(call)
        return result

    def last_use(self, preds: Tensor) -> dict[str, int]:
        """For each tensor, the last call that used it before the predictions were made (all calls if unknown)."""
        ref, made_at = self.made.get(id(preds), (None, None))
        if ref is None or ref() is not preds or made_at is None:
            made_at = self.calls
        last = {name: max((c for c in calls if c <= made_at), default=0) for name, calls in self.uses.items()}
        return {name: call for name, call in last.items() if call > 0}


@dataclass
class Probe:
    """What one forward pass on one batch, run as the evaluation runs it, tells about the model."""

    preds: Tensor
    target: Any
    first_use: dict[str, int]  # tensor name (as in tensor_view) -> number of the first torch call that used it
    last_use: dict[str, int]  # ... the last call that used it up to the one that made the predictions
    collection: MetricCollection  # the metrics the evaluation updates, tried on these predictions
    metric_names: list[str]


def probe(model: nn.Module, batch: Any, forward: ForwardFn, metrics: Metric | MetricCollection | None,
          device: torch.device, sharded: bool = False) -> Probe:
    """Run the evaluation's forward on ``batch`` (eval mode, no grad) and refuse an output ``metrics`` cannot score.

    The model (parameters, buffers, modes) and the global RNGs are left as they were. With ``sharded`` parameters
    every rank runs it, and non-finite predictions on one rank make every rank raise.
    """
    recorder = _UseRecorder(model)
    with model_preserved(model), rng_preserved(device), torch.no_grad():
        model.eval()
        try:
            with recorder:
                out = forward(model, batch)
        finally:
            reshard(fsdp_modules(model))  # FSDP2 leaves the root's parameters gathered (and registered) otherwise
    with failing_together(device, sharded):  # under sharding every rank must stop here, not only this one
        preds, target = checked_outputs(out)
    finite = all_finite(preds)
    if not finite_everywhere([preds], device, sharded)[0]:
        named = list(tensor_view(model).named_parameters())
        parts = finite_everywhere([local_tensor(tensor) for _, tensor in named], device, sharded)
        for (name, _), ok in zip(named, parts, strict=True):
            if not ok:
                raise ValueError(
                    f"Parameter {name!r} holds NaN or infinity, and the model's predictions on the first batch are not"
                    " finite: nothing is scored."
                )
        if finite:  # another rank's predictions
            raise ValueError("The model's predictions on another rank's first batch hold NaN or infinity (see its"
                             " error); nothing is scored.")
    check_finite_predictions(preds, "the unpruned model, on the first batch", pruned=False)
    with failing_together(device, sharded):  # refused on this rank's batch: every rank stops here
        if metrics is None:
            check_default_metric_inputs(preds, target)
        collection = metric_collection(metrics, preds, device)
        names = metric_names(collection, preds, target)
    return Probe(preds, target, recorder.first, recorder.last_use(preds), collection, names)


def _default_selection(view: nn.Module, probe: Probe) -> tuple[list[str], dict[str, str]]:
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


def select_targets(model: nn.Module, params: ParamSelector | None, exclude: Sequence[str],
                   probe: Probe | None) -> tuple[list[Target], dict[str, str]]:
    """The tensors to prune, and the weights the default selection left out (with the reason)."""
    refuse_hook_reparametrizations(model)
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
            described = "; ".join(f"{name}: {why}" for name, why in left_out.items()) or "nothing"
            raise ValueError(
                f"`params`=None (the default) selects no trainable weight of {type(model).__name__}: it prunes the"
                f" weights the forward pass uses except the output layer and the first conv (left out: {described};"
                f" exclude={list(exclude)!r}). Pass params='weights' to prune the output layer too, or name the"
                " parameters with `params`."
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
    return targets_named(model, [name for name, _ in selected]), left_out


def check_common(model: Any, forward_fn: Any, output_key: Any, metrics: Any, exclude: Any) -> tuple[str, ...]:
    """The checks every evaluation entry point makes first; returns ``exclude`` as a tuple."""
    patterns = check_exclude(exclude)
    check_model(model)
    check_metrics(metrics)
    validate_forward(forward_fn, output_key)
    return patterns


@dataclass
class Run:
    """What every evaluation entry point sets up before pruning anything."""

    scorer: Scorer
    example: Any  # the first batch, on the device
    forward: ForwardFn
    probe: Probe
    exclude: tuple[str, ...]


def prepare(model: Any, dataloader: Any, metrics: Metric | MetricCollection | None, forward_fn: Any,
            output_key: Any, exclude: Any, device: Any) -> Run:
    """Check the common arguments, run the first batch once (refusing what cannot be scored), set up the metrics."""
    check_dataloader(dataloader)
    patterns = check_common(model, forward_fn, output_key, metrics, exclude)
    device_ = resolve_device(model, device)
    forward = make_forward(forward_fn, output_key)
    refuse_lazy(model)  # before any forward could materialize them
    sharded = model_is_sharded(model)
    scorer = Scorer(dataloader, forward, device_, sharded)
    example = scorer.example_batch()
    found = probe(model, example, forward, metrics, device_, sharded)
    scorer.collection = found.collection
    return Run(scorer, example, forward, found, patterns)


def materialized_copy(model: nn.Module, batch: Any, forward: ForwardFn, device: torch.device) -> nn.Module:
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
