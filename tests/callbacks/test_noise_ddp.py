"""Real two-process DDP on the CPU: every rank must hold bitwise the same parameters after noisy training."""

import hashlib
import json

import lightning.pytorch as pl
import pytest
import torch

from lightning_heavytail.callbacks.noise import HeavyTailNoiseCallback
from tests.helpers import MLP, trainer

pytestmark = pytest.mark.slow


class GatherChecksums(pl.Callback):
    """After training, every rank hashes its parameters; rank 0 writes all ranks' hashes to a file."""

    def __init__(self, path):
        self.path = str(path)

    def on_train_end(self, trainer, pl_module):
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in pl_module.parameters())).digest()
        local = torch.tensor([int.from_bytes(digest[:7], "big"), trainer.global_rank])
        gathered = trainer.strategy.all_gather(local)  # shape (world_size, 2)
        noise = next(c for c in trainer.callbacks if isinstance(c, HeavyTailNoiseCallback))
        steps = trainer.strategy.all_gather(torch.tensor(noise.noise_step))
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump({"hashes": gathered[:, 0].tolist(), "ranks": gathered[:, 1].tolist(),
                           "noise_steps": steps.tolist()}, f)


class RankDependentSeed(HeavyTailNoiseCallback):
    """What a naive implementation does: each rank seeds its own noise. Replicas must drift apart."""

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self._resolved_seed = (self._resolved_seed or 0) + trainer.global_rank


def _ddp_run(tmp_path, noise):
    out = tmp_path / "checksums.json"
    t = trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=2, callbacks=[noise, GatherChecksums(out)])
    t.fit(MLP(width=32, lr=0.1))
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    ("noise", "replicas_equal"),
    [
        (HeavyTailNoiseCallback(1.7, 0.05, structure="iid", seed=None), True),  # seed agreed at setup
        (RankDependentSeed(1.7, 0.05, structure="iid", seed=3), False),  # the test can see drift
        (RankDependentSeed(1.7, 0.05, structure="neuron", seed=3, sync="broadcast"), True),  # broadcast repairs it
    ],
    ids=["agreed-seed", "control-rank-seeds-drift", "broadcast"],
)
def test_two_process_ddp_replicas_stay_bitwise_equal(tmp_path, noise, replicas_equal):
    result = _ddp_run(tmp_path, noise)
    assert result["ranks"] == [0, 1]
    # 64 samples over 2 ranks in batches of 16: 2 real steps per epoch on each rank
    assert result["noise_steps"] == [4, 4]
    assert (result["hashes"][0] == result["hashes"][1]) is replicas_equal
