"""Heavy-tailed noise and pruning curves under DDP: N GPUs, several nodes, or 2 processes on a laptop CPU.

Both callbacks are DDP-aware. ``HeavyTailNoiseCallback`` agrees on one seed across ranks at setup, so every rank adds
bitwise the same noise and the replicas stay equal (DDP's gradient all-reduce alone would not keep them equal).
``PruneEvalCallback`` gives every rank every ``world_size``-th batch of the evaluation data and syncs the metrics with
torchmetrics, so every rank gets the same curve, equal to the one a single process computes on all the data.

At the end of training this script checks both claims: every rank hashes its parameters and reports its curve and how
many samples it evaluated; rank 0 gathers them, compares, evaluates the full test set again in-process as a reference,
prints the final pruning curve, and writes everything to ``{out}/ddp_report.json``.

Run::

    python examples/multi_gpu.py --devices 4                                         # 4 GPUs on this machine
    torchrun --nproc_per_node=4 examples/multi_gpu.py --devices 4                    # the same, launched by torchrun
    python examples/multi_gpu.py --accelerator cpu --devices 2 --strategy ddp        # 2 CPU processes
    python examples/multi_gpu.py --accelerator cpu --devices 2 --smoke --out /tmp/ddp  # a few steps, for tests

See docs/multi_gpu.md for SLURM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.classification import MulticlassAccuracy

from lightning_heavytail import HeavyTailNoiseCallback, PruneEvalCallback, evaluate_pruning_curve
from lightning_heavytail.data import ClassificationDataModule
from lightning_heavytail.known_warnings import ignore_known_warnings
from lightning_heavytail.models import BiasFreeMLP, Classifier

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)


class CountingForward:
    """``forward_fn`` for PruneEvalCallback that counts the evaluation samples this rank sees (to show the sharding).

    It also sees the callback's output checks: one forward on the rank's first batch at fit start and one before each
    evaluation (which loads each batch once and runs every level of every method, and the epsilon point, on it).
    """

    def __init__(self) -> None:
        self.samples = 0

    def __call__(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        self.samples += len(y)
        return model(x), y


class DDPReport(pl.Callback):
    """Gathers every rank's parameter checksum, noise step count, curve and sample count; rank 0 compares and prints."""

    def __init__(self, noise: HeavyTailNoiseCallback, prune_eval: PruneEvalCallback, counter: CountingForward,
                 path: str) -> None:
        self.noise = noise
        self.prune_eval = prune_eval
        self.counter = counter
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.parameters()))
        curve = self.prune_eval.history[-1]["curves"]["global"]
        local = {
            "checksum": torch.tensor(int.from_bytes(digest.digest()[:7], "big")),
            "noise_step": torch.tensor(self.noise.noise_step),
            "samples_evaluated": torch.tensor(self.counter.samples),
            "accuracy": torch.tensor(curve["metrics"]["accuracy"], dtype=torch.float64),
        }
        # all_gather is a collective: every rank must call it, in the same order
        gathered = {key: trainer.strategy.all_gather(value.to(pl_module.device)).cpu() for key, value in local.items()}
        if not trainer.is_global_zero:
            return
        if trainer.world_size == 1:
            gathered = {key: value.unsqueeze(0) for key, value in gathered.items()}
        datamodule = trainer.datamodule
        # reference: the whole test set in this one process; sync_on_compute=False because the other ranks do not
        # take part (a synced compute() on rank 0 alone would hang)
        reference = evaluate_pruning_curve(
            pl_module, datamodule.test_dataloader(), SPARSITIES, method="global",
            metrics=MulticlassAccuracy(num_classes=datamodule.num_classes, average="micro", sync_on_compute=False),
        )
        report = {
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "checksums": gathered["checksum"].tolist(),
            "noise_steps": gathered["noise_step"].tolist(),
            "samples_evaluated": gathered["samples_evaluated"].tolist(),
            "test_samples": len(datamodule.data.test),
            # every level of each curve, and the epsilon point, runs on every batch
            "evaluations": sum(len(entry["curves"]) * len(SPARSITIES) + bool(entry["at_epsilon"])
                               for entry in self.prune_eval.history),
            # one at fit start, one before each evaluation
            "output_checks": 1 + len(self.prune_eval.history),
            "sparsities": curve["sparsities"],
            "accuracy_per_rank": gathered["accuracy"].tolist(),
            "accuracy_single_process": next(iter(reference.metrics.values())),
            "seed": self.noise.resolved_seed,
        }
        report["replicas_equal"] = len(set(report["checksums"])) == 1
        report["curves_equal"] = all(acc == report["accuracy_single_process"] for acc in report["accuracy_per_rank"])
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps(report, indent=1))
        print(f"\n{trainer.world_size} rank(s), {report['strategy']}, seed {report['seed']}")
        print(f"parameter checksums per rank: {report['checksums']} -> replicas equal: {report['replicas_equal']}")
        print(f"evaluation samples per rank:  {report['samples_evaluated']} (test set: {report['test_samples']}"
              f" samples x {report['evaluations']} evaluations, plus one batch per output check:"
              f" {report['output_checks']})")
        print("final pruning curve (global magnitude pruning, test accuracy):")
        for level, acc in zip(report["sparsities"], report["accuracy_per_rank"][0], strict=True):
            print(f"  sparsity {level:.3f}: {acc:.4f}")
        print(f"same curve on every rank and in a single process: {report['curves_equal']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accelerator", default="auto", help="'gpu', 'cpu' or 'auto'")
    parser.add_argument("--devices", default="auto", help="devices per node: a number, or 'auto' for all of them")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--strategy", default="ddp", help="'ddp' (also under torchrun and SLURM) or 'ddp_spawn'")
    parser.add_argument("--sync", default="seed", choices=("seed", "broadcast"),
                        help="'broadcast' also sends rank 0's noised weights to all ranks (mixed GPU models)")
    parser.add_argument("--out", default="runs/multi_gpu")
    parser.add_argument("--width", type=int, default=4096)
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
        args.width, args.epochs = 64, 2
    devices: int | str = int(args.devices) if args.devices.lstrip("-").isdigit() else args.devices
    pl.seed_everything(0 if args.seed is None else args.seed)  # reproducible init; the noise seed is separate
    datamodule = ClassificationDataModule(
        "digits", batch_size=args.batch_size, eval_batch_size=30 if args.smoke else 60,
        max_train_samples=128 if args.smoke else None, max_test_samples=120 if args.smoke else None,
    )
    model = Classifier(BiasFreeMLP(datamodule.in_features, datamodule.num_classes, width=args.width), lr=args.lr,
                       num_classes=datamodule.num_classes)
    # a large sigma in smoke mode, so that replicas drawing different noise could not end up equal by chance
    noise = HeavyTailNoiseCallback(alpha=args.alpha, sigma=0.05 if args.smoke else args.sigma, structure="neuron",
                                   params="paper", seed=args.seed, sync=args.sync)
    counter = CountingForward()
    # no `dataloader=`: the datamodule's test_dataloader, sharded by the callback
    prune_eval = PruneEvalCallback(sparsities=SPARSITIES, method=("global", "neuron"), forward_fn=counter)
    out = Path(args.out)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        max_epochs=args.epochs,
        callbacks=[noise, prune_eval, DDPReport(noise, prune_eval, counter, str(out / "ddp_report.json"))],
        default_root_dir=str(out),
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, datamodule=datamodule)
    if trainer.is_global_zero:
        return json.loads((out / "ddp_report.json").read_text())
    return None


if __name__ == "__main__":
    with ignore_known_warnings():  # Lightning/torch warnings no user can act on; yours still show
        main()
