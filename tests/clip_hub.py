"""A Hugging Face hub cache holding ViT-B-32 weights where open_clip looks for the OpenAI ones,
for tests of the clip-vit-b32 path: ``from clip_hub import clip_hub, offline_hub``.

The weights are randomly initialised (this machine has no network): the whole path runs for
real, through open_clip's own loading, with weights whose values no test depends on. Tests that
use them skip where open_clip is not installed (``pip install -e '.[clip]'``)."""

import pytest
import torch

CLIP_HUB_REPO = "models--timm--vit_base_patch32_clip_224.openai"  # where open_clip looks for ViT-B-32 'openai'


@pytest.fixture(scope="session")
def clip_hub(tmp_path_factory):
    """(the cache's root, the model its weights came from), once per session (the file is 600 MB)."""
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("hub")
    snapshot = root / CLIP_HUB_REPO / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (root / CLIP_HUB_REPO / "refs").mkdir()
    (root / CLIP_HUB_REPO / "refs" / "main").write_text("0" * 40)
    with torch.random.fork_rng():  # the session's RNG is not this fixture's to reseed
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32").eval()
    torch.save(model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    return root, model


@pytest.fixture
def offline_hub(monkeypatch):
    """Points huggingface_hub at a cache folder, offline (its settings are read at import)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def use(root):
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return use
