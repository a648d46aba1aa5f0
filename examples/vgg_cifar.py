"""The paper's CNN experiment: the authors' wide VGG-11 (no batch norm, no biases) on CIFAR-10 with filter noise.

Heavy-tailed noise goes to the hidden conv kernels with one draw per filter (``structure="neuron"``: "type 1" of the
authors' code); the first conv and the output layer are left out, as in the paper (``params="paper"``, see
``lightning_heavytail.selection``). After every epoch ``PruneEvalCallback`` prunes whole filters by l2 norm
(``"neuron"``) and single weights by magnitude (``"global"``), over the same hidden kernels, and logs test accuracy.

CIFAR-10 is never downloaded: point ``--data-dir`` at the python batches (``data_batch_1`` .. ``data_batch_5``,
``test_batch``, directly or in ``cifar-10-batches-py/``). Run::

    python examples/vgg_cifar.py --data-dir ~/data/cifar10 --accelerator gpu --epochs 100
    python examples/vgg_cifar.py --data-dir ~/data/cifar10 --width-multiplier 0.25 --epochs 5   # smaller, faster
    python examples/vgg_cifar.py --data-dir /tmp/fake_cifar --smoke --out /tmp/vgg              # a few steps, tests
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_heavytail import HeavyTailNoiseCallback, PruneEvalCallback, select_parameters
from lightning_heavytail.data import ClassificationDataModule
from lightning_heavytail.known_warnings import ignore_known_warnings
from lightning_heavytail.models import Classifier, VGG11Wide


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="directory with the CIFAR-10 python batches")
    parser.add_argument("--out", default="runs/vgg_cifar")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto", help="per node: a number, or 'auto' (see docs/multi_gpu.md)")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="'auto' is DDP with several devices; 'ddp', 'ddp_spawn'")
    parser.add_argument("--width-multiplier", type=float, default=1.0, help="1.0: the paper's network (28 M params)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=1.75)
    parser.add_argument("--sigma", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--precision", default="32-true", help="e.g. 'bf16-mixed' on GPUs (noise is drawn in fp32)")
    parser.add_argument("--smoke", action="store_true", help="1 CPU process, width 1/32, 64 images, 2x2 steps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.smoke:
        args.width_multiplier, args.epochs, args.batch_size, args.num_workers = 1 / 32, 2, 16, 0
    pl.seed_everything(args.seed, workers=True)
    datamodule = ClassificationDataModule(
        "cifar10", data_dir=args.data_dir, batch_size=args.batch_size, eval_batch_size=32 if args.smoke else 500,
        seed=args.seed, num_workers=args.num_workers,
        max_train_samples=64 if args.smoke else None, max_test_samples=64 if args.smoke else None,
    )
    try:
        datamodule.setup("fit")  # load now, so a missing directory fails before anything is built
    except FileNotFoundError as err:
        raise SystemExit(
            f"error: CIFAR-10 not found: {err}\nThis example never downloads data. Download the python version"
            " (cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html), unpack it, and pass"
            " --data-dir to the unpacked directory."
        ) from None

    net = VGG11Wide(datamodule.num_classes, in_channels=3, width_multiplier=args.width_multiplier)
    model = Classifier(net, num_classes=datamodule.num_classes, lr=args.lr)
    # "paper": every conv kernel but the first (net.features.0.weight), and not the output layer (net.classifier)
    noised = [name for name, _ in select_parameters(model, "paper")]
    noise = HeavyTailNoiseCallback(alpha=args.alpha, sigma=args.sigma, structure="neuron", params="paper",
                                   seed=args.seed)
    prune_eval = PruneEvalCallback(
        sparsities=(0.0, 0.3, 0.5, 0.7, 0.8, 0.9) if not args.smoke else (0.0, 0.5, 0.9),
        method=("neuron", "global"),  # the first method feeds pruning/auc and the short names
        params="paper",
    )
    out = Path(args.out)
    trainer = pl.Trainer(
        accelerator="cpu" if args.smoke else args.accelerator,
        devices=1 if args.smoke else (int(args.devices) if args.devices.isdigit() else args.devices),
        num_nodes=1 if args.smoke else args.num_nodes,
        strategy="auto" if args.smoke else args.strategy,
        precision=args.precision,
        max_epochs=args.epochs,
        limit_train_batches=2 if args.smoke else None,
        log_every_n_steps=1 if args.smoke else 50,
        logger=TensorBoardLogger(save_dir=str(out), name="tensorboard"),
        callbacks=[noise, prune_eval, ModelCheckpoint(monitor="pruning/auc", mode="max")],
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, datamodule=datamodule)

    if not trainer.is_global_zero:
        return {}
    last = prune_eval.history[-1]
    result = {
        "noised_params": noised,
        "noise_steps": noise.noise_step,
        "epochs_evaluated": [entry["epoch"] for entry in prune_eval.history],
        "curves": {method: {"sparsity": curve["sparsities"], "accuracy": curve["metrics"]["accuracy"]}
                   for method, curve in last["curves"].items()},
        "auc": last["auc"],
        "log_dir": trainer.log_dir,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    for method, curve in result["curves"].items():
        pairs = ", ".join(f"{s:.2f}: {a:.3f}" for s, a in zip(curve["sparsity"], curve["accuracy"], strict=True))
        print(f"{method:>7} pruning, test accuracy at measured sparsity: {pairs}")
    return result


if __name__ == "__main__":
    with ignore_known_warnings():  # Lightning/torch warnings no user can act on; yours still show
        main()
