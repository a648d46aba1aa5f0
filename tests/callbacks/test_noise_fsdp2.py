"""HeavyTailNoiseCallback under FSDP2: real 2-process ModelParallelStrategy + fully_shard on the CPU (gloo).

The driver (tests/fsdp2_driver.py) trains the same module, seed and steps once sharded over two processes and once
in one process; the loss is multiplied by 0, so only the noise moves the weights. Each rank adds its shard's part of
the noise; gathered, the weights must be bitwise those of the single-process run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_heavytail.callbacks.noise import HeavyTailNoiseCallback, check_strategy_supported
from tests.fsdp2_driver import STRUCTURES

pytestmark = pytest.mark.slow


@pytest.fixture
def runs(fsdp2_runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return fsdp2_runs  # the driver's runs (tests/callbacks/conftest.py), shared with the pruning tests


@pytest.mark.parametrize("structure", STRUCTURES)
def test_sharded_noise_is_bitwise_the_single_process_noise(runs: dict[str, Any], structure: str) -> None:
    sharded, single, init = runs["sharded"][structure], runs["single"][structure], runs["single"]["init"]["params"]
    assert sharded["noise_step"] == single["noise_step"] == 4
    # hidden: 15 rows over 2 ranks (8 + 7); mid: 1 row, rank 1 holds none of it
    assert sharded["params"]["hidden.weight"].shape == (15, 8) and sharded["params"]["mid.weight"].shape == (1, 15)
    for name, value in single["params"].items():
        assert not torch.equal(value, init[name]), name  # the noise moved it
        assert torch.equal(sharded["params"][name], value), name


def test_resume_from_a_sharded_checkpoint_continues_the_noise_exactly(runs: dict[str, Any]) -> None:
    for mode in ("sharded", "single"):
        resumed, straight = runs[mode]["resumed"], runs[mode]["neuron"]
        assert resumed["noise_step"] == 4 and resumed["seed"] == 1
        for name, value in straight["params"].items():
            assert torch.equal(resumed["params"][name], value), (mode, name)


def test_fsdp1_and_deepspeed_are_refused_naming_the_supported_way() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    for strategy in (FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)):
        with pytest.raises(ValueError, match=r"ModelParallelStrategy with torch\.distributed\.fsdp\.fully_shard"):
            check_strategy_supported(strategy)
    check_strategy_supported(ModelParallelStrategy())
    with pytest.raises(ValueError, match="sync='broadcast' needs every rank to hold whole parameters"):
        check_strategy_supported(ModelParallelStrategy(), sync="broadcast")
    assert HeavyTailNoiseCallback(sync="broadcast").sync == "broadcast"  # refused at setup, where the strategy is known
