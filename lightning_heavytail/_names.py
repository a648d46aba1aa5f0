"""Names the package accepts, defined once and importable without torch (the command line parses against them).

``noise`` and ``data`` import their names from here; ``cli`` reads them before it imports anything heavy, so that
``lightning-heavytail demo --help`` and a bad flag answer at once.

Examples:
    >>> NOISE_STRUCTURES
    ('iid', 'neuron', 'elliptical')
    >>> set(FILE_DATASETS) <= set(DATASETS)
    True
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["DATASETS", "FILE_DATASETS", "NOISE_STRUCTURES", "DatasetName", "NoiseStructure"]

NoiseStructure = Literal["iid", "neuron", "elliptical"]
"""How noise is drawn for a parameter: one draw per entry, one per unit (row / filter), or elliptical per unit."""
NOISE_STRUCTURES: tuple[str, ...] = get_args(NoiseStructure)

DatasetName = Literal["digits", "mnist5k", "mnist", "cifar10"]
"""The datasets ``lightning_heavytail.data.load_dataset`` reads (none is ever downloaded)."""
DATASETS: tuple[str, ...] = get_args(DatasetName)
FILE_DATASETS: tuple[str, ...] = ("mnist", "cifar10")
"""The datasets read from files in a directory the user names (``data_dir`` / ``--data-dir``)."""
