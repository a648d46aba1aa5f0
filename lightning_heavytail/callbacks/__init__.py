"""Lightning callbacks that delegate to the functional core."""

from lightning_heavytail.callbacks.noise import HeavyTailNoiseCallback

__all__ = ["HeavyTailNoiseCallback"]
