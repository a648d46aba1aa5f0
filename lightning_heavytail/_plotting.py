"""The sparsity axis shared by the package's figures (PruneEvalCallback's curves, the demo's): torch-free."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

SPARSITY_TICKS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
"""The sparsities an axis is labelled with (as far as the data reach)."""


def sparsity_axis(sparsity: float) -> float:
    """The x coordinate of a sparsity: ``-log10(1 - s)``, which gives 0.9, 0.99 and 0.999 equal room.

    Examples:
        >>> [round(sparsity_axis(s), 3) for s in (0.0, 0.5, 0.9, 0.99)]
        [0.0, 0.301, 1.0, 2.0]
    """
    return 0.0 - math.log10(max(1.0 - sparsity, 1e-3))  # 0.0 - x, not -x: no -0.0; sparsity 1 drawn at 0.999


def label_sparsity_axis(ax: Any, sparsities: Sequence[float], label: str = "measured sparsity") -> None:
    """Tick and label an x axis drawn in ``sparsity_axis`` coordinates.

    The ticks run up to the first one at or past the largest of ``sparsities``.

    Examples:
        >>> from matplotlib.figure import Figure
        >>> ax = Figure().subplots()
        >>> label_sparsity_axis(ax, [0.0, 0.9])
        >>> [tick.get_text() for tick in ax.get_xticklabels()]
        ['0', '0.5', '0.8', '0.9']
    """
    highest = max(sparsities, default=0.0)
    ticks = [t for t in SPARSITY_TICKS if t < highest - 1e-12]
    ticks += [t for t in SPARSITY_TICKS if t >= highest - 1e-12][:1] or [SPARSITY_TICKS[-1]]
    ax.set_xticks([sparsity_axis(t) for t in ticks], [f"{t:g}" for t in ticks])
    ax.set_xlim(-0.08, sparsity_axis(ticks[-1]) + 0.08)
    ax.set_xlabel(label)
