"""Frozen image encoders for the feature cache: a name maps to a module that turns normalised
float images (``Dataset.to_float`` output, (N, C, H, W)) into (N, D) features.

* ``own-cnn``: the offline default. A small CNN trained ONCE on the dataset's own training split
  (clean labels, fixed seed), cached on disk keyed by the training data. It is *not*
  ImageNet-pretrained, and its train-split features come from images it was trained on.
* ``resnet18`` / ``resnet50``: torchvision ImageNet V1 weights from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``), downloaded when possible. Missing weights are an error,
  never a random init. :func:`imagenet_state_dict` is the one resolver of these weights for
  every family (attn_knn's and wm_attention's backbones too).
* ``clip-vit-b32``: open_clip ViT-B/32 (OpenAI weights) when open_clip is installed (the
  ``clip`` extra) and its weights are in the Hugging Face cache or can be fetched.

Every encoder also gives a spatial map (``module.feature_map(x)`` -> (N, C, h, w)) except CLIP.
``ORCHESTRATE_OFFLINE=1`` forbids weight downloads.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.common.cache import atomic_write, build_lock, default_cache_dir
from trainables.common.data import DataError, Dataset, augment
from trainables.common.training import minibatches, resolve_device

ENCODERS = ("own-cnn", "resnet18", "resnet50", "clip-vit-b32")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class EncoderUnavailable(DataError):
    """An encoder that cannot be built here (unknown name, weights missing, package missing)."""


@dataclass
class Encoder:
    name: str
    identity: str  # name + hash of the weights: changes whenever the weights do
    dim: int
    module: nn.Module  # normalised float images (N, C, H, W) -> (N, dim); eval mode, frozen
    encode_text: Callable[[list[str]], np.ndarray] | None = None  # CLIP only: L2-normalised




def describe(name: str, dataset: Dataset, *, device: str = "auto", cache_dir=None, progress: bool = True) -> tuple[str, str]:
    """``(identity, transform)`` of an encoder without building its module: cheap once the
    weights exist (own-cnn is trained here if it is not cached yet)."""
    check_name(name)
    if name == "own-cnn":
        path = _own_cnn_weights(dataset, device, cache_dir, progress)
        return f"own-cnn:{sha256_file(path)[:16]}", _dataset_transform(dataset, "")
    if name in _TORCHVISION:
        path = imagenet_weights_file(name)
        return f"{name}:{sha256_file(path)[:16]}", _dataset_transform(dataset, f"|rgb|resize{_RESNET_SIZE}|imagenet-norm")
    path = _clip_weights()
    return f"{name}:{sha256_file(path)[:16]}", _dataset_transform(dataset, "|rgb|resize224-bicubic|clip-norm")


def get_encoder(name: str, dataset: Dataset, device: str | torch.device = "auto", cache_dir=None, progress: bool = True) -> Encoder:
    """The frozen encoder ``name`` for ``dataset`` on ``device`` (weights loaded or trained)."""
    device = resolve_device(str(device))
    identity, _ = describe(name, dataset, device=str(device), cache_dir=cache_dir, progress=progress)
    encode_text = None
    if name == "own-cnn":
        state = torch.load(_own_cnn_weights(dataset, device, cache_dir, progress), map_location="cpu", weights_only=True)
        module = OwnCNN(dataset.channels, dataset.image_size, dataset.num_classes)
        module.load_state_dict(state["state_dict"])
    elif name in _TORCHVISION:
        module = TorchvisionResNet(name, imagenet_state_dict(name), dataset)
    else:
        module, encode_text = _build_clip(dataset, device)
    module = module.to(device).eval().requires_grad_(False)
    return Encoder(name, identity, module.dim, module, encode_text)


def check_name(name: str) -> None:
    if name not in ENCODERS:
        raise EncoderUnavailable(f"unknown encoder {name!r}: use one of {', '.join(ENCODERS)}")


def _dataset_transform(dataset: Dataset, rest: str) -> str:
    return f"to_float(mean={tuple(dataset.mean)},std={tuple(dataset.std)}){rest}"


_HASHES: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, memoised per (path, inode, size, mtime) so warm trials skip
    re-reading; a replaced or rewritten file is hashed again."""
    st = Path(path).stat()
    memo = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _HASHES[memo] = digest.hexdigest()
    return _HASHES[memo]


def _offline() -> bool:
    return os.environ.get("ORCHESTRATE_OFFLINE", "") not in ("", "0")


# ---------------------------------------------------------------- own-cnn


class OwnCNN(nn.Module):
    """Four 3x3 conv blocks (32-64-128-256, BN, ReLU); max-pool after each of the first three
    while the map is larger than 2x2 (32x32 -> 4x4, 8x8 -> 2x2); features = global average of
    the last map (256-d)."""

    WIDTHS = (32, 64, 128, 256)

    def __init__(self, channels: int, image_size: int, num_classes: int):
        super().__init__()
        layers, size, c_in = [], image_size, channels
        for i, c_out in enumerate(self.WIDTHS):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if i < len(self.WIDTHS) - 1 and size > 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        self.dim = c_in

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


