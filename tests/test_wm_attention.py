"""wm_attention: the N-back generator, the attention module, the analyses and the family contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.spatial import procrustes
from scipy.special import log_softmax

from one_thread import one_thread  # noqa: F401
from orchestrator.spaces import load_study
from trainables import wm_attention as wm
from trainables.common.checks import ConfigError
from trainables.common.data import train_class_counts
from trainables.common.encoders import EncoderUnavailable
from trainables.common.lifecycle import RELIABILITY_FILE
from trainables.common.metrics import ece_from_bins
from trainables.wm_tasks import (
    MATCH,
    N_LOCATIONS,
    N_VIEWS,
    NO_ACTION,
    NON_MATCH,
    Sequences,
    Task,
    generate,
    nback_targets,
    pick_identities,
    render_stimuli,
    scenario_tasks,
    split_pools,
    task_targets,
    view_of,
)

SPACE = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / "wm_attention.yaml").read_text())
A, M, N = NO_ACTION, MATCH, NON_MATCH


def study_config(study: str = "smoke", **overrides) -> dict:
    config = {**SPACE["defaults"], **SPACE["studies"][study].get("set", {}), "seed": 0, "eval": {}, "device": "cpu"}
    return {**config, **overrides}


# ---------------------------------------------------------------- targets on hand-built sequences

# step:      0  1  2  3  4  5
# category:  0  1  0  0  1  1
# identity:  2  3  2  3  3  3     objects (category * 5 + identity): 2 8 2 3 8 8
# location:  0  1  0  2  2  1
# Step 3 vs step 1 share identity index 3 but not the class (an identity NON-match); step 3 vs
# step 0 share the class but not the image (a category match, an identity non-match).
HAND = Sequences(
    category=np.array([[0, 1, 0, 0, 1, 1]]),
    identity=np.array([[2, 3, 2, 3, 3, 3]]),
    location=np.array([[0, 1, 0, 2, 2, 1]]),
    view=np.array([[0, 1, 2, 3, 0, 1]]),  # views never matter
    task=np.array([0]),
    target=np.zeros((1, 6), dtype=np.int64),
)
EXPECTED = {
    (1, "location"): [A, N, N, N, M, N],
    (1, "identity"): [A, N, N, N, N, M],
    (1, "category"): [A, N, N, M, N, M],
    (2, "location"): [A, A, M, N, N, N],
    (2, "identity"): [A, A, M, N, N, N],
    (2, "category"): [A, A, M, N, N, N],
    (3, "location"): [A, A, A, N, N, N],
    (3, "identity"): [A, A, A, N, M, N],
    (3, "category"): [A, A, A, M, M, N],
}


@pytest.mark.parametrize("n,feature", sorted(EXPECTED))
def test_targets_on_hand_built_sequences(n, feature):
    assert task_targets(HAND, [Task(n, feature)], n_identities=5)[0].tolist() == EXPECTED[(n, feature)]
    assert nback_targets(HAND.feature(feature, 5), n)[0].tolist() == EXPECTED[(n, feature)]


def test_scenarios_list_their_tasks():
    assert [t.name for t in scenario_tasks("stsf", 3, "location")] == ["3back_location"]
    assert [t.name for t in scenario_tasks("stmf", 2, "identity")] == ["2back_location", "2back_identity", "2back_category"]
    assert len({t.name for t in scenario_tasks("mtmf", 1, "category")}) == 9


# ---------------------------------------------------------------- the generator


def test_generator_targets_agree_with_the_stimuli_and_match_half_the_time():
    tasks = scenario_tasks("mtmf", 2, "identity")
    pool, _ = split_pools("random", 5, 2)
    seqs = generate(np.random.default_rng(0), 6000, tasks, pool, n_categories=4)
    # the drawn decisions are what the stimuli say: matches equal, non-matches differ on the task feature
    np.testing.assert_array_equal(seqs.target, task_targets(seqs, tasks, 5))
    for k, task in enumerate(tasks):
        rows = seqs.task == k
        values = seqs.feature(task.feature, 5)[rows]
        target = seqs.target[rows]
        assert (target[:, : task.n] == NO_ACTION).all()
        decision = target[:, task.n :]
        assert (values[:, task.n :][decision == NON_MATCH] != values[:, : -task.n][decision == NON_MATCH]).all()
        assert abs(np.mean(decision == MATCH) - 0.5) < 0.03, task.name
    assert abs(np.bincount(seqs.task, minlength=9) / len(seqs) - 1 / 9).max() < 0.02


@pytest.mark.parametrize("split", ["novel_view", "novel_identity"])
def test_splits_keep_held_out_views_and_identities_out_of_training(split):
    tasks = scenario_tasks("stmf", 2, "identity")
    train_pool, gen_pool = split_pools(split, 5, 2)
    train = generate(np.random.default_rng(1), 500, tasks, train_pool, n_categories=4)
    gen = generate(np.random.default_rng(2), 500, tasks, gen_pool, n_categories=4)
    if split == "novel_view":
        assert set(np.unique(train.view)) == {0, 1, 2} and set(np.unique(gen.view)) == {3}
    else:
        assert set(np.unique(train.identity)) == {0, 1, 2} and set(np.unique(gen.identity)) == {3, 4}
    np.testing.assert_array_equal(gen.target, task_targets(gen, tasks, 5))


def test_rendered_stimulus_holds_the_view_in_its_quadrant_only():
    rng = np.random.default_rng(0)
    objects = rng.integers(1, 256, size=(2, 3, 4, 4, 1), dtype=np.uint8)
    canvases = render_stimuli(objects)
    assert canvases.shape == (2 * 3 * N_VIEWS * N_LOCATIONS, 8, 8, 1)
    seqs = generate(rng, 20, [Task(1, "location")], split_pools("random", 3, 1)[0], n_categories=2)
    for cat, ident, view, loc, idx in zip(*(a.ravel() for a in (seqs.category, seqs.identity, seqs.view, seqs.location,
                                                                  seqs.stimulus_index(3)))):
        canvas = canvases[idx].copy()
        r0, c0 = (loc // 2) * 4, (loc % 2) * 4
        np.testing.assert_array_equal(canvas[r0 : r0 + 4, c0 : c0 + 4], view_of(objects[cat, ident], view))
        canvas[r0 : r0 + 4, c0 : c0 + 4] = 0
        assert not canvas.any()
    np.testing.assert_array_equal(view_of(objects[0, 0], 3), np.rot90(objects[0, 0], 2))


def test_rendered_stimuli_stay_uint8_so_the_attention_plot_shows_colour_images_as_they_are():
    """The attention plot draws ``Stimuli.canvas`` with imshow, which clips a float RGB image to
    [0, 1]: a float64 canvas of 0-255 values (``dtype=np.uint8`` dropped) plots CIFAR stimuli white."""
    objects = np.random.default_rng(1).integers(1, 200, size=(1, 1, 4, 4, 3), dtype=np.uint8)
    assert render_stimuli(objects).dtype == np.uint8


def test_views_are_the_documented_flips():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)  # no symmetry: every flip shows
    for view, expected in enumerate((image, np.fliplr(image), np.flipud(image), np.rot90(image, 2))):
        np.testing.assert_array_equal(view_of(image, view), expected)


def test_identities_are_distinct_images_of_their_own_class_fixed_by_their_seed():
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 1])
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)  # image i is i
    picked = pick_identities(images, labels, n_categories=3, n_identities=3)
    assert picked.shape == (3, 3, 2, 2, 1)
    for c in range(3):
        ids = picked[c, :, 0, 0, 0]
        assert (labels[ids] == c).all() and len(set(ids.tolist())) == 3  # its class's images, none twice
    np.testing.assert_array_equal(pick_identities(images, labels, 3, 3, seed=0), picked)  # fixed, not the trial's
    assert any(not np.array_equal(pick_identities(images, labels, 3, 3, seed=s), picked) for s in range(1, 6))
    assert sorted(pick_identities(images, labels, 3, 3)[2, :, 0, 0, 0].tolist()) == [0, 4, 8]  # exactly enough: all
    with pytest.raises(ValueError, match="class 0 has 4 training images, fewer than n_identities=5"):
        pick_identities(images, labels, 3, 5)


@pytest.mark.parametrize("feature", ["location", "category", "identity"])
def test_a_non_match_shifts_the_feature_by_every_non_zero_offset_drawn_per_sequence(feature):
    """A non-match is the feature at t - N moved by an offset drawn uniformly from 1..K-1 (K its
    values: 4 locations, 4 categories, 4 x 5 objects), independently for each sequence."""
    n_back, n_identities, n_categories = 2, 5, 4
    seqs = generate(np.random.default_rng(3), 4000, [Task(n_back, feature)], split_pools("random", n_identities, 1)[0],
                    n_categories=n_categories)
    values = seqs.feature(feature, n_identities)
    k = {"location": N_LOCATIONS, "category": n_categories, "identity": n_categories * n_identities}[feature]
    offsets = (values[:, n_back:] - values[:, :-n_back]) % k
    non_match = seqs.target[:, n_back:] == NON_MATCH
    counts = np.bincount(offsets[non_match], minlength=k)
    assert counts[0] == 0 and (counts[1:] > 0).all()
    assert np.abs(counts[1:] / counts[1:].sum() - 1 / (k - 1)).max() < 0.3 / (k - 1)
    for step in range(offsets.shape[1]):  # one step's sequences do not share one offset
        assert len(np.unique(offsets[:, step][non_match[:, step]])) == k - 1


def test_novel_identity_holds_out_between_one_and_all_but_one_identity():
    train, held = split_pools("novel_identity", 5, 1)
    assert train.identities == (0, 1, 2, 3) and held.identities == (4,)
    assert split_pools("novel_identity", 5, 4)[0].identities == (0,)
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"heldout_identities must be in \[1, n_identities\)"):
            split_pools("novel_identity", 5, bad)


# ---------------------------------------------------------------- attention


def test_attention_matches_torch_sdpa_sums_to_one_and_follows_the_task():
    torch.manual_seed(0)
    att = wm.TaskGuidedAttention(task_dim=3, feature_dim=8, hidden=16, dropout=0.0).eval()
    maps = torch.randn(5, 8, 4, 4)
    task = torch.eye(3)[[0, 1, 2, 0, 1]]
    context, weights = att(maps, task)
    assert weights.shape == (5, 16)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    feats = maps.flatten(2).transpose(1, 2)
    expected = torch.nn.functional.scaled_dot_product_attention(att.query(task)[:, None], att.key(feats), feats)[:, 0]
    torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-5)
    same_maps = maps[:1].expand(3, -1, -1, -1)
    _, per_task = att(same_maps, torch.eye(3))
    assert not torch.allclose(per_task[0], per_task[1]) and not torch.allclose(per_task[1], per_task[2])


def test_model_outputs_attention_over_the_map_and_a_baseline_without_it():
    stimuli = torch.randn(10, 1, 16, 16)
    index = torch.randint(0, 10, (3, 6))
    task = torch.eye(3)
    kwargs = dict(attention_hidden=8, attention_dropout=0.0, rnn="lstm", hidden_size=12, freeze_frontend=False, input_size=0)
    with_att = wm.WorkingMemoryNet(wm.SmallCNN(1, 8), 3, attention=True, **kwargs).eval()
    out = with_att(stimuli, index, task)
    assert out["logits"].shape == (3, 6, 3) and out["hidden"].shape == (3, 6, 12)
    assert out["attention"].shape == (3, 6, 4, 4)
    torch.testing.assert_close(out["attention"].sum((-2, -1)), torch.ones(3, 6))
    baseline = wm.WorkingMemoryNet(wm.SmallCNN(1, 8), 3, attention=False, **kwargs).eval()
    assert "attention" not in baseline(stimuli, index, task)


def test_imagenet_weights_missing_is_a_clear_error_before_and_in_the_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ORCHESTRATE_OFFLINE", "1")
    with pytest.raises(EncoderUnavailable, match="encoder resnet18: ImageNet weights"):
        wm.build_frontend("resnet18", 1, "imagenet", 32)  # the one resolver's error, never a random init
    with pytest.raises(ConfigError, match="encoder resnet18: ImageNet weights"):
        wm.check(study_config(frontend="resnet18", pretrained="imagenet"))
    wm.check(study_config(frontend="resnet18", pretrained="none"))
    trunk = wm.build_frontend("resnet18", 1, "none", 32)
    assert trunk(torch.randn(2, 1, 64, 64)).shape == (2, 512, 2, 2)
    assert trunk.out_channels == 512  # the width the attention's keys and the RNN's input are built for


@pytest.mark.parametrize("overrides", wm.INVALID_CONFIGS)
def test_check_refuses_what_train_cannot_run(overrides):
    """Each refusal is one message naming every field of the bad combination."""
    wm.check(study_config())
    with pytest.raises(ConfigError) as refused:
        wm.check(study_config(**overrides))
    assert all(key in str(refused.value) for key in overrides), refused.value
    with pytest.raises(ConfigError):  # train refuses it first thing too
        wm.train(study_config(**overrides), lambda *a, **k: None)


def test_every_shipped_study_passes_check():
    for study in SPACE["studies"]:
        for cfg in load_study("wm_attention", study).trial_configs():
            wm.check(cfg)


def test_attention_statistics_on_known_weights():
    uniform = np.full((1, 4, 4), 1 / 16)
    onehot = np.zeros((1, 4, 4))
    onehot[0, 3, 0] = 1.0  # bottom-left quadrant (2)
    u = wm.attention_stats(uniform, np.array([0]))
    o = wm.attention_stats(onehot, np.array([2]))
    assert u["attn_entropy"] == pytest.approx(math.log(16)) and u["attn_sparsity"] == pytest.approx(0.0)
    assert u["attn_on_stimulus"] == pytest.approx(0.25)
    assert o["attn_entropy"] == pytest.approx(0.0, abs=1e-9) and o["attn_sparsity"] == pytest.approx(1.0)
    assert o["attn_on_stimulus"] == pytest.approx(1.0)


# ---------------------------------------------------------------- analyses


def test_decoder_is_at_chance_on_shuffled_labels_and_high_on_separable_data():
    rng = np.random.default_rng(0)
    y = rng.integers(4, size=400)
    x = rng.normal(size=(400, 20))
    x[:, :4] += 4.0 * np.eye(4)[y]
    acc, normals = wm.decode(x, y, folds=3, seed=0)
    assert acc > 0.95 and normals.shape == (4, 20)
    shuffled, _ = wm.decode(x, rng.permutation(y), folds=3, seed=0)
    assert abs(shuffled - 0.25) < 0.08


def test_orthogonality_of_decoders_along_separate_and_shared_axes():
    rng = np.random.default_rng(0)
    a, b = rng.integers(2, size=600), rng.integers(2, size=600)
    x = rng.normal(scale=0.3, size=(600, 10))
    x[:, 0] += 2 * a
    x[:, 1] += 2 * b
    separate = wm.orthogonality([wm.decode(x, a, 3, 0)[1], wm.decode(x, b, 3, 0)[1]])
    shared = wm.orthogonality([wm.decode(x, a, 3, 0)[1], wm.decode(x, a, 3, 1)[1]])  # one feature, twice
    assert separate > 0.8 and shared < 0.05


def test_procrustes_transfer_agrees_with_scipy_and_swaps_a_shared_rotation():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(10, 6))
    dst = rng.normal(size=(10, 6))
    transform = wm.fit_procrustes(src, dst)
    assert wm.transfer_disparity(src, dst, transform) == pytest.approx(procrustes(dst, src)[2])
    # one rotation moves every configuration: swapping transforms costs nothing
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    other = rng.normal(size=(10, 6))
    assert wm.transfer_disparity(other, other @ rotation, wm.fit_procrustes(src, src @ rotation)) < 1e-20


def _hidden_moved_by(transforms, values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """h_t = sum_{s <= t} codes[value at s] @ transforms(s, t)."""
    b, t_len = values.shape
    hidden = np.zeros((b, t_len, codes.shape[1]))
    for t in range(t_len):
        hidden[:, t] = sum(codes[values[:, s]] @ transforms(s, t) for s in range(t + 1))
    return hidden


def test_procrustes_analysis_tells_a_shared_transformation_from_step_specific_ones():
    rng = np.random.default_rng(0)
    values = rng.integers(4, size=(4000, 4))
    codes = rng.normal(size=(4, 3))  # 4 values span 3 dimensions once centred
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    random_rotations = {(s, t): np.linalg.qr(rng.normal(size=(3, 3)))[0] for s in range(4) for t in range(4)}
    own, swap = wm.procrustes_analysis(_hidden_moved_by(lambda s, t: np.linalg.matrix_power(rotation, t - s), values, codes), values)
    assert own < 0.01 and swap < 0.01
    own, swap = wm.procrustes_analysis(_hidden_moved_by(lambda s, t: random_rotations[s, t], values, codes), values)
    assert own < 0.01 and swap > 0.3


# ---------------------------------------------------------------- the family end to end


def run(config: dict, restore=None) -> tuple[list[dict], list[dict]]:
    reports, checkpoints = [], []

    def report(metrics, checkpoint=None):
        reports.append(metrics)
        checkpoints.append(checkpoint)

    wm.train(config, report, restore=restore)
    return reports, checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("attention", [True, False])
def test_family_runs_end_to_end_on_digits(attention, tmp_path):
    # attention: three tasks (per-task statistics); baseline: the smoke study's single task on
    # the novel-view split (generalisation accuracy)
    overrides = {"scenario": "stmf"} if attention else {"split": "novel_view"}
    reports, checkpoints = run(study_config(attention=attention, artifact_dir=str(tmp_path), **overrides))
    method = "attention" if attention else "baseline"
    assert [r["epoch"] for r in reports] == [1, 2] and all(c is not None for c in checkpoints)
    assert f"train/{method}/loss" in reports[0] and f"val/{method}/acc" in reports[0]
    final = reports[-1]
    names = ["acc", "ece", "nll", "brier", "balanced_acc", "macro_f1", "loss", "acc_all_steps", "acc_2back_location",
             "decode_relevant", "orthogonality_rnn", "orthogonality_cnn", "procrustes_disparity", "swap_disparity"]
    if attention:
        names += ["decode_irrelevant", "acc_2back_identity", "attn_entropy", "attn_sparsity", "attn_on_stimulus",
                  "attn_entropy_2back_location", "attn_sparsity_2back_category"]
    else:
        names += ["gen_acc", "gen_acc_2back_location"]
        assert not any("attn_" in key for key in final)
    for name in names:
        assert f"test/{method}/{name}" in final, name
    assert all(np.isfinite(v) for v in final.values())
    assert 0.0 <= final[f"test/{method}/acc"] <= 1.0 and "perf/train_ms" in final
    written = {p.name for p in tmp_path.iterdir()}
    assert {"analysis.json", "decoding.png", RELIABILITY_FILE} <= written
    bins = json.loads((tmp_path / RELIABILITY_FILE).read_text())["splits"]["test"]
    assert list(bins) == [method] and ece_from_bins(bins[method]) == pytest.approx(final[f"test/{method}/ece"], abs=1e-12)
    assert ("attention_heatmaps.png" in written) == attention


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch_and_matches_an_uninterrupted_run():
    config = study_config(epochs=3, patience=10, train_sequences=128)
    full, checkpoints = run(config)
    resumed, _ = run(config, restore=checkpoints[0])
    assert [r["epoch"] for r in resumed] == [2, 3]
    for key in ("train/attention/loss", "val/attention/acc", "test/attention/acc", "test/attention/decode_relevant"):
        assert resumed[-1][key] == pytest.approx(full[-1][key]), key
    assert run(config, restore=checkpoints[-1])[0] == []  # a finished trial reports nothing more


@pytest.mark.slow
def test_divergence_is_reported_and_stops_the_trial():
    reports, _ = run(study_config(lr=1e30))
    assert reports[-1]["diverged"] == 1.0 and len(reports) == 1
    assert reports[-1]["epoch"] == 1  # the report names the epoch it happened in


# ---------------------------------------------------------------- mutation-testing additions (bench/mutation.py)


def test_small_cnn_is_the_documented_stack():
    """Three 3x3 conv (padding 1, no bias: BatchNorm follows) - BatchNorm - ReLU blocks with a 2x2
    max-pool after the first two; channels c/2, c, c."""
    cnn = wm.SmallCNN(3, 8)
    layers = list(cnn.net)
    assert [type(m).__name__ for m in layers] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2 + ["Conv2d", "BatchNorm2d", "ReLU"]
    convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 4), (4, 8), (8, 8)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    assert all(m.kernel_size == 2 for m in layers if isinstance(m, torch.nn.MaxPool2d))
    assert cnn.out_channels == 8 and cnn(torch.randn(2, 3, 16, 12)).shape == (2, 8, 4, 3)


def _upsample2x(x: np.ndarray) -> np.ndarray:
    """Bilinear 2x upsampling with half-pixel centres (align_corners=False), by hand: each output
    pixel mixes its nearest input pixel (3/4) and the next one towards it (1/4), edges clamped."""
    def along(a: np.ndarray, axis: int) -> np.ndarray:
        a = np.moveaxis(a, axis, -1)
        prev = np.concatenate([a[..., :1], a[..., :-1]], -1)
        nxt = np.concatenate([a[..., 1:], a[..., -1:]], -1)
        out = np.empty(a.shape[:-1] + (2 * a.shape[-1],))
        out[..., 0::2], out[..., 1::2] = 0.75 * a + 0.25 * prev, 0.75 * a + 0.25 * nxt
        return np.moveaxis(out, -1, axis)

    return along(along(x, -1), -2)


def test_input_size_resizes_the_canvases_bilinearly_before_the_front_end():
    torch.manual_seed(0)
    stimuli = torch.rand(3, 1, 8, 8)
    kwargs = dict(attention=True, attention_hidden=4, attention_dropout=0.0, rnn="gru", hidden_size=4, freeze_frontend=False)
    resized = wm.WorkingMemoryNet(wm.SmallCNN(1, 4), 2, input_size=16, **kwargs).eval()
    expected = resized.frontend(torch.as_tensor(_upsample2x(stimuli.numpy()), dtype=torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(resized.encode(stimuli), expected, rtol=1e-5, atol=1e-5)
        for size in (0, 8):  # 0, or the canvas's own size: the canvases as they are
            native = wm.WorkingMemoryNet(resized.frontend, 2, input_size=size, **kwargs).eval()
            torch.testing.assert_close(native.encode(stimuli), resized.frontend(stimuli), rtol=0, atol=0)
        out = resized(stimuli, torch.tensor([[0, 1, 2, 0]]), torch.eye(2)[:1])
    assert out["attention"].shape == (1, 4, 4, 4)  # the map of a 16x16 input, not of the 8x8 canvas


def test_a_frozen_front_end_stays_in_eval_mode_and_takes_no_gradient():
    kwargs = dict(attention=False, attention_hidden=4, attention_dropout=0.0, rnn="rnn", hidden_size=4, input_size=0)
    frozen = wm.WorkingMemoryNet(wm.SmallCNN(1, 4), 2, freeze_frontend=True, **kwargs).train()
    assert not frozen.frontend.training and frozen.rnn.training
    assert not any(p.requires_grad for p in frozen.frontend.parameters())
    assert all(p.requires_grad for name, p in frozen.named_parameters() if not name.startswith("frontend."))
    free = wm.WorkingMemoryNet(wm.SmallCNN(1, 4), 2, freeze_frontend=False, **kwargs).train()
    assert free.frontend.training and all(p.requires_grad for p in free.parameters())
    stimuli = torch.rand(4, 1, 8, 8)
    for model, grad in ((frozen, False), (free, True)):
        out = model(stimuli, torch.tensor([[0, 1, 2], [3, 2, 1]]), torch.eye(2))
        out["logits"].sum().backward()
        assert out["pooled"].requires_grad == grad
        assert all((p.grad is not None) == grad for p in model.frontend.parameters())
        assert model.head.weight.grad is not None


def test_attention_dropout_drops_from_the_weighted_sum_only():
    torch.manual_seed(0)
    att = wm.TaskGuidedAttention(task_dim=2, feature_dim=6, hidden=8, dropout=0.5)
    maps, task = torch.randn(4, 6, 3, 3), torch.eye(2)[[0, 1, 1, 0]]
    with torch.no_grad():
        att.eval()
        _, clean = att(maps, task)
        att.train()
        torch.manual_seed(7)
        context, weights = att(maps, task)
        torch.manual_seed(7)
        dropped = torch.nn.functional.dropout(clean, 0.5, training=True)
    torch.testing.assert_close(weights, clean)  # the reported weights: the softmax, summing to 1
    feats = maps.flatten(2).transpose(1, 2)
    torch.testing.assert_close(context, (dropped[..., None] * feats).sum(1))
    assert not torch.allclose(context, (clean[..., None] * feats).sum(1))


def test_weighted_loss_against_scipy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 3)).astype(np.float32)
    target = rng.integers(3, size=(3, 5))
    target[:, 0] = NO_ACTION
    for w in (0.0, 0.3, 1.0, 2.0):
        nll = -np.take_along_axis(log_softmax(logits.astype(np.float64), -1), target[..., None], -1)[..., 0]
        weight = np.where(target == NO_ACTION, w, 1.0)
        got = wm._weighted_loss(torch.as_tensor(logits), torch.as_tensor(target), w)
        assert float(got) == pytest.approx((nll * weight).sum() / weight.sum(), rel=1e-5), w


def test_orthogonality_by_hand():
    x, y, xy = np.array([[2.0, 0.0]]), np.array([[0.0, 3.0]]), np.array([[1.0, 1.0]])
    assert wm.orthogonality([x, y]) == pytest.approx(1.0)
    assert wm.orthogonality([x, -x]) == pytest.approx(0.0)  # |cos|: a flipped normal is the same axis
    assert wm.orthogonality([x, xy]) == pytest.approx(1 - 1 / math.sqrt(2))
    # three features: mean over the three pairs; a two-row normal matrix: mean over its rows
    assert wm.orthogonality([x, y, xy]) == pytest.approx(1 - (0 + 2 / math.sqrt(2)) / 3)
    two_rows = np.array([[3.0, 4.0], [0.0, 2.0]])  # unit rows (0.6, 0.8) and (0, 1)
    assert wm.orthogonality([two_rows, xy]) == pytest.approx(1 - (1.4 + 1.0) / math.sqrt(2) / 2)
    assert wm.orthogonality([two_rows, x]) == pytest.approx(1 - 0.3)


def test_decoder_keeps_classes_with_at_least_folds_samples_and_needs_two():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(14, 3))
    y = np.array([0] * 6 + [1] * 5 + [2] * 3)  # class 2: exactly 3 samples, as many as the folds
    assert wm.decode(x, y, folds=3, seed=0)[1].shape == (3, 3)
    assert wm.decode(x, y, folds=4, seed=0)[1].shape == (1, 3)  # class 2 left out; two classes: one hyperplane
    assert wm.decode(x, y, folds=5, seed=0)[1].shape == (1, 3)  # class 1 has exactly 5: still two classes
    assert wm.decode(x, y, folds=6, seed=0) is None  # one class left
    # the folds are shuffled with the seed: the same seed gives the same accuracy
    noisy = rng.integers(2, size=90)
    xn = rng.normal(size=(90, 4)) + noisy[:, None] * 0.4
    accs = [wm.decode(xn, noisy, 3, seed)[0] for seed in (0, 0, 1, 2, 3)]
    assert accs[0] == accs[1] and len(set(accs)) > 1


def test_attention_statistics_by_hand_on_random_maps():
    rng = np.random.default_rng(0)
    for h, w in ((6, 6), (8, 4), (2, 2)):
        weights = rng.random((5, h, w))
        weights /= weights.sum((1, 2), keepdims=True)
        location = rng.integers(4, size=5)
        got = wm.attention_stats(weights, location)
        flat = weights.reshape(5, -1)
        p = h * w
        hoyer = (math.sqrt(p) - flat.sum(1) / np.sqrt((flat**2).sum(1))) / (math.sqrt(p) - 1)
        on = []
        for n, q in enumerate(location):
            top, left = q < 2, q % 2 == 0
            rows = slice(0, h // 2) if top else slice(h // 2, h)
            cols = slice(0, w // 2) if left else slice(w // 2, w)
            on.append(weights[n, rows, cols].sum())
        assert got["attn_entropy"] == pytest.approx(np.mean([-(r * np.log(r)).sum() for r in flat]))
        assert got["attn_sparsity"] == pytest.approx(hoyer.mean())
        assert got["attn_on_stimulus"] == pytest.approx(np.mean(on)), (h, w)
    pair = wm.attention_stats(np.array([[[0.8, 0.2]]]), np.zeros(1, dtype=int))  # two positions: Hoyer is defined
    assert pair["attn_sparsity"] == pytest.approx((math.sqrt(2) - 1 / math.sqrt(0.68)) / (math.sqrt(2) - 1))
    single = wm.attention_stats(np.ones((3, 1, 1)), np.zeros(3, dtype=int))  # one position: no quadrants
    assert single == {"attn_entropy": 0.0, "attn_sparsity": 0.0}
    assert set(wm.attention_stats(np.full((2, 1, 4), 0.25), np.zeros(2, dtype=int))) == {"attn_entropy", "attn_sparsity"}


def _reference_procrustes(hidden: np.ndarray, values: np.ndarray) -> tuple[float, float] | None:
    """The module doc's definition with scikit-learn's PCA, scipy's procrustes and the SVD
    solution of the orthogonal Procrustes problem written out."""
    from sklearn.decomposition import PCA

    b, t_len, dim = hidden.shape
    rows = sorted(set.intersection(*(set(values[:, s].tolist()) for s in range(t_len))))
    if len(rows) < 3:
        return None
    projected = PCA(len(rows) - 1, svd_solver="full").fit(hidden.reshape(-1, dim)).components_
    z = hidden @ projected.T
    cent = {(s, t): np.stack([z[values[:, s] == v, t].mean(0) for v in rows]) for s in range(t_len) for t in range(t_len)}
    pairs = [(cent[s, t], cent[s, t + 1]) for s in range(t_len - 1) for t in range(s, t_len - 1)]

    def unit(m):
        m = m - m.mean(0)
        return m / np.linalg.norm(m)

    def fit(src, dst):  # R, s minimising ||unit(dst) - s unit(src) R^T||
        u, sig, vt = np.linalg.svd(unit(dst).T @ unit(src))
        return u @ vt, sig.sum()

    own = [procrustes(dst, src)[2] for src, dst in pairs]
    fits = [fit(src, dst) for src, dst in pairs]
    swap = [np.sum((unit(dst) - fits[j][1] * unit(src) @ fits[j][0].T) ** 2)
            for i, (src, dst) in enumerate(pairs) for j in range(len(pairs)) if j != i]
    return float(np.mean(own)), float(np.mean(swap))


@pytest.mark.parametrize("n_values", [3, 4, 5])
def test_procrustes_analysis_against_a_reference(n_values):
    rng = np.random.default_rng(n_values)
    values = rng.integers(n_values, size=(300, 4))
    values[values[:, 1] == n_values - 1, 1] = 0  # the last value is never shown at step 1: not a shared row
    if n_values == 5:
        values[values[:, 0] == 3, 0] = 1  # nor value 3 at step 0
    hidden = rng.normal(size=(300, 4, 7)) + 0.5 * values[..., None]
    got, expected = wm.procrustes_analysis(hidden, values), _reference_procrustes(hidden, values)
    if n_values == 3:
        assert got is None and expected is None  # two shared values are too few
    else:
        assert got == pytest.approx(expected, rel=1e-6)


def test_check_accepts_the_edges_of_every_rule():
    counts = train_class_counts("digits")
    for overrides in ({"scenario": "mtmf", "seq_len": 4}, {"scenario": "stsf", "n_back": 3, "seq_len": 4},
                      {"split": "novel_identity", "heldout_identities": 1}, {"split": "novel_identity", "heldout_identities": 4},
                      {"n_categories": len(counts), "n_identities": int(counts.min())},
                      {"n_identities": int(counts[:4].min())}):
        wm.check(study_config(**overrides))
    for overrides in ({"split": "novel_identity", "heldout_identities": 0}, {"scenario": "stmf", "n_back": 2, "seq_len": 2},
                      {"n_identities": int(counts[:4].min()) + 1}):
        with pytest.raises(ConfigError):
            wm.check(study_config(**overrides))


def test_batch_task_vectors_are_as_wide_as_the_task_list_whatever_tasks_the_batch_holds():
    seqs = generate(np.random.default_rng(0), 5, [Task(1, "location")], split_pools("random", 3, 1)[0], n_categories=2)
    seqs.task = np.array([0, 0, 1, 0, 1])  # three tasks in the list, the last one absent from this batch
    index, task, target = wm._batch_tensors(seqs, 3, 3, "cpu")
    np.testing.assert_array_equal(task.numpy(), np.eye(3)[seqs.task])
    np.testing.assert_array_equal(index.numpy(), seqs.stimulus_index(3))
    np.testing.assert_array_equal(target.numpy(), seqs.target)
    assert task.dtype == torch.float32 and index.dtype == target.dtype == torch.int64


def test_check_messages_name_the_value_and_every_choice():
    from trainables.wm_tasks import SCENARIOS, SPLITS

    for overrides, expected in (({"scenario": "xx"}, f"scenario 'xx' must be one of {', '.join(SCENARIOS)}"),
                                ({"split": "xx"}, f"split 'xx' must be one of {', '.join(SPLITS)}"),
                                ({"rnn": "xx"}, f"rnn 'xx' must be one of {', '.join(wm.WorkingMemoryNet.RNNS)}"),
                                ({"scenario": "mtmf", "seq_len": 3}, "(its 3-back tasks 3)"),
                                ({"scenario": "stmf", "n_back": 4, "seq_len": 4}, "(n_back 4)")):
        with pytest.raises(ConfigError) as refused:
            wm.check(study_config(**overrides))
        assert expected in str(refused.value), refused.value


def test_check_bounds_seq_len_by_n_back_outside_mtmf():
    wm.check(study_config(scenario="stsf", n_back=1, seq_len=2))  # 2 > 1: one decision step
    with pytest.raises(ConfigError):
        wm.check(study_config(scenario="stsf", n_back=4, seq_len=4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_config_asking_for_cuda_without_it_is_refused_not_run_on_the_cpu():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        wm.train(study_config(device="cuda"), lambda *a, **k: None)


# ---------------------------------------------------------------- the figures (read back through matplotlib's own objects)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _attention_inputs(channels: int):
    """Four tasks, the last with no sequence; 6x8 canvases (not square); the first sequence of
    each task is not the first row; a sequence never plotted holds the largest weight."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    tasks = [Task(1, "location"), Task(1, "identity"), Task(2, "category"), Task(3, "location")]
    seqs = generate(rng, 7, tasks[:3], split_pools("random", 2, 1)[0], n_categories=2, seq_len=4)
    seqs.task = np.array([2, 2, 0, 1, 0, 1, 2])  # first of task 0: row 2, task 1: row 3, task 2: row 0
    stim = SimpleNamespace(canvas=rng.integers(0, 256, size=(2 * 2 * N_VIEWS * N_LOCATIONS, 6, 8, channels), dtype=np.uint8),
                           n_identities=2)
    attention = rng.random((7, 4, 3, 3)) * 0.5
    attention[1, 2, 0, 0] = 0.9  # row 1 is never plotted: not the colour scale's top
    out = {"probs": rng.dirichlet(np.ones(3), size=(7, 4)), "attention": attention}
    return stim, seqs, out, tasks


