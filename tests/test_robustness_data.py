"""Shift and OoD data: corruptions, AUROC, the CIFAR-10-C reader, OoD patches and imagefolder splits."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from freetickets_kernels.app.data import Splits, _split, load_splits
from freetickets_kernels.app.shift_data import NO_LABEL, corrupted_sets, ood_set
from freetickets_kernels.ensemble import CORRUPTIONS, SEVERITIES, auroc, corrupt, ood_metrics, predictive_entropy

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits", seed=0)


def _images(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _inputs():
    g = torch.Generator().manual_seed(0)
    from sklearn.datasets import load_digits
    digits8 = torch.tensor(load_digits().images[:64], dtype=torch.float32).unsqueeze(1) / 16
    smooth32 = F.interpolate(torch.rand(8, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    return {"digits8x8": digits8, "rgb32x32": smooth32}


INPUTS = _inputs()


# ---- corruptions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_shape_range_determinism_and_growing_damage(name, kind):
    x = INPUTS[kind]
    outs = [corrupt(x, name, s, seed=3) for s in SEVERITIES]
    for out in outs:
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(outs[2], corrupt(x, name, 3, seed=3))
    damage = [(out - x).abs().mean().item() for out in outs]
    assert all(a < b for a, b in zip(damage, damage[1:])), damage
    assert damage[0] > 0


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "rotation", "translation"])
def test_random_corruptions_depend_on_the_seed(name):
    x = INPUTS["rgb32x32"]
    assert not torch.equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=1))


def test_corrupt_keeps_float64_and_does_not_touch_its_input():
    x = INPUTS["digits8x8"].double()
    before = x.clone()
    assert corrupt(x, "rotation", 5, 0).dtype == torch.float64
    assert torch.equal(x, before)


@pytest.mark.parametrize("args, match", [
    (("fog", 1), "unknown corruption 'fog'; choose one of gaussian_noise"),
    (("contrast", 0), "severity must be an integer in 1..5"),
    (("contrast", 6), "severity must be an integer in 1..5"),
    (("contrast", 2.0), "severity must be an integer in 1..5"),
    (("contrast", True), "severity must be an integer in 1..5"),
])
def test_corrupt_rejects_bad_names_and_severities(args, match):
    with pytest.raises(ValueError, match=match):
        corrupt(INPUTS["digits8x8"], *args)


def test_corrupt_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"expected images \[N, C, H, W\], got \(1, 8, 8\)"):
        corrupt(torch.rand(1, 8, 8), "contrast", 1)
    with pytest.raises(ValueError, match="before normalization"):
        corrupt(torch.randn(2, 1, 8, 8) * 3, "contrast", 1)
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        corrupt(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "contrast", 1)


# ---- AUROC and OoD metrics -----------------------------------------------------------------------------

def _sklearn_auroc(pos, neg):
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return sklearn_metrics.roc_auc_score(labels, np.r_[pos, neg])


@pytest.mark.parametrize("n_in, n_out, decimals", [(200, 200, None), (37, 500, None), (300, 20, 1), (50, 80, 0)])
def test_auroc_equals_sklearn(n_in, n_out, decimals):
    rng = np.random.default_rng(n_in + n_out)
    pos, neg = rng.normal(0.5, 1, n_in), rng.normal(0, 1, n_out)
    if decimals is not None:   # rounded scores: many ties, within and across the sides
        pos, neg = pos.round(decimals), neg.round(decimals)
    assert auroc(torch.from_numpy(pos), torch.from_numpy(neg)) == pytest.approx(_sklearn_auroc(pos, neg), abs=1e-12)


def test_auroc_extremes_and_empty_sides():
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="out_scores has no scores"):
        auroc([1.0], [])
    with pytest.raises(ValueError, match="in_scores has no scores"):
        auroc(torch.tensor([]), [1.0])


def test_ood_metrics_on_separable_and_identical_distributions():
    confident = torch.tensor([[0.97, 0.01, 0.02], [0.02, 0.9, 0.08]]).repeat(10, 1)
    unsure = torch.full((15, 3), 1 / 3)
    assert ood_metrics(confident, unsure) == {"auroc_msp": 1.0, "auroc_entropy": 1.0}
    assert ood_metrics(confident, confident.clone()) == {"auroc_msp": 0.5, "auroc_entropy": 0.5}


def test_entropy_handles_zero_probabilities_and_rejects_logits():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(predictive_entropy(probs), torch.tensor([0.0, np.log(3)], dtype=torch.float64))
    with pytest.raises(ValueError, match="not logits"):
        predictive_entropy(torch.tensor([[2.0, -1.0]]))
    with pytest.raises(ValueError, match="same model"):
        ood_metrics(torch.full((2, 3), 1 / 3), torch.full((2, 2), 0.5))


# ---- corrupted sets ------------------------------------------------------------------------------------

def test_digits_splits_keep_their_normalization(digits):
    from sklearn.datasets import load_digits
    raw = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16
    assert digits.mean == (raw.mean().item(),) and digits.std == (raw.std().item(),)
    test = _images(digits.test)
    assert torch.equal(test, digits.normalize(digits.test_images01))
    assert torch.equal(torch.stack([digits.test[i][1] for i in range(len(digits.test))]), digits.test_labels)
    _, test_rows = _split(len(raw), len(raw) // 5, 0)
    assert torch.equal(test, ((raw - raw.mean()) / raw.std())[test_rows])   # the normalization before shift sets


def test_built_corrupted_sets_cover_every_corruption_and_severity(digits):
    sets = corrupted_sets(digits, seed=4)
    assert [(c, s) for c, s, _ in sets] == [(c, s) for c in CORRUPTIONS for s in SEVERITIES]
    _, _, blur3 = sets[CORRUPTIONS.index("gaussian_blur") * 5 + 2]
    assert len(blur3) == len(digits.test) == 359
    expected = digits.normalize(corrupt(digits.test_images01, "gaussian_blur", 3, 4))
    assert torch.equal(_images(blur3), expected)
    assert torch.equal(blur3[-1][1], digits.test_labels[-1])
    with pytest.raises(ValueError, match="unknown corruptions"):
        corrupted_sets(digits, 0, corruptions=["fog"])


def _cifar_like(n_test=6):
    images01 = torch.rand(n_test, 3, 32, 32)
    return Splits(None, None, None, 10, 3, 32, test_images01=images01, test_labels=torch.arange(n_test),
                  mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _write_cifar_c(directory, n=6, labels_per_severity=True, name="gaussian_noise"):
    rows = np.zeros((5 * n, 32, 32, 3), np.uint8)
    for r in range(5 * n):
        rows[r] = 10 * (r // n + 1) + r % n   # severity s, image i -> value 10 s + i
    np.save(directory / f"{name}.npy", rows)
    labels = np.arange(5 * n) % 10 if labels_per_severity else np.arange(n) % 10
    np.save(directory / "labels.npy", labels.astype(np.int64))


@pytest.mark.parametrize("labels_per_severity", [True, False])
def test_cifar_c_reader_slices_severities(tmp_path, labels_per_severity):
    _write_cifar_c(tmp_path, labels_per_severity=labels_per_severity)
    _write_cifar_c(tmp_path, labels_per_severity=labels_per_severity, name="contrast")
    splits = _cifar_like()
    sets = corrupted_sets(splits, seed=0, corruptions_dir=str(tmp_path))
    assert [(c, s) for c, s, _ in sets] == [(c, s) for c in ("contrast", "gaussian_noise") for s in SEVERITIES]
    _, severity, ds = sets[5 + 2]
    assert severity == 3 and len(ds) == 6
    x, y = ds[4]
    raw = torch.full((1, 3, 32, 32), (10 * 3 + 4) / 255)
    assert torch.allclose(x, splits.normalize(raw)[0])
    assert int(y) == ((2 * 6 + 4) % 10 if labels_per_severity else 4)
    only = corrupted_sets(splits, 0, corruptions_dir=str(tmp_path), corruptions=["gaussian_noise"])
    assert {c for c, _, _ in only} == {"gaussian_noise"}


def test_cifar_c_reader_errors(tmp_path):
    splits = _cifar_like()
    with pytest.raises(FileNotFoundError, match="no such directory"):
        corrupted_sets(splits, 0, corruptions_dir=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="holds no <corruption>.npy files"):
        corrupted_sets(splits, 0, corruptions_dir=str(tmp_path))
    np.save(tmp_path / "fog.npy", np.zeros((30, 32, 32, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="labels.npy' is missing"):
        corrupted_sets(splits, 0, corruptions_dir=str(tmp_path))
    np.save(tmp_path / "labels.npy", np.arange(7))
    with pytest.raises(ValueError, match=r"fog.npy' has 30 rows but labels.npy has 7 labels"):
        corrupted_sets(splits, 0, corruptions_dir=str(tmp_path))
    np.save(tmp_path / "labels.npy", np.arange(6) + 5)
    with pytest.raises(ValueError, match="labels in \\[5, 10\\] but the data set has 10 classes"):
        corrupted_sets(splits, 0, corruptions_dir=str(tmp_path))
    np.save(tmp_path / "labels.npy", np.arange(6))
    np.save(tmp_path / "fog.npy", np.zeros((30, 3, 32, 32), np.uint8))   # channels first: not the published layout
    bad_shape = r"fog.npy' holds uint8 \(30, 3, 32, 32\); expected uint8 \[5 \* N, 32, 32, 3\]"
    with pytest.raises(ValueError, match=bad_shape):
        corrupted_sets(splits, 0, corruptions_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no snow.npy; it has fog"):
        corrupted_sets(splits, 0, corruptions_dir=str(tmp_path), corruptions=["snow"])


# ---- OoD sets ------------------------------------------------------------------------------------------

def test_digits_ood_patches_look_like_the_digits(digits):
    name, ds = ood_set(digits, "digits", seed=1)
    x = _images(ds)
    assert name == "patches" and x.shape == _images(digits.test).shape == (359, 1, 8, 8)
    assert torch.equal(x, _images(ood_set(digits, "digits", seed=1)[1]))
    assert not torch.equal(x, _images(ood_set(digits, "digits", seed=2)[1]))
    assert all(int(ds[i][1]) == NO_LABEL for i in (0, 358))
    # before normalization: ink counts k / 16 in [0, 1], with the digits' mean ink
    raw = x * digits.std[0] + digits.mean[0]
    assert torch.allclose(raw * 16, (raw * 16).round(), atol=1e-4) and raw.min() > -1e-6 and raw.max() < 1 + 1e-6
    assert abs(raw.mean().item() - digits.test_images01.mean().item()) < 0.05


def test_ood_set_refusals(digits, tmp_path):
    with pytest.raises(ValueError, match="digits' OoD set is 'patches'"):
        ood_set(digits, "digits", 0, "svhn")
    with pytest.raises(ValueError, match="cifar10 is the in-distribution data set"):
        ood_set(_cifar_like(), "cifar10", 0, "cifar10")
    with pytest.raises(ValueError, match="unknown OoD data set 'mnist'"):
        ood_set(_cifar_like(), "cifar10", 0, "mnist")
    with pytest.raises(FileNotFoundError, match="pass --download"):
        ood_set(_cifar_like(), "cifar10", 0, data_dir=str(tmp_path))   # default: SVHN, not there


# ---- imagefolder ---------------------------------------------------------------------------------------

def _write_folder(root, classes=("cat", "dog", "owl"), per_class=10):
    from PIL import Image
    rng = np.random.default_rng(0)
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (12 + i, 20, 3)) + 80 * k   # sizes differ; class sets the brightness
            Image.fromarray(pixels.astype(np.uint8)).save(root / cls / f"{i}.png")


def test_imagefolder_one_folder_is_split_70_10_20(tmp_path):
    _write_folder(tmp_path)
    splits = load_splits("imagefolder", str(tmp_path), seed=0, image_size=16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (21, 3, 6)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (3, 3, 16)
    assert splits.test_images01.shape == (6, 3, 16, 16) and 0 <= splits.test_images01.min() <= 1
    assert torch.equal(_images(splits.test), splits.normalize(splits.test_images01))
    train = _images(splits.train)
    assert torch.allclose(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    again = load_splits("imagefolder", str(tmp_path), seed=0, image_size=16)
    assert torch.equal(again.test_images01, splits.test_images01)
    assert load_splits("imagefolder", str(tmp_path), seed=0).image_size == 32
    # the built-in shift sets work on it too
    assert corrupted_sets(splits, 0)[0][2][0][0].shape == (3, 16, 16)
    assert _images(ood_set(splits, "imagefolder", 0)[1]).shape == (6, 3, 16, 16)


def test_imagefolder_train_test_layout(tmp_path):
    _write_folder(tmp_path / "train", per_class=8)
    _write_folder(tmp_path / "test", per_class=2)
    splits = load_splits("imagefolder", str(tmp_path), image_size=8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (21, 3, 6)   # val: 1/8 of train/
    _write_folder(tmp_path / "val", per_class=1)
    splits = load_splits("imagefolder", str(tmp_path), image_size=8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 3, 6)
    assert sorted(splits.test_labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_splits("imagefolder", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no class subfolders"):
        load_splits("imagefolder", str(tmp_path))
    _write_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(ValueError, match="one class subfolder"):
        load_splits("imagefolder", str(tmp_path / "one"))
    _write_folder(tmp_path / "few", per_class=3)
    with pytest.raises(ValueError, match="has 9 images; need at least 10"):
        load_splits("imagefolder", str(tmp_path / "few"))
    (tmp_path / "few" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="every class subfolder needs at least one image"):
        load_splits("imagefolder", str(tmp_path / "few"))
    _write_folder(tmp_path / "split" / "train", per_class=2)
    with pytest.raises(ValueError, match="has train/ but no test/"):
        load_splits("imagefolder", str(tmp_path / "split"))
    _write_folder(tmp_path / "split" / "test", classes=("cat", "dog"), per_class=2)
    with pytest.raises(ValueError, match=r"test/ has classes \['cat', 'dog'\] but train/ has \['cat', 'dog', 'owl'\]"):
        load_splits("imagefolder", str(tmp_path / "split"))
    with pytest.raises(ValueError, match="image_size applies only to imagefolder"):
        load_splits("digits", image_size=8)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        load_splits("imagefolder", str(tmp_path / "split"), image_size=0)
