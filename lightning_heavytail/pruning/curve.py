"""What an evaluation returns: a pruning curve, the epsilon point, and the labels of sparsity levels."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DEFAULT_METRIC_KEY", "EpsilonPoint", "PruningCurve", "level_label"]

DEFAULT_METRIC_KEY = "accuracy"
"""The key of the default metric (micro-averaged multiclass accuracy)."""


@dataclass
class PruningCurve:
    """A metric measured at several sparsity levels.

    Attributes:
        method: the pruning method, one of ``PRUNING_METHODS``.
        requested: the sparsity levels asked for.
        sparsities: the measured sparsity at each level: the fraction of the selected parameters' entries that are
            zero (mask methods), of their singular values dropped (``"svd"``), or of all model parameters removed
            (``"structured"``).
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
