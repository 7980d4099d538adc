"""The shifted test sets of a ``freetickets train`` run: corrupted copies of the test set, and an OoD set.

Corrupted sets follow the CIFAR-10-C protocol: every corruption at severities 1..5, either
built here from the clean test images (``freetickets_kernels.ensemble.corruptions``) or read
from the published CIFAR-10-C / CIFAR-100-C ``.npy`` files.  The out-of-distribution set is
another data set the model never saw, normalized like the in-distribution test set.

The sets are lazy: images are built (or read) one chunk at a time when a sequential pass (a
DataLoader without shuffling) reaches them, so a 400,000-image CIFAR suite never sits in
memory at once.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from ..ensemble.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from .data import Splits

CHUNK = 1000               # images per lazily built chunk (12 MB of CIFAR floats)
OOD_DATASETS = ("patches", "svhn", "cifar10", "cifar100")
DEFAULT_OOD = {"digits": "patches", "imagefolder": "patches", "cifar10": "svhn", "cifar100": "svhn"}
NO_LABEL = -1              # the target OoD samples carry: they belong to no class
DIGITS_INK = 0.3           # the digits' mean pixel value (1 = a fully inked 4x4 block): a patch's ink fraction


class LazyImages(Dataset):
    """``(normalized image, label)`` pairs whose images ``load(start, stop)`` builds in [0, 1], a chunk at a time.

    Only the last chunk is kept, so a sequential pass holds one chunk in memory.
    """

    def __init__(self, labels: torch.Tensor, load: Callable[[int, int], torch.Tensor],
                 normalize: Callable[[torch.Tensor], torch.Tensor], chunk: int = CHUNK):
        self.labels, self.load, self.normalize, self.chunk = labels, load, normalize, chunk
        self._cached: Tuple[int, Optional[torch.Tensor]] = (-1, None)

    def __len__(self) -> int:
        return len(self.labels)

    def _images(self, index: int) -> torch.Tensor:
        if self._cached[0] != index:
            start = index * self.chunk
            self._cached = (index, self.normalize(self.load(start, min(start + self.chunk, len(self)))))
        return self._cached[1]

    def __getitem__(self, i: int):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        return self._images(i // self.chunk)[i % self.chunk], self.labels[i]


def _built_set(splits: Splits, name: str, severity: int, seed: int) -> Dataset:
    images01 = splits.test_images01

    def load(start: int, stop: int) -> torch.Tensor:
        # chunk 0 uses `seed` itself, so a set within one chunk equals corrupt(test_images01, ...)
        return corrupt(images01[start:stop], name, severity, seed + (start // CHUNK) * 1_000_003)

    return LazyImages(splits.test_labels, load, splits.normalize)


def _read_labels(directory: str, splits: Splits) -> np.ndarray:
    path = os.path.join(directory, "labels.npy")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is missing; a CIFAR-10-C folder holds labels.npy beside the "
                                "<corruption>.npy files")
    labels = np.load(path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path!r} must hold integer labels [5 * N] or [N], got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= splits.num_classes):
        raise ValueError(f"{path!r} has labels in [{labels.min()}, {labels.max()}] but the data set has "
                         f"{splits.num_classes} classes; are these the files of another data set "
                         "(CIFAR-10-C vs CIFAR-100-C)?")
    return labels


def _read_set(path: str, labels: np.ndarray, splits: Splits) -> List[Tuple[int, Dataset]]:
    """The five severities of one published ``<corruption>.npy`` file (uint8 ``[5 * N, H, W, C]``)."""
    images = np.load(path, mmap_mode="r")
    size, channels = splits.image_size, splits.in_channels
    if images.ndim != 4 or images.shape[1:] != (size, size, channels) or images.dtype != np.uint8:
        raise ValueError(f"{path!r} holds {images.dtype} {tuple(images.shape)}; expected uint8 "
                         f"[5 * N, {size}, {size}, {channels}] (rows, height, width, channels) for this data set")
    rows = images.shape[0]
    if len(labels) * 5 == rows:
        n, per_severity = len(labels), False
    elif len(labels) == rows and rows % 5 == 0:
        n, per_severity = rows // 5, True
    else:
        raise ValueError(f"{path!r} has {rows} rows but labels.npy has {len(labels)} labels; expected 5 x N "
                         "rows (severity 1's N images first) and N or 5 x N labels")
    out = []
    for severity in SEVERITIES:
        offset = (severity - 1) * n
        part = labels[offset:offset + n] if per_severity else labels

        def load(start: int, stop: int, offset: int = offset) -> torch.Tensor:
            rows = np.array(images[offset + start:offset + stop])   # copies just these rows out of the file
            return torch.from_numpy(rows).permute(0, 3, 1, 2).float().div(255)

        out.append((severity, LazyImages(torch.as_tensor(np.asarray(part), dtype=torch.long), load,
                                         splits.normalize)))
    return out


def corrupted_sets(splits: Splits, seed: int, corruptions_dir: Optional[str] = None,
                   corruptions: Optional[Sequence[str]] = None) -> List[Tuple[str, int, Dataset]]:
    """``(corruption, severity, dataset)`` for every corruption at severities 1..5 of the test set.

    Without ``corruptions_dir`` the sets are built from ``splits.test_images01`` (default
    ``corruptions``: all of ``CORRUPTIONS``); with it they are read from the published
    CIFAR-10-C / CIFAR-100-C files there (default: every ``*.npy`` but ``labels.npy``).
    """
    if corruptions_dir is None:
        if splits.test_images01 is None or splits.test_labels is None:
            raise ValueError("these splits keep no clean test images (test_images01); build them with load_splits")
        names = CORRUPTIONS if corruptions is None else tuple(corruptions)
        unknown = [c for c in names if c not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruptions {unknown}; choose from {', '.join(CORRUPTIONS)}")
        return [(c, s, _built_set(splits, c, s, seed)) for c in names for s in SEVERITIES]
    if not os.path.isdir(corruptions_dir):
        raise FileNotFoundError(f"no such directory {corruptions_dir!r}; pass the folder of the extracted "
                                "CIFAR-10-C (or CIFAR-100-C) files")
    present = sorted(f[:-4] for f in os.listdir(corruptions_dir) if f.endswith(".npy") and f != "labels.npy")
    if not present:
        raise FileNotFoundError(f"{corruptions_dir!r} holds no <corruption>.npy files; pass the folder of the "
                                "extracted CIFAR-10-C (or CIFAR-100-C) files")
    names = present if corruptions is None else list(corruptions)
    missing = [c for c in names if c not in present]
    if missing:
        raise FileNotFoundError(f"{corruptions_dir!r} has no {', '.join(c + '.npy' for c in missing)}; "
                                f"it has {', '.join(present)}")
    labels = _read_labels(corruptions_dir, splits)
    return [(c, s, ds) for c in names
            for s, ds in _read_set(os.path.join(corruptions_dir, c + ".npy"), labels, splits)]


class _Unlabelled(Dataset):
    """A data set's images with the target ``NO_LABEL``: OoD samples belong to no class of the model."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i][0], NO_LABEL


