r"""Compressibility of weights: best-k error, the fraction of prunable units, and tail-index estimates.

Notation: ``w`` is a weight tensor flattened (``n`` entries), ``W`` the same tensor seen as units along dim 0
(rows of a Linear weight, filters of a conv kernel), ``||.||`` the Euclidean (Frobenius) norm.

- **Relative best-k error** (Barsbey et al., 2021): with ``w_k`` keeping the ``k = n - round(s * n)`` entries of
  largest magnitude and zeroing the rest, ``err_s(w) = ||w - w_k|| / ||w||``. Small at high sparsity ``s`` means
  compressible.
- **Fraction of prunable units** (Wan et al., 2024, the paper's measure): order the units by l2 norm,
  ``||W_(1)|| <= ... <= ||W_(N)||``; the fraction is the largest ``j / N`` with
  ``||W_(1)||^2 + ... + ||W_(j)||^2 <= epsilon * ||W||^2``: the share of units that can be zeroed at a relative
  squared Frobenius error of at most ``epsilon`` (default 0.1).
- **Tail index** ``alpha`` of the weights' law, read as the index of a symmetric alpha-stable law
  (heavier tails, smaller ``alpha``; ``alpha = 2`` is Gaussian). Two estimators on the entries of one tensor:

  * Mohammadi, Mohammadpour and Ogata (2015): split the entries ``X_i`` into ``K`` blocks of ``m`` and sum each block
    (``Y_j``); for i.i.d. SaS entries ``Y_j`` has the law of ``m**(1/alpha) * X``, so
    ``alpha_hat = log(m) / (mean_j log|Y_j| - mean_i log|X_i|)``, clipped to ``(0, 2]``; default
    ``m = floor(sqrt(n))``.
  * Hill (1975): with ``|X|_(1) >= |X|_(2) >= ...`` the magnitudes in decreasing order,
    ``alpha_hat = k / sum_{i=1..k} (log|X|_(i) - log|X|_(k+1))``; default ``k = floor(sqrt(n))``. It estimates the
    Pareto index of the tail and is not clipped: values above 2 mean tails lighter than any stable law with
    ``alpha < 2``. For stable laws near ``alpha = 2`` it is biased upwards (the Pareto regime sets in far out in
    the tail).

  These estimate the stable index of the **weights themselves**. They are not WeightWatcher's "alpha", which is the
  power-law exponent fitted to the eigenvalue spectrum of ``W^T W``, a different quantity on a different
  scale. Both estimators assume i.i.d. entries; exact zeros (e.g. pruned weights) are left out.

- **Tail index per unit**: the same estimators on **one value per unit**, the unit's mean entry
  ``m_j = mean_i W[j, i]`` (``unit_means``; row sums would give the same estimates, both estimators being scale
  invariant). Neuron noise (one draw per unit, broadcast over its incoming weights, the structure the theory covers)
  adds the same accumulated draw ``N_j`` to every entry of unit ``j``, so ``m_j = N_j +`` the mean of the unit's
  initial and gradient-driven part: where the noise dominates, this estimates the noise's index. The entry estimates
  do not: the entries of a unit are far from independent, consecutive entries share ``N_j``, and Mohammadi's
  estimate falls towards 1 whatever the index (neuron noise of index 1.5, 1.75, 1.9 on 20000 units of 64 weights
  initialized ``N(0, 1/64)``, noise scale 0.3, mean of 4 seeds: 1.17, 1.22, 1.25 on the entries, 1.47, 1.70, 1.83
  on the unit means; see the tests). For i.i.d. noise both are meaningful:
  the mean of ``d`` i.i.d. SaS entries is SaS of the same index, and the entries are ``d`` times as many samples.
  With ``N`` units the per-unit estimate rests on ``N`` values: over seeds its standard deviation was about 0.09
  at ``N = 5000`` and 0.05 at ``N = 20000`` (Mohammadi, default block size).

Any metric of a tensor holding NaN or infinity is NaN: nothing meaningful can be said, and a metric is no place to stop
a run.

References:
    M. Mohammadi, A. Mohammadpour, H. Ogata, "On estimating the tail index and the spectral measure of multivariate
    alpha-stable distributions", Metrika 78, 2015.
    B. M. Hill, "A simple general approach to inference about the tail of a distribution", Ann. Statist. 3(5), 1975.
    M. Barsbey, M. Sefidgaran, M. A. Erdogdu, G. Richard, U. Şimşekli, "Heavy tails in SGD and compressibility of
    overparametrized neural networks", NeurIPS 2021.
    Y. Wan, M. Barsbey, A. Zaidi, U. Şimşekli, "Implicit compressibility of overparametrized neural networks trained
    with heavy-tailed SGD", ICML 2024 (arXiv 2306.08125).
    C. H. Martin, M. W. Mahoney, "Heavy-tailed universality predicts trends in test accuracies", 2019 (WeightWatcher's
    spectral exponent, for contrast).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_heavytail._checks import check_fraction, check_int, check_weight, validate_epsilon, validate_sparsities
from lightning_heavytail._distributed import as_units
from lightning_heavytail._tensors import ACCUMULATE_DTYPE, all_finite, compute_dtype, sort_ascending
from lightning_heavytail.pruning.curve import level_label
from lightning_heavytail.pruning.epsilon import prunable_units
from lightning_heavytail.selection import ParamSelector, select_parameters
from lightning_heavytail.sharding import is_sharded

__all__ = [
    "best_k_relative_error",
    "compressibility_report",
    "fraction_prunable",
    "hill_alpha",
    "mohammadi_alpha",
    "unit_means",
]

DEFAULT_REPORT_SPARSITIES: tuple[float, ...] = (0.5, 0.9, 0.99)
"""Sparsity levels at which ``compressibility_report`` gives the best-k error."""


TAIL_KEYS = ("alpha_mohammadi", "alpha_hill", "alpha_mohammadi_units", "alpha_hill_units")
"""The report's tail-index keys: Mohammadi and Hill on the entries, then on one value per unit."""


