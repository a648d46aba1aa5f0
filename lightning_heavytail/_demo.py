"""Pieces of the demo that import Lightning (kept out of ``cli``, which parses its flags before importing it)."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_heavytail.callbacks.prune_eval import PruneEvalCallback
from lightning_heavytail.data import ClassificationDataModule


class FinalPruneEvalCallback(PruneEvalCallback):
    """``PruneEvalCallback`` that evaluates once, after the final epoch of the fit (with ``every_n_epochs=1``).

    The final epoch is the one at which ``EarlyStopping`` stopped training (it checks in the validation loop, which
    runs before ``on_train_epoch_end``, so ``trainer.should_stop`` is already set) or the last of ``max_epochs``.
    Evaluating the curves at every check of the stopping rule cost the demo more than the training itself. A
    module-level class, so that ``ddp_spawn`` can pickle it.
    """

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.should_stop or trainer.current_epoch + 1 >= (trainer.max_epochs or 0):
            super().on_train_epoch_end(trainer, pl_module)


class StoppingRuleData(LightningDataModule):
    """A ``ClassificationDataModule``'s training batches, with its training set in order as the validation data.

    The validation loop then scores the full training set, which is what the paper's stopping rule checks
    (``EarlyStopping`` on ``train_full/accuracy``, see ``Classifier``). The loaders are built in each process, so
    ``ddp_spawn`` pickles tensors, not the training loader's ``torch.Generator``.
    """

    def __init__(self, data: ClassificationDataModule) -> None:
        super().__init__()
        self.data = data

    @override
    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return self.data.train_dataloader()

    @override
    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return self.data.train_eval_dataloader()
