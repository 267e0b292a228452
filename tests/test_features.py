"""The frozen-encoder feature cache: reuse without recomputation, corruption detection,
one extraction under concurrency, clear errors for missing weights."""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from trainables.common.data import load_dataset, with_label_noise
from trainables.common.encoders import EncoderUnavailable, OwnCNN, get_encoder
from trainables.common.features import cache_path_for, extract_features, precompute


class ForwardCounter:
    """Counts forward calls of top-level encoder modules in this process (a global torch hook)."""

    def __init__(self, types=(OwnCNN,)):
        self.types, self.calls = types, 0

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output):
        self.calls += isinstance(module, self.types)

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny 8x8 models gain nothing from intra-op threads, and on a shared 2-core machine two
    threads per process oversubscribe it badly; restored for the tests after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", max_train=500)


@pytest.fixture(scope="module")
def trained_cache(tmp_path_factory, digits):
    """A cache dir holding own-cnn's weights for digits (trained once for this module)."""
    root = tmp_path_factory.mktemp("own_cnn")
    extract_features(digits, "own-cnn", cache_dir=root, progress=False)
    shutil.rmtree(root / "features")
    return root


@pytest.fixture
def cache(tmp_path, trained_cache):
    shutil.copytree(trained_cache / "encoders", tmp_path / "encoders")
    return tmp_path


def test_second_call_reuses_features_without_running_the_encoder(cache, digits):
    with ForwardCounter() as cold:
        first = extract_features(digits, "own-cnn", cache_dir=cache, progress=False)
    with ForwardCounter() as warm:
        second = extract_features(digits, "own-cnn", cache_dir=cache, progress=False)
    assert cold.calls > 0 and warm.calls == 0
    for split in ("train", "val", "test"):
        a, b = first.split(split), second.split(split)
        assert isinstance(b, np.memmap) and not b.flags.writeable
        assert a.dtype == np.float32 and a.shape == (len(getattr(digits, split)), first.dim)
        np.testing.assert_array_equal(a, b)
        assert second.paths[split] == cache_path_for(digits, "own-cnn", split, cache_dir=cache)
    # the cached values are the encoder's output on those images
    enc = get_encoder("own-cnn", digits, "cpu", cache)
    with torch.no_grad():
        direct = enc.module(digits.to_float(digits.test.images)).numpy()
    np.testing.assert_allclose(second.test, direct, rtol=1e-4, atol=1e-5)
    assert second.identity == enc.identity and first.dim == enc.dim == 256
    sidecar = json.loads(second.paths["test"].with_suffix(".json").read_text())  # what the file holds, for a reader
    assert {k: sidecar[k] for k in ("encoder", "dataset", "split", "code_version", "identity", "shape", "dtype")} == {
        "encoder": "own-cnn", "dataset": "digits", "split": "test", "code_version": 1, "identity": enc.identity,
        "shape": [len(digits.test), 256], "dtype": "<f4"}


def test_progress_bars_name_what_is_extracted_count_every_image_and_show_unless_turned_off(cache, digits, capsys):
    """On by default (a user running a sweep or ``precompute`` sees the work), off when asked;
    each split's bar names encoder, dataset and split and ends at that split's image count."""
    def bars():
        err = capsys.readouterr().err
        return {split: re.search(rf"own-cnn features digits/{split}: 100%\|[^|]*\| (\d+)/(\d+) \[[^]]*img/s\]", err)
                for split in ("train", "val", "test")}

    for quiet in (lambda: extract_features(digits, "own-cnn", cache_dir=cache, progress=False),
                  lambda: precompute("digits", "own-cnn", cache_dir=cache, max_train=500, progress=False)):
        shutil.rmtree(cache / "features", ignore_errors=True)
        quiet()
        assert capsys.readouterr().err == ""
    for run in (lambda: extract_features(digits, "own-cnn", cache_dir=cache),
                lambda: precompute("digits", "own-cnn", cache_dir=cache, max_train=500)):
        shutil.rmtree(cache / "features")
        run()
        for split, bar in bars().items():
            n = str(len(getattr(digits, split).images))
            assert bar is not None and bar.groups() == (n, n), split


