"""The data sets ``freetickets train`` knows: train / validation / test splits as torch Datasets.

``digits`` (scikit-learn's 1,797 handwritten 8x8 digits) ships inside
scikit-learn, so the default run needs no download.  ``cifar10`` and
``cifar100`` come from torchvision and are downloaded only with
``download=True``.  The validation split (for EDST's best-checkpoint choice)
is held out of the training set with a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

DATASETS = ("digits", "cifar10", "cifar100")


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


def _split(n: int, holdout: int, seed: int):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[holdout:], order[:holdout]


def _digits(seed: int) -> Splits:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits data set ships with scikit-learn: pip install scikit-learn "
                          "(or pip install 'freetickets-kernels[train]')") from None
    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(raw.target, dtype=torch.long)
    rest, test = _split(len(labels), len(labels) // 5, seed)   # 20% test
    train, val = rest[len(rest) // 9:], rest[:len(rest) // 9]   # ~10% of the rest for validation
    make = lambda idx: TensorDataset(images[idx], labels[idx])  # noqa: E731
    return Splits(make(train), make(val), make(test), 10, 1, 8)


def _cifar(name: str, data_dir: str, download: bool, val_size: int, seed: int) -> Splits:
    try:
        import torchvision
        from torchvision import transforms as T
    except ImportError:
        raise ImportError("CIFAR needs torchvision: pip install torchvision") from None
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    plain = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    try:
        train_aug = cls(data_dir, train=True, transform=augment, download=download)
        train_plain = cls(data_dir, train=True, transform=plain, download=False)
        test = cls(data_dir, train=False, transform=plain, download=download)
    except RuntimeError as exc:
        raise FileNotFoundError(f"{name} is not in {data_dir!r} ({exc}); pass --download to fetch it") from None
    train_idx, val_idx = _split(len(train_aug), val_size, seed)
    return Splits(Subset(train_aug, train_idx), Subset(train_plain, val_idx), test,
                  10 if name == "cifar10" else 100, 3, 32)


def load_splits(name: str, data_dir: str = "./data", download: bool = False, val_size: int = 5000,
                seed: int = 0) -> Splits:
    """Train / validation / test splits of data set ``name`` (one of ``DATASETS``)."""
    if name == "digits":
        return _digits(seed)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, data_dir, download, val_size, seed)
    raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
