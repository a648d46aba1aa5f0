"""Heavy-tailed SGD noise and pruning-curve evaluation for PyTorch Lightning (Wan et al., ICML 2024).

The public names are imported on first use (PEP 562), so ``import lightning_heavytail`` and the command line's
``--help`` do not pay for importing torch and Lightning; ``from lightning_heavytail import X`` works as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers, IDEs and the API docs read; at run time __getattr__ imports these
    from lightning_heavytail.callbacks.noise import HeavyTailNoiseCallback
    from lightning_heavytail.callbacks.prune_eval import PruneEvalCallback
    from lightning_heavytail.compressibility import (
        best_k_relative_error,
        compressibility_report,
        fraction_prunable,
        hill_alpha,
        mohammadi_alpha,
    )
    from lightning_heavytail.noise import add_heavy_tailed_noise, draw_noise, noise_scale
    from lightning_heavytail.pruning import (
        PRUNING_METHODS,
        EpsilonPoint,
        PruningCurve,
        evaluate_at_epsilon,
        evaluate_at_ratios,
        evaluate_pruning_curve,
    )
    from lightning_heavytail.selection import select_parameters
    from lightning_heavytail.stable import derive_seed, sample_positive_stable, sample_stable

__all__ = [
    "PRUNING_METHODS",
    "EpsilonPoint",
    "HeavyTailNoiseCallback",
    "PruneEvalCallback",
    "PruningCurve",
    "add_heavy_tailed_noise",
    "best_k_relative_error",
    "compressibility_report",
    "derive_seed",
    "draw_noise",
    "evaluate_at_epsilon",
    "evaluate_at_ratios",
    "evaluate_pruning_curve",
    "fraction_prunable",
    "hill_alpha",
    "mohammadi_alpha",
    "noise_scale",
    "sample_positive_stable",
    "sample_stable",
    "select_parameters",
]
__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "lightning_heavytail.callbacks.noise": ("HeavyTailNoiseCallback",),
    "lightning_heavytail.callbacks.prune_eval": ("PruneEvalCallback",),
    "lightning_heavytail.compressibility": (
        "best_k_relative_error", "compressibility_report", "fraction_prunable", "hill_alpha", "mohammadi_alpha",
    ),
    "lightning_heavytail.noise": ("add_heavy_tailed_noise", "draw_noise", "noise_scale"),
    "lightning_heavytail.pruning": (
        "PRUNING_METHODS", "EpsilonPoint", "PruningCurve", "evaluate_at_epsilon", "evaluate_at_ratios",
        "evaluate_pruning_curve",
    ),
    "lightning_heavytail.selection": ("select_parameters",),
    "lightning_heavytail.stable": ("derive_seed", "sample_positive_stable", "sample_stable"),
}
"""Where each public name lives: the submodule imported when the name is first read."""
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, as ``lightning_heavytail.pruning``) on first access."""
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value  # later reads skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