def test_a_cold_cache_trains_own_cnn_with_its_bar_only_when_progress_is_on(tmp_path, digits, capsys, monkeypatch):
    """The encoder's training bar follows the caller's ``progress`` too (its own tests: test_encoders)."""
    from trainables.common import encoders

    monkeypatch.setitem(encoders.OWN_CNN_RECIPE, "max_steps", 4)  # a short training: 1 epoch of 4 steps
    extract_features(digits, "own-cnn", cache_dir=tmp_path / "quiet", progress=False)
    assert "training own-cnn" not in capsys.readouterr().err
    extract_features(digits, "own-cnn", cache_dir=tmp_path / "shown")
    assert re.search(r"training own-cnn on digits: 100%\|[^|]*\| 4/4 \[", capsys.readouterr().err)


def test_precompute_loads_the_spec_and_fills_the_same_cache(cache, digits):
    paths = precompute("digits", "own-cnn", cache_dir=cache, progress=False, max_train=500)
    assert paths == extract_features(digits, "own-cnn", cache_dir=cache, progress=False).paths
    assert all(p.exists() and p.with_suffix(".json").exists() for p in paths.values())


def test_key_follows_image_content_not_labels(cache, digits):
    fs = extract_features(digits, "own-cnn", cache_dir=cache, progress=False)
    relabelled = replace(digits, test=replace(digits.test, labels=np.roll(digits.test.labels, 1)))
    assert cache_path_for(relabelled, "own-cnn", "test", cache_dir=cache) == fs.paths["test"]
    fewer = replace(digits, test=digits.test.subset(np.arange(100)))
    assert cache_path_for(fewer, "own-cnn", "test", cache_dir=cache) != fs.paths["test"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_sidecar", "sidecar_shape", "sidecar_dtype"])
def test_damaged_file_is_rebuilt_not_loaded(cache, digits, damage):
    fs = extract_features(digits, "own-cnn", cache_dir=cache, progress=False)
    expected = np.array(fs.train)
    path = fs.paths["train"]
    del fs
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        data[len(data) - 7] ^= 0xFF
        path.write_bytes(data)
    elif damage.startswith("sidecar_"):  # the array verifies, its description does not
        sidecar = json.loads(path.with_suffix(".json").read_text())
        if damage == "sidecar_shape":
            sidecar["shape"][0] -= 1
        else:
            sidecar["dtype"] = "<f8"
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    else:
        path.with_suffix(".json").unlink()
    with ForwardCounter() as counter:
        rebuilt = extract_features(digits, "own-cnn", cache_dir=cache, progress=False)
    assert counter.calls > 0
    np.testing.assert_allclose(rebuilt.train, expected, rtol=1e-5, atol=1e-6)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["shape"] == list(expected.shape)


def _extract_in_child(cache_dir, barrier, results):
    torch.set_num_threads(1)
    ds = load_dataset("digits", max_train=500)
    barrier.wait()
    with ForwardCounter() as counter:
        fs = extract_features(ds, "own-cnn", cache_dir=cache_dir, progress=False)
    results.put((counter.calls, float(np.asarray(fs.test).sum())))


@pytest.mark.slow
def test_concurrent_requests_extract_once(cache):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_extract_in_child, args=(str(cache), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    out = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    calls = sorted(c for c, _ in out)
    assert calls[0] == 0 and calls[1] > 0, f"forward calls per process: {calls}"
    assert out[0][1] == out[1][1]
    assert len(list((cache / "features" / "own-cnn").glob("*.npy"))) == 3


def test_missing_resnet_weights_offline_is_a_clear_error(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("ORCHESTRATE_OFFLINE", "1")
    with pytest.raises(EncoderUnavailable, match=r"resnet18.*resnet18-f37072fd\.pth.*hub/checkpoints"):
        extract_features(digits, "resnet18", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "features").exists()


def test_bad_requests_are_clear_errors(tmp_path, digits):
    with pytest.raises(EncoderUnavailable, match="unknown encoder 'vgg'"):
        extract_features(digits, "vgg", cache_dir=tmp_path)
    with pytest.raises(EncoderUnavailable, match="own-cnn is trained on clean labels"):
        extract_features(with_label_noise(digits, 0.2, seed=0), "own-cnn", cache_dir=tmp_path)


def test_non_finite_features_are_refused_and_never_cached(tmp_path):
    from torch import nn

    from trainables.common.encoders import Encoder
    from trainables.common.features import _extract

    ds = load_dataset("digits", max_train=40, max_test=20)
    broken = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(ds.train.images.shape[1:])), 4))
    with torch.no_grad():
        broken[1].weight.fill_(float("nan"))  # what a diverged own-cnn training leaves behind
    encoder = Encoder("broken", "broken-0", 4, broken.eval())
    path = tmp_path / "train.npy"
    with pytest.raises(RuntimeError, match=r"encoder broken gave non-finite features for digits/train \(images 0\.\.15\)"):
        _extract(encoder, ds, "train", path, batch_size=16, progress=False, meta={})
    assert list(tmp_path.iterdir()) == []


