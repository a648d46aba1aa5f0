"""The evaluator: writes the selected tensors' values level by level, and always leaves the model as it was.

A method's rule computes, once per evaluation, what every selected tensor holds at every level (a ``LevelPlan``: for
the mask methods one sort of the scores and a threshold per level and tensor). ``levels_applied`` backs the tensors up
once, puts the model in eval mode, and yields a ``LevelWriter`` that writes any level's values in place (a parameter
itself; the effective tensor of a parametrized layer through an appended ``Override``); on exit, also on an error,
every parameter, buffer, train/eval flag, ``requires_grad`` and parametrization is restored bitwise. What the writer
holds at once: one backup of the selected tensors (plus one copy per parametrized tensor), and the plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_heavytail.pruning._scoring import ForwardFn, Scorer
from lightning_heavytail.pruning._targets import Target, overrides_attached


class LevelPlan(Protocol):
    """What a rule computed once for the selected tensors: their values at each level."""

    def write(self, level: int, index: int, backup: Tensor, out: Tensor) -> None:
        """Write tensor ``index``'s value at level number ``level`` into ``out``; ``backup`` is its unpruned value."""

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
    """Writes the values of a level into the selected tensors (see ``levels_applied``)."""

    def __init__(self, targets: Sequence[Target], backups: Sequence[Tensor]) -> None:
        self.targets = targets
        self.backups = backups

    def apply(self, plan: LevelPlan, level: int) -> float:
        """Write level number ``level`` of ``plan`` into every target; return the level's measured sparsity."""
        written = [target.writable() for target in self.targets]
        for index, (out, backup) in enumerate(zip(written, self.backups, strict=True)):
            plan.write(level, index, backup, out)
        return plan.sparsity(level, written)


@contextlib.contextmanager
def levels_applied(model: nn.Module, targets: Sequence[Target]) -> Iterator[LevelWriter]:
    """Back up ``targets``, put ``model`` in eval mode without grad, yield the writer; restore everything on exit."""
    with model_preserved(model), torch.no_grad():
        model.eval()  # before the backups: a parametrization may compute another value in training mode
        backups = [target.current().detach().clone() for target in targets]
        try:
            with overrides_attached(targets, backups):
                yield LevelWriter(targets, backups)
        finally:
            for target, backup in zip(targets, backups, strict=True):
                if target.param is not None:
                    target.param.copy_(backup)


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