def _best_k_errors(magnitudes_sorted: Tensor, sparsities: Sequence[float]) -> list[float]:
    """Relative best-k errors at each sparsity, from magnitudes sorted ascending (float64 sums)."""
    total = magnitudes_sorted.to(ACCUMULATE_DTYPE).square().sum()
    if total.item() == 0.0:
        return [0.0 for _ in sparsities]  # the zero tensor loses nothing
    n = magnitudes_sorted.numel()
    errors = []
    for sparsity in sparsities:
        dropped = magnitudes_sorted[: round(sparsity * n)].to(ACCUMULATE_DTYPE).square().sum()
        errors.append(math.sqrt((dropped / total).item()))
    return errors


def best_k_relative_error(weight: Tensor, sparsity: float) -> float:
    r"""Relative error ``||w - w_k|| / ||w||`` of keeping only the largest ``1 - s`` share of the entries.

    ``w_k`` keeps the ``n - round(s * n)`` entries of largest magnitude (the same count the
    ``"global"`` pruning method keeps) and zeroes the rest. The zero tensor has error 0.

    Args:
        weight: any tensor, read as a flat vector.
        sparsity: the share of entries dropped, in [0, 1).

    Returns:
        The error in [0, 1]; NaN if ``weight`` holds NaN or infinity.

    Examples:
        >>> import torch
        >>> w = torch.tensor([3.0, -4.0, 0.0, 0.0])
        >>> best_k_relative_error(w, 0.5)  # drops the two zeros
        0.0
        >>> best_k_relative_error(w, 0.75)  # drops 0, 0 and 3: sqrt(9 / 25)
        0.6
    """
    weight = check_weight(weight)
    level = check_fraction(sparsity, "sparsity", upper_open=True)
    if not all_finite(weight):
        return math.nan
    return _best_k_errors(sort_ascending(weight.abs().flatten()), [level])[0]


