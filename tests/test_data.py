"""trainables.common.data: splits, training-split transforms, augmentation, ImageFolder loading."""

import zipfile
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from trainables.common.data import DataError, Dataset, Split, augment, load_dataset, validate_spec, with_imbalance, with_label_noise


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def rows(split):
    """The (image bytes, label) pairs of a split, as a multiset."""
    return Counter((img.tobytes(), int(y)) for img, y in zip(split.images, split.labels))


def test_digits_splits_partition_the_data(digits):
    d = load_digits()
    every = Counter((np.round(img * (255.0 / 16.0)).astype(np.uint8)[..., None].tobytes(), int(y)) for img, y in zip(d.images, d.target))
    parts = [rows(digits.train), rows(digits.val), rows(digits.test)]
    assert sum(parts, Counter()) == every  # disjoint and covering: train + val + test is the whole set
    assert len(digits.test) == 360 and len(digits.train) + len(digits.val) == 1437
    assert abs(len(digits.val) - 144) <= 5  # 10% per class, rounded per class
    assert digits.train.images.shape[1:] == (8, 8, 1)
    assert digits.num_classes == 10 and digits.channels == 1


def test_digits_splits_are_stratified_and_deterministic(digits):
    full = np.bincount(load_digits().target, minlength=10) / 1797
    for split in (digits.train, digits.val, digits.test):
        np.testing.assert_allclose(np.bincount(split.labels, minlength=10) / len(split), full, atol=0.02)
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.val.images, digits.val.images)
    np.testing.assert_array_equal(again.train.labels, digits.train.labels)
    other = load_dataset("digits", split_seed=1)
    assert rows(other.val) != rows(digits.val)
    assert rows(other.test) == rows(digits.test)  # the test split never depends on the seed
    small = load_dataset("digits", max_train=300)
    assert abs(len(small.train) - 300) <= 10 and not (rows(small.train) - rows(digits.train))
    assert rows(small.val) == rows(digits.val)  # val is carved before max_train applies


def test_label_noise(digits):
    noisy = with_label_noise(digits, 0.2, seed=3)
    flipped = noisy.train.labels != digits.train.labels
    n = len(flipped)
    assert abs(flipped.mean() - 0.2) < 3 * np.sqrt(0.2 * 0.8 / n)  # within 3 sigma of the rate
    np.testing.assert_array_equal(noisy.train.images, digits.train.images)
    np.testing.assert_array_equal(noisy.val.labels, digits.val.labels)
    np.testing.assert_array_equal(noisy.test.labels, digits.test.labels)
    # the new class is any other class, roughly uniformly
    offsets = (noisy.train.labels[flipped] - digits.train.labels[flipped]) % 10
    assert set(offsets) == set(range(1, 10))
    np.testing.assert_array_equal(with_label_noise(digits, 0.2, seed=3).train.labels, noisy.train.labels)
    assert (with_label_noise(digits, 0.2, seed=4).train.labels != noisy.train.labels).any()
    assert with_label_noise(digits, 0.0, seed=3) is digits
    for bad in (1.0, -0.1):
        with pytest.raises(DataError):
            with_label_noise(digits, bad, seed=0)


def synthetic(per_class, classes=10):
    labels = np.repeat(np.arange(classes), per_class)
    split = Split(np.zeros((len(labels), 2, 2, 1), np.uint8), labels)
    return Dataset("synthetic", [str(c) for c in range(classes)], split, split, split, (0.5,), (0.25,))


@pytest.mark.parametrize("rho", [10, 100])
def test_imbalance_ratio(rho):
    ds = with_imbalance(synthetic(1000), rho, seed=0)
    counts = np.bincount(ds.train.labels, minlength=10)
    assert counts.max() / counts.min() == pytest.approx(rho, rel=0.02)
    assert (np.diff(counts) <= 0).all() and counts[0] == 1000
    assert len(ds.val) == len(ds.test) == 10000  # val and test stay balanced
    np.testing.assert_array_equal(with_imbalance(synthetic(1000), rho, seed=0).train.labels, ds.train.labels)
    assert with_imbalance(ds, 1, seed=0) is ds
    with pytest.raises(DataError):
        with_imbalance(ds, 0.5, seed=0)


def test_imbalance_on_digits(digits):
    counts = np.bincount(with_imbalance(digits, 10, seed=1).train.labels, minlength=10)
    assert counts.max() / counts.min() == pytest.approx(10, rel=0.1)


