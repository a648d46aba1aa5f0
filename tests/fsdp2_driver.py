"""Runs small fits under FSDP2 (ModelParallelStrategy + fully_shard, 2 CPU processes, gloo) or in one process.

Run as a script, ``python -m tests.fsdp2_driver MODE OUT`` (MODE ``sharded`` or ``single``); Lightning's launcher
re-runs it for rank 1. Every fit's whole (gathered) parameters, and the callbacks' figures, are saved by rank 0 into
the ``OUT`` file as a dict keyed by run name. The loss is multiplied by 0, so SGD (lr 0.1, which sets the noise scale)
leaves the weights alone and only the noise moves them. The "prune" run adds a PruneEvalCallback (the mask methods,
the epsilon point, the compressibility report) on 9 evaluation batches: 5 on rank 0 and 4 on rank 1 when sharded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_heavytail import HeavyTailNoiseCallback, PruneEvalCallback
from tests.callbacks.test_prune_eval import counting_metrics

STRUCTURES = ("iid", "neuron", "elliptical")
PRUNE_LEVELS = (0.0, 0.3, 0.5, 0.8)
PRUNE_METHODS = ("global", "layerwise", "neuron")


class ShardedNet(pl.LightningModule):
    """Dims 0 of 15 and 1 rows: uneven shards over 2 ranks (8 + 7), and a parameter rank 1 holds no part of.

    ``per_layer=False`` shards the root alone: FSDP2 then keeps every parameter gathered after a forward.
    """

    def __init__(self, lr: float = 0.1, per_layer: bool = True) -> None:
        super().__init__()
        self.lr = lr
        self.per_layer = per_layer
        self.hidden = nn.Linear(8, 15, bias=False)
        self.mid = nn.Linear(15, 1, bias=False)
        self.out = nn.Linear(1, 3, bias=False)

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:  # one process: nothing to shard
            return
        from torch.distributed.fsdp import fully_shard

        for layer in (self.hidden, self.mid, self.out) if self.per_layer else ():
            fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.hidden(x)))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y) * 0.0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])  # a forward before the pruning evaluation: FSDP2 leaves a root-only model gathered after it

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)),
                      batch_size=8)


def eval_data() -> DataLoader:
    """9 batches (the last of 4 samples): an uneven number per rank."""
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(68, 8, generator=g), torch.randint(0, 3, (68,), generator=g)),
                      batch_size=8)


def pruning_callback() -> PruneEvalCallback:
    return PruneEvalCallback(PRUNE_LEVELS, method=PRUNE_METHODS, dataloader=eval_data(), metrics=counting_metrics(),
                             report_sparsities=(0.3, 0.9), log_figure=False, filename=None)


def whole_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered (a collective under sharding: every rank calls it)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).clone()
            for name, p in model.named_parameters()}


def fit(mode: str, root: Path, steps: int, callbacks: list[Any], ckpt_path: str | None = None,
        checkpoint: bool = False, per_layer: bool = True, validate: bool = False) -> tuple[pl.Trainer, ShardedNet]:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.manual_seed(0)
    model = ShardedNet(per_layer=per_layer)
    sharded = mode == "sharded"
    if checkpoint:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=steps)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2 if sharded else 1, max_steps=steps, logger=False, callbacks=callbacks,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "auto",
        enable_checkpointing=checkpoint, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(model, data(), eval_data() if validate else None, ckpt_path=ckpt_path)
    return trainer, model


def main(mode: str, out: str) -> None:
    root = Path(out).parent / f"runs_{mode}"
    results: dict[str, Any] = {}
    trainer = None
    for structure in STRUCTURES:
        noise = HeavyTailNoiseCallback(1.7, 0.1, structure=structure, params="weights", seed=1)
        trainer, model = fit(mode, root / structure, 4, [noise])
        results[structure] = {"params": whole_parameters(model), "noise_step": noise.noise_step}
    # resume from a (distributed, under sharding) checkpoint written after 2 steps, to 4 steps
    first = HeavyTailNoiseCallback(1.7, 0.1, structure="neuron", params="weights", seed=1)
    fit(mode, root / "resume", 2, [first], checkpoint=True)
    # no seed: the seed and the step count come from the checkpoint
    resumed = HeavyTailNoiseCallback(1.7, 0.1, structure="neuron", params="weights")
    trainer, model = fit(mode, root / "resumed", 4, [resumed], ckpt_path=str(root / "resume" / "last.ckpt"))
    results["resumed"] = {"params": whole_parameters(model), "noise_step": resumed.noise_step,
                          "seed": resumed.resolved_seed}
    # the pruning evaluation of the noised weights (equal in both modes, see above), the layers sharded one by one,
    # then the root alone (its parameters stay gathered after a forward: the evaluation must reshard after a write),
    # each after a validation loop of 9 batches (5 and 4 per rank) whose last forward leaves the root gathered
    for run, per_layer in (("prune", True), ("prune_root", False)):
        noise = HeavyTailNoiseCallback(1.7, 0.3, structure="neuron", params="weights", seed=3)
        prune = pruning_callback()
        trainer, model = fit(mode, root / run, 4, [noise, prune], per_layer=per_layer, validate=True)
        results[run] = {"params": whole_parameters(model), "history": prune.history,
                        "logged": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    torch.manual_seed(0)
    results["init"] = {"params": whole_parameters(ShardedNet())}
    if trainer.is_global_zero:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