def fraction_prunable(weight: Tensor, epsilon: float = 0.1) -> float:
    r"""Share of output units (dim 0) that can be zeroed at a relative squared Frobenius error of at most ``epsilon``.

    Units are zeroed in increasing order of l2 norm while the zeroed squared norm stays at most
    ``epsilon * ||W||^2`` (Wan et al., 2024). Sums are in float64; the comparison is exact (``<=``).

    Args:
        weight: a tensor whose dim 0 indexes units (Linear ``(out, in)``, conv ``(out, in, *kernel)``); for a 1-D
            tensor every entry is a unit.
        epsilon: the error budget, a share of the squared norm in [0, 1].

    Returns:
        The fraction in [0, 1]; NaN if ``weight`` holds NaN or infinity.

    Examples:
        >>> import torch
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [0.0, 3.0]])  # squared norms 1, 1, 8, 9: total 19
        >>> fraction_prunable(w, 0.1)  # budget 1.9: only one unit of squared norm 1
        0.25
        >>> fraction_prunable(w, 0.2)  # budget 3.8: both units of squared norm 1
        0.5
    """
    weight = check_weight(weight)
    eps = validate_epsilon(epsilon)
    if not all_finite(weight):
        return math.nan
    prunable, units = prunable_units(weight, eps)
    return prunable / units


def _nonzero_entries(weight: Tensor) -> Tensor:
    flat = weight.flatten().to(ACCUMULATE_DTYPE)
    return flat[flat != 0]


def mohammadi_alpha(weight: Tensor, m: int | None = None) -> float:
    r"""Estimate the stable index of the entries of ``weight`` (Mohammadi et al., 2015), clipped to (0, 2].

    The nonzero entries, in flattened order, are cut into ``K = floor(n / m)`` blocks of ``m`` (a remainder
    is left out) and ``alpha_hat = log(m) / (mean log|Y| - mean log|X|)`` with ``Y`` the block
    sums, see the module docstring. Assumes i.i.d. symmetric entries.

    Args:
        weight: any tensor.
        m: the block size, at least 2 and at most the number of nonzero entries; default
            ``floor(sqrt(n))``.

    Returns:
        The estimate in (0, 2]; NaN if ``weight`` holds NaN or infinity.

    Raises:
        ValueError: if ``m`` is not an int >= 2, or ``weight`` has too few nonzero entries (4 for the default ``m``).

    Examples:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> abs(mohammadi_alpha(torch.randn(100_000)) - 2.0) < 0.15  # Gaussian: alpha = 2
        True
        >>> abs(mohammadi_alpha(torch.distributions.Cauchy(0.0, 1.0).sample((100_000,))) - 1.0) < 0.1
        True
    """
    weight = check_weight(weight)
    check_int(m, "m", minimum=2, allow_none=True)
    if not all_finite(weight):
        return math.nan
    x = _nonzero_entries(weight)
    n = x.numel()
    block = math.isqrt(n) if m is None else m
    if block < 2 or block > n:
        raise ValueError(
            f"mohammadi_alpha needs a block size `m` in [2, {n}] (the number of nonzero entries of `weight`), got"
            f" m={block}" + (" (the default, sqrt of the count)" if m is None else "")
        )
    blocks = n // block
    x = x[: blocks * block]
    y = x.reshape(blocks, block).sum(dim=1)
    y = y[y != 0]  # a block summing to exactly zero has no logarithm (probability zero for continuous laws)
    gap = (y.abs().log().mean() - x.abs().log().mean()).item()
    if gap <= 0.0:  # sums no larger than the summands: lighter than Gaussian at this sample size
        return 2.0
    return min(math.log(block) / gap, 2.0)


