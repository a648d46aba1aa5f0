"""Test-wide fixtures."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from lightning_heavytail.known_warnings import KNOWN_WARNINGS, pythonwarnings


def pytest_configure(config: pytest.Config) -> None:
    """Hide the warnings Lightning and torch print on this package's code paths (``KNOWN_WARNINGS``), and only those.

    In the test process through pytest's own filters; in the processes the tests start (ddp_spawn children, the
    examples run as scripts) through ``PYTHONWARNINGS``, which they inherit.
    """
    for message in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{re.escape(message)}")
    os.environ["PYTHONWARNINGS"] = pythonwarnings(os.environ.get("PYTHONWARNINGS"))

_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def fresh_ddp_environment() -> Iterator[None]:
    """Restore the DDP variables after each test.

    Lightning's ddp_spawn leaves MASTER_PORT in the parent's environment, so every later DDP run in the session (and
    every subprocess it starts) would reuse that port while the last run's socket may still hold it: a flaky
    "address in use". Each test starts from the environment it had.
    """
    saved = {key: os.environ.get(key) for key in _DDP_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
