"""Fixtures of the callback tests: the FSDP2 driver's runs, shared by the noise and the pruning tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _drive(mode: str, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "tests.fsdp2_driver", mode, str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="session")
def fsdp2_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """``tests/fsdp2_driver.py`` run sharded (2 processes, ModelParallelStrategy + fully_shard) and in one process."""
    root = tmp_path_factory.mktemp("fsdp2")
    return {mode: _drive(mode, root / f"{mode}.pt") for mode in ("sharded", "single")}
