"""The networks of Wan et al. (2024) and a plain-SGD LightningModule to train them.

- ``BiasFreeMLP``: fully connected ReLU network without biases (one hidden layer by default: the setting the
  theory covers).
- ``VGG11Wide``: the authors' "vgg11_wide" CNN, ``128-M-256-M-512-512-M-1024-1024-M-1024-1024-M`` with 3x3
  convolutions, no batch norm and no biases, global average pooling, then one Linear layer to the classes.
- ``Classifier``: wraps any of them (or any ``nn.Module`` that maps inputs to class scores) in a LightningModule
  trained with cross-entropy and plain SGD (no momentum, no weight decay unless asked), as in the paper.

References:
    Y. Wan, M. Barsbey, A. Zaidi, U. Şimşekli, "Implicit Compressibility of Overparametrized Neural Networks Trained
    with Heavy-Tailed SGD", ICML 2024, arXiv:2306.08125.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_heavytail._checks import check_int, check_positive_finite

__all__ = ["VGG11_WIDE_LAYOUT", "BiasFreeMLP", "Classifier", "VGG11Wide"]

VGG11_WIDE_LAYOUT: tuple[int | str, ...] = (128, "M", 256, "M", 512, 512, "M", 1024, 1024, "M", 1024, 1024, "M")
"""Channels of the authors' "vgg11_wide" (``"M"``: 2x2 max pooling)."""


class BiasFreeMLP(nn.Sequential):
    """ReLU network without biases; inputs of any shape are flattened first.

    Layers are named ``hidden1, hidden2, ...`` and ``out``, so the hidden weights are ``hidden1.weight`` etc. The
    ``"paper"`` parameter selection of the callbacks picks every hidden weight and leaves ``out`` alone.

    Args:
        in_features: number of input features (e.g. 64 for 8x8 digits, 784 for MNIST).
        num_classes: number of outputs.
        width: units per hidden layer.
        depth: number of hidden layers (1: the paper's theory setting).

    Examples:
        >>> net = BiasFreeMLP(64, 10, width=32)
        >>> [name for name, _ in net.named_parameters()]
        ['hidden1.weight', 'out.weight']
        >>> net(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5, 10])
    """

    def __init__(self, in_features: int, num_classes: int, width: int = 2048, depth: int = 1) -> None:
        check_int(in_features, "in_features", minimum=1)
        check_int(num_classes, "num_classes", minimum=1)
        check_int(width, "width", minimum=1)
        check_int(depth, "depth", minimum=1)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        features = in_features
        for i in range(1, depth + 1):
            layers[f"hidden{i}"] = nn.Linear(features, width, bias=False)
            layers[f"relu{i}"] = nn.ReLU()
            features = width
        layers["out"] = nn.Linear(features, num_classes, bias=False)
        super().__init__(layers)


class VGG11Wide(nn.Module):
    """The authors' wide VGG-11-style CNN: no batch norm, no biases, global average pooling, one Linear head.

    Args:
        num_classes: number of outputs.
        in_channels: channels of the input images (3 for CIFAR-10).
        width_multiplier: scales every layer's channel count (1.0 is the paper's network, about 28 M parameters;
            a small value such as 1/16 gives a model for quick tests).

    Examples:
        >>> net = VGG11Wide(10, width_multiplier=1 / 32)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> [name for name, p in net.named_parameters()][:2]
        ['features.0.weight', 'features.3.weight']
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> None:
        super().__init__()
        check_int(num_classes, "num_classes", minimum=1)
        check_int(in_channels, "in_channels", minimum=1)
        check_positive_finite(width_multiplier, "width_multiplier")
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG11_WIDE_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out_channels = max(1, round(int(item) * width_multiplier))
            layers += [nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False), nn.ReLU()]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores of a batch of images ``(N, C, H, W)``."""
        scores: Tensor = self.classifier(self.pool(self.features(x)).flatten(1))
        return scores


class Classifier(pl.LightningModule):
    """A classification LightningModule trained with cross-entropy and plain SGD.

    Logs ``train/loss`` every step, ``train/accuracy`` per epoch, and ``val/accuracy`` / ``test/accuracy`` when
    validation or test data are given. Nothing here knows about heavy-tailed noise or pruning: the callbacks of
    this package add those from the Trainer.

    Args:
        net: the network, mapping a batch of inputs to class scores ``(N, num_classes)``.
        num_classes: number of classes (for the accuracy metrics).
        lr: learning rate of SGD.
        momentum: SGD momentum (0 in the paper).
        weight_decay: SGD weight decay (0 in the paper).

    Examples:
        >>> model = Classifier(BiasFreeMLP(64, 10, width=16), num_classes=10, lr=0.1)
        >>> optimizer = model.configure_optimizers()
        >>> type(optimizer).__name__, optimizer.defaults["lr"], optimizer.defaults["momentum"]
        ('SGD', 0.1, 0.0)
    """

    def __init__(self, net: nn.Module, num_classes: int = 10, lr: float = 0.1, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"`net` must be a torch.nn.Module, got {type(net).__name__}: {net!r}")
        check_int(num_classes, "num_classes", minimum=2)
        check_positive_finite(lr, "lr")
        check_positive_finite(momentum, "momentum", allow_zero=True)
        check_positive_finite(weight_decay, "weight_decay", allow_zero=True)
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.train_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Class scores."""
        out: Tensor = self.net(x)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch."""
        x, y = batch
        scores = self(x)
        loss = nn.functional.cross_entropy(scores, y)
        self.train_accuracy(scores, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accuracy on validation data."""
        x, y = batch
        self.val_accuracy(self(x), y)
        self.log("val/accuracy", self.val_accuracy, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accuracy on test data."""
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test/accuracy", self.test_accuracy, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        """Plain SGD over every parameter."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