@pytest.mark.parametrize("channels", [1, 3])
def test_attention_figure_shows_each_tasks_first_test_sequence_with_its_weights(channels):
    from trainables.wm_tasks import RESPONSES

    plt = _pyplot()
    stim, seqs, out, tasks = _attention_inputs(channels)
    fig = wm._plot_attention(plt, stim, seqs, out, tasks)
    try:
        assert tuple(fig.get_size_inches()) == pytest.approx((1.6 * 4, 1.8 * 4))
        assert len(fig.axes) == 4 * 4 and fig.subplotpars.left != plt.rcParams["figure.subplot.left"]  # tight layout
        index, pred = seqs.stimulus_index(2), out["probs"].argmax(-1)
        vmax = out["attention"][[2, 3, 0]].max()
        for k, b in ((0, 2), (1, 3), (2, 0)):
            row = fig.axes[4 * k : 4 * k + 4]
            assert row[0].get_ylabel() == tasks[k].name and row[0].yaxis.label.get_fontsize() == 7
            for t, ax in enumerate(row):
                canvas, weights = ax.images
                expected = stim.canvas[index[b, t]]
                np.testing.assert_array_equal(canvas.get_array(), expected[..., 0] if channels == 1 else expected)
                assert canvas.get_cmap().name == "gray" and tuple(canvas.get_extent()) == (0, 8, 6, 0)
                np.testing.assert_array_equal(weights.get_array(), out["attention"][b, t])
                assert weights.get_cmap().name == "inferno" and weights.get_alpha() == 0.55
                assert tuple(weights.get_extent()) == (0, 8, 6, 0) and weights.get_interpolation() == "nearest"
                assert tuple(weights.get_clim()) == (0.0, vmax)  # one scale for every panel
                assert ax.get_title() == f"{RESPONSES[seqs.target[b, t]]}\n-> {RESPONSES[pred[b, t]]}"
                assert ax.title.get_fontsize() == 6 and list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []
        assert all(not ax.images and not ax.get_ylabel() for ax in fig.axes[12:])  # the task with no sequence
        assert fig._suptitle.get_text() == f"attention over the canvas (target -> response); colour 0 to {vmax:.2f}"
        assert fig._suptitle.get_fontsize() == 9
    finally:
        plt.close(fig)


