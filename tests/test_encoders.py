"""The own-cnn encoder as the science uses it: trained on the TRAIN split only, by its declared
recipe, in its declared architecture; its cache key follows exactly what it was trained on.

The reference is written out here: the architecture as plain ``nn.Sequential`` layers, and the
training as a loop over torch's own AdamW and OneCycleLR with the recipe's numbers. Tiny data
(150 digits, 40 optimiser steps) keeps each training to about a second.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from clip_hub import CLIP_HUB_REPO, clip_hub, offline_hub  # noqa: F401
from one_thread import one_thread  # noqa: F401
from trainables.common import encoders
from trainables.common.data import augment, load_dataset
from trainables.common.encoders import OWN_CNN_RECIPE, EncoderUnavailable, OwnCNN, describe, get_encoder

RECIPE = {"version": 1, "seed": 0, "epochs": 20, "max_steps": 600, "batch_size": 128, "lr": 2e-3, "weight_decay": 5e-4}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", max_train=150)


@pytest.fixture(scope="module")
def trained(digits) -> dict:
    return encoders._train_own_cnn(digits, torch.device("cpu"), progress=False)


def declared_own_cnn(channels: int, image_size: int, num_classes: int) -> tuple[nn.Sequential, nn.Linear]:
    """The module doc's network: 3x3 convs (no bias) of 32-64-128-256, each with BatchNorm and
    ReLU; a 2x2 max-pool after each of the first three while the map is larger than 2x2; the
    features are the global average of the last map; a linear head on them for training."""
    layers, size, c_in = [], image_size, channels
    for i, c_out in enumerate((32, 64, 128, 256)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        if i < 3 and size > 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        c_in = c_out
    return nn.Sequential(*layers), nn.Linear(256, num_classes)


def load_declared(state: dict, channels: int, image_size: int, num_classes: int) -> tuple[nn.Sequential, nn.Linear]:
    body, head = declared_own_cnn(channels, image_size, num_classes)
    body.load_state_dict({k.removeprefix("body."): v for k, v in state.items() if k.startswith("body.")})  # strict
    head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
    return body.eval(), head.eval()


def features(body: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return body(x).mean((2, 3))


def test_the_recipe_is_the_declared_one():
    assert OWN_CNN_RECIPE == RECIPE  # part of the weights' cache key: a change retrains every cached own-cnn


@pytest.mark.parametrize("image_size,maps", [(8, (4, 2, 2)), (32, (16, 8, 4)), (2, (2, 2, 2)), (12, (6, 3, 1))])
def test_own_cnn_is_the_declared_architecture(image_size, maps):
    torch.manual_seed(0)
    net = OwnCNN(3, image_size, 10).eval()
    body, head = load_declared(net.state_dict(), 3, image_size, 10)
    x = torch.randn(4, 3, image_size, image_size)
    with torch.no_grad():
        np.testing.assert_allclose(net(x), features(body, x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(net.head(net(x)), head(features(body, x)), rtol=1e-5, atol=1e-6)
        assert net.feature_map(x).shape == (4, 256, maps[-1], maps[-1])
    pooled = [m for m in net.body if isinstance(m, nn.MaxPool2d)]
    assert len(pooled) == sum(1 for a, b in zip((image_size,) + maps, maps) if b < a) and net.dim == 256


def replay(digits) -> tuple[nn.Sequential, nn.Linear]:
    """own-cnn's training written out: the recipe's seed for the initial weights (torch's global
    RNG) and for a generator that orders the batches and draws the translations (no flips);
    AdamW at the recipe's lr and weight decay under one OneCycle schedule over every step; epochs
    = min(recipe epochs, max_steps // steps per epoch); cross-entropy of the head on the pooled
    features; TRAIN images and labels only."""
    r = RECIPE
    torch.manual_seed(r["seed"])
    body, head = declared_own_cnn(digits.channels, digits.image_size, digits.num_classes)
    gen = torch.Generator().manual_seed(r["seed"])
    n = len(digits.train)
    steps = -(-n // r["batch_size"])
    epochs = min(r["epochs"], r["max_steps"] // steps)
    params = list(body.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=epochs * steps)
    labels = torch.as_tensor(digits.train.labels)
    body.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, r["batch_size"]):
            idx = order[start:start + r["batch_size"]]
            x = augment(digits.to_float(digits.train.images[idx.numpy()]), gen, flip=False)
            loss = F.cross_entropy(head(body(x).mean((2, 3))), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    assert sched.last_epoch == epochs * steps == 40  # 150 images: 2 steps an epoch, all 20 epochs
    return body.eval(), head.eval()


def test_own_cnn_is_trained_by_its_recipe_on_the_train_split(digits, trained):
    body, head = replay(digits)
    got_body, got_head = load_declared(trained["state_dict"], digits.channels, digits.image_size, digits.num_classes)
    for ours, theirs in ((body, got_body), (head, got_head)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            np.testing.assert_allclose(b.numpy(), a.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    assert trained["epochs"] == 20 and trained["recipe"] == RECIPE
    # the reported val accuracy is the trained network's on the VAL split
    logits = head(features(body, digits.to_float(digits.val.images)))
    assert trained["val_acc"] == pytest.approx(float((logits.argmax(1).numpy() == digits.val.labels).mean()), abs=1e-9)
    assert 0.5 < trained["val_acc"] < 1.0


def test_val_and_test_never_reach_own_cnn_training(digits, trained):
    """Other val and test images leave the weights bit for bit (they are never trained on); other
    train labels change them."""
    other = replace(digits, val=replace(digits.val, images=digits.val.images[::-1].copy()),
                    test=replace(digits.test, images=255 - digits.test.images))
    again = encoders._train_own_cnn(other, torch.device("cpu"), progress=False)
    assert all(torch.equal(v, again["state_dict"][k]) for k, v in trained["state_dict"].items())
    relabelled = replace(digits, train=replace(digits.train, labels=np.roll(digits.train.labels, 1)))
    changed = encoders._train_own_cnn(relabelled, torch.device("cpu"), progress=False)["state_dict"]
    assert not torch.equal(changed["head.weight"], trained["state_dict"]["head.weight"])


def test_the_weights_key_is_what_own_cnn_is_trained_on(tmp_path, digits, monkeypatch):
    """The cached weights are found again for the same train split whatever val and test hold,
    and trained anew for other train images, labels, image shape (the same bytes as 16x4 images:
    another network pools them otherwise, with the same weight shapes), normalisation or recipe."""
    calls = []  # each "training" saves weights of its own, so a new training is a new identity
    monkeypatch.setattr(encoders, "_train_own_cnn", lambda ds, *a: calls.append(ds) or {"state_dict": {"n": torch.tensor(len(calls) * 1.0)}})

    def key(ds):
        return describe("own-cnn", ds, device="cpu", cache_dir=tmp_path, progress=False)[0]

    first = key(digits)
    same_train = replace(digits, val=replace(digits.val, images=digits.val.images[::-1].copy()),
                         test=digits.test.subset(np.arange(50)))
    assert key(same_train) == first and len(calls) == 1
    images = digits.train.images.copy()
    images[0, 0, 0] ^= 1
    for other in (replace(digits, train=replace(digits.train, images=images)),
                  replace(digits, train=replace(digits.train, labels=np.roll(digits.train.labels, 1))),
                  replace(digits, train=replace(digits.train, images=digits.train.images.reshape(len(digits.train), 16, 4, 1))),
                  replace(digits, mean=tuple(m + 0.01 for m in digits.mean))):
        assert key(other) != first
    assert len(calls) == 5
    monkeypatch.setitem(encoders.OWN_CNN_RECIPE, "lr", 1e-3)
    assert key(digits) != first and len(calls) == 6


def test_a_noisy_dataset_never_trains_own_cnn(tmp_path, digits):
    from trainables.common.data import with_label_noise

    noisy = with_label_noise(digits, 0.2, seed=0)
    with pytest.raises(EncoderUnavailable, match=r"^own-cnn is trained on clean labels: extract features from the dataset "
                       r"before with_label_noise \(features are per image; take the noisy labels from the noisy dataset\)$"):
        get_encoder("own-cnn", noisy, "cpu", tmp_path)
    assert not (tmp_path / "encoders").exists()


def test_the_loaded_encoder_is_the_cached_weights_frozen_in_eval_mode(tmp_path, digits):
    enc = get_encoder("own-cnn", digits, "cpu", tmp_path)
    (path,) = (tmp_path / "encoders").glob("own-cnn-*.pt")  # the given cache: the only weights trained
    assert enc.identity == f"own-cnn:{encoders.sha256_file(path)[:16]}"  # the identity of the weights it loaded
    state = torch.load(path, weights_only=True)["state_dict"]
    body, _ = load_declared(state, digits.channels, digits.image_size, digits.num_classes)
    x = digits.to_float(digits.test.images[:32])
    with torch.no_grad():
        np.testing.assert_allclose(enc.module(x), features(body, x), rtol=1e-5, atol=1e-6)
    assert not enc.module.training and not any(p.requires_grad for p in enc.module.parameters())
    assert enc.name == "own-cnn" and enc.dim == 256 and enc.encode_text is None


def test_damaged_own_cnn_weights_are_retrained_not_loaded(tmp_path, digits, monkeypatch):
    trainings = []
    monkeypatch.setattr(encoders, "_train_own_cnn", lambda ds, *a: trainings.append(ds) or {"state_dict": {"w": torch.ones(2)}})
    describe("own-cnn", digits, device="cpu", cache_dir=tmp_path, progress=False)
    path = next((tmp_path / "encoders").glob("own-cnn-*.pt"))
    for damage in (b"not a checkpoint", None):
        if damage is None:  # weights a diverged training left: loadable, not finite
            torch.save({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
        else:
            path.write_bytes(damage)
        identity, _ = describe("own-cnn", digits, device="cpu", cache_dir=tmp_path, progress=False)
        assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(2))  # retrained in place
        assert identity == f"own-cnn:{encoders.sha256_file(path)[:16]}"
    assert len(trainings) == 3


class LocalWeights:
    """ImageNet weights served from a file:// address (torch's own downloader, no network): the
    name carries the sha256 prefix torch's downloader checks, as torchvision's do."""

    def __init__(self, folder, state: dict):
        folder.mkdir(parents=True)
        raw = folder / "raw.pth"
        torch.save(state, raw)
        self.file = folder / f"resnet18-{encoders.sha256_file(raw)[:8]}.pth"
        raw.rename(self.file)
        self.url = self.file.as_uri()

    def serve(self, monkeypatch) -> None:
        """Stand in for torchvision's weights of resnet18 (only: another name is a wiring bug)."""
        def weights(name):
            assert name == "resnet18", name
            return self
        monkeypatch.setattr(encoders, "imagenet_weights", weights)


@pytest.mark.parametrize("hub_folder", ["absent", "present"])
def test_imagenet_weights_are_downloaded_hash_checked_unless_offline(tmp_path, monkeypatch, hub_folder):
    torch.manual_seed(0)
    state = {"w": torch.randn(3)}
    served = LocalWeights(tmp_path / "server", state)
    served.serve(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    target = tmp_path / "home" / "hub" / "checkpoints" / served.file.name
    if hub_folder == "present":  # other checkpoints there already
        target.parent.mkdir(parents=True)
        (target.parent / "other-0123abcd.pth").write_bytes(b"x")
    for offline in ("1", "yes"):
        monkeypatch.setenv("ORCHESTRATE_OFFLINE", offline)
        with pytest.raises(EncoderUnavailable, match=r"\(ORCHESTRATE_OFFLINE forbids downloads\);.*\(pretrained: none, or encoder own-cnn\)$"):
            encoders.imagenet_state_dict("resnet18")
        assert not target.exists()
    for allowed in ("0", ""):  # "0" and empty mean online, as does no variable at all
        monkeypatch.setenv("ORCHESTRATE_OFFLINE", allowed)
        assert encoders.imagenet_weights_problem("resnet18") is None
    monkeypatch.delenv("ORCHESTRATE_OFFLINE")
    assert encoders.imagenet_weights_file("resnet18") == target
    assert target.read_bytes() == served.file.read_bytes()
    assert torch.equal(encoders.imagenet_state_dict("resnet18")["w"], state["w"])
    monkeypatch.setenv("ORCHESTRATE_OFFLINE", "1")  # on disk now: offline is no obstacle
    assert encoders.imagenet_weights_problem("resnet18") is None and encoders.imagenet_weights_file("resnet18") == target

    target.write_bytes(target.read_bytes()[:20])  # truncated in the cache: an error naming it, never a random init
    with pytest.raises(EncoderUnavailable, match=rf"encoder resnet18: .*{target.name}.*the file does not load"):
        encoders.imagenet_state_dict("resnet18")


def test_a_download_that_fails_its_hash_check_leaves_nothing(tmp_path, monkeypatch):
    served = LocalWeights(tmp_path / "server", {"w": torch.zeros(3)})
    served.file.write_bytes(served.file.read_bytes() + b"tampered")
    served.serve(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ORCHESTRATE_OFFLINE", raising=False)
    with pytest.raises(EncoderUnavailable, match=r"encoder resnet18: .*the download failed: .*hash"):
        encoders.imagenet_weights_file("resnet18")
    assert not any((tmp_path / "home" / "hub" / "checkpoints").iterdir())


def test_unknown_imagenet_weights_name_the_known_ones():
    with pytest.raises(EncoderUnavailable, match=r"^no ImageNet weights for 'vgg16': use one of resnet18, resnet50$"):
        encoders.imagenet_weights("vgg16")


def test_resnet_weights_from_the_hub_cache_match_torchvision(tmp_path, monkeypatch, digits):
    """A (randomly initialised) resnet18 state dict placed where ImageNet weights belong is loaded
    as is; features equal torchvision's own forward pass on the same preprocessed images."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # a fresh BatchNorm is the identity in eval mode: one left out would not show
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    ckpt = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(net.state_dict(), ckpt)
    enc = get_encoder("resnet18", digits, "cpu", tmp_path / "cache")
    assert enc.dim == 512 and enc.identity.startswith("resnet18:")
    images = digits.test.images[:4]
    raw = torch.as_tensor(images).permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
    raw = torch.nn.functional.interpolate(raw, size=(224, 224), mode="bilinear", align_corners=False)
    normalised = torchvision.transforms.functional.normalize(raw, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        np.testing.assert_allclose(enc.module(digits.to_float(images)), net(normalised), rtol=1e-3, atol=1e-4)
        assert enc.module.feature_map(digits.to_float(images)).shape == (4, 512, 7, 7)


def test_unknown_encoders_name_the_known_ones():
    with pytest.raises(EncoderUnavailable, match=r"^unknown encoder 'vgg': use one of own-cnn, resnet18, resnet50, clip-vit-b32$"):
        encoders.check_name("vgg")


@pytest.mark.parametrize("max_steps,epochs", [(3, 1), (5, 2), (1, 1)])
def test_a_large_train_set_gets_the_epochs_its_step_budget_allows(digits, monkeypatch, max_steps, epochs):
    """epochs = max(1, min(recipe epochs, max_steps // steps per epoch)): CIFAR-10's 50,000 images
    (391 steps an epoch) get one epoch of the 600-step budget. Here 150 images make 2 steps an
    epoch, and the budget is shrunk to match."""
    monkeypatch.setitem(encoders.OWN_CNN_RECIPE, "max_steps", max_steps)
    assert encoders._train_own_cnn(digits, torch.device("cpu"), progress=False)["epochs"] == epochs


def test_training_own_cnn_shows_its_bar_unless_turned_off_and_says_its_val_accuracy(tmp_path, digits, capsys, monkeypatch):
    """The training bar is on by default (a user whose first sweep trains the encoder sees why
    it waits), counts every optimiser step, and is off when asked; the closing line gives the
    epochs and the val accuracy stored with the weights, either way."""
    monkeypatch.setitem(encoders.OWN_CNN_RECIPE, "max_steps", 4)  # 150 images: 2 epochs of 2 steps
    describe("own-cnn", digits, device="cpu", cache_dir=tmp_path / "quiet", progress=False)
    assert re.fullmatch(r"own-cnn on digits: 2 epochs, val acc \d\.\d{3}\n", capsys.readouterr().err)
    get_encoder("own-cnn", digits, "cpu", cache_dir=tmp_path / "quiet too", progress=False)
    assert "training own-cnn" not in capsys.readouterr().err
    get_encoder("own-cnn", digits, "cpu", cache_dir=tmp_path / "shown")
    err = capsys.readouterr().err
    assert re.search(r"training own-cnn on digits: 100%\|[^|]*\| 4/4 \[", err)
    (weights,) = (tmp_path / "shown" / "encoders").glob("own-cnn-*.pt")
    val_acc = torch.load(weights, weights_only=True)["val_acc"]
    assert err.endswith(f"own-cnn on digits: 2 epochs, val acc {val_acc:.3f}\n")


class LinearImageTower(nn.Module):
    """A stand-in for open_clip's model where only its image tower is needed: a linear map of
    the preprocessed 224x224 RGB image, so the preprocessing is checked without open_clip."""

    def __init__(self, dim: int = 5):
        super().__init__()
        self.visual = nn.Module()
        self.visual.output_dim = dim
        self.proj = nn.Linear(3 * 224 * 224, dim)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))


@pytest.mark.parametrize("channels", [1, 3])
def test_clip_image_preprocessing_is_clips(channels, digits):
    """CLIP's preprocessing in front of its image tower: the dataset normalisation undone, grey
    made RGB, a bicubic resize to 224 clamped to [0, 1], then OpenAI CLIP's mean and std."""
    torch.manual_seed(0)
    tower = LinearImageTower()
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, channels), dtype=np.uint8)
    ds = replace(digits, mean=(0.3,) * channels, std=(0.2,) * channels)
    module = encoders.ClipImage(tower, ds)
    raw = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    raw = F.interpolate(raw.repeat(1, 3 // channels, 1, 1), size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
    clip = torchvision.transforms.functional.normalize(raw, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        np.testing.assert_allclose(module(ds.to_float(images)), tower.encode_image(clip), rtol=1e-4, atol=1e-4)
    assert module.dim == 5
    with pytest.raises(EncoderUnavailable, match=r"^encoder clip-vit-b32 gives pooled features only, no spatial feature map$"):
        module.feature_map(ds.to_float(images))


def test_clip_without_open_clip_is_a_clear_error_and_offline_keeps_the_hub_offline(tmp_path, digits, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip raises ImportError
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("ORCHESTRATE_OFFLINE", "1")
    message = r"^encoder clip-vit-b32 needs the open_clip package \(pip install open_clip_torch\) and its ViT-B-32 'openai' weights"
    with pytest.raises(EncoderUnavailable, match=message):
        get_encoder("clip-vit-b32", digits, "cpu", tmp_path)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_clip_encoder_is_open_clips_vit_b32_with_its_cached_weights(clip_hub, offline_hub, digits):
    """clip-vit-b32 end to end through open_clip: its identity hashes the cached weights file,
    its transform names CLIP's preprocessing, the image tower is the model those weights make
    (frozen, eval mode), and text embeddings are open_clip's own, L2-normalised per prompt."""
    import hashlib

    import open_clip

    root, reference = clip_hub
    offline_hub(root)
    weights = next((root / CLIP_HUB_REPO / "snapshots").glob("*/open_clip_pytorch_model.bin"))
    identity, transform = describe("clip-vit-b32", digits, device="cpu")
    assert identity == "clip-vit-b32:" + hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert transform == f"to_float(mean={tuple(digits.mean)},std={tuple(digits.std)})|rgb|resize224-bicubic|clip-norm"

    encoder = get_encoder("clip-vit-b32", digits, "cpu")
    assert (encoder.name, encoder.identity, encoder.dim) == ("clip-vit-b32", identity, 512)
    assert isinstance(encoder.module, encoders.ClipImage) and not encoder.module.training
    assert not any(p.requires_grad for p in encoder.module.parameters())
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(encoder.module.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    prompts = ["a photo of the digit 0.", "a photo of the digit 7.", "a blurry photo of a number."]
    with torch.no_grad():
        expected = F.normalize(reference.encode_text(open_clip.get_tokenizer("ViT-B-32")(prompts)), dim=-1).numpy()
    texts = encoder.encode_text(prompts)
    assert texts.shape == (3, 512)
    np.testing.assert_allclose(texts, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    images = digits.to_float(digits.test.images[:3])
    with torch.no_grad():
        np.testing.assert_allclose(encoder.module(images), encoders.ClipImage(reference, digits)(images), rtol=1e-5, atol=1e-5)


def test_clip_weights_missing_offline_is_a_clear_error(tmp_path, offline_hub, digits):
    pytest.importorskip("open_clip")
    offline_hub(tmp_path)  # an empty cache
    message = r"^encoder clip-vit-b32: open_clip ViT-B-32/openai weights are not cached and could not be downloaded \(.+\); fetch them once"
    with pytest.raises(EncoderUnavailable, match=message):
        get_encoder("clip-vit-b32", digits, "cpu")
    with pytest.raises(EncoderUnavailable, match=message):
        describe("clip-vit-b32", digits)
