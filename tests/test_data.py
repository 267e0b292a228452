"""trainables.common.data: splits, training-split transforms, augmentation, ImageFolder loading."""

import os
import re
import zipfile
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from one_thread import one_thread  # noqa: F401  (one torch and one BLAS/OpenMP thread: tiny models)
from trainables.common.data import (
    DataError,
    Dataset,
    Split,
    augment,
    load_dataset,
    train_class_counts,
    validate_spec,
    with_imbalance,
    with_label_noise,
)


@pytest.fixture
def digits():
    # per test, not per module (0.07 s): bench/mutation.py runs a mutant only against the tests
    # that call the mutated function, and a module-scoped fixture calls the loaders in one test only
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


# ---------------------------------------------------------------- bench/mutation.py: what each split, transform and loader must do


def test_digits_split_is_sklearns_fixed_stratified_split_and_stats_are_its_train_pixels(digits):
    # the test split is scikit-learn's stratified 20% with random_state 0: every published digits
    # figure is on it; mean and std are over the training pixels (train + val), on [0, 1]
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr, te = train_test_split(np.arange(1797), test_size=0.2, stratify=d.target, random_state=0)
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    np.testing.assert_array_equal(digits.test.images[..., 0], pixels[te])
    np.testing.assert_array_equal(digits.test.labels, d.target[te])
    assert digits.mean == pytest.approx((pixels[tr].mean() / 255.0,), rel=1e-12)
    assert digits.std == pytest.approx((pixels[tr].std() / 255.0,), rel=1e-12)
    assert digits.name == "digits" and digits.classes == [str(i) for i in range(10)] and digits.meta == {}
    assert digits.train.labels.dtype == np.int64 and digits.train.images.dtype == np.uint8


def test_max_test_is_a_stratified_subset_of_test_and_caps_at_or_above_size_change_nothing(digits):
    small = load_dataset("digits", max_test=100)
    assert abs(len(small.test) - 100) <= 5 and not (rows(small.test) - rows(digits.test))
    np.testing.assert_allclose(np.bincount(small.test.labels, minlength=10) / len(small.test),
                               np.bincount(digits.test.labels, minlength=10) / len(digits.test), atol=0.02)
    assert rows(small.train) == rows(digits.train) and rows(small.val) == rows(digits.val)
    capped = load_dataset("digits", max_train=len(digits.train), max_test=len(digits.test))
    assert rows(capped.train) == rows(digits.train) and rows(capped.test) == rows(digits.test)
    # a cap equal to the size draws nothing, so the next subset is the one without it
    both = load_dataset("digits", max_train=len(digits.train), max_test=100)
    assert rows(both.test) == rows(small.test)


def test_to_float_is_per_channel_normalisation_on_the_device():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)  # H != W != C
    split = Split(images, np.zeros(4, np.int64))
    ds = Dataset("x", ["a", "b"], split, split, split, (0.1, 0.5, 0.9), (0.2, 0.3, 0.4))
    expected = (images.transpose(0, 3, 1, 2) / 255.0 - np.array([0.1, 0.5, 0.9]).reshape(1, 3, 1, 1)) / np.array([0.2, 0.3, 0.4]).reshape(1, 3, 1, 1)
    out = ds.to_float(images)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 5, 6)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.to_float(torch.from_numpy(images)).numpy(), expected, rtol=1e-5, atol=1e-6)
    # the meta device stands in for CUDA: every tensor of the computation must be on the target
    assert ds.to_float(images, device="meta").device.type == "meta"
    assert ds.image_size == 5 and ds.channels == 3 and ds.num_classes == 2


def colour_batch(n=64, h=8, w=6, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3, h, w)).astype(np.float32))


def crops_of(x, pad, mode):
    """Every (dy, dx, flipped) view of one image (C, H, W), padded by numpy."""
    c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode=mode)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[..., ::-1]


def views(x, out, pad, mode="reflect"):
    found = []
    for i in range(len(x)):
        matches = [key for key, crop in crops_of(x[i].numpy(), pad, mode) if np.array_equal(out[i].numpy(), crop)]
        assert matches, f"image {i} is no shifted or mirrored view of its input"
        found.append(matches[0])
    return found


