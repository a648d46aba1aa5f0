"""The ``"structured"`` method: channels physically removed from deep copies of the model with torch-pruning.

torch-pruning's ``BasePruner`` (group l2 magnitude, the same channel ratio in each selected layer) works on a copy at
each level; channels that reach the model's output are never removed. The ratio counts channels, so the measured
sparsity is the fraction of all model parameters removed. torch-pruning is an optional dependency (extra
``structured``), imported here only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_heavytail._extras import import_optional
from lightning_heavytail.pruning._evaluator import CurveState, CurveTask, LevelWriter, model_preserved
from lightning_heavytail.pruning._scoring import ForwardFn
from lightning_heavytail.pruning._targets import Target
from lightning_heavytail.sharding import is_sharded

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LSTM)
"""Layers whose output channels torch-pruning removes (its default root module types)."""
_NEEDED_FOR = "method='structured'"


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
    return clone.requires_grad_(True).eval()


def _output_shapes(out: Any) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    apply_to_collection(out, Tensor, lambda t: shapes.append(tuple(t.shape)))
    return shapes


def _as_grad_tensors(batch: Any) -> Any:
    # Tensors made under inference_mode cannot be saved for backward; tracing needs ordinary tensors.
    return apply_to_collection(batch, Tensor, lambda t: t.clone() if t.is_inference() else t)


def _channels_reach_output(node: Any) -> bool:
    """Whether a layer's output channels reach the model's output without passing through another root layer."""
    ops = import_optional("torch_pruning.ops", "structured", _NEEDED_FOR)
    stack, seen = list(node.outputs), set()
    if not stack:
        return True
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.type == ops.OPTYPE.OUTPUT or not current.outputs:
            if not isinstance(current.module, ROOT_TYPES):
                return True
            continue
        if isinstance(current.module, ROOT_TYPES):
            continue  # consumes the channels as its inputs
        stack.extend(current.outputs)
    return False


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
        if not isinstance(module, ROOT_TYPES):
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


class _StructuredPlan:
    """What to prune and what to keep, worked out once per call by tracing one copy of the model."""

    def __init__(self, model: nn.Module, selected_names: Sequence[str], example: Any, forward: ForwardFn) -> None:
        tp = import_optional("torch_pruning", "structured", _NEEDED_FOR)
        self.example = example  # one whole batch: torch-pruning traces the evaluation's own forward on it
        self.trace_forward: Callable[[nn.Module, Any], Any] = lambda m, batch: forward(m, batch)[0]
        self.model_name = type(model).__name__
        root_names = _selected_root_layers(model, selected_names)
        all_roots = [name for name, module in model.named_modules() if isinstance(module, ROOT_TYPES)]
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
        tp = import_optional("torch_pruning", "structured", _NEEDED_FOR)
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
                    root_module_types=list(ROOT_TYPES),
                    forward_fn=self.trace_forward,
                )
                pruner.step()
            except Exception as err:
                raise ValueError(
                    f"torch-pruning failed to remove channels from {self.model_name}: {type(err).__name__}: {err}."
                    " Use method='neuron' (zeroes units without changing shapes)."
                ) from err
        clone.requires_grad_(False)
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


def refuse_sharded(model: nn.Module) -> None:
    """Refuse a model whose parameters are sharded, naming the methods that work there."""
    sharded = [name for name, p in model.named_parameters() if is_sharded(p)]
    if sharded:
        raise ValueError(
            f"method='structured' removes channels from copies of the model, and {type(model).__name__} has sharded"
            f" parameters ({sharded[:3]}{' ...' if len(sharded) > 3 else ''}: FSDP2 or tensor parallelism), whose"
            " shapes cannot change. Use a mask method, 'global', 'layerwise' or 'neuron' ('neuron' zeroes whole units,"
            " the structured pruning of the paper), which prune sharded weights shard by shard."
        )


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _plan(model: nn.Module, targets: Sequence[Target], example: Any, forward: ForwardFn) -> _StructuredPlan:
    parametrized = [target.name for target in targets if target.param is None]
    if parametrized:
        raise ValueError(
            f"method='structured' removes channels with torch-pruning, which does not follow parametrizations, and"
            f" {parametrized} of {type(model).__name__} are parametrized. Use method='neuron' (it prunes their"
            " effective weights), or leave them out with `exclude`."
        )
    return _StructuredPlan(model, [target.name for target in targets], example, forward)


class StructuredMethod:
    """The registry entry of ``"structured"``: evaluates pruned copies, never writes the model."""

    in_place = False
    zeroes_entries = False
    extra: str | None = "structured"

    def check(self, model: nn.Module, targets: Sequence[Target], batch: Any, forward: ForwardFn) -> None:
        """Fail early: a deep copy, selected Linear/Conv/LSTM layers; with a batch, a trace and a trial prune at 0.5.

        Sharded parameters (DTensors: FSDP2, tensor parallelism) are refused: removing channels changes the shapes
        that the shards are cut from.
        """
        refuse_sharded(model)
        if batch is None:
            _selected_root_layers(model, [t.name for t in targets])
            with _grad_mode():
                _traceable_copy(model)
        else:
            with model_preserved(model):
                _plan(model, targets, batch, forward).pruned_copy(model, 0.5)

    def states(self, task: CurveTask, writer: LevelWriter) -> Sequence[CurveState]:
        """One pruned copy per level above 0, all built now (the model itself at 0), scored in the same pass.

        Held at once: every level's copy; a copy at level ``s`` has about ``1 - s`` of the parameters of the layers
        it prunes (see ``docs/pruning.md`` for what this costs against one copy at a time).
        """
        model = task.model
        refuse_sharded(model)
        plan = _plan(model, task.targets, task.example, task.forward)
        total = _parameter_count(model)
        states: list[CurveState] = []
        for level in task.levels:
            if level > 0.0:
                clone = plan.pruned_copy(model, level)
                states.append(_CopyState(clone, 1.0 - _parameter_count(clone) / total, task.where(level), None))
            else:  # the model itself, unpruned: the in-place methods of the same pass may have written it
                states.append(_CopyState(model, 0.0, task.where(level), writer.restore))
        return states


class _CopyState:
    """A model state that is a module of its own (a pruned copy), or the unpruned model once ``restore`` ran."""

    def __init__(self, module: nn.Module, sparsity: float, where: str, restore: Callable[[], None] | None) -> None:
        self.module, self.where, self.restore = module, where, restore
        self.sparsity: float | None = sparsity
        self.pruned = restore is None

    def activate(self) -> nn.Module:
        if self.restore is not None:
            self.restore()
        return self.module
