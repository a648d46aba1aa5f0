"""Test-wide fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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