def _photo_patches(splits: Splits, dataset_name: str, seed: int) -> torch.Tensor:
    """Patches of scikit-learn's two sample photographs, ``[N, C, S, S]`` in [0, 1], N = the test set's size."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise ImportError("the OoD photo patches ship with scikit-learn: pip install scikit-learn") from None
    photos = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float().div(255)
              for p in load_sample_images().images]
    size, channels, n = splits.image_size, splits.in_channels, len(splits.test)
    side = min(max(32, size), *(p.shape[1] for p in photos), *(p.shape[2] for p in photos))
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(photos), (n,), generator=g).tolist()
    corners = torch.rand(n, 2, generator=g)
    patches = []
    for k, (u, v) in zip(which, corners.tolist()):
        photo = photos[k]
        top, left = int(u * (photo.shape[1] - side + 1)), int(v * (photo.shape[2] - side + 1))
        patches.append(photo[:, top:top + side, left:left + side])
    x = torch.stack(patches) if patches else torch.zeros(0, 3, side, side)
    if channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)   # luminance
    elif channels != 3:
        raise ValueError(f"photo patches come in 1 or 3 channels; this data set has {channels}")
    if dataset_name == "digits":
        # The digits are 32x32 binary bitmaps (dark ink on white paper) counted in 4x4 blocks:
        # values k/16 with about 30% ink.  Binarizing each patch's darkest DIGITS_INK pixels
        # as ink and counting them the same way gives the digits' value lattice and mean, so
        # detection has to go by shape, not by a brightness offset the model could key on.
        flat = x.flatten(1)
        cut = flat.quantile(DIGITS_INK, dim=1, keepdim=True)
        x = (flat <= cut).float().view_as(x)
        return F.avg_pool2d(x, side // size) if side % size == 0 else F.interpolate(x, size=(size, size), mode="area")
    if side > size:
        return F.interpolate(x, size=(size, size), mode="area")
    if side < size:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x


def _torchvision_ood(splits: Splits, name: str, data_dir: str, download: bool) -> Dataset:
    try:
        import torchvision
        from torchvision import transforms as T
    except ImportError:
        raise ImportError(f"the {name} OoD set needs torchvision: pip install torchvision") from None
    # SVHN and CIFAR are 32x32 RGB; an imagefolder run may use another size
    steps = [T.Resize((splits.image_size, splits.image_size))] if splits.image_size != 32 else []
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(splits.mean, splits.std)])
    try:
        if name == "svhn":
            return torchvision.datasets.SVHN(data_dir, split="test", transform=transform, download=download)
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        return cls(data_dir, train=False, transform=transform, download=download)
    except RuntimeError as exc:
        raise FileNotFoundError(f"the OoD set {name} is not in {data_dir!r} ({exc}); pass --download to fetch "
                                "it, or --data-dir to the folder that has it") from None


def ood_set(splits: Splits, dataset_name: str, seed: int, ood_dataset: Optional[str] = None,
            data_dir: str = "./data", download: bool = False) -> Tuple[str, Dataset]:
    """``(name, dataset)`` of out-of-distribution images normalized like ``splits``' test set; targets are -1.

    Default ``ood_dataset``: SVHN's test split for CIFAR, patches of scikit-learn's sample
    photographs (``"patches"``) for the digits and imagefolder.  A torchvision OoD set is
    subsampled (seeded) to the test set's size, so both sides weigh the same and cost the same.
    """
    if dataset_name not in DEFAULT_OOD:
        raise ValueError(f"unknown data set {dataset_name!r}; choose one of {tuple(DEFAULT_OOD)}")
    name = DEFAULT_OOD[dataset_name] if ood_dataset is None else ood_dataset
    if name not in OOD_DATASETS:
        raise ValueError(f"unknown OoD data set {name!r}; choose one of {OOD_DATASETS}")
    if name == dataset_name:
        raise ValueError(f"{name} is the in-distribution data set; pick another OoD set from "
                         f"{tuple(d for d in OOD_DATASETS if d != name)}")
    if dataset_name == "digits" and name != "patches":
        raise ValueError(f"{name} is not comparable to the 8x8 digits; the digits' OoD set is 'patches'")
    if name == "patches":
        images01 = _photo_patches(splits, dataset_name, seed)
        labels = torch.full((len(images01),), NO_LABEL, dtype=torch.long)
        return name, TensorDataset(splits.normalize(images01), labels)
    source = _torchvision_ood(splits, name, data_dir, download)
    n = min(len(source), len(splits.test))
    keep = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n]
    return name, _Unlabelled(Subset(source, sorted(keep.tolist())))