def hill_alpha(weight: Tensor, k: int | None = None) -> float:
    r"""Hill's (1975) estimate of the tail index of the magnitudes of ``weight``'s entries (not clipped).

    ``alpha_hat = k / sum_{i <= k} (log|X|_(i) - log|X|_(k+1))`` over the ``k`` largest magnitudes, see
    the module docstring. Exact zeros are left out.

    Args:
        weight: any tensor.
        k: the number of upper order statistics, at least 1 and less than the number of nonzero entries; default
            ``floor(sqrt(n))``.

    Returns:
        The estimate (> 0, may exceed 2 for light tails; ``inf`` if the ``k + 1`` largest magnitudes are equal); NaN if
        ``weight`` holds NaN or infinity.

    Raises:
        ValueError: if ``k`` is not an int >= 1, or ``weight`` has at most ``k`` nonzero entries.

    Examples:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> pareto = torch.distributions.Pareto(1.0, 1.5).sample((100_000,))  # tail index 1.5
        >>> round(hill_alpha(pareto), 1)
        1.5
    """
    weight = check_weight(weight)
    check_int(k, "k", minimum=1, allow_none=True)
    if not all_finite(weight):
        return math.nan
    x = _nonzero_entries(weight).abs()
    n = x.numel()
    order = math.isqrt(n) if k is None else k
    if order < 1 or order >= n:
        raise ValueError(
            f"hill_alpha needs `k` in [1, {n - 1}] (fewer than the {n} nonzero entries of `weight`), got k={order}"
            + (" (the default, sqrt of the count)" if k is None else "")
        )
    top = x.topk(order + 1).values.log()  # descending; topk, not a full sort
    spread = (top[:order] - top[order]).sum().item()
    return math.inf if spread == 0.0 else order / spread


def unit_means(weight: Tensor) -> Tensor:
    """One value per unit, in float64: the mean entry of each slice along dim 0 (of a 1-D tensor, the entries).

    Examples:
        >>> import torch
        >>> unit_means(torch.tensor([[1.0, 3.0], [-2.0, 0.0]])).tolist()
        [2.0, -1.0]
    """
    return as_units(check_weight(weight)).to(ACCUMULATE_DTYPE).mean(dim=1)


def _report_keys(levels: Sequence[float]) -> list[str]:
    return [f"best_k_error@{level_label(level)}" for level in levels]  # distinct levels, distinct labels


def _tail_estimate(estimator: Any, weight: Tensor) -> float:
    try:
        return float(estimator(weight))
    except ValueError:  # too few nonzero entries: no estimate for this tensor
        return math.nan


class _Stats(Protocol):
    """The report's quantities of each selected tensor (``_WholeStats``, or ``ShardedStats`` under sharding)."""

    def finite(self) -> list[bool]: ...

    def prunable_units(self, index: int, epsilon: float) -> tuple[int, int]: ...

    def best_k_errors(self, indices: Sequence[int], levels: Sequence[float]) -> list[float]: ...

    def tail_indices(self, index: int, finite: bool) -> dict[str, float]: ...


