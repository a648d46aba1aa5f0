"""Warnings that Lightning and torch print on this package's own code paths, and a way to hide just those.

With torch 2.13 and Lightning 2.6 every fit prints a ``FutureWarning`` about ``LeafSpec`` from inside Lightning, DDP
runs one about ``torch.distributed.nn.functional.all_gather``, and the examples' ``Classifier`` trained without
validation data gets "validation_step but no val_dataloader". None of them is something a user of the demo or the
examples can act on. ``ignore_known_warnings()`` hides exactly these (matched by the start of the message), in this
process and in the processes it starts (``ddp_spawn`` children, Lightning's DDP launcher) through
``PYTHONWARNINGS``, and puts everything back on exit. The demo, the examples and the test suite's configuration
use it; importing the package installs no filter, so a user's own warnings are never touched.

Examples:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     with ignore_known_warnings():
    ...         warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
    ...         warnings.warn("a warning of your own")
    >>> [str(w.message) for w in seen]
    ['a warning of your own']
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["KNOWN_WARNINGS", "ignore_known_warnings", "pythonwarnings"]

KNOWN_WARNINGS: tuple[str, ...] = (
    # Lightning 2.6's CombinedLoader builds a torch LeafSpec, deprecated since torch 2.10: every fit
    "`isinstance(treespec",
    # Lightning's DDP all_gather (PruneEvalCallback's sync) calls a function torch 2.13 deprecates
    "torch.distributed.nn.functional.all_gather is deprecated",
    # the models' validation_step serves the demo's stopping rule; the examples train without validation data
    "You defined a `validation_step` but have no `val_dataloader`",
    # the data are small in-memory tensors: worker processes would cost more than they save
    "The 'train_dataloader' does not have many workers",
    "The 'val_dataloader' does not have many workers",
    "The 'test_dataloader' does not have many workers",
)
"""The start of each hidden message (literal text, no comma: ``PYTHONWARNINGS`` splits on commas)."""


def pythonwarnings(existing: str | None = None) -> str:
    """``PYTHONWARNINGS`` that hides ``KNOWN_WARNINGS`` in a new Python process, after the ``existing`` entries.

    Examples:
        >>> pythonwarnings("error::ResourceWarning").split(",")[:2]
        ['error::ResourceWarning', 'ignore:`isinstance(treespec']
    """
    return ",".join([*filter(None, [existing]), *(f"ignore:{message}" for message in KNOWN_WARNINGS)])


@contextmanager
def ignore_known_warnings() -> Iterator[None]:
    """Hide ``KNOWN_WARNINGS`` in this process and in the processes started inside the block; restore on exit."""
    saved = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = pythonwarnings(saved)
    try:
        with warnings.catch_warnings():
            for message in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=re.escape(message))
            yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = saved
