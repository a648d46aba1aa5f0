r"""The pruning methods, chosen by name through one registry (name -> rule).

Five methods (Barsbey et al., 2021; Wan et al., 2024). The first four write the selected tensors in place, level by
level, and restore them afterwards; ``"structured"`` evaluates pruned copies.

- ``"global"``: one threshold over all selected weights. At sparsity ``s`` over ``n`` selected entries, with
  ``k = round(s * n)`` and ``t`` the ``k``-th smallest ``|w|``, every entry with ``|w| <= t`` is zeroed.
- ``"layerwise"``: the same rule inside each selected tensor, so every layer loses the same fraction.
- ``"neuron"``: in each selected tensor, the output units (rows of a Linear weight, filters of a conv kernel: slices
  along dim 0) with the smallest l2 norm are zeroed, ``round(s * n_units)`` of them.
  This is the structured pruning of the paper. Only the selected tensors are masked: a unit whose bias is not selected
  still emits its bias (the paper's networks have no biases).
- ``"svd"``: each selected tensor, seen as a matrix ``W`` of shape ``(out, -1)`` (a conv kernel ``(out, in, *k)`` is
  reshaped to ``(out, in * prod(k))``), loses its ``round(s * r)`` smallest singular values, ``r = min(W.shape)``: it
  is replaced by ``U_q diag(S_q) V_q^T``, the ``q = r - round(s * r)`` largest terms of its SVD (the best rank-``q``
  approximation), reshaped back. The level is the fraction of singular values dropped, and so is the measured
  sparsity (summed over the tensors). At level 0 the tensors are left exactly as they are. Selected tensors need two
  or more dimensions and finite entries.
- ``"structured"``: channels are physically removed from a deep copy of the model with torch-pruning's
  ``BasePruner`` (group l2 magnitude, the same channel ratio in each selected layer). Channels that reach
  the model's output are never removed. The ratio counts channels, so the curve's x-axis is the measured fraction of
  all model parameters removed.

For the three mask methods (``MASK_METHODS``), ties at the threshold are all zeroed, so the measured sparsity, the
fraction of the selected entries that are zero, can exceed the level asked for (e.g. when many weights are exactly
zero already); the curve reports the measured value. ``round`` is Python's, as in ``torch.nn.utils.prune``. Their
cost: one sort of the scores per call (not one per level), thresholds from the sort (never from ``torch.quantile``,
which fails above ``2^{24}`` elements); they hold the indices each level zeroes (``ThresholdPlan``: 4 bytes per entry
zeroed at the highest level, per unit for ``"neuron"``). ``"svd"`` factors each selected tensor once per call, one
tensor at a time, and holds its value at every level that drops a singular value (one copy of the selected tensors
per such level). ``"structured"`` holds the pruned copies of every level at once.

**Adding a method** is one rule and one entry of ``REGISTRY``, in this file: a rule maps the unpruned values of the
selected tensors and the levels to a ``LevelPlan`` (what each tensor holds at each level, computed once; see
``_plans``: ``ThresholdPlan`` for masks from scores and thresholds), and ``InPlaceMethod(rule)`` evaluates it like
the methods above, in one pass over the data, in the functional API and in ``PruneEvalCallback``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_heavytail._checks import check_names
from lightning_heavytail._distributed import Layout, as_units, squared_sums
from lightning_heavytail._extras import require
from lightning_heavytail._tensors import all_finite, compute_dtype, sort_ascending
from lightning_heavytail.pruning._evaluator import CurveState, CurveTask, LevelPlan, LevelState, LevelWriter
from lightning_heavytail.pruning._plans import SingularValuePlan, ThresholdPlan
from lightning_heavytail.pruning._scoring import ForwardFn
from lightning_heavytail.pruning._structured import StructuredMethod
from lightning_heavytail.pruning._targets import Target
from lightning_heavytail.sharding import is_sharded

__all__ = [
    "MASK_METHODS",
    "PRUNING_METHODS",
    "REGISTRY",
    "InPlaceMethod",
    "LevelPlan",
    "PruningMethod",
    "SingularValuePlan",
    "ThresholdPlan",
    "method_named",
    "require_methods",
    "validate_method",
]

Rule = Callable[[Sequence[Tensor], Sequence[float], Layout], LevelPlan]
"""``rule(unpruned values of the selected tensors, levels, layout) -> LevelPlan``.

