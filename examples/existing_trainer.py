"""Add heavy-tailed noise and pruning curves to an existing Lightning project by changing only the Trainer.

``DigitsMLP`` below stands for your own LightningModule: it knows nothing about this package. The two callbacks are
added to the Trainer's ``callbacks`` list, and ``ModelCheckpoint`` keeps the checkpoint with the best area under the
pruning curve (``pruning/auc``), which ``PruneEvalCallback`` logs through ``pl_module.log``.

Run (bundled scikit-learn digits, no download; TensorBoard logs and checkpoints under ``--out``)::

    python examples/existing_trainer.py --out runs/existing
    tensorboard --logdir runs/existing
    python examples/existing_trainer.py --smoke --out /tmp/smoke   # a few steps, for tests
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_heavytail import HeavyTailNoiseCallback, PruneEvalCallback
from lightning_heavytail.known_warnings import ignore_known_warnings


class DigitsMLP(pl.LightningModule):
    """An ordinary LightningModule: a one-hidden-layer bias-free ReLU network trained with plain SGD."""

    def __init__(self, width: int = 2048, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hidden = nn.Linear(64, width, bias=False)
        self.out = nn.Linear(width, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.flatten(1))))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def digits(max_samples: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits, standardized, split 80/20 (what an existing project's data code does)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    n = max_samples  # None keeps everything
    return TensorDataset(x_train[:n], y_train[:n]), TensorDataset(x_test[:n], y_test[:n])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/existing_trainer", help="logs, checkpoints and results go here")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=1.75)
    parser.add_argument("--sigma", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny width, 2 epochs of 3 steps: checks that it runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.smoke:
        args.width, args.epochs = 32, 2
    pl.seed_everything(args.seed, workers=True)
    train, test = digits(max_samples=96 if args.smoke else None)
    train_loader = DataLoader(train, batch_size=32 if args.smoke else args.batch_size, shuffle=True)
    test_loader = DataLoader(test, batch_size=512)

    out = Path(args.out)
    noise = HeavyTailNoiseCallback(alpha=args.alpha, sigma=args.sigma, structure="neuron", params="paper",
                                   seed=args.seed)
    # the test set is passed explicitly; without `dataloader=` the callback would use the validation loaders
    prune_eval = PruneEvalCallback(sparsities=(0.0, 0.5, 0.8, 0.9, 0.95), method=("global", "neuron"),
                                   dataloader=test_loader)
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", monitor="pruning/auc", mode="max",
                                 filename="{epoch}-{pruning/auc:.4f}", auto_insert_metric_name=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=TensorBoardLogger(save_dir=str(out), name="tensorboard"),
        callbacks=[noise, prune_eval, checkpoint],
        log_every_n_steps=1 if args.smoke else 10,
        limit_train_batches=3 if args.smoke else None,
        enable_progress_bar=not args.smoke,
    )
    trainer.fit(DigitsMLP(width=args.width, lr=args.lr), train_loader, test_loader)

    last = prune_eval.history[-1]
    result = {
        "noise_steps": noise.noise_step,
        "seed": noise.resolved_seed,
        "epochs_evaluated": [entry["epoch"] for entry in prune_eval.history],
        "sparsities": last["curves"]["global"]["sparsities"],
        "accuracy_global": last["curves"]["global"]["metrics"]["accuracy"],
        "accuracy_neuron": last["curves"]["neuron"]["metrics"]["accuracy"],
        "auc": last["auc"],
        "best_checkpoint": checkpoint.best_model_path,
        "best_auc": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "log_dir": trainer.log_dir,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    with ignore_known_warnings():  # Lightning/torch warnings no user can act on; yours still show
        main()
