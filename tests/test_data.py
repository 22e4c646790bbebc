"""Real loading code, tested on small files the tests write in the real formats."""

import gzip
import struct

import numpy as np
import pytest
import torch

from dfkd.config import DataConfig
from dfkd.data import MNIST_INFO, load_dataset, read_idx, stratified_split, to_model_input, write_cifar_binary
from dfkd.errors import DfkdError


def write_idx(path, array: np.ndarray, compress: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def write_mnist_folder(folder, n_train=30, n_test=20, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if compress else "")), array, compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_as_debian_ships_fashion_mnist(tmp_path, compress):
    arrays = write_mnist_folder(tmp_path / "fmnist", compress=compress)
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "fmnist")))
    assert ds.train.images.shape == (30, 1, 32, 32) and ds.test.images.shape == (20, 1, 32, 32)
    assert ds.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    # pixel values survive: normalize back and compare with the raw image resized the same way
    raw = torch.tensor(arrays["t10k-images-idx3-ubyte"][:1], dtype=torch.float32).unsqueeze(1) / 255
    back = ds.denormalize(ds.test.images[:1])
    resized = torch.nn.functional.interpolate(raw, size=32, mode="bilinear", antialias=True).clamp(0, 1)
    assert torch.allclose(back, resized, atol=1e-5)


def test_torchvision_mnist_from_local_root(tmp_path):
    write_mnist_folder(tmp_path / "MNIST" / "raw", compress=False)
    ds = load_dataset(DataConfig(name="mnist", root=str(tmp_path)))
    assert len(ds.train) == 30 and len(ds.test) == 20 and ds.info.num_classes == 10


def test_missing_and_broken_data(tmp_path):
    with pytest.raises(DfkdError, match="does not exist"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfkdError, match="no train-images-idx"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "empty")))
    with pytest.raises(DfkdError, match="MNIST not found under"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path / "empty")))
    bad = tmp_path / "bad.gz"
    gzip.open(bad, "wb").write(b"\x00\x00\x08\x03" + struct.pack(">3I", 10, 28, 28) + b"\x00" * 5)
    with pytest.raises(DfkdError, match="truncated"):
        read_idx(bad)
    with pytest.raises(DfkdError, match="unknown dataset 'mnist4k'"):
        load_dataset(DataConfig(name="mnist4k"))


def test_stratified_split_is_fixed_and_disjoint():
    labels = np.repeat(np.arange(10), 50)
    train, test = stratified_split(labels, test_per_class=10)
    train2, test2 = stratified_split(labels, test_per_class=10)
    assert np.array_equal(test, test2) and np.array_equal(train, train2)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 500
    assert np.bincount(labels[test]).tolist() == [10] * 10


def test_mnist5k_real_digits_fixed_split():
    ds = load_dataset(DataConfig())
    assert len(ds.train) == 4000 and len(ds.test) == 1000
    assert torch.bincount(ds.test.labels).tolist() == [100] * 10
    assert abs(ds.train.images.mean().item()) < 0.05 and abs(ds.train.images.std().item() - 1) < 0.1


def test_channels_last_uint8_layout_is_converted():
    rgb = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    from dfkd.data import CIFAR10_INFO

    x = to_model_input(rgb, CIFAR10_INFO, 32)
    assert x.shape == (2, 3, 32, 32)
    assert x[:, 0].mean() > 1 and x[:, 1].mean() < 0
    assert to_model_input(np.zeros((1, 28, 28)), MNIST_INFO, 32).shape == (1, 1, 32, 32)


@pytest.mark.parametrize(
    "name, folder, train, test, label_bytes",
    [
        (
            "cifar10",
            "cifar-10-batches-bin",
            [f"data_batch_{i}.bin" for i in range(1, 6)],
            ["test_batch.bin"],
            1,
        ),
        ("cifar100", "cifar-100-binary", ["train.bin"], ["test.bin"], 2),
    ],
)
def test_cifar_binary_version_is_read_without_pickle(tmp_path, name, folder, train, test, label_bytes):
    from dfkd.data import DATASETS

    written = write_cifar_binary(tmp_path / folder, train + test, records=4, label_bytes=label_bytes)
    ds = load_dataset(DataConfig(name=name, root=str(tmp_path), image_size=32))
    assert len(ds.train) == 4 * len(train) and len(ds.test) == 4
    labels, pixels = written[test[0]]
    assert ds.test.labels.tolist() == labels[:, -1].tolist()  # CIFAR-100: the fine label, stored second
    info = DATASETS.get(name)[0]
    back = ds.test.images * torch.tensor(info.std).view(1, 3, 1, 1) + torch.tensor(info.mean).view(1, 3, 1, 1)
    assert torch.allclose(back * 255, torch.tensor(pixels, dtype=torch.float32), atol=1e-3)
    (tmp_path / folder / test[0]).write_bytes(b"\x00" * 100)
    with pytest.raises(DfkdError, match="truncated"):
        DATASETS.get(name)[1](tmp_path)
