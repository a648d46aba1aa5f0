"""Heavy-tailed SGD noise and pruning-curve evaluation for PyTorch Lightning (Wan et al., ICML 2024)."""

from lightning_heavytail.selection import select_parameters
from lightning_heavytail.stable import derive_seed, sample_positive_stable, sample_stable

__all__ = ["derive_seed", "sample_positive_stable", "sample_stable", "select_parameters"]
__version__ = "0.1.0"