def test_augment_translates_and_flips(digits):
    x = digits.to_float(digits.train.images[:16])
    out = augment(x, torch.Generator().manual_seed(0), flip=True, pad=2)
    assert out.shape == x.shape and not torch.equal(out, x)
    torch.testing.assert_close(out, augment(x, torch.Generator().manual_seed(0), flip=True, pad=2))
    # every output is a 8x8 crop of the reflect-padded input, possibly mirrored
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        candidates = crops + [c[..., ::-1] for c in crops]
        assert any(np.allclose(out[i].numpy(), c) for c in candidates)
    unmoved = augment(x, torch.Generator().manual_seed(0), flip=False, pad=0)
    torch.testing.assert_close(unmoved, x)


def write_tree(root, splits, per_class=6, size=5):
    """An ImageFolder tree of PNGs (lossless, so pixels can be checked); returns {(split, class): images}."""
    rng = np.random.default_rng(0)
    made = {}
    for split in splits:
        for cls in ("cat", "ant", "bee"):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True)
            imgs = rng.integers(0, 256, size=(per_class, size, size, 3), dtype=np.uint8)
            for i, img in enumerate(imgs):
                Image.fromarray(img).save(folder / f"{i:03d}.png")
            made[(split, cls)] = imgs
    return made


def zip_tree(root, zip_path):
    with zipfile.ZipFile(zip_path, "w") as z:
        for path in sorted(root.rglob("*.png")):
            z.write(path, path.relative_to(root.parent))
    return zip_path


def test_imagefolder_train_test_tree_and_zip(tmp_path):
    made = write_tree(tmp_path / "tree", ["train", "test"], per_class=10)
    ds = load_dataset(f"imagefolder:{tmp_path / 'tree'}", cache_dir=tmp_path / "cache")
    assert ds.classes == ["ant", "bee", "cat"] and ds.image_size == 5 and ds.channels == 3
    assert len(ds.test) == 30 and len(ds.train) + len(ds.val) == 30 and len(ds.val) == 3
    for c, cls in enumerate(ds.classes):
        np.testing.assert_array_equal(ds.test.images[ds.test.labels == c], made[("test", cls)])
    assert rows(Split(np.concatenate([ds.train.images, ds.val.images]), np.concatenate([ds.train.labels, ds.val.labels]))) == rows(
        Split(np.concatenate([made[("train", c)] for c in ds.classes]), np.repeat(np.arange(3), 10)))
    pixels = np.concatenate([made[("train", c)] for c in ds.classes]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(ds.mean, pixels.mean(0), atol=1e-6)
    zipped = load_dataset(f"imagefolder:{zip_tree(tmp_path / 'tree', tmp_path / 'tree.zip')}", cache_dir=tmp_path / "cache")
    for a, b in [(zipped.train, ds.train), (zipped.val, ds.val), (zipped.test, ds.test)]:
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    cached = load_dataset(f"imagefolder:{tmp_path / 'tree.zip'}", cache_dir=tmp_path / "cache")  # second load: from the cache
    np.testing.assert_array_equal(cached.test.images, ds.test.images)


def test_imagefolder_sibling_train_and_test_zips(tmp_path):
    made = write_tree(tmp_path / "train", [""], per_class=10)
    write_tree(tmp_path / "test", [""], per_class=4)
    zip_tree(tmp_path / "train", tmp_path / "set-train.zip")
    zip_tree(tmp_path / "test", tmp_path / "set-test.zip")
    ds = load_dataset(f"imagefolder:{tmp_path / 'set-train.zip'}", cache_dir=tmp_path / "cache")
    assert len(ds.test) == 12 and len(ds.train) + len(ds.val) == 30
    assert sorted(rows(ds.train) + rows(ds.val)) == sorted(rows(Split(np.concatenate([made[("", c)] for c in ds.classes]), np.repeat(np.arange(3), 10))))


def test_imagefolder_single_split_is_cut_80_20(tmp_path):
    write_tree(tmp_path / "flat", [""], per_class=10)
    ds = load_dataset(f"imagefolder:{tmp_path / 'flat'}", cache_dir=tmp_path / "cache")
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 2]
    assert len(ds.train) + len(ds.val) == 24
    assert not set(rows(ds.test)) & set(rows(ds.train) + rows(ds.val))


def test_bad_specs_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'missing.zip'}")
    with pytest.raises(DataError, match="unknown dataset"):
        validate_spec("mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}", cache_dir=tmp_path / "cache")


def test_to_float_normalises(digits):
    # mean/std are those of the training data before the val split is carved from it
    x = digits.to_float(np.concatenate([digits.train.images, digits.val.images]))
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert replace(digits, mean=(0.0,), std=(1.0,)).to_float(digits.train.images[:1]).max() <= 1.0