@pytest.mark.parametrize("h,pad", [(16, 2), (8, 1), (4, 1)])
def test_augment_default_pad_is_an_eighth_and_flips_half(h, pad):
    x = colour_batch(n=96, h=h, w=h)
    found = views(x, augment(x, torch.Generator().manual_seed(1)), pad)  # flip on by default
    assert {dy for dy, _, _ in found} == {dx for _, dx, _ in found} == set(range(2 * pad + 1))
    flipped = sum(f for _, _, f in found)
    assert 96 * 0.5 - 3 * np.sqrt(96 / 4) < flipped < 96 * 0.5 + 3 * np.sqrt(96 / 4)  # a fair coin, 3 sigma


def test_augment_flips_width_not_channels_or_height():
    x = colour_batch()
    out = augment(x, torch.Generator().manual_seed(2), flip=True, pad=0)
    for i in range(len(x)):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    assert not torch.equal(out, x)


def test_augment_pads_by_replication_when_the_pad_is_not_smaller_than_the_image():
    x = colour_batch(n=32, h=4, w=4)
    for pad in (4, 5):  # reflect padding needs pad < size
        views(x, augment(x, torch.Generator().manual_seed(3), flip=False, pad=pad), pad, mode="edge")
    views(x, augment(x, torch.Generator().manual_seed(3), flip=False, pad=3), 3, mode="reflect")


def test_augment_runs_on_the_device_of_its_input():
    x = colour_batch(n=4).to("meta")  # the meta device stands in for CUDA
    assert augment(x, torch.Generator().manual_seed(0)).device.type == "meta"