CURVES = {"1back_location": {"location": [None, 0.9, 0.8], "identity": [0.2, 0.3, None], "category": [0.4, 0.5, 0.45]},
          "2back_identity": {"location": [0.3, 0.35, 0.3], "identity": [None, None, 0.7], "category": [0.25, 0.3, 0.5]}}


def test_decoding_figure_draws_every_curve_of_every_task():
    plt = _pyplot()
    fig = wm._plot_decoding(plt, "baseline", CURVES)
    try:
        assert tuple(fig.get_size_inches()) == pytest.approx((3.2 * 2, 2.8))
        assert len(fig.axes) == 2 and fig.subplotpars.left != plt.rcParams["figure.subplot.left"]  # tight layout
        assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])  # one accuracy scale
        for ax, (name, by_feature) in zip(fig.axes, CURVES.items()):
            assert ax.get_title() == name and ax.title.get_fontsize() == 9 and ax.get_xlabel() == "step"
            assert len(ax.lines) == 3
            for line, (feature, accs) in zip(ax.lines, by_feature.items()):
                relevant = name.endswith(feature)  # the task's own feature: solid, labelled
                np.testing.assert_array_equal(line.get_xdata(), range(3))
                np.testing.assert_array_equal(np.asarray(line.get_ydata(), float), np.array(accs, float))
                assert line.get_linestyle() == ("-" if relevant else "--") and line.get_marker() == "o"
                assert line.get_label() == feature + (" (task)" if relevant else "")
        first, second = fig.axes
        assert first.get_ylabel() == "decoding accuracy (CV)" and second.get_ylabel() == ""
        legend = first.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == ["location (task)", "identity", "category"]
        assert all(t.get_fontsize() == 7 for t in legend.get_texts()) and second.get_legend() is None
        assert fig._suptitle.get_text() == "baseline: decoding of the current stimulus from the RNN state"
        assert fig._suptitle.get_fontsize() == 10
    finally:
        plt.close(fig)


