"""Lightning callbacks that delegate to the functional core."""

from lightning_heavytail.callbacks.noise import HeavyTailNoiseCallback
from lightning_heavytail.callbacks.prune_eval import PruneEvalCallback

__all__ = ["HeavyTailNoiseCallback", "PruneEvalCallback"]
