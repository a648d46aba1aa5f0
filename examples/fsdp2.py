"""Heavy-tailed noise and pruning curves under sharded training (FSDP2): N GPUs, or 2 processes on a laptop CPU.

The model's layers are sharded with ``torch.distributed.fsdp.fully_shard`` in ``configure_model`` and trained with
Lightning's ``ModelParallelStrategy``. Each parameter is then a ``DTensor``: every rank holds some rows of it (uneven
shards included) and ``HeavyTailNoiseCallback`` adds to its rows exactly their part of the noise the whole tensor would
get, drawn by global index: no rank draws more than its shard, and no communication is needed. A sharded run ends
bitwise equal to an unsharded one with the same seed (the test suite checks it).

``PruneEvalCallback`` evaluates the pruning curves at the end of each epoch on the test set, each rank its share of
the batches: thresholds are global (found by a distributed selection over the shards, nothing gathered), each rank
masks its own rows, and the curve is the one the same weights give in one process.

At the end rank 0 prints what each rank held, the gathered model's test accuracy and compressibility, the last
pruning curves and whether one process evaluating the gathered weights gets the same curves, and writes
``{out}/fsdp2_report.json``. (Gathering the model is for this report only: the callbacks never do.)

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
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_heavytail import HeavyTailNoiseCallback, PruneEvalCallback, fraction_prunable
from lightning_heavytail.data import ClassificationDataModule
from lightning_heavytail.known_warnings import ignore_known_warnings
from lightning_heavytail.models import BiasFreeMLP, Classifier
from lightning_heavytail.pruning import evaluate_pruning_curve


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
    """Rank 0 reports the shard each rank held, the gathered model's accuracy, compressibility, pruning curves."""

    def __init__(self, noise: HeavyTailNoiseCallback, prune: PruneEvalCallback, path: str) -> None:
        self.noise = noise
        self.prune = prune
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hidden = pl_module.net.hidden1.weight
        rows = torch.tensor([hidden.to_local().shape[0]], device=pl_module.device)
        rows_per_rank = trainer.strategy.all_gather(rows).flatten().tolist()
        whole = hidden.full_tensor()  # a collective: every rank gathers (only for this report)
        weights = {name: p.full_tensor().cpu() for name, p in pl_module.named_parameters()}
        datamodule = trainer.datamodule
        x, y = datamodule.data.test.tensors
        with torch.no_grad():
            accuracy = float((pl_module(x.to(pl_module.device)).argmax(1).cpu() == y).float().mean())
        if not trainer.is_global_zero:
            return
        last = self.prune.records[-1]
        # the same weights in one process, on the whole test set: the curves the sharded run logged
        single = Classifier(BiasFreeMLP(datamodule.in_features, datamodule.num_classes, width=hidden.shape[0]),
                            num_classes=datamodule.num_classes)
        single.load_state_dict(weights)
        # (rank 0 alone: its metric must not wait for the other ranks to sync)
        alone = MetricCollection({"accuracy": MulticlassAccuracy(datamodule.num_classes, average="micro",
                                                                 sync_on_compute=False)})
        same = all(evaluate_pruning_curve(single, datamodule.test_dataloader(), self.prune.sparsities, method=method,
                                          metrics=alone) == curve for method, curve in last.curves.items())
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
            "pruning": {method: {"sparsities": curve.sparsities, "accuracy": curve.metrics["accuracy"]}
                        for method, curve in last.curves.items()},
            "pruning_epoch": last.epoch,
            "epsilon_ratio": last.at_epsilon.point.ratio if last.at_epsilon else None,
            "same_curves_in_one_process": same,
        }
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps(report, indent=1))
        print(f"\n{report['world_size']} rank(s), {report['strategy']}, parameters are {report['parameter_type']}s")
        print(f"hidden1.weight {report['hidden_shape']}: rows per rank {rows_per_rank}")
        print(f"noise steps: {report['noise_step']}, noised: {report['noised_parameters']}")
        print(f"test accuracy {accuracy:.4f}, fraction prunable (eps 0.1) {report['fraction_prunable_hidden']:.4f}")
        for method, curve in report["pruning"].items():
            points = ", ".join(f"{s:.2f}: {a:.3f}" for s, a in zip(curve["sparsities"], curve["accuracy"], strict=True))
            print(f"pruning curve ({method}, epoch {last.epoch}), sparsity: accuracy  {points}")
        print(f"same curves when one process evaluates the gathered weights: {same}")


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
        "digits", batch_size=args.batch_size, eval_batch_size=args.batch_size,  # test batches for every rank
        max_train_samples=128 if args.smoke else None,
        max_test_samples=120 if args.smoke else None,
    )
    model = ShardedClassifier(BiasFreeMLP(datamodule.in_features, datamodule.num_classes, width=args.width),
                              lr=args.lr, num_classes=datamodule.num_classes)
    noise = HeavyTailNoiseCallback(alpha=args.alpha, sigma=0.05 if args.smoke else args.sigma, structure="neuron",
                                   params="paper", seed=args.seed)
    # the mask methods prune sharded weights; the test set's batches are dealt to the ranks
    prune = PruneEvalCallback(sparsities=(0.0, 0.5, 0.9) if args.smoke else (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
                              method=("global", "neuron"), log_figure=False, filename="prune_eval")
    out = Path(args.out)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices * args.num_nodes, tensor_parallel_size=1),
        max_epochs=args.epochs,
        callbacks=[noise, prune, FSDP2Report(noise, prune, str(out / "fsdp2_report.json"))],
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
