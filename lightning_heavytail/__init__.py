"""Heavy-tailed SGD noise and pruning-curve evaluation for PyTorch Lightning (Wan et al., ICML 2024)."""

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
