"""Small real models and data shared by the tests (importable, so DDP spawn can pickle them)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def blobs(n: int = 64, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """A separable classification set made by the code (no download)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, features, generator=g) * 3
    x = centers[y] + torch.randn(n, features, generator=g)
    return TensorDataset(x, y)


def loader(n: int = 64, batch_size: int = 16, **kwargs: Any) -> DataLoader:
    return DataLoader(blobs(n, **kwargs), batch_size=batch_size, shuffle=False)


class MLP(pl.LightningModule):
    """One-hidden-layer ReLU network, bias-free like the paper's, trained with plain SGD.

    ``grad_scale`` multiplies the loss; 0 makes every gradient zero, so the only change to the weights is the noise.
    """

    def __init__(self, features: int = 8, width: int = 16, classes: int = 3, lr: float = 0.1, grad_scale: float = 1.0,
                 bias: bool = False) -> None:
        super().__init__()
        self.hidden = nn.Linear(features, width, bias=bias)
        self.out = nn.Linear(width, classes, bias=bias)
        self.lr = lr
        self.grad_scale = grad_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(x)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y) * self.grad_scale

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return loader()


def trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    """A small, quiet CPU Trainer."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def weights(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def run_in_fresh_python(code: str) -> tuple[Any, subprocess.CompletedProcess[str]]:
    """Run ``code`` in a new interpreter; return the JSON its last line of stdout prints, and the finished process.

    For what only a fresh process shows: which modules an import loads, which warning filters it installs.
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1]), proc
