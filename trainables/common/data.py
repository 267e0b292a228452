"""Datasets as uint8 image arrays with deterministic train/val/test splits.

A dataset spec is a string: ``digits`` (scikit-learn, offline), ``cifar10`` / ``cifar100``
(torchvision; downloads only when ``download=True``), or ``imagefolder:PATH`` where PATH is an
ImageFolder directory or a zip holding one (e.g. ``../shared/data/cifar10-jpeg-train.zip``; a
``-train`` zip picks up its ``-test`` sibling as the test split).

Label noise and class imbalance are transforms of the *training* split only, seeded.
Images stay uint8 (N, H, W, C) so many trials can share them cheaply; ``to_float`` turns a
batch into a normalised float tensor.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainables.common.cache import atomic_save_npz, build_lock, default_cache_dir

if TYPE_CHECKING:
    import torch


class DataError(ValueError):
    """A dataset spec or path that cannot be loaded; the CLI turns it into exit code 2."""


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.train.images.shape[-1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[1]

    def to_float(self, images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """uint8 (N, H, W, C) -> normalised float32 (N, C, H, W) on ``device``."""
        import torch  # lazily: the driver validates datasets without importing torch

        x = torch.as_tensor(images).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


# ---------------------------------------------------------------- loading

DATASET_NAMES = ("digits", "cifar10", "cifar100")


def validate_spec(spec: str, download: bool = False, data_root: str | os.PathLike | None = None) -> None:
    """Cheap check of a dataset spec before anything starts (no image is decoded): a torchvision
    dataset is on disk or asked to ``download``; an ImageFolder path is a readable folder or zip
    of SPLIT/CLASS/IMAGE or CLASS/IMAGE files with at least two classes in every split."""
    if spec == "digits":
        return
    if spec in ("cifar10", "cifar100"):
        if not download:
            _require_torchvision_files(spec, data_root)
        return
    if spec.startswith("imagefolder:"):
        path = Path(spec.split(":", 1)[1]).expanduser()
        if not path.exists():
            raise DataError(f"dataset path does not exist: {path}")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise DataError(f"dataset path is not readable: {path}")
        try:
            splits = _layout(_list_image_files(path))
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        if not splits:
            raise DataError(f"no images in ImageFolder layout (SPLIT/CLASS/IMAGE or CLASS/IMAGE) under {path}")
        for split, items in splits.items():
            classes = sorted({cls for cls, _ in items})
            if len(classes) < 2:
                where = "" if split == "all" else f" split {split!r}"
                raise DataError(f"{path}{where}: ImageFolder needs at least 2 class folders, found {classes}")
        return
    raise DataError(f"unknown dataset {spec!r}: use one of {', '.join(DATASET_NAMES)} or imagefolder:PATH")


def _require_torchvision_files(name: str, data_root) -> None:
    from torchvision import datasets

    root = Path(data_root or default_cache_dir() / "torchvision").expanduser()
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = root / cls.base_folder
    if not all((folder / file).is_file() for file, _ in cls.train_list + cls.test_list):
        fetch = (f"python -c \"from torchvision.datasets import {cls.__name__} as D; "
                 f"[D('{root}', train=t, download=True) for t in (True, False)]\"")
        raise DataError(f"{name} is not on disk under {root}: download it once (needs network) with: {fetch}")


def load_dataset(
    spec: str,
    *,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    max_train: int | None = None,
    max_test: int | None = None,
    download: bool = False,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Load ``spec`` with a deterministic stratified val split carved from the training data.

    ``max_train``/``max_test`` take a stratified, seeded subset (for CPU-sized runs); the val
    split is carved before ``max_train`` applies so val never overlaps train.
    """
    validate_spec(spec, download, data_root)
    if spec == "digits":
        train, test, classes, mean, std = _load_digits()
    elif spec in ("cifar10", "cifar100"):
        train, test, classes, mean, std = _load_torchvision_cifar(spec, download, data_root)
    else:
        train, test, classes, mean, std = _load_imagefolder(Path(spec.split(":", 1)[1]).expanduser(), cache_dir)
    rng = np.random.default_rng(split_seed)
    val_idx = _stratified_take(train.labels, val_fraction, rng)
    rest = np.setdiff1d(np.arange(len(train)), val_idx)
    val, train = train.subset(val_idx), train.subset(rest)
    if max_train is not None and max_train < len(train):
        train = train.subset(_stratified_take(train.labels, max_train / len(train), rng))
    if max_test is not None and max_test < len(test):
        test = test.subset(_stratified_take(test.labels, max_test / len(test), rng))
    return Dataset(spec, classes, train, val, test, mean, std)