# The recipe is part of the weights' cache key: change it and own-cnn retrains.
OWN_CNN_RECIPE = {"version": 1, "seed": 0, "epochs": 20, "max_steps": 600, "batch_size": 128, "lr": 2e-3, "weight_decay": 5e-4}


def _own_cnn_weights(dataset: Dataset, device, cache_dir, progress: bool) -> Path:
    """Path of own-cnn's weights for ``dataset``, training them (once, under a lock) if needed."""
    if dataset.meta.get("noise_rate"):
        raise EncoderUnavailable(
            "own-cnn is trained on clean labels: extract features from the dataset before with_label_noise "
            "(features are per image; take the noisy labels from the noisy dataset)"
        )
    digest = hashlib.sha256(repr((OWN_CNN_RECIPE, dataset.num_classes, tuple(dataset.mean), tuple(dataset.std))).encode())
    for arr in (dataset.train.images, dataset.train.labels):
        digest.update(repr((arr.dtype.str, arr.shape)).encode())
        digest.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    path = Path(cache_dir or default_cache_dir()) / "encoders" / f"own-cnn-{digest.hexdigest()[:24]}.pt"
    if _loadable(path):
        return path
    with build_lock(path, f"own-cnn for {dataset.name}"):
        if not _loadable(path):
            state = _train_own_cnn(dataset, resolve_device(str(device)), progress)
            atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def _loadable(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception:  # truncated or corrupted: the caller retrains and replaces it
        return False
    # weights a diverged training left behind count as corrupted too: they give NaN features
    return _finite(state)


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def _train_own_cnn(dataset: Dataset, device: torch.device, progress: bool) -> dict:
    from tqdm import tqdm

    r = OWN_CNN_RECIPE
    gen = torch.Generator().manual_seed(r["seed"])
    torch.manual_seed(r["seed"])
    model = OwnCNN(dataset.channels, dataset.image_size, dataset.num_classes).to(device)
    n = len(dataset.train)
    steps_per_epoch = -(-n // r["batch_size"])
    epochs = max(1, min(r["epochs"], r["max_steps"] // steps_per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=epochs * steps_per_epoch)
    labels = torch.as_tensor(dataset.train.labels)
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"training own-cnn on {dataset.name}", file=sys.stderr, disable=not progress)
    model.train()
    for _ in range(epochs):
        for idx in minibatches(n, r["batch_size"], gen):
            x = augment(dataset.to_float(dataset.train.images[idx.numpy()], device), gen, flip=False)
            loss = F.cross_entropy(model.head(model(x)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    model.eval()
    with torch.no_grad():
        preds = [model.head(model(dataset.to_float(dataset.val.images[i.numpy()], device))).argmax(1).cpu()
                 for i in minibatches(len(dataset.val), 512, shuffle=False)]
    val_acc = float((torch.cat(preds).numpy() == dataset.val.labels).mean())
    print(f"own-cnn on {dataset.name}: {epochs} epochs, val acc {val_acc:.3f}", file=sys.stderr)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not _finite(state_dict):
        raise EncoderUnavailable(f"own-cnn training on {dataset.name} diverged (non-finite weights); nothing was cached")
    return {"state_dict": state_dict, "recipe": dict(r), "epochs": epochs, "val_acc": val_acc}


# ---------------------------------------------------------------- torchvision ResNets: the one weights resolver

# One ImageNet checkpoint per name, for every family (frozen features, fine-tuned backbones,
# wm_attention's front end). ResNet-50 uses V1 (76.1 % top-1), not V2 (80.9 %): V2's recipe
# (label smoothing, mixup, cutmix, long training) buys ImageNet accuracy with penultimate
# features that transfer worse as fixed features (Kornblith et al., "Do Better ImageNet Models
# Transfer Better?", 2019), V1 is the checkpoint the prior work compared with means, and the
# feature cache is keyed on it already.
IMAGENET_WEIGHTS = {"resnet18": ("ResNet18_Weights", "IMAGENET1K_V1"), "resnet50": ("ResNet50_Weights", "IMAGENET1K_V1")}
_TORCHVISION = tuple(IMAGENET_WEIGHTS)
_RESNET_SIZE = 224


def imagenet_weights(name: str):
    """The torchvision weights enum ``name`` resolves to (``resnet18`` or ``resnet50``)."""
    import torchvision

    if name not in IMAGENET_WEIGHTS:
        raise EncoderUnavailable(f"no ImageNet weights for {name!r}: use one of {', '.join(IMAGENET_WEIGHTS)}")
    enum, member = IMAGENET_WEIGHTS[name]
    return getattr(getattr(torchvision.models, enum), member)


def imagenet_weights_path(name: str) -> Path:
    """Where the checkpoint of ``name`` is looked for: the torch hub cache (``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(imagenet_weights(name).url)


def imagenet_weights_file(name: str) -> Path:
    """The ImageNet checkpoint of ``name`` on disk, downloaded (hash-checked) when it is absent,
    unless ``ORCHESTRATE_OFFLINE`` is set. Missing weights are an error naming the encoder, never
    a random init."""
    path = imagenet_weights_path(name)
    if path.exists():
        return path
    problem = imagenet_weights_problem(name)
    if problem is not None:
        raise problem
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = torch.hub.HASH_REGEX.search(path.name)
        torch.hub.download_url_to_file(imagenet_weights(name).url, str(path), hash_prefix=prefix and prefix.group(1), progress=False)
    except Exception as exc:  # URLError, HTTPError, OSError, hash mismatch
        raise _weights_missing(name, f"the download failed: {exc}") from None
    return path


def imagenet_weights_problem(name: str) -> EncoderUnavailable | None:
    """The error loading ``name``'s weights is sure to raise, without downloading or loading
    anything (for config checks before anything starts): the file is absent and downloads are
    forbidden. None when the file is there or a download may still fetch it."""
    if imagenet_weights_path(name).exists() or not _offline():
        return None
    return _weights_missing(name, "ORCHESTRATE_OFFLINE forbids downloads")


def imagenet_state_dict(name: str) -> dict:
    """The ImageNet state dict of ``name`` (see :func:`imagenet_weights_file`); an unreadable
    (truncated, corrupted) checkpoint is the same error as a missing one."""
    path = imagenet_weights_file(name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _weights_missing(name, f"the file does not load: {exc}") from None


def _weights_missing(name: str, why: str) -> EncoderUnavailable:
    weights, path = imagenet_weights(name), imagenet_weights_path(name)
    return EncoderUnavailable(
        f"encoder {name}: ImageNet weights {weights} not usable at {path} ({why}); download {weights.url} on a "
        f"machine with network access into {path.parent} (TORCH_HOME moves it), or run without them "
        "(pretrained: none, or encoder own-cnn)")


def _unnormalise_rgb(x: torch.Tensor, dataset_mean: torch.Tensor, dataset_std: torch.Tensor) -> torch.Tensor:
    """Dataset-normalised (N, C, H, W) -> [0, 1] RGB (grey images repeated to 3 channels)."""
    x = x * dataset_std + dataset_mean
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet with its ImageNet preprocessing in front: dataset images are
    un-normalised, made RGB, resized to 224 (bilinear) and ImageNet-normalised."""

    def __init__(self, name: str, state_dict: dict, dataset: Dataset):
        import torchvision

        super().__init__()
        net = getattr(torchvision.models, name)(weights=None)
        net.load_state_dict(state_dict)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        self.dim = net.fc.in_features
        for key, values in (("in_mean", dataset.mean), ("in_std", dataset.std), ("out_mean", IMAGENET_MEAN), ("out_std", IMAGENET_STD)):
            self.register_buffer(key, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = _unnormalise_rgb(x, self.in_mean, self.in_std)
        x = F.interpolate(x, size=(_RESNET_SIZE, _RESNET_SIZE), mode="bilinear", align_corners=False)
        return self.stem((x - self.out_mean) / self.out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean((2, 3))


# ---------------------------------------------------------------- CLIP (open_clip)

_CLIP_ARCH, _CLIP_TAG = "ViT-B-32", "openai"


def _open_clip():
    if _offline():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import open_clip
    except ImportError:
        raise EncoderUnavailable(
            "encoder clip-vit-b32 needs the open_clip package (pip install open_clip_torch) "
            "and its ViT-B-32 'openai' weights in the local cache"
        ) from None
    return open_clip


def _clip_weights() -> Path:
    open_clip = _open_clip()
    cfg = open_clip.pretrained.get_pretrained_cfg(_CLIP_ARCH, _CLIP_TAG)
    try:
        return Path(open_clip.pretrained.download_pretrained(cfg))
    except Exception as exc:
        raise EncoderUnavailable(
            f"encoder clip-vit-b32: open_clip {_CLIP_ARCH}/{_CLIP_TAG} weights are not cached and could not be "
            f"downloaded ({exc}); fetch them once on a machine with network access into the same cache"
        ) from None


class ClipImage(nn.Module):
    """open_clip's image tower with CLIP preprocessing in front (RGB, 224 bicubic, CLIP norm)."""

    def __init__(self, model: nn.Module, dataset: Dataset):
        super().__init__()
        self.model = model
        self.dim = int(model.visual.output_dim)
        for key, values in (("in_mean", dataset.mean), ("in_std", dataset.std), ("out_mean", CLIP_MEAN), ("out_std", CLIP_STD)):
            self.register_buffer(key, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _unnormalise_rgb(x, self.in_mean, self.in_std)
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False).clamp_(0, 1)
        return self.model.encode_image((x - self.out_mean) / self.out_std)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        raise EncoderUnavailable("encoder clip-vit-b32 gives pooled features only, no spatial feature map")


def _build_clip(dataset: Dataset, device: torch.device):
    open_clip = _open_clip()
    model = open_clip.create_model(_CLIP_ARCH, pretrained=str(_clip_weights()))
    model = model.to(device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(_CLIP_ARCH)

    def encode_text(prompts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            z = model.encode_text(tokenizer(prompts).to(device)).float()
        return F.normalize(z, dim=-1).cpu().numpy()

    return ClipImage(model, dataset), encode_text