def unique_synthetic(per_class, classes=10, seen=None):
    """Every image distinct (its index in the pixels), so a row identifies an example."""
    labels = np.repeat(np.arange(classes), per_class)
    if seen is not None:
        labels = labels[np.isin(labels, seen)]
    idx = np.arange(len(labels))
    images = np.stack([idx % 256, idx // 256, np.zeros_like(idx), np.zeros_like(idx)], 1).astype(np.uint8).reshape(-1, 2, 2, 1)
    split = Split(images, labels)
    return Dataset("synthetic", [str(c) for c in range(classes)], split, split, split, (0.5,), (0.25,), meta={"kept": 1})


def test_label_noise_rate_and_uniform_other_class_on_a_large_train_split():
    from scipy.stats import chisquare

    ds = unique_synthetic(2000)
    noisy = with_label_noise(ds, 0.3, seed=5)
    changed = noisy.train.labels != ds.train.labels
    assert abs(changed.mean() - 0.3) < 3 * np.sqrt(0.3 * 0.7 / len(changed))  # every flip lands on another class
    new = noisy.train.labels[changed]
    for c in range(10):  # a flipped label is uniform over the other 9 classes
        counts = np.bincount(new[ds.train.labels[changed] == c], minlength=10)
        assert counts[c] == 0 and chisquare(np.delete(counts, c)).pvalue > 1e-3
    assert noisy.meta == {"kept": 1, "noise_rate": 0.3}
    assert noisy.val is ds.val and noisy.test is ds.test
    with pytest.raises(DataError, match=r"noise rate must be in \[0, 1\), got 1.5"):
        with_label_noise(ds, 1.5, seed=0)


def test_imbalance_draws_distinct_seeded_examples_per_class():
    ds = unique_synthetic(50)
    out = with_imbalance(ds, 10, seed=3)
    kept = rows(out.train)
    assert max(kept.values()) == 1 and not (kept - rows(ds.train))  # a subset, no example twice
    again = with_imbalance(ds, 10, seed=3)
    np.testing.assert_array_equal(again.train.images, out.train.images)  # seeded: the same examples
    assert rows(with_imbalance(ds, 10, seed=4).train) != kept
    assert out.meta == {"kept": 1, "imbalance": 10}
    with pytest.raises(DataError, match="imbalance ratio must be >= 1, got 0.5"):
        with_imbalance(ds, 0.5, seed=0)


def test_imbalance_counts_follow_the_class_index_exponent():
    # class c keeps floor(n_max * ratio ** (-c / (C - 1))) images, at least one, at most its own
    for per_class, ratio in [(10, 100.0), (40, 10.0), (7, 3.0)]:
        counts = np.bincount(with_imbalance(unique_synthetic(per_class), ratio, seed=0).train.labels, minlength=10)
        expected = [min(per_class, max(1, int(per_class * ratio ** (-c / 9)))) for c in range(10)]
        assert counts.tolist() == expected
    # a class absent from train keeps its index: the exponent runs over every class
    counts = np.bincount(with_imbalance(unique_synthetic(40, seen=range(9)), 10.0, seed=0).train.labels, minlength=10)
    assert counts.tolist() == [min(40, int(40 * 10.0 ** (-c / 9))) for c in range(9)] + [0]


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_imagefolder_images_of_any_mode_become_rgb_and_root_files_are_ignored(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "modes"
    write_png(root / "000.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))  # no class folder: not an example
    grey = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    for i in range(5):
        write_png(root / "a" / f"{i}.png", grey)
        write_png(root / "b" / f"{i}.png", rng.integers(0, 256, (4, 4, 4), dtype=np.uint8))  # RGBA
    ds = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert ds.classes == ["a", "b"] and ds.channels == 3 and len(ds.train) + len(ds.val) + len(ds.test) == 10
    for split in (ds.train, ds.val, ds.test):
        for img in split.images[split.labels == 0]:
            np.testing.assert_array_equal(img, np.repeat(grey[..., None], 3, axis=2))


def test_imagefolder_stats_are_per_channel_over_train(tmp_path):
    made = write_tree(tmp_path / "tree", ["train", "test"], per_class=10)
    ds = load_dataset(f"imagefolder:{tmp_path / 'tree'}", cache_dir=tmp_path / "cache")
    train = np.concatenate([ds.train.images, ds.val.images]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(ds.std, train.std(0), rtol=1e-9)
    np.testing.assert_allclose(ds.mean, train.mean(0), rtol=1e-9)
    assert len(ds.std) == 3 and made


def test_imagefolder_cache_lives_in_cache_dir_is_reused_and_follows_the_source(tmp_path, monkeypatch):
    from trainables.common import data

    monkeypatch.setenv("ORCHESTRATE_CACHE_DIR", str(tmp_path / "default"))
    monkeypatch.chdir(tmp_path)
    write_tree(tmp_path / "tree", ["train", "test"], per_class=4)
    spec, cache = f"imagefolder:{tmp_path / 'tree'}", tmp_path / "cache"
    decoded = []
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda raw: decoded.append(1) or real(raw))
    first = load_dataset(spec, cache_dir=cache)
    assert len(decoded) == 24 and len(list(cache.rglob("*.npz"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "tree"]  # nothing in the default cache or the cwd
    again = load_dataset(spec, cache_dir=cache)
    assert len(decoded) == 24  # read back, not decoded again
    assert again.classes == first.classes == ["ant", "bee", "cat"]
    for a, b in [(again.train, first.train), (again.val, first.val), (again.test, first.test)]:
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    # the source changes (one more image): a new cache entry, not the stale one
    write_png(tmp_path / "tree" / "test" / "ant" / "999.png", np.zeros((5, 5, 3), np.uint8))
    assert len(load_dataset(spec, cache_dir=cache).test) == 13 and len(decoded) == 24 + 25
    # the default cache directory when none is given
    load_dataset(spec)
    assert len(list((tmp_path / "default").rglob("*.npz"))) == 1


def test_imagefolder_corrupted_cache_is_rebuilt(tmp_path):
    write_tree(tmp_path / "tree", ["train", "test"], per_class=4)
    spec, cache = f"imagefolder:{tmp_path / 'tree'}", tmp_path / "cache"
    good = load_dataset(spec, cache_dir=cache)
    [entry] = cache.rglob("*.npz")
    entry.write_bytes(b"not a zip")
    rebuilt = load_dataset(spec, cache_dir=cache)
    np.testing.assert_array_equal(rebuilt.test.images, good.test.images)
    assert rebuilt.classes == good.classes


def test_imagefolder_only_a_train_folder_is_cut_80_20_and_a_train_named_folder_takes_no_sibling(tmp_path):
    write_tree(tmp_path / "only", ["train"], per_class=10)
    ds = load_dataset(f"imagefolder:{tmp_path / 'only'}", cache_dir=tmp_path / "cache")
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 2] and len(ds.train) + len(ds.val) == 24
    # a folder (not a zip) named *train* with a *test* sibling: only -train zips pick up a sibling
    write_tree(tmp_path / "set-train", [""], per_class=10)
    write_tree(tmp_path / "set-test", [""], per_class=4)
    ds = load_dataset(f"imagefolder:{tmp_path / 'set-train'}", cache_dir=tmp_path / "cache")
    assert len(ds.test) == 6 and len(ds.train) + len(ds.val) == 24
    assert train_class_counts(f"imagefolder:{tmp_path / 'set-train'}").tolist() == np.bincount(ds.train.labels).tolist()


def test_imagefolder_the_80_20_cut_is_fixed(tmp_path):
    write_tree(tmp_path / "flat", [""], per_class=10)
    a = load_dataset(f"imagefolder:{tmp_path / 'flat'}", cache_dir=tmp_path / "c1")
    b = load_dataset(f"imagefolder:{tmp_path / 'flat'}", cache_dir=tmp_path / "c2", split_seed=4)
    assert rows(a.test) == rows(b.test)


def test_imagefolder_layout_errors(tmp_path):
    write_tree(tmp_path / "mismatch", ["train"], per_class=2)
    write_png(tmp_path / "mismatch" / "test" / "ant" / "0.png", np.zeros((5, 5, 3), np.uint8))
    write_png(tmp_path / "mismatch" / "test" / "dog" / "0.png", np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(DataError, match="train and test class folders differ in"):
        load_dataset(f"imagefolder:{tmp_path / 'mismatch'}", cache_dir=tmp_path / "cache")
    write_tree(tmp_path / "trainval", ["train", "val"], per_class=2)
    with pytest.raises(DataError, match=r"expected one split or train/ and test/, found \['train', 'val'\]"):
        load_dataset(f"imagefolder:{tmp_path / 'trainval'}", cache_dir=tmp_path / "cache")


def test_validate_spec_class_counts_and_messages(tmp_path):
    write_png(tmp_path / "one" / "train" / "a" / "0.png", np.zeros((2, 2, 3), np.uint8))
    write_png(tmp_path / "one" / "test" / "a" / "0.png", np.zeros((2, 2, 3), np.uint8))
    write_png(tmp_path / "one" / "test" / "b" / "0.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DataError, match=r"one split 'train': ImageFolder needs at least 2 class folders, found \['a'\]"):
        validate_spec(f"imagefolder:{tmp_path / 'one'}")
    write_png(tmp_path / "flat" / "a" / "0.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DataError, match=r"flat: ImageFolder needs at least 2 class folders, found \['a'\]"):
        validate_spec(f"imagefolder:{tmp_path / 'flat'}")
    write_png(tmp_path / "flat" / "b" / "0.png", np.zeros((2, 2, 3), np.uint8))
    validate_spec(f"imagefolder:{tmp_path / 'flat'}")  # two classes are enough
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(DataError, match="plain.txt is neither a directory nor a zip file"):
        validate_spec(f"imagefolder:{tmp_path / 'plain.txt'}")
    with pytest.raises(DataError, match="unknown dataset 'mnist': use one of digits, cifar10, cifar100 or imagefolder:PATH"):
        validate_spec("mnist")


def test_an_unreadable_path_is_a_data_error(tmp_path, monkeypatch):
    # root reads everything, so the permission check is seen through a stand-in for os.access
    from trainables.common import data

    write_tree(tmp_path / "tree", [""], per_class=2)
    zipped = zip_tree(tmp_path / "tree", tmp_path / "set.zip")
    asked = []
    monkeypatch.setattr(data.os, "access", lambda path, mode: asked.append(mode) and False)
    for path in (tmp_path / "tree", zipped):
        with pytest.raises(DataError, match=f"dataset path is not readable: {path}$"):
            validate_spec(f"imagefolder:{path}")
    assert asked == [os.R_OK | os.X_OK, os.R_OK]  # a folder must be searchable too


def test_imagefolder_path_may_hold_a_colon(tmp_path):
    write_tree(tmp_path / "a:b", [""], per_class=5)
    ds = load_dataset(f"imagefolder:{tmp_path / 'a:b'}", cache_dir=tmp_path / "cache")
    assert ds.classes == ["ant", "bee", "cat"]
    assert train_class_counts(f"imagefolder:{tmp_path / 'a:b'}").tolist() == np.bincount(ds.train.labels).tolist()


def test_a_zip_with_a_broken_directory_is_a_data_error(tmp_path):
    write_tree(tmp_path / "tree", [""], per_class=2)
    raw = zip_tree(tmp_path / "tree", tmp_path / "set.zip").read_bytes()
    broken = tmp_path / "broken.zip"  # its end record is intact, so it still looks like a zip
    broken.write_bytes(raw.replace(b"PK\x01\x02", b"XX\x01\x02"))
    assert zipfile.is_zipfile(broken)
    with pytest.raises(DataError, match=f"cannot read {broken}: Bad magic number for central directory"):
        validate_spec(f"imagefolder:{broken}")


# ---------------------------------------------------------------- torchvision CIFAR, without the download


def fake_cifar(monkeypatch, calls, per_class=3, fail=None):
    """torchvision's CIFAR classes replaced by ones that record how they are built."""
    from torchvision import datasets

    def make(real, classes):
        class Fake:
            base_folder, train_list, test_list = real.base_folder, real.train_list, real.test_list

            def __init__(self, root, train, download):
                calls.append((real.__name__, root, train, download))
                if fail is not None:
                    raise fail
                n = per_class * classes * (2 if train else 1)
                self.targets = [i % classes for i in range(n)]
                self.data = np.full((n, 2, 2, 3), 7 if train else 9, np.uint8)
                self.classes = [f"c{i}" for i in range(classes)]

        Fake.__name__ = real.__name__
        return Fake

    monkeypatch.setattr(datasets, "CIFAR10", make(datasets.CIFAR10, 10))
    monkeypatch.setattr(datasets, "CIFAR100", make(datasets.CIFAR100, 100))


def cifar_files(root, name):
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    for file, _ in cls.train_list + cls.test_list:
        (root / cls.base_folder).mkdir(parents=True, exist_ok=True)
        (root / cls.base_folder / file).write_bytes(b"")


@pytest.mark.parametrize("name,classes,mean", [("cifar10", 10, (0.4914, 0.4822, 0.4465)), ("cifar100", 100, (0.5071, 0.4865, 0.4409))])
def test_cifar_loads_through_torchvision_from_data_root(tmp_path, monkeypatch, name, classes, mean):
    calls = []
    fake_cifar(monkeypatch, calls)
    fetch = f"from torchvision.datasets import CIFAR{classes} as D; [D('{tmp_path}', train=t, download=True) for t in (True, False)]"
    with pytest.raises(DataError, match=re.escape(f"{name} is not on disk under {tmp_path}: download it once (needs network) with: python -c \"{fetch}\"")):
        load_dataset(name, data_root=tmp_path)
    assert calls == []
    cifar_files(tmp_path, name)
    ds = load_dataset(name, data_root=tmp_path)
    assert calls == [(f"CIFAR{classes}", str(tmp_path), True, False), (f"CIFAR{classes}", str(tmp_path), False, False)]
    assert ds.name == name and ds.num_classes == classes and ds.classes[-1] == f"c{classes - 1}" and ds.mean == mean
    assert len(ds.test) == 3 * classes and (ds.test.images == 9).all() and (ds.train.images == 7).all()
    assert len(ds.train) + len(ds.val) == 6 * classes and ds.train.labels.dtype == np.int64
    assert train_class_counts(name, data_root=tmp_path).tolist() == [(5000 if classes == 10 else 500) * 9 // 10] * classes


def test_cifar_download_is_asked_for_and_failures_are_data_errors(tmp_path, monkeypatch):
    calls = []
    fake_cifar(monkeypatch, calls)
    validate_spec("cifar10", download=True, data_root=tmp_path)  # nothing on disk is fine when it may download
    with pytest.raises(DataError, match="cifar10 is not on disk"):
        validate_spec("cifar10", data_root=tmp_path)
    with pytest.raises(DataError, match="cifar100 is not on disk"):
        validate_spec("cifar100", data_root=tmp_path)
    load_dataset("cifar10", download=True, data_root=tmp_path)
    assert [c[3] for c in calls] == [True, True]
    monkeypatch.setenv("ORCHESTRATE_CACHE_DIR", str(tmp_path / "default"))
    cifar_files(tmp_path / "default" / "torchvision", "cifar100")
    load_dataset("cifar100")  # the default root
    assert calls[-1][1] == str(tmp_path / "default" / "torchvision")
    fake_cifar(monkeypatch, [], fail=RuntimeError("Dataset not found or corrupted."))
    with pytest.raises(DataError, match=r"cifar100 is not available under .*\(load it with download=True; needs network access\): Dataset not found"):
        load_dataset("cifar100")
    root = tmp_path / "default" / "torchvision"
    with pytest.raises(DataError, match=re.escape(f"cifar100 is not available under {root}: Dataset not found")):  # no hint to download
        load_dataset("cifar100", download=True)
    fake_cifar(monkeypatch, [], fail=OSError("no route"))
    with pytest.raises(DataError, match=r"cifar10 download failed \(no network\?\): no route"):
        load_dataset("cifar10", download=True, data_root=tmp_path)


# ---------------------------------------------------------------- train_class_counts against the loaded split


@pytest.mark.parametrize("val_fraction,max_train,imbalance", [(0.1, None, 1.0), (0.2, 300, 1.0), (0.1, None, 10.0), (0.05, 500, 4.0), (0.1, None, 2.0)])
def test_train_class_counts_are_the_loaded_training_split(val_fraction, max_train, imbalance):
    ds = load_dataset("digits", val_fraction=val_fraction, max_train=max_train)
    ds = with_imbalance(ds, imbalance, seed=0) if imbalance != 1 else ds
    expected = np.bincount(ds.train.labels, minlength=10)
    assert train_class_counts("digits", val_fraction=val_fraction, max_train=max_train, imbalance=imbalance).tolist() == expected.tolist()


def test_train_class_counts_of_imagefolder_layouts(tmp_path):
    write_tree(tmp_path / "tree", ["train", "test"], per_class=10)
    write_tree(tmp_path / "flat", [""], per_class=10)
    write_tree(tmp_path / "train", [""], per_class=10)
    write_tree(tmp_path / "test", [""], per_class=4)
    zip_tree(tmp_path / "train", tmp_path / "set-train.zip")
    zip_tree(tmp_path / "test", tmp_path / "set-test.zip")
    zip_tree(tmp_path / "train", tmp_path / "lone-train.zip")  # no -test sibling: cut 80/20
    for name in ("tree", "flat", "set-train.zip", "lone-train.zip"):
        spec = f"imagefolder:{tmp_path / name}"
        ds = load_dataset(spec, max_train=12, cache_dir=tmp_path / "cache")
        assert train_class_counts(spec, max_train=12).tolist() == np.bincount(ds.train.labels, minlength=3).tolist(), name
        ds = load_dataset(spec, cache_dir=tmp_path / "cache")
        assert train_class_counts(spec).tolist() == np.bincount(ds.train.labels, minlength=3).tolist(), name