Under sharding (FSDP2, tensor parallelism) the values are this rank's local parts, and ``layout`` says where they
sit in the whole tensors: a rule takes whole-tensor quantities from it (``Layout.kth_smallest``,
``Layout.unit_values``), never by gathering a tensor. A rule that cannot is registered with ``shards=False``.
"""


class PruningMethod(Protocol):
    """An entry of ``REGISTRY``."""

    @property
    def in_place(self) -> bool:
        """Whether it writes the selected tensors in place (no model copy)."""

    @property
    def zeroes_entries(self) -> bool:
        """Whether it only zeroes entries (a mask method, one of ``MASK_METHODS``)."""

    @property
    def extra(self) -> str | None:
        """The optional dependency it needs (an extra of the package), if any."""

    def check(self, model: nn.Module, targets: Sequence[Target], batch: Any, forward: ForwardFn) -> None:
        """Fail early if the method cannot prune ``targets`` of ``model`` (``batch`` may be None)."""

    def states(self, task: CurveTask, writer: LevelWriter) -> Sequence[CurveState]:
        """One state per level of ``task``, scored in one pass (``scored_in_one_pass``); the model is not changed here.

        ``writer`` holds the backups of ``task.targets`` (the unpruned values) and writes the selected tensors.
        """


def _magnitudes(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    mag = tensor.abs()
    return mag if mag.dtype == dtype else mag.to(dtype)


def _thresholds(scores: Iterable[Tensor], sizes: Sequence[int], levels: Sequence[float],
                layout: Layout | None) -> list[list[float | None]]:
    """thresholds[level][group]: the k-th smallest score of each group, k = round(level * size of the group).

    ``scores`` are each group's scores that this rank counts; the largest score to zero at a level is the k-th
    smallest, None when nothing is pruned. One sort per group where the scores are all here (``layout`` None or not
    sharded), the distributed selection where they are spread over the ranks.
    """
    ks = [[round(level * size) for level in levels] for size in sizes]
    if layout is not None and layout.sharded:
        by_group = layout.kth_smallest(list(scores), ks)
    else:
        by_group = [[None if k == 0 else float(ranked[k - 1].item()) for k in group_ks]
                    for ranked, group_ks in zip((sort_ascending(s.flatten()) for s in scores), ks, strict=True)]
    return [list(column) for column in zip(*by_group, strict=True)]


def _global(backups: Sequence[Tensor], levels: Sequence[float], layout: Layout) -> LevelPlan:
    dtype = compute_dtype(*(b.dtype for b in backups))  # rank every tensor in one dtype: comparisons stay exact
    pooled = torch.cat([layout.counted_part(i, _magnitudes(b, dtype)) for i, b in enumerate(backups)])
    [column] = zip(*_thresholds([pooled], [layout.size()], levels, layout), strict=True)
    del pooled
    return ThresholdPlan([[t] * len(backups) for t in column], (_magnitudes(b, dtype) for b in backups), layout)


def _layerwise(backups: Sequence[Tensor], levels: Sequence[float], layout: Layout) -> LevelPlan:
    def magnitudes() -> Iterator[Tensor]:
        return (_magnitudes(b, compute_dtype(b.dtype)) for b in backups)

    counted = (layout.counted_part(i, m) for i, m in enumerate(magnitudes()))
    sizes = [layout.size(i) for i in range(len(backups))]
    return ThresholdPlan(_thresholds(counted, sizes, levels, layout), magnitudes(), layout)


def _unit_norms(layout: Layout, index: int, backup: Tensor) -> Tensor:
    """The l2 norm of every unit (slice along dim 0) of whole tensor ``index``, in its compute dtype, on every rank."""
    dtype = compute_dtype(backup.dtype)
    return layout.unit_values(index, as_units(backup), whole=lambda rows: rows.to(dtype).norm(dim=1),
                              partial=squared_sums, finish=lambda sums: sums.sqrt().to(dtype))


def _neuron(backups: Sequence[Tensor], levels: Sequence[float], layout: Layout) -> LevelPlan:
    norms = [_unit_norms(layout, i, b) for i, b in enumerate(backups)]
    thresholds = _thresholds(norms, [n.numel() for n in norms], levels, None)  # every rank holds all the norms
    # each rank's units, shaped to broadcast against its part
    scores = [layout.local_units(i, norm).reshape(-1, *([1] * (b.ndim - 1)))
              for i, (norm, b) in enumerate(zip(norms, backups, strict=True))]
    return ThresholdPlan(thresholds, scores, layout)


def _svd(backups: Sequence[Tensor], levels: Sequence[float], layout: Layout) -> LevelPlan:
    values: list[list[Tensor | None]] = [[] for _ in levels]
    drops: list[list[int]] = [[] for _ in levels]
    ranks = []
    for backup in backups:  # one tensor's factors at a time
        u, s, vh = torch.linalg.svd(backup.reshape(backup.shape[0], -1).to(compute_dtype(backup.dtype)),
                                    full_matrices=False)
        ranks.append(s.numel())
        for i, level in enumerate(levels):
            drop = round(level * s.numel())
            keep = s.numel() - drop  # singular values come in descending order: the smallest are last
            drops[i].append(drop)
            values[i].append(None if drop == 0 else
                             ((u[:, :keep] * s[:keep]) @ vh[:keep]).reshape(backup.shape).to(backup.dtype))
    return SingularValuePlan(values, drops, ranks)


@dataclass(frozen=True)
class InPlaceMethod:
    """A method that writes the selected tensors in place, level by level, from its ``rule`` (no model copy).

    Attributes:
        rule: computes, once per evaluation, every tensor's value at every level.
        zeroes_entries: the rule only zeroes entries (a mask method).
        matrices: the rule reads each tensor as a matrix: it needs 2 or more dimensions and finite entries.
    """

    rule: Rule
    zeroes_entries: bool = True
    matrices: bool = False
    shards: bool = True
    in_place: bool = True
    extra: str | None = None

    def check(self, model: nn.Module, targets: Sequence[Target], batch: Any, forward: ForwardFn) -> None:
        """Refuse tensors the rule cannot read.

        That is: with ``matrices``, fewer than 2 dimensions, NaN or infinity; without ``shards``, sharded tensors.
        """
        sharded = [t.name for t in targets if is_sharded(t.current())]
        if sharded and not self.shards:
            raise ValueError(
                f"This method needs each selected tensor whole on one rank, and {sharded} of {type(model).__name__} are"
                f" sharded (DTensors: FSDP2, tensor parallelism). Use one of the mask methods {MASK_METHODS}, which"
                " prune sharded tensors shard by shard with global thresholds."
            )
        if not self.matrices:
            return
        vectors = [t.name for t in targets if t.current().ndim < 2]
        if vectors:
            raise ValueError(
                f"This method factors each selected tensor as a matrix, and {vectors} of {type(model).__name__} have"
                " fewer than 2 dimensions. Leave them out with `exclude`, or select weights with `params`."
            )
        for target in targets:
            if not all_finite(target.current()):
                raise ValueError(f"Parameter {target.name!r} holds NaN or infinity: it has no singular values")

    def states(self, task: CurveTask, writer: LevelWriter) -> Sequence[CurveState]:
        """One state per level; activating one writes its values from the plan, made once (one sort)."""
        self.check(task.model, task.targets, None, task.forward)
        plan = self.rule(writer.backups, task.levels, writer.layout)
        return [LevelState(task.model, writer, plan, i, task.where(level), level > 0.0)
                for i, level in enumerate(task.levels)]


REGISTRY: dict[str, PruningMethod] = {
    "global": InPlaceMethod(_global),
    "layerwise": InPlaceMethod(_layerwise),
    "neuron": InPlaceMethod(_neuron),
    "svd": InPlaceMethod(_svd, zeroes_entries=False, matrices=True, shards=False),
    "structured": StructuredMethod(),
}
"""Method name -> method: the one place a method is chosen by its name."""

PRUNING_METHODS: tuple[str, ...] = tuple(REGISTRY)
"""The methods ``evaluate_pruning_curve`` accepts."""

MASK_METHODS: tuple[str, ...] = tuple(name for name, method in REGISTRY.items() if method.zeroes_entries)
"""The methods that zero entries in place (no model copy)."""


def validate_method(method: Any, argument: str = "method") -> tuple[str, ...]:
    """Check a pruning method name, or a sequence of distinct names, against ``PRUNING_METHODS``.

    Args:
        method: one name or a sequence of names.
        argument: the argument name used in error messages.

    Returns:
        The names as a tuple.

    Raises:
        TypeError: if ``method`` is neither a name nor a sequence of names.
        ValueError: on an unknown name, an empty sequence or a repeated name.

    Examples:
        >>> validate_method("global")
        ('global',)
        >>> validate_method(["neuron", "global"])
        ('neuron', 'global')
        >>> validate_method("magnitude")
        Traceback (most recent call last):
        ...
        ValueError: `method` must be one of ('global', 'layerwise', 'neuron', 'svd', 'structured') or a sequence of them, got 'magnitude'
    """  # noqa: E501
    return check_names(method, PRUNING_METHODS, argument)


def require_methods(names: Sequence[str]) -> None:
    """Raise a ModuleNotFoundError naming the extra to install if a method's optional dependency is missing."""
    for name in names:
        extra = REGISTRY[name].extra
        if extra is not None:
            require(extra, f"method={name!r}")


def method_named(method: Any) -> tuple[str, PruningMethod]:
    """The name and registry entry of one method (a ValueError for a sequence of several); its dependency checked."""
    names = validate_method(method)
    if len(names) != 1:
        raise ValueError(f"`method` must name one method here (call once per method), got {method!r}")
    require_methods(names)
    return names[0], REGISTRY[names[0]]