def _stratified_take(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a seeded, per-class ``fraction`` of ``labels`` (at least one per class)."""
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.choice(idx, size=_take_count(len(idx), fraction), replace=False))
    return np.sort(np.concatenate(picked))


def _take_count(n: int, fraction: float) -> int:
    """How many of a class's ``n`` images :func:`_stratified_take` keeps."""
    return min(max(1, int(round(fraction * n))), n)


def train_class_counts(spec: str, *, val_fraction: float = 0.1, max_train: int | None = None,
                       imbalance: float = 1.0, data_root: str | os.PathLike | None = None) -> np.ndarray:
    """Images per class of the training split that ``load_dataset`` (then ``with_imbalance``)
    gives, from labels or file names only (no image is decoded): cheap enough for a config check
    before anything starts. Label noise does not change the counts."""
    validate_spec(spec, data_root=data_root)
    counts = _source_train_counts(spec, data_root)
    counts = counts - np.array([_take_count(n, val_fraction) for n in counts])
    if max_train is not None and max_train < counts.sum():
        counts = np.array([_take_count(n, max_train / counts.sum()) for n in counts])
    return counts if imbalance == 1 else _imbalanced_counts(counts, imbalance)


def _source_train_counts(spec: str, data_root) -> np.ndarray:
    """Images per class of the training data before the val split is carved out of it."""
    if spec == "digits":
        return np.bincount(_load_digits()[0].labels)
    if spec in ("cifar10", "cifar100"):
        return np.full(10, 5000) if spec == "cifar10" else np.full(100, 500)
    path = Path(spec.split(":", 1)[1]).expanduser()
    splits = _layout(_list_image_files(path))
    classes = sorted({cls for items in splits.values() for cls, _ in items})
    items = splits.get("train", splits.get("all", []))
    counts = np.array([sum(cls == c for cls, _ in items) for c in classes])
    has_test = "test" in splits or (path.is_file() and "train" in path.name and path.with_name(path.name.replace("train", "test")).exists())
    return counts if has_test else counts - np.array([_take_count(n, 0.2) for n in counts])  # the 80/20 cut


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    labels = d.target.astype(np.int64)
    # A fixed stratified 80/20 train/test split: the test set is the same for every seed.
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    train, test = Split(images[tr], labels[tr]), Split(images[te], labels[te])
    mean = float(train.images.mean() / 255.0)
    std = float(train.images.std() / 255.0)
    return train, test, [str(i) for i in range(10)], (mean,), (std,)


CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _load_torchvision_cifar(name: str, download: bool, data_root):
    from torchvision import datasets

    root = Path(data_root or default_cache_dir() / "torchvision").expanduser()
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted..."
        hint = "" if download else " (load it with download=True; needs network access)"
        raise DataError(f"{name} is not available under {root}{hint}: {exc}") from None
    except OSError as exc:  # URLError and friends when the download itself fails
        raise DataError(f"{name} download failed (no network?): {exc}") from None
    train = Split(np.asarray(tr.data, dtype=np.uint8), np.asarray(tr.targets, dtype=np.int64))
    test = Split(np.asarray(te.data, dtype=np.uint8), np.asarray(te.targets, dtype=np.int64))
    mean, std = CIFAR_STATS[name]
    return train, test, list(tr.classes), mean, std


# ---------------------------------------------------------------- ImageFolder trees and zips

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _load_imagefolder(path: Path, cache_dir):
    """Train and test splits of an ImageFolder tree or zip.

    A tree or zip with ``train/`` and ``test/`` directories (at any depth) gives both splits;
    a ``*-train.zip`` with a sibling ``*-test.zip`` likewise; otherwise the single split is cut
    80/20 into train and test (fixed, stratified).
    """
    sources = [path]
    if path.is_file() and "train" in path.name:
        sibling = path.with_name(path.name.replace("train", "test"))
        if sibling.exists():
            sources.append(sibling)
    decoded: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
    for src in sources:
        for split, arrays in _decode_cached(src, cache_dir).items():
            decoded[split] = arrays
    if "train" in decoded and "test" in decoded:
        (xi, yi, classes), (xt, yt, classes_t) = decoded["train"], decoded["test"]
        # one source lists its classes over both splits: compare the classes each split holds
        if classes != classes_t or set(np.unique(yi)) != set(np.unique(yt)):
            raise DataError(f"train and test class folders differ in {path}")
        train, test = Split(xi, yi), Split(xt, yt)
    else:
        if len(decoded) != 1:
            raise DataError(f"{path}: expected one split or train/ and test/, found {sorted(decoded)}")
        x, y, classes = next(iter(decoded.values()))
        rng = np.random.default_rng(0)
        te = _stratified_take(y, 0.2, rng)
        tr = np.setdiff1d(np.arange(len(y)), te)
        train, test = Split(x[tr], y[tr]), Split(x[te], y[te])
    mean = tuple(float(m) for m in train.images.reshape(-1, train.images.shape[-1]).mean(0) / 255.0)
    std = tuple(float(s) for s in train.images.reshape(-1, train.images.shape[-1]).std(0) / 255.0)
    return train, test, classes, mean, std


def _decode_cached(src: Path, cache_dir) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Decode every image of ``src`` once; later calls read the cached arrays."""
    key = hashlib.sha256(f"{src.resolve()}|{_source_version(src)}|v1".encode()).hexdigest()[:16]
    cache = Path(cache_dir or default_cache_dir()) / "imagefolder" / f"{src.stem}-{key}.npz"
    cached = _load_decoded(cache)
    if cached is not None:
        return cached
    with build_lock(cache, f"decoded images of {src.name}"):  # one process decodes, the others wait
        cached = _load_decoded(cache)
        return cached if cached is not None else _decode_all(src, cache)


def _source_version(src: Path) -> str:
    """Size and mtime of a zip, or of every image file of a folder: a folder's own mtime changes
    only when its direct entries do, so an image added or replaced in a class folder would
    otherwise be served stale from the cache."""
    if src.is_file():
        stat = src.stat()
        return f"{stat.st_size}|{stat.st_mtime_ns}"
    stats = ((rel, (src / rel).stat()) for rel in _list_image_files(src))
    return hashlib.sha256("|".join(f"{rel}:{st.st_size}:{st.st_mtime_ns}" for rel, st in stats).encode()).hexdigest()


def _load_decoded(cache: Path) -> dict | None:
    if not cache.exists():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            splits = [str(s) for s in z["splits"]]
            classes = [str(c) for c in z["classes"]]
            return {s: (z[f"{s}_x"], z[f"{s}_y"], classes) for s in splits}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        cache.unlink(missing_ok=True)  # truncated or corrupted: rebuilt by the caller
        return None


def _decode_all(src: Path, cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    files = _list_image_files(src)
    if not files:
        raise DataError(f"no images in ImageFolder layout (SPLIT/CLASS/IMAGE) under {src}")
    by_split = _layout(files)
    classes = sorted({cls for items in by_split.values() for cls, _ in items})
    index = {c: i for i, c in enumerate(classes)}
    out, arrays = {}, {}
    with _opener(src) as read:
        for split, items in by_split.items():
            items.sort()
            x = np.stack([_decode(read(rel)) for _, rel in items])
            y = np.array([index[c] for c, _ in items], dtype=np.int64)
            out[split] = (x, y, classes)
            arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    atomic_save_npz(cache, splits=np.array(sorted(out)), classes=np.array(classes), **arrays)
    return out


def _layout(files: list[str]) -> dict[str, list[tuple[str, str]]]:
    """ImageFolder paths by split: ``{split: [(class, path)]}``; a file directly under the root
    (no class folder) is not part of the layout. Split ``all`` when there are no split folders."""
    by_split: dict[str, list[tuple[str, str]]] = {}
    for rel in files:
        parts = rel.split("/")
        if len(parts) < 2:
            continue
        split = parts[-3] if len(parts) >= 3 and parts[-3] in ("train", "test", "val") else "all"
        by_split.setdefault(split, []).append((parts[-2], rel))
    return by_split


def _list_image_files(src: Path) -> list[str]:
    if src.is_dir():
        return sorted(str(p.relative_to(src)).replace(os.sep, "/") for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            return sorted(n for n in z.namelist() if n.lower().endswith(IMAGE_EXTENSIONS))
    raise DataError(f"{src} is neither a directory nor a zip file")


class _opener:
    """Context manager giving ``read(relative_path) -> bytes`` over a directory or a zip."""

    def __init__(self, src: Path):
        self.src = src
        self.zip = None

    def __enter__(self):
        if self.src.is_dir():
            return lambda rel: (self.src / rel).read_bytes()
        self.zip = zipfile.ZipFile(self.src)
        return self.zip.read

    def __exit__(self, *exc):
        if self.zip is not None:
            self.zip.close()


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


# ---------------------------------------------------------------- training-split transforms


def with_label_noise(ds: Dataset, rate: float, seed: int) -> Dataset:
    """Symmetric label noise: each training label is, with probability ``rate``, replaced by a
    uniformly drawn *different* class. Val and test keep their clean labels."""
    if not 0.0 <= rate < 1.0:
        raise DataError(f"noise rate must be in [0, 1), got {rate}")
    if rate == 0:
        return ds
    rng = np.random.default_rng([seed, 1])
    labels = ds.train.labels.copy()
    flip = rng.random(len(labels)) < rate
    offsets = rng.integers(1, ds.num_classes, size=int(flip.sum()))
    labels[flip] = (labels[flip] + offsets) % ds.num_classes
    return replace(ds, train=Split(ds.train.images, labels), meta={**ds.meta, "noise_rate": rate})


def with_imbalance(ds: Dataset, ratio: float, seed: int) -> Dataset:
    """Exponential class imbalance on the training split: class c keeps
    ``n_max * ratio ** (-c / (C - 1))`` images, so the largest/smallest class ratio is ``ratio``."""
    if ratio < 1:
        raise DataError(f"imbalance ratio must be >= 1, got {ratio}")
    if ratio == 1:
        return ds
    rng = np.random.default_rng([seed, 2])
    kept = _imbalanced_counts(np.bincount(ds.train.labels, minlength=ds.num_classes), ratio)
    keep = [rng.choice(np.flatnonzero(ds.train.labels == c), size=n_c, replace=False) for c, n_c in enumerate(kept)]
    return replace(ds, train=ds.train.subset(np.sort(np.concatenate(keep))), meta={**ds.meta, "imbalance": ratio})


def _imbalanced_counts(counts: np.ndarray, ratio: float) -> np.ndarray:
    """Images per class that :func:`with_imbalance` keeps of ``counts``."""
    c = np.arange(len(counts))
    wanted = np.maximum(1, (counts.max() * ratio ** (-c / (len(counts) - 1))).astype(int))
    return np.minimum(wanted, counts)


# ---------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool = True, pad: int | None = None) -> torch.Tensor:
    """Random translation (pad + crop, reflect padding) and, when ``flip``, horizontal flip of a
    normalised float batch (N, C, H, W). Used for training and for TTA views."""
    import torch

    n, _, h, w = x.shape
    pad = pad if pad is not None else max(1, h // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect" if pad < h else "replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)  # (N, H)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)  # (N, W)
    out = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1),
                 rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(mask.view(n, 1, 1, 1), out.flip(-1), out)
    return out