class _WholeStats:
    """The report's quantities of whole tensors (one process, DDP)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.weights = [t.detach() for t in tensors]

    def finite(self) -> list[bool]:
        return [all_finite(w) for w in self.weights]

    def prunable_units(self, index: int, epsilon: float) -> tuple[int, int]:
        return prunable_units(self.weights[index], epsilon)

    def best_k_errors(self, indices: Sequence[int], levels: Sequence[float]) -> list[float]:
        chosen = [self.weights[i] for i in indices]
        dtype = compute_dtype(*(w.dtype for w in chosen))  # one dtype for all: the ranking stays exact
        magnitudes = [w.abs().flatten().to(dtype) for w in chosen]
        return _best_k_errors(sort_ascending(magnitudes[0] if len(chosen) == 1 else torch.cat(magnitudes)), levels)

    def tail_indices(self, index: int, finite: bool) -> dict[str, float]:
        weight = self.weights[index]
        means = unit_means(weight)
        estimates = ((mohammadi_alpha, weight), (hill_alpha, weight), (mohammadi_alpha, means), (hill_alpha, means))
        return {label: _tail_estimate(estimator, sample)
                for label, (estimator, sample) in zip(TAIL_KEYS, estimates, strict=True)}


def _stats_of(tensors: Sequence[Tensor]) -> _Stats:
    if any(is_sharded(t) for t in tensors):
        from lightning_heavytail._sharded_stats import ShardedStats  # it uses this module's estimators

        return ShardedStats(tensors)
    return _WholeStats(tensors)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def compressibility_report(
    model: nn.Module,
    *,
    params: ParamSelector = "weights",
    exclude: Sequence[str] = (),
    sparsities: Sequence[float] = DEFAULT_REPORT_SPARSITIES,
    epsilon: float = 0.1,
) -> dict[str, float]:
    """Every compressibility metric of the selected parameters, per parameter and in total, as a flat dict.

    Keys (``<name>`` a parameter name such as ``0.weight``, levels as ``level_label`` writes them: two decimals, more
    where the level has them, ``0.90``, ``0.995``):

    - ``fraction_prunable/<name>``, and ``fraction_prunable/total`` = prunable units summed / units summed, each
      tensor at its own budget ``epsilon``;
    - ``best_k_error@0.90/<name>``, and ``best_k_error@0.90/total`` over all selected entries pooled (one global
      magnitude ranking, as the ``"global"`` pruning method);
    - ``alpha_mohammadi/<name>``, ``alpha_hill/<name>``: the estimators on the tensor's entries, with default block
      size / order, and their means over the tensors, ``alpha_mohammadi/mean``, ``alpha_hill/mean``;
    - ``alpha_mohammadi_units/<name>``, ``alpha_hill_units/<name>`` and their ``/mean``: the estimators on one value
      per unit (``unit_means``), the estimate that is meaningful under neuron noise (see the module docstring).

    A tensor with too few nonzero values for an estimator (fewer than 4) gets NaN there and is left out of the mean.

    Args:
        model: the model; it is only read.
        params: which parameters, as in ``select_parameters``.
        exclude: glob patterns of names to leave out.
        sparsities: levels for the best-k error, strictly increasing in [0, 1).
        epsilon: the error budget of the fraction of prunable units, in [0, 1].

    Returns:
        Metric name -> float.

    Examples:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> report = compressibility_report(net, sparsities=(0.9,))
        >>> sorted(key for key in report if key.endswith("/total"))
        ['best_k_error@0.90/total', 'fraction_prunable/total']
        >>> 0.0 <= report["fraction_prunable/0.weight"] <= 1.0
        True
    """
    levels = validate_sparsities(sparsities)
    keys = _report_keys(levels)
    eps = validate_epsilon(epsilon)
    selected = select_parameters(model, params, exclude=exclude)
    stats = _stats_of([p for _, p in selected])
    report: dict[str, float] = {}
    prunable_total = units_total = 0
    alphas: dict[str, list[float]] = {key: [] for key in TAIL_KEYS}
    with torch.no_grad():
        finite = stats.finite()
        for index, (name, _) in enumerate(selected):
            errors = [math.nan] * len(levels)
            report[f"fraction_prunable/{name}"] = math.nan
            if finite[index]:
                prunable, units = stats.prunable_units(index, eps)
                report[f"fraction_prunable/{name}"] = prunable / units
                prunable_total, units_total = prunable_total + prunable, units_total + units
                errors = stats.best_k_errors([index], levels)
            for key, error in zip(keys, errors, strict=True):
                report[f"{key}/{name}"] = error
            for label, value in stats.tail_indices(index, finite[index]).items():
                report[f"{label}/{name}"] = value
                alphas[label].append(value)
        report["fraction_prunable/total"] = prunable_total / units_total if all(finite) else math.nan
        if not all(finite):
            pooled_errors = [math.nan] * len(levels)
        else:  # one tensor: its own errors, already computed (the same sort)
            pooled_errors = errors if len(selected) == 1 else stats.best_k_errors(range(len(selected)), levels)
        for key, error in zip(keys, pooled_errors, strict=True):
            report[f"{key}/total"] = error
    for label, values in alphas.items():
        report[f"{label}/mean"] = _nanmean(values)
    return report
