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

from one_thread import one_thread  # noqa: F401
from orchestrator.spaces import load_study
from trainables import wm_attention as wm
from trainables.common.checks import ConfigError
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
