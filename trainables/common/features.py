"""Content-keyed on-disk cache of frozen-encoder features, shared by every trial of every sweep.

One ``.npy`` per (dataset split images, split, encoder, weights, preprocessing, code version),
keyed by a sha256 of exactly that content, written atomically (temp + rename) under a file lock
so concurrent trials compute it once. A json sidecar holds shape, dtype and the file's sha256:
a truncated or corrupted array is detected and rebuilt, never loaded. Arrays are opened as
read-only memmaps, so trials on one machine share them through the page cache.

Labels are not part of the features: take them from ``dataset.<split>.labels`` (label noise
does not change an image's features).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainables.common.cache import atomic_write, default_cache_dir
from trainables.common.data import Dataset, load_dataset
from trainables.common.cache import build_lock
from trainables.common.encoders import Encoder, OwnCNN, check_name, describe, get_encoder, sha256_file
from trainables.common.training import forked_rng, resolve_device

CODE_VERSION = 1  # bump when the extraction code changes what it writes
SPLITS = ("train", "val", "test")
# Feature width per encoder, known without building one (for config checks before anything
# starts): own-cnn's last conv width, the ResNets' pooled widths, CLIP ViT-B/32's embedding.
FEATURE_DIMS = {"own-cnn": OwnCNN.WIDTHS[-1], "resnet18": 512, "resnet50": 2048, "clip-vit-b32": 512}


@dataclass
class FeatureSet:
    encoder: str
    identity: str  # encoder name + weights hash
    dim: int
    train: np.ndarray  # float32 (N, dim), read-only memmap
    val: np.ndarray
    test: np.ndarray
    paths: dict[str, Path]

    def split(self, name: str) -> np.ndarray:
        return getattr(self, name)


def extract_features(dataset: Dataset, encoder: str, *, device: str = "auto", cache_dir=None,
                     batch_size: int = 256, progress: bool = True) -> FeatureSet:
    """Features of every split of ``dataset`` under ``encoder``: loaded from the cache, or
    computed once (under a lock) and cached. Leaves every RNG as it found it, so a trial reports
    the same whether the cache was cold (an encoder built or own-cnn trained here) or warm."""
    with _rng_untouched(device):
        return _extract_features(dataset, encoder, device, cache_dir, batch_size, progress)


@contextmanager
def _rng_untouched(device: str):
    """Restore python's, numpy's and torch's global RNGs (the CUDA one of ``device`` too) on exit:
    building an encoder draws its initial weights, and training own-cnn reseeds torch."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with forked_rng(resolve_device(device)):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def _extract_features(dataset: Dataset, encoder: str, device: str, cache_dir, batch_size: int, progress: bool) -> FeatureSet:
    check_name(encoder)
    identity, transform = describe(encoder, dataset, device=device, cache_dir=cache_dir, progress=progress)
    built: Encoder | None = None
    arrays, paths = {}, {}
    for split in SPLITS:
        path = _path(dataset, split, encoder, identity, transform, cache_dir)
        arr = _load_valid(path)
        if arr is None:
            with build_lock(path, f"{encoder} features of {dataset.name}/{split}"):
                arr = _load_valid(path)
                if arr is None:
                    built = built or get_encoder(encoder, dataset, device, cache_dir, progress)
                    _extract(built, dataset, split, path, batch_size, progress, meta={"identity": identity, "transform": transform})
                    arr = _load_valid(path)
                    if arr is None:
                        raise RuntimeError(f"features just written to {path} do not verify")
        arrays[split], paths[split] = arr, path
    return FeatureSet(encoder, identity, arrays["train"].shape[1], arrays["train"], arrays["val"], arrays["test"], paths)


def cache_path_for(dataset: Dataset, encoder: str, split: str, *, device: str = "auto", cache_dir=None) -> Path:
    """Where the features of ``dataset.<split>`` under ``encoder`` live (present or not).
    For own-cnn this trains the encoder if it is not cached yet (its weights are in the key)."""
    check_name(encoder)
    identity, transform = describe(encoder, dataset, device=device, cache_dir=cache_dir)
    return _path(dataset, split, encoder, identity, transform, cache_dir)


def precompute(dataset_spec: str, encoder: str, *, device: str = "auto", cache_dir=None, progress: bool = True,
               **load_kwargs) -> dict[str, Path]:
    """Load ``dataset_spec`` (``load_dataset`` keyword arguments pass through) and cache its
    features under ``encoder``; returns split -> path. Backs ``orchestrate features``."""
    load_kwargs.setdefault("cache_dir", cache_dir)
    dataset = load_dataset(dataset_spec, **load_kwargs)
    return extract_features(dataset, encoder, device=device, cache_dir=cache_dir, progress=progress).paths


def _path(dataset: Dataset, split: str, encoder: str, identity: str, transform: str, cache_dir) -> Path:
    images = getattr(dataset, split).images
    digest = hashlib.sha256(repr((CODE_VERSION, split, encoder, identity, transform, images.dtype.str, images.shape)).encode())
    digest.update(memoryview(np.ascontiguousarray(images)).cast("B"))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dataset.name.rsplit("/", 1)[-1]).strip("-")[-40:]
    return Path(cache_dir or default_cache_dir()) / "features" / encoder / f"{slug}-{split}-{digest.hexdigest()[:24]}.npy"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _load_valid(path: Path) -> np.ndarray | None:
    """The cached array as a read-only memmap, or None when missing, truncated or corrupted."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        if sha256_file(path) != meta["sha256"]:  # memoised: hashed once per process per file version
            return None
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError):
        return None
    if list(arr.shape) != meta["shape"] or arr.dtype.str != meta["dtype"]:
        return None
    if not np.isfinite(arr).all():  # written by a diverged encoder before such features were refused
        return None
    return arr


def _extract(encoder: Encoder, dataset: Dataset, split: str, path: Path, batch_size: int, progress: bool, meta: dict) -> None:
    from tqdm import tqdm

    images = getattr(dataset, split).images
    device = next(encoder.module.parameters()).device
    shape = (len(images), encoder.dim)

    def write(tmp):
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        bar = tqdm(total=len(images), desc=f"{encoder.name} features {dataset.name}/{split}", file=sys.stderr,
                   disable=not progress, unit="img")
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                block = encoder.module(dataset.to_float(chunk, device)).float().cpu().numpy()
                if not np.isfinite(block).all():  # a diverged encoder: caching it would poison every later trial
                    raise RuntimeError(f"encoder {encoder.name} gave non-finite features for {dataset.name}/{split} "
                                       f"(images {start}..{start + len(chunk) - 1}); nothing was cached")
                out[start : start + len(chunk)] = block
                bar.update(len(chunk))
        bar.close()
        out.flush()
        del out

    atomic_write(path, write)
    sidecar = {**meta, "shape": list(shape), "dtype": np.dtype(np.float32).str, "sha256": sha256_file(path),
               "encoder": encoder.name, "dataset": dataset.name, "split": split, "code_version": CODE_VERSION}
    atomic_write(_sidecar(path), lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1)))
