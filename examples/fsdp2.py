"""Heavy-tailed noise under sharded training (FSDP2): N GPUs, or 2 processes on a laptop CPU.

The model's layers are sharded with ``torch.distributed.fsdp.fully_shard`` in ``configure_model`` and trained with
Lightning's ``ModelParallelStrategy``. Each parameter is then a ``DTensor``: every rank holds some rows of it (uneven
shards included) and ``HeavyTailNoiseCallback`` adds to its rows exactly their part of the noise the whole tensor would
get, drawn by global index: no rank draws more than its shard, and no communication is needed. A sharded run ends
bitwise equal to an unsharded one with the same seed (the test suite checks it).

At the end rank 0 prints what each rank held and the gathered model's test accuracy and compressibility, and writes
``{out}/fsdp2_report.json``.

Run::

    python examples/fsdp2.py --devices 4                                       # 4 GPUs on this machine
    torchrun --nproc_per_node=4 examples/fsdp2.py --devices 4                  # the same, launched by torchrun
    python examples/fsdp2.py --accelerator cpu --devices 2                     # 2 CPU processes (gloo)
    python examples/fsdp2.py --accelerator cpu --devices 2 --smoke --out /tmp/fsdp2  # a few steps, for tests

See docs/multi_gpu.md ("Sharded training (FSDP2)").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_heavytail import HeavyTailNoiseCallback, fraction_prunable
from lightning_heavytail.data import ClassificationDataModule
from lightning_heavytail.known_warnings import ignore_known_warnings
from lightning_heavytail.models import BiasFreeMLP, Classifier


class ShardedClassifier(Classifier):
    """The package's plain-SGD classifier, with every Linear layer (and the root) sharded by FSDP2."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]  # set by ModelParallelStrategy before configure_model
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


class FSDP2Report(pl.Callback):
    """Rank 0 reports the shard each rank held, then the gathered model's accuracy and compressibility."""

    def __init__(self, noise: HeavyTailNoiseCallback, path: str) -> None:
        self.noise = noise
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hidden = pl_module.net.hidden1.weight
        rows = torch.tensor([hidden.to_local().shape[0]], device=pl_module.device)
        rows_per_rank = trainer.strategy.all_gather(rows).flatten().tolist()
        whole = hidden.full_tensor()  # a collective: every rank gathers (only for this report)
        datamodule = trainer.datamodule
        x, y = datamodule.data.test.tensors
        with torch.no_grad():
            accuracy = float((pl_module(x.to(pl_module.device)).argmax(1).cpu() == y).float().mean())
        if not trainer.is_global_zero:
            return
        report = {
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "parameter_type": type(hidden).__name__,
            "hidden_rows_per_rank": rows_per_rank,
            "hidden_shape": list(whole.shape),
            "noise_step": self.noise.noise_step,
            "noised_parameters": list(self.noise.noised_parameters),
            "test_accuracy": accuracy,
            "fraction_prunable_hidden": fraction_prunable(whole.cpu()),
        }
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps(report, indent=1))
        print(f"\n{report['world_size']} rank(s), {report['strategy']}, parameters are {report['parameter_type']}s")
        print(f"hidden1.weight {report['hidden_shape']}: rows per rank {rows_per_rank}")
        print(f"noise steps: {report['noise_step']}, noised: {report['noised_parameters']}")
        print(f"test accuracy {accuracy:.4f}, fraction prunable (eps 0.1) {report['fraction_prunable_hidden']:.4f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accelerator", default="auto", help="'gpu', 'cpu' or 'auto'")
    parser.add_argument("--devices", type=int, default=2, help="processes (GPUs) on this node")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--out", default="runs/fsdp2")
    parser.add_argument("--width", type=int, default=4099, help="hidden units (not a multiple of --devices: uneven)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--alpha", type=float, default=1.75)
    parser.add_argument("--sigma", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=None, help="None: rank 0 draws one and shares it")
    parser.add_argument("--smoke", action="store_true", help="tiny width and data, 2 epochs: checks that it runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.smoke:
        args.width, args.epochs = 65, 2
    pl.seed_everything(0 if args.seed is None else args.seed)  # reproducible init; the noise seed is separate
    datamodule = ClassificationDataModule(
        "digits", batch_size=args.batch_size, max_train_samples=128 if args.smoke else None,
        max_test_samples=120 if args.smoke else None,
    )
    model = ShardedClassifier(BiasFreeMLP(datamodule.in_features, datamodule.num_classes, width=args.width),
                              lr=args.lr, num_classes=datamodule.num_classes)
    noise = HeavyTailNoiseCallback(alpha=args.alpha, sigma=0.05 if args.smoke else args.sigma, structure="neuron",
                                   params="paper", seed=args.seed)
    out = Path(args.out)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices * args.num_nodes, tensor_parallel_size=1),
        max_epochs=args.epochs,
        callbacks=[noise, FSDP2Report(noise, str(out / "fsdp2_report.json"))],
        default_root_dir=str(out),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, datamodule=datamodule)
    if trainer.is_global_zero:
        return json.loads((out / "fsdp2_report.json").read_text())
    return None


if __name__ == "__main__":
    with ignore_known_warnings():  # Lightning/torch warnings no user can act on; yours still show
        main()
