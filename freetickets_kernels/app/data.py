"""The data sets ``freetickets train`` knows: train / validation / test splits as torch Datasets.

``digits`` (scikit-learn's 1,797 handwritten 8x8 digits) ships inside
scikit-learn, so the default run needs no download.  ``cifar10`` and
``cifar100`` come from torchvision and are downloaded only with
``download=True``.  ``imagefolder`` is a user's folder of class subfolders of
images (torchvision's ``ImageFolder``), read once into tensors.  The validation
split (for EDST's best-checkpoint choice) is held out of the training set with a
fixed seed.

Every split also keeps the test images in [0, 1] before normalization and the
normalization itself, so shifted test sets (``freetickets_kernels.app.shift_data``)
can be corrupted in image space and normalized like the clean test set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
IMAGEFOLDER_SIZE = 32


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    test_images01: Optional[torch.Tensor] = None   # [N, C, H, W] float in [0, 1], the test set before normalization
    test_labels: Optional[torch.Tensor] = None     # [N] int64, in the order of test / test_images01
    mean: Tuple[float, ...] = ()                   # per-channel normalization: (x - mean) / std
    std: Tuple[float, ...] = ()

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` images in [0, 1], normalized the way this data set's test split is."""
        if not self.mean:
            raise ValueError("these splits carry no normalization (mean / std); build them with load_splits")
        if images01.dim() != 4 or images01.shape[1] != len(self.mean):
            raise ValueError(f"expected images [N, {len(self.mean)}, H, W], got {tuple(images01.shape)}")
        view = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=images01.dtype, device=images01.device).view(view)
        std = torch.tensor(self.std, dtype=images01.dtype, device=images01.device).view(view)
        return (images01 - mean) / std


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
    images01 = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    mean, std = images01.mean(), images01.std()   # one global value over the whole set (not per split)
    images = (images01 - mean) / std
    labels = torch.tensor(raw.target, dtype=torch.long)
    rest, test = _split(len(labels), len(labels) // 5, seed)   # 20% test
    train, val = rest[len(rest) // 9:], rest[:len(rest) // 9]   # ~10% of the rest for validation
    make = lambda idx: TensorDataset(images[idx], labels[idx])  # noqa: E731
    return Splits(make(train), make(val), make(test), 10, 1, 8, test_images01=images01[test],
                  test_labels=labels[test], mean=(mean.item(),), std=(std.item(),))


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
    # the same uint8 -> [0, 1] conversion as ToTensor, in the order of the test set
    test01 = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous().float().div(255)
    return Splits(Subset(train_aug, train_idx), Subset(train_plain, val_idx), test,
                  10 if name == "cifar10" else 100, 3, 32, test_images01=test01,
                  test_labels=torch.tensor(test.targets, dtype=torch.long), mean=mean, std=std)


def _class_folders(path: str) -> list:
    # the rule torchvision's ImageFolder uses, checked here to say what is wrong
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


def _read_folder(path: str, image_size: int) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """Every image under ``path``'s class subfolders as RGB ``[N, 3, S, S]`` in [0, 1], labels, class names."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder
    classes = _class_folders(path)
    if not classes:
        raise FileNotFoundError(f"{path!r} has no class subfolders; put each class's images in a subfolder of "
                                f"its own, e.g. {os.path.join(path, 'cat', '1.png')}")
    if len(classes) < 2:
        raise ValueError(f"{path!r} has one class subfolder ({classes[0]!r}); classification needs at least 2")
    try:
        folder = ImageFolder(path, transform=T.Compose([T.Resize((image_size, image_size)), T.ToTensor()]))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path!r}: {exc}; every class subfolder needs at least one image") from None
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    return images, torch.tensor(folder.targets, dtype=torch.long), classes


def _imagefolder(data_dir: str, image_size: int, seed: int) -> Splits:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise ImportError("imagefolder needs torchvision (and Pillow): pip install torchvision") from None
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"imagefolder: no such directory {data_dir!r}; pass --data-dir DIR, a folder of "
                                "class subfolders of images (or train/ and test/ folders of those)")
    has = {part: os.path.isdir(os.path.join(data_dir, part)) for part in ("train", "val", "test")}
    if has["train"] != has["test"]:
        there, missing = ("train", "test") if has["train"] else ("test", "train")
        raise ValueError(f"{data_dir!r} has {there}/ but no {missing}/; give both (and optionally val/), or one "
                         "folder of class subfolders to be split 70/10/20")
    if has["train"]:
        parts = {part: _read_folder(os.path.join(data_dir, part), image_size)
                 for part in ("train", "val", "test") if has[part]}
        classes = parts["train"][2]
        for part, (_, _, other) in parts.items():
            if other != classes:
                raise ValueError(f"{part}/ has classes {other} but train/ has {classes}; every split needs the "
                                 "same class subfolders")
        train01, train_y = parts["train"][:2]
        test01, test_y = parts["test"][:2]
        if has["val"]:
            val01, val_y = parts["val"][:2]
        else:   # hold 1/8 of train/ out, the 70/10 ratio of the one-folder layout
            if len(train_y) < 2:
                raise ValueError(f"{os.path.join(data_dir, 'train')!r} has {len(train_y)} image; need at least 2 "
                                 "to hold out a validation split (or add a val/ folder)")
            fit, val = _split(len(train_y), max(1, round(len(train_y) / 8)), seed)
            train01, train_y, val01, val_y = train01[fit], train_y[fit], train01[val], train_y[val]
    else:
        images, labels, classes = _read_folder(data_dir, image_size)
        n = len(labels)
        if n < 10:
            raise ValueError(f"{data_dir!r} has {n} images; need at least 10 to split them 70/10/20 into "
                             "train / val / test (or give train/ and test/ folders)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_test, n_val = round(0.2 * n), round(0.1 * n)
        test, val, fit = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
        train01, train_y, val01, val_y = images[fit], labels[fit], images[val], labels[val]
        test01, test_y = images[test], labels[test]
    mean, std = train01.mean(dim=(0, 2, 3)), train01.std(dim=(0, 2, 3))
    if (std == 0).any():
        raise ValueError(f"the training images of {data_dir!r} are constant in a channel; cannot normalize them")
    splits = Splits(None, None, None, len(classes), 3, image_size, test_images01=test01, test_labels=test_y,
                    mean=tuple(mean.tolist()), std=tuple(std.tolist()))
    splits.train = TensorDataset(splits.normalize(train01), train_y)
    splits.val = TensorDataset(splits.normalize(val01), val_y)
    splits.test = TensorDataset(splits.normalize(test01), test_y)
    return splits


def load_splits(name: str, data_dir: str = "./data", download: bool = False, val_size: int = 5000,
                seed: int = 0, image_size: Optional[int] = None) -> Splits:
    """Train / validation / test splits of data set ``name`` (one of ``DATASETS``).

    ``image_size`` (default 32) is the side ``imagefolder`` images are resized to; the other
    data sets have a fixed size and refuse it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    if name != "imagefolder" and image_size is not None:
        raise ValueError(f"image_size applies only to imagefolder; {name} images have a fixed size")
    if name == "digits":
        return _digits(seed)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, data_dir, download, val_size, seed)
    size = IMAGEFOLDER_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels per side), got {image_size!r}")
    return _imagefolder(data_dir, size, seed)
