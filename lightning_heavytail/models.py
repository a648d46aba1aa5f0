"""The networks of Wan et al. (2024) and a plain-SGD LightningModule to train them.

- ``BiasFreeMLP``: fully connected ReLU network without biases (one hidden layer by default), the authors' practical
  network: standard parametrization, both layers trained.
- ``MeanFieldMLP``: the network of the theory, ``f(x) = (1/n) sum_j b_j relu(w_j . x)`` with the output layer ``b``
  fixed and the hidden step ``n * eta``.
- ``VGG11Wide``: the authors' "vgg11_wide" CNN, ``128-M-256-M-512-512-M-1024-1024-M-1024-1024-M`` with 3x3
  convolutions, no batch norm and no biases, global average pooling, then one Linear layer to the classes.
- ``Classifier``: wraps any of them (or any ``nn.Module`` that maps inputs to class scores) in a LightningModule
  trained with cross-entropy and plain SGD (no momentum, no weight decay unless asked), as in the paper.

References:
    Y. Wan, M. Barsbey, A. Zaidi, U. Şimşekli, "Implicit Compressibility of Overparametrized Neural Networks Trained
    with Heavy-Tailed SGD", ICML 2024, arXiv:2306.08125.
    S. Mei, A. Montanari, P.-M. Nguyen, "A mean field view of the landscape of two-layer neural networks", PNAS 115
    (33), 2018.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_heavytail._checks import check_int, check_positive_finite

__all__ = ["VGG11_WIDE_LAYOUT", "BiasFreeMLP", "Classifier", "MeanFieldMLP", "VGG11Wide"]

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


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by a constant in the backward pass."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


class MeanFieldMLP(nn.Module):
    r"""The one-hidden-layer network of the theory, in the mean-field parametrization.

    ``f(x) = (1/n) * sum_{j=1..n} b_j * relu(w_j . x)``, bias-free, ``n = width``, with

    - ``hidden1.weight`` (rows ``w_j``, shape ``(n, d)``): initialized ``N(0, 1/d)``, so each ``w_j . x`` is O(1);
    - ``out.weight`` (columns ``b_j``, shape ``(classes, n)``): initialized ``N(0, 1)`` and **frozen**
      (``requires_grad=False``), as in the theorem, where only the hidden layer is trained.

    **The step.** Mean-field SGD moves each unit by ``n * eta`` times its gradient, ``w_j <- w_j - n * eta *
    dL/dw_j`` (each ``dL/dw_j`` carries the factor ``1/n``, so every unit moves O(eta) per step), and the heavy-tailed
    noise is the Euler step of the Lévy-driven equation ``dw_j = -n dL/dw_j dt + sigma dL_t`` with time step
    ``eta``: ``sigma * eta**(1/alpha)`` (Wan et al., 2024; Mei et al., 2018). Here the factor ``n`` lives in the
    model: the backward pass multiplies the gradient of ``hidden1.weight`` by ``n`` (a custom autograd function in
    ``forward``, identity in value), so an optimizer with learning rate ``eta`` takes the step ``n * eta`` while its
    param group's ``lr`` stays ``eta``. ``HeavyTailNoiseCallback`` reads that ``lr`` as the time step and adds
    ``sigma * eta**(1/alpha)``, not ``sigma * (n * eta)**(1/alpha)``, which would be ``n**(1/alpha)`` (about 130 at
    ``n = 5000``, ``alpha = 1.75``) times too much.

    Consequences of keeping ``n`` in the gradient: whatever reads ``hidden1.weight.grad`` (gradient clipping,
    gradient-norm logging, adaptive optimizers such as Adam, which undo the scale) sees ``n`` times the gradient of
    the loss; SGD's weight decay is applied with ``eta``, not ``n * eta``. The factor is applied in ``forward``
    rather than as a tensor hook so that it survives ``deepcopy``, pickling (``ddp_spawn``) and ``torch.compile``.

    Args:
        in_features: input features (inputs of any shape are flattened).
        num_classes: outputs.
        width: hidden units ``n``.

    Examples:
        >>> net = MeanFieldMLP(64, 10, width=100)
        >>> [(name, p.requires_grad) for name, p in net.named_parameters()]
        [('hidden1.weight', True), ('out.weight', False)]
        >>> x = torch.randn(3, 64)
        >>> manual = torch.relu(x @ net.hidden1.weight.T) @ net.out.weight.T / 100
        >>> torch.allclose(net(x), manual)
        True
    """

    def __init__(self, in_features: int, num_classes: int, width: int = 5000) -> None:
        super().__init__()
        check_int(in_features, "in_features", minimum=1)
        check_int(num_classes, "num_classes", minimum=1)
        check_int(width, "width", minimum=1)
        self.width = width
        self.flatten = nn.Flatten()
        self.hidden1 = nn.Linear(in_features, width, bias=False)
        self.out = nn.Linear(width, num_classes, bias=False)
        with torch.no_grad():
            self.hidden1.weight.normal_(0.0, in_features**-0.5)
            self.out.weight.normal_(0.0, 1.0)
        self.out.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores ``(1/n) * relu(x W^T) B^T``; the backward pass scales the hidden gradient by ``n``."""
        hidden: Tensor = _ScaleGradient.apply(self.hidden1.weight, float(self.width))  # type: ignore[no-untyped-call]
        features = torch.relu(nn.functional.linear(self.flatten(x), hidden))
        scores: Tensor = nn.functional.linear(features, self.out.weight) / self.width
        return scores


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

    Logs ``train/loss`` every step, ``train/accuracy`` per epoch (the running accuracy over the epoch's batches, each
    scored before its step), and ``{val_name}/accuracy`` / ``test/accuracy`` when validation or test data are given.
    Nothing here knows about heavy-tailed noise or pruning: the callbacks of this package add those from the Trainer.

    **The paper's stopping rule** ("train until the accuracy on the full training set reaches 95%, checked every k
    steps") needs no new mechanism: pass the training set, in order, as the validation data, name what is logged with
    ``val_name="train_full"``, and let Lightning's ``EarlyStopping`` stop at the threshold::

        model = Classifier(net, num_classes=10, lr=0.5, val_name="train_full")
        stop = EarlyStopping(monitor="train_full/accuracy", mode="max", stopping_threshold=0.95,
                             patience=10**9, check_on_train_epoch_end=False)
        trainer = pl.Trainer(max_epochs=1000, check_val_every_n_epoch=k, callbacks=[stop])  # or val_check_interval
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=train_loader_in_order)

    The check runs after the epoch's last step (noise included), and training ends right after it, so the final model
    is the one that was checked. ``EarlyStopping`` compares strictly (``>`` 0.95), and ``patience`` must be large,
    since it would otherwise also stop after that many checks without improvement.

    Args:
        net: the network, mapping a batch of inputs to class scores ``(N, num_classes)``.
        num_classes: number of classes (for the accuracy metrics).
        lr: learning rate of SGD.
        momentum: SGD momentum (0 in the paper).
        weight_decay: SGD weight decay (0 in the paper).
        val_name: prefix of what the validation loop logs (``"{val_name}/accuracy"``); e.g. ``"train_full"`` when the
            validation data are the training set.

    Examples:
        >>> model = Classifier(BiasFreeMLP(64, 10, width=16), num_classes=10, lr=0.1)
        >>> optimizer = model.configure_optimizers()
        >>> type(optimizer).__name__, optimizer.defaults["lr"], optimizer.defaults["momentum"]
        ('SGD', 0.1, 0.0)
    """

    def __init__(self, net: nn.Module, num_classes: int = 10, lr: float = 0.1, momentum: float = 0.0,
                 weight_decay: float = 0.0, val_name: str = "val") -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"`net` must be a torch.nn.Module, got {type(net).__name__}: {net!r}")
        check_int(num_classes, "num_classes", minimum=2)
        check_positive_finite(lr, "lr")
        check_positive_finite(momentum, "momentum", allow_zero=True)
        check_positive_finite(weight_decay, "weight_decay", allow_zero=True)
        if not isinstance(val_name, str) or not val_name or "/" in val_name:
            raise ValueError(f"`val_name` must be a non-empty string without '/', got {val_name!r}")
        self.save_hyperparameters(ignore=["net"])
        self.val_name = val_name
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
        """Accuracy on validation data, logged as ``{val_name}/accuracy``."""
        x, y = batch
        self.val_accuracy(self(x), y)
        self.log(f"{self.val_name}/accuracy", self.val_accuracy, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accuracy on test data."""
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test/accuracy", self.test_accuracy, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        """Plain SGD over every parameter."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
