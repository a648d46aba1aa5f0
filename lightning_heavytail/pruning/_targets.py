"""The tensors pruning works on: plain parameters, and the effective tensors of parametrized layers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_heavytail._compat import forward_pre_hooks
from lightning_heavytail.selection import UninitializedParameterError, uninitialized_parameters
from lightning_heavytail.sharding import is_sharded, local_tensor


def parametrized_originals(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """Id of each parametrization original -> (name of the effective tensor, its module, its attribute)."""
    originals: dict[int, tuple[str, nn.Module, str]] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations:
            name = f"{module_name}.{attr}" if module_name else attr
            for original in parametrizations(module, attr).parameters(recurse=False):
                originals[id(original)] = (name, module, attr)
    return originals


def parametrizations(module: nn.Module, attr: str) -> parametrize.ParametrizationList:
    """The parametrizations of ``module.<attr>``, which hold its originals."""
    return cast(parametrize.ParametrizationList, module.parametrizations[attr])  # type: ignore[index]


def view_names_by_id(model: nn.Module) -> dict[int, str]:
    """Id of each parameter of ``model`` -> the name of the tensor it is part of in ``tensor_view(model)``."""
    originals = parametrized_originals(model)
    return {id(p): originals[id(p)][0] if id(p) in originals else name for name, p in model.named_parameters()}


def refuse_hook_reparametrizations(model: nn.Module) -> None:
    """Refuse the deprecated hook-based weight_norm / spectral_norm.

    They recompute ``weight`` from other parameters at every forward: pruning those does not prune the weight used.
    """
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for module_name, module in model.named_modules():
        for hook in forward_pre_hooks(module):
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
                raise ValueError(
                    f"Layer {module_name!r} of {type(model).__name__} uses the deprecated torch.nn.utils.{kind}, which"
                    f" recomputes its weight from other parameters at every forward, so pruning them does not prune"
                    f" the weight. Use torch.nn.utils.parametrizations.{kind}, whose effective weight is pruned."
                )


def refuse_lazy(model: nn.Module) -> None:
    """Refuse a model with lazy parameters: they have no shape to prune yet.

    Raises:
        UninitializedParameterError: naming them.
    """
    lazy = uninitialized_parameters(model)
    if lazy:
        raise UninitializedParameterError(
            f"{type(model).__name__} has lazy parameters {lazy} with no shape yet: run one forward pass (or build the"
            " layers in configure_model) before pruning"
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
    refuse_lazy(model)
    originals = parametrized_originals(model)
    view: nn.Module = type(type(model).__name__, (nn.Module,), {})()  # the model's class name, for messages
    done: set[str] = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in originals:
                name, module, attr = originals[id(param)]
                if name in done:
                    continue
                trainable = any(p.requires_grad for p in parametrizations(module, attr).parameters(recurse=False))
                tensor = nn.Parameter(getattr(module, attr).detach(), requires_grad=trainable)
            else:
                tensor = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
            done.add(name)
            *path, leaf = name.split(".")
            node = view
            for part in path:
                child = dict(node.named_children()).get(part)
                if child is None:
                    child = nn.Module()
                    node.add_module(part, child)
                node = child
            node.register_parameter(leaf, tensor)
    return view


class Override(nn.Module):
    """A parametrization that replaces the tensor it is appended to by ``value`` (when set)."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return self.value


class Target:
    """One tensor that is pruned.

    A parameter is written in place; the effective tensor of a parametrized module is replaced, during an evaluation,
    by the value of an ``Override`` appended to its parametrizations (its originals are never written). A sharded
    parameter (a ``DTensor``: FSDP2, tensor parallelism) is read and written through its local part.
    """

    def __init__(self, name: str, param: Tensor | None, module: nn.Module | None = None, attr: str = "") -> None:
        self.name = name
        self.param = param
        self.module = module
        self.attr = attr
        self.override: Override | None = None

    def current(self) -> Tensor:
        """The tensor as the forward pass sees it now."""
        if self.param is not None:
            return self.param
        return getattr(self.module, self.attr)  # type: ignore[no-any-return]

    def local(self) -> Tensor:
        """This rank's part of the tensor as the forward pass sees it (all of it, unless it is a DTensor)."""
        return local_tensor(self.current())

    def writable(self) -> Tensor:
        """What a pruned value is written into: the parameter (its local part), or the value of the ``Override``."""
        if self.param is not None:
            return local_tensor(self.param)
        if self.override is None:
            raise RuntimeError(f"{self.name!r} is parametrized: attach its override first (overrides_attached)")
        return self.override.value


@contextlib.contextmanager
def overrides_attached(targets: Sequence[Target], backups: Sequence[Tensor]) -> Iterator[None]:
    """Append an ``Override`` (holding a copy of its backup) to each parametrized target; remove them all on exit."""
    attached: list[Target] = []
    try:
        for target, backup in zip(targets, backups, strict=True):
            if target.param is None and target.module is not None:
                target.override = Override(backup.clone())
                parametrize.register_parametrization(target.module, target.attr, target.override)
                attached.append(target)
        yield
    finally:
        for target in attached:
            plist = parametrizations(target.module, target.attr)  # type: ignore[arg-type]
            if len(plist) and plist[-1] is target.override:
                del plist[-1]
            target.override = None


def targets_named(model: nn.Module, names: Sequence[str]) -> list[Target]:
    """The tensors of ``model`` named as in ``tensor_view``, as targets to prune.

    Raises:
        ValueError: for a parametrized tensor whose originals are sharded (DTensors): its effective value is not a
            part of one sharded tensor that can be written.
    """
    originals = parametrized_originals(model)
    effective = {name: (module, attr) for name, module, attr in originals.values()}
    real = dict(model.named_parameters())
    sharded = [name for name in names if name in effective and any(
        is_sharded(p) for p in parametrizations(*effective[name]).parameters())]
    if sharded:
        raise ValueError(
            f"{sharded} of {type(model).__name__} are parametrized and sharded: pruning writes the effective weight of"
            " a parametrized layer through an extra parametrization, which sharded originals do not allow. Leave"
            " them out with `exclude`."
        )
    return [Target(name, None, *effective[name]) if name in effective else Target(name, real[name]) for name in names]
