"""Heavy-tailed SGD noise and pruning-curve evaluation for PyTorch Lightning (Wan et al., ICML 2024)."""

from lightning_heavytail.callbacks.noise import HeavyTailNoiseCallback
from lightning_heavytail.noise import add_heavy_tailed_noise, draw_noise, noise_scale
from lightning_heavytail.selection import select_parameters
from lightning_heavytail.stable import derive_seed, sample_positive_stable, sample_stable

__all__ = [
    "HeavyTailNoiseCallback",
    "add_heavy_tailed_noise",
    "derive_seed",
    "draw_noise",
    "noise_scale",
    "sample_positive_stable",
    "sample_stable",
    "select_parameters",
]
__version__ = "0.1.0"