def test_a_cache_left_non_finite_by_a_diverged_encoder_is_rebuilt(tmp_path):
    """Encoder weights and features with NaNs (what a diverged own-cnn training cached before
    such entries were refused) count as corrupted: retrained and re-extracted, finite."""
    from trainables.common.encoders import sha256_file

    cache = tmp_path / "cache"
    ds = load_dataset("digits", max_train=200, max_test=50)
    extract_features(ds, "own-cnn", cache_dir=cache, progress=False)
    (weights,) = (cache / "encoders").glob("own-cnn-*.pt")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, weights)
    for path in (cache / "features" / "own-cnn").glob("*.npy"):
        np.save(path, np.full(np.load(path).shape, np.nan, dtype=np.float32))
        meta = json.loads(path.with_suffix(".json").read_text())
        meta["sha256"] = sha256_file(path)
        path.with_suffix(".json").write_text(json.dumps(meta))
    rebuilt = extract_features(ds, "own-cnn", cache_dir=cache, progress=False)
    assert all(np.isfinite(np.asarray(rebuilt.split(s))).all() for s in ("train", "val", "test"))
    assert all(torch.isfinite(v).all() for v in torch.load(weights, weights_only=True)["state_dict"].values()
               if v.is_floating_point())


def test_precompute_keeps_the_decoded_images_and_features_in_the_given_cache(tmp_path, monkeypatch, trained_cache):
    """``orchestrate features`` on an ImageFolder tree with a cache: the decoded images, own-cnn's
    weights and the features all go under that cache, nothing to the default one; each file is
    named by the tree it holds."""
    from test_data import write_tree

    monkeypatch.setenv("ORCHESTRATE_CACHE_DIR", str(tmp_path / "default"))
    write_tree(tmp_path / "My Tree", ["train", "test"], per_class=4)
    spec = f"imagefolder:{tmp_path / 'My Tree'}"
    # asked first on a cold cache: own-cnn is trained there, on this machine's device
    expected = cache_path_for(load_dataset(spec, cache_dir=tmp_path / "cache"), "own-cnn", "train", cache_dir=tmp_path / "cache")
    paths = precompute(spec, "own-cnn", cache_dir=tmp_path / "cache", progress=False)
    assert paths["train"] == expected
    assert not (tmp_path / "default").exists()
    assert len(list((tmp_path / "cache" / "imagefolder").glob("*.npz"))) == 1
    assert sorted(paths) == ["test", "train", "val"]
    for split, path in paths.items():
        assert path.parent == tmp_path / "cache" / "features" / "own-cnn" and path.name.startswith(f"My-Tree-{split}-")
    digits_path = cache_path_for(load_dataset("digits", max_train=500), "own-cnn", "val", cache_dir=trained_cache)
    assert digits_path.name.startswith("digits-val-")


def test_extraction_leaves_every_global_rng_as_it_found_it(cache, digits):
    """Building the encoder draws initial weights (and training own-cnn reseeds torch): a trial
    that extracts features must draw afterwards what it would have drawn on a warm cache."""
    import random

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    with ForwardCounter() as extracting:
        extract_features(digits, "own-cnn", cache_dir=cache, progress=False)
    assert extracting.calls > 0  # the encoder was built and run here
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
