"""The evaluator: writes the selected tensors' values level by level, and always leaves the model as it was.

A method's rule computes, once per evaluation, what every selected tensor holds at every level (a ``LevelPlan``: for
the mask methods one sort of the scores and a threshold per level and tensor). ``levels_applied`` backs the tensors up
once, puts the model in eval mode, and yields a ``LevelWriter`` that writes any level's values in place (a parameter
itself; the effective tensor of a parametrized layer through an appended ``Override``); on exit, also on an error,
every parameter, buffer, train/eval flag, ``requires_grad`` and parametrization is restored bitwise.

``scored_in_one_pass`` evaluates a whole curve, or several (every method of ``PruneEvalCallback`` and its epsilon
point), in one pass over the data: every level of every plan is a ``State``, and each batch, loaded once, runs every
state in turn (the writer writing that state's level first). What it holds at once: one backup of the selected
tensors (plus one copy per parametrized tensor), the plans (see ``methods``), and one copy of the metrics per state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_heavytail._distributed import Layout
from lightning_heavytail.pruning._scoring import ForwardFn, Scorer, State
from lightning_heavytail.pruning._targets import Target, overrides_attached
from lightning_heavytail.sharding import fsdp_modules, reshard


class LevelPlan(Protocol):
    """What a rule computed once for the selected tensors: their values at each level."""

    def write(self, level: int, index: int, backup: Tensor, out: Tensor, held: int | None) -> None:
        """Write tensor ``index``'s value at level number ``level`` into ``out``; ``backup`` is its unpruned value.

        ``out`` holds this plan's level number ``held`` now (None: anything else), so a plan may write only what
        differs.
        """

    def sparsity(self, level: int, written: Sequence[Tensor]) -> float:
        """The measured sparsity at level number ``level``, given the values ``written`` there."""


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
def model_preserved(model: nn.Module) -> Iterator[None]:
    """Snapshot what a forward may change besides the parameters, and put it back on exit, also on an exception.

    Buffers (a forward may update some even in eval mode) are restored bitwise. Train/eval flags are restored per
    submodule, not through ``.train()``, which modules may override; ``requires_grad`` per parameter.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    with torch.no_grad():
        backups = [(buf, buf.detach().clone()) for buf in model.buffers()]
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


class LevelWriter:
    """Writes the values of a level into the selected tensors (see ``levels_applied``).

    It remembers what the tensors hold, so a state that is already written is not written again (one level alone
    is written once per pass, not once per batch). ``backups`` are the local parts of the tensors (all of a tensor
    unless it is sharded), ``layout`` where they sit in the whole tensors. After every write the FSDP2 modules are
    resharded, so that the next forward gathers the written shards: FSDP2 keeps the root's parameters gathered after
    a forward, and would not see a write into its shards.
    """

    def __init__(self, targets: Sequence[Target], backups: Sequence[Tensor], layout: Layout,
                 fsdp: Sequence[nn.Module] = ()) -> None:
        self.targets = targets
        self.backups = backups
        self.layout = layout
        self.fsdp = fsdp
        self._holds: tuple[int, int] | None = None  # (id of the plan, level) written last; None: the backups

    def write(self, plan: LevelPlan, level: int) -> list[Tensor]:
        """Write level number ``level`` of ``plan`` into every target; return the tensors written."""
        written = [target.writable() for target in self.targets]
        if self._holds != (id(plan), level):
            held = self._holds[1] if self._holds is not None and self._holds[0] == id(plan) else None
            for index, (out, backup) in enumerate(zip(written, self.backups, strict=True)):
                plan.write(level, index, backup, out, held)
            self._holds = (id(plan), level)
            reshard(self.fsdp)
        return written

    def apply(self, plan: LevelPlan, level: int) -> float:
        """Write level number ``level`` of ``plan`` into every target; return the level's measured sparsity."""
        return plan.sparsity(level, self.write(plan, level))

    def restore(self) -> None:
        """Put the unpruned values back."""
        if self._holds is None:
            return
        for target, backup in zip(self.targets, self.backups, strict=True):
            target.writable().copy_(backup)
        self._holds = None
        reshard(self.fsdp)


class CurveState(State, Protocol):
    """A state of a curve: one level of a method, whose measured sparsity is known once it was activated."""

    sparsity: float | None


class LevelState:
    """One level of a plan as a model state: activating it writes the level (its sparsity measured the first time)."""

    def __init__(self, model: nn.Module, writer: LevelWriter, plan: LevelPlan, level: int, where: str,
                 pruned: bool) -> None:
        self.model, self.writer, self.plan, self.level = model, writer, plan, level
        self.where, self.pruned = where, pruned
        self.sparsity: float | None = None

    def activate(self) -> nn.Module:
        """Write the level into the model; return the model."""
        if self.sparsity is None:
            self.sparsity = self.writer.apply(self.plan, self.level)
        else:
            self.writer.write(self.plan, self.level)
        return self.model


@contextlib.contextmanager
def levels_applied(model: nn.Module, targets: Sequence[Target]) -> Iterator[LevelWriter]:
    """Back up ``targets``, put ``model`` in eval mode without grad, yield the writer; restore everything on exit.

    With sharded targets every rank must call it (``Layout.of`` is a collective); each backs up its local parts.
    """
    with model_preserved(model), torch.no_grad():
        model.eval()  # before the backups: a parametrization may compute another value in training mode
        device = targets[0].local().device if targets else torch.device("cpu")
        layout = Layout.of([target.current() for target in targets], device)
        backups = [target.local().detach().clone() for target in targets]
        fsdp = fsdp_modules(model)
        try:
            with overrides_attached(targets, backups):
                yield LevelWriter(targets, backups, layout, fsdp)
        finally:
            for target, backup in zip(targets, backups, strict=True):
                if target.param is not None:
                    target.writable().copy_(backup)
            reshard(fsdp)


StateBuilder = Callable[[LevelWriter], Sequence[CurveState]]
"""Builds states from the writer (whose backups hold the unpruned values), before anything is written."""


def scored_in_one_pass(model: nn.Module, targets: Sequence[Target], scorer: Scorer,
                       builders: Sequence[StateBuilder]) -> list[list[tuple[CurveState, dict[str, float]]]]:
    """Build every builder's states, score them all in one pass over the data, restore the model.

    ``targets`` are backed up once for all states (pass none when no state writes in place). Returns, per builder,
    its states with their metrics.
    """
    with levels_applied(model, targets) as writer:
        groups = [list(build(writer)) for build in builders]
        values = iter(scorer.score([state for group in groups for state in group]))
        return [[(state, next(values)) for state in group] for group in groups]


@dataclass
class CurveTask:
    """What a method needs to evaluate a curve: the model, the tensors it prunes, the levels, how to score."""

    method: str  # the method's name, for messages
    model: nn.Module
    targets: Sequence[Target]
    levels: Sequence[float]
    scorer: Scorer
    example: Any  # the first batch, on the device
    forward: ForwardFn

    def where(self, level: float) -> str:
        """What is scored at ``level``, for error messages."""
        return f"method={self.method!r} at sparsity {level}"