def test_artifacts_are_the_json_of_every_number_and_the_figures_of_these_inputs(tmp_path):
    """analysis.json holds the method, the metrics and the details (indent 2); the PNGs are the
    figures of the same inputs at 110 dpi, pixel for pixel; the function closes its own figures
    (and no other); a missing folder is made, parents included, and an existing one is reused.
    One task (stsf): the heatmaps are one row of panels."""
    import io

    from matplotlib.image import imread

    plt = _pyplot()
    stim, seqs, out, tasks = _attention_inputs(1)
    details = {"decoding_by_step": CURVES, "note": [1, 2]}

    def pixels(fig) -> np.ndarray:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        buffer.seek(0)
        return imread(buffer)

    mine = plt.figure()
    try:
        folder = tmp_path / "runs" / "trial"
        for method, outputs in (("baseline", {"probs": out["probs"]}), ("attention", out)):  # the folder, then again
            metrics = {"acc": 0.5, "decode_relevant": 0.75, "method": method}
            names = wm.save_artifacts(str(folder), method, metrics, details, stim, seqs, outputs, tasks[:1])
            figures = ["decoding.png", "attention_heatmaps.png"][: 2 if method == "attention" else 1]
            assert names == ["analysis.json", *figures] and sorted(p.name for p in folder.iterdir()) == sorted(names)
            assert plt.get_fignums() == [mine.number]
            assert (folder / "analysis.json").read_text() == json.dumps({"method": method, "metrics": metrics, **details},
                                                                        indent=2)
        np.testing.assert_array_equal(imread(folder / "decoding.png"), pixels(wm._plot_decoding(plt, "attention", CURVES)))
        np.testing.assert_array_equal(imread(folder / "attention_heatmaps.png"),
                                      pixels(wm._plot_attention(plt, stim, seqs, out, tasks[:1])))
    finally:
        plt.close(mine)
