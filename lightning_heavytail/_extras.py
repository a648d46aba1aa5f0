"""Optional dependencies, imported where used: a clear error names the extra to install when one is missing.

Both are default dependencies (``pip install lightning-heavytail`` gives the full demo); the extras ``structured``
and ``figures`` name them for installs that leave them out (``--no-deps``, a trimmed lock file). The check follows
Lightning's convention (``lightning_utilities``' ``RequirementCache``), and an import that fails all the same (a
broken install) gets the same message.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lightning_utilities.core.imports import RequirementCache

REQUIREMENTS: dict[str, RequirementCache] = {
    "structured": RequirementCache("torch-pruning>=1.5", "torch_pruning"),  # method="structured"
    "figures": RequirementCache("matplotlib>=3.7", "matplotlib"),  # the pruning-curve figures
}
"""Extra name -> the requirement it installs."""


def _missing(extra: str, needed_for: str, detail: str) -> ModuleNotFoundError:
    requirement = REQUIREMENTS[extra].requirement
    return ModuleNotFoundError(
        f"{needed_for} needs {requirement}, which is not installed ({detail}). Install it with"
        f" pip install 'lightning-heavytail[{extra}]'."
    )


def require(extra: str, needed_for: str) -> None:
    """Raise a ModuleNotFoundError naming ``extra`` unless its requirement is installed.

    Examples:
        >>> require("structured", "method='structured'")
    """
    requirement = REQUIREMENTS[extra]
    if not requirement:
        raise _missing(extra, needed_for, str(requirement))


def import_optional(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import ``module`` of the optional dependency ``extra``, or raise the error ``require`` raises."""
    require(extra, needed_for)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise _missing(extra, needed_for, f"import {module} failed: {err}") from err
