"""Stage 6's pipeline (moe_utils.stages.routing_prediction): its checks, its recall, difference and
cache numbers against counts made token by token, and the whole chain on a real tiny model, with
real MMLU-Pro questions, from stage 1's store to the artifact."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from moe_utils.capture.routing import capture_routing
from moe_utils.common.artifacts import read_artifact
from moe_utils.evaluation.data import load_prompts
from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.patterns.hsdl import HSDL
from moe_utils.prediction import routing_prediction as rp
from moe_utils.stages import hsdl as hsdl_report
from moe_utils.stages import routing_prediction as stage
from moe_utils.stages import stage_paths

from .conftest import SHARED_DATA
from .test_expert_cache import _replay

N_TOKENS, N_LAYERS, N_EXPERTS, K = 90, 3, 6, 2


def _hits_by_hand(rankings, truth, m):
    """How many of the top m ranked experts are true, token by token and layer by layer."""
    out = np.zeros(truth.shape[:2], dtype=int)
    for t in range(truth.shape[0]):
        for layer in range(truth.shape[1]):
            out[t, layer] = len({int(e) for e in rankings[t, layer, :m] if e >= 0} & set(truth[t, layer].tolist()))
    return out


@pytest.fixture(scope="module")
def scores():
    """Random truth and rankings (the oracle ranks the truth first), scored by hand."""
    rng = np.random.default_rng(0)
    truth = np.stack([np.stack([rng.choice(N_EXPERTS, K, replace=False) for _ in range(N_LAYERS)])
                      for _ in range(N_TOKENS)])
    ranked = {}
    for h in (1, 2):
        ranked[h] = {}
        for name in rp.PREDICTORS:
            r = np.stack([np.stack([rng.permutation(N_EXPERTS)[:2 * K] for _ in range(N_LAYERS)])
                          for _ in range(N_TOKENS)])
            if name == "oracle":
                r = np.concatenate([truth, r[:, :, :K]], axis=2)
            r[:, :h] = -1  # nothing predicts the first h layers
            ranked[h][name] = r
    hits = {h: {n: {m: _hits_by_hand(r, truth, m) for m in (K, 2 * K)} for n, r in ranked[h].items()} for h in ranked}
    return stage.Scores(ranked, hits, {h: np.arange(h, N_LAYERS) for h in ranked}, [K, 2 * K], truth,
                        np.repeat(np.arange(15), 6), K, N_EXPERTS)


def _recall(scores, name, m, h=1):
    return scores.hits[h][name][m][:, h:].sum() / (N_TOKENS * K * (N_LAYERS - h))


def test_recall_table_against_the_hit_counts(scores):
    summary, values = stage.recall_table(scores, confidence=0.9, n_boot=200)
    for key, name in rp.KEYS.items():
        assert values[f"{key}_recall"] == pytest.approx(100 * _recall(scores, name, K))
        assert values[f"{key}_recall_2k"] == pytest.approx(100 * _recall(scores, name, 2 * K))
        assert values[f"{key}_recall_low"] <= values[f"{key}_recall"] <= values[f"{key}_recall_high"]
    assert values["oracle_recall"] == 100.0 and len(summary) == len(rp.PREDICTORS) * 2
    layers = stage.recall_layers(scores, confidence=0.9, n_boot=50)
    assert sorted(layers["layer"].unique()) == [1, 2]
    assert (layers.loc[layers["predictor"] == "oracle", "recall"] == 1.0).all()


def test_versus_controls_are_differences_of_the_recalls(scores):
    differences, values = stage.versus_controls(scores, confidence=0.9, n_boot=300)
    assert set(differences) == {f"hsdl_minus_{o}_m{m}" for o in ("affinity", "bayes", "token") for m in (K, 2 * K)}
    hsdl = rp.KEYS["hsdl"]
    for prefix, other in stage.CONTROLS:
        for m, suffix in ((K, ""), (2 * K, "_2k")):
            by_hand = 100 * (_recall(scores, hsdl, m) - _recall(scores, rp.KEYS[other], m))
            assert values[f"{prefix}diff{suffix}"] == pytest.approx(by_hand)
            d = differences[f"hsdl_minus_{other}_m{m}"]
            assert values[f"{prefix or 'hsdl_'}verdict{suffix}"] == rp.verdict(d)
    # random rankings: HSDL's interval against the random affinity includes zero
    assert values["hsdl_verdict"] == "not distinguishable from"


def test_ahead_table_keeps_recall_at_k_per_horizon(scores):
    ahead = stage.ahead_table(scores, confidence=0.9, n_boot=50)
    assert set(ahead["m"]) == {K} and set(ahead["horizon"]) == {1, 2}
    row = ahead[(ahead["horizon"] == 2) & (ahead["predictor"] == rp.KEYS["token"])]
    assert row["recall"].item() == pytest.approx(_recall(scores, rp.KEYS["token"], K, h=2))


def test_cache_summary_against_a_plain_replay(scores):
    cache, table, values = stage.cache_summary(scores)
    size = max(K, N_EXPERTS // 2)
    assert values["cache_size"] == size and values["cache_size_small"] == max(K, N_EXPERTS // 4)
    for key, prefetch in (("lru", None), ("hsdl", scores.ranked[1][rp.KEYS["hsdl"]][:, :, :K])):
        replays = [_replay(scores.truth, prefetch, layer, size) for layer in scores.targets[1]]
        hits = sum(r[0] for r in replays)
        loads = sum(r[1] + r[2] for r in replays)
        assert values[f"hit_{key}"] == pytest.approx(100 * hits / (N_TOKENS * K * len(replays)))
        assert values[f"loads_{key}"] == pytest.approx(loads / (N_TOKENS * len(replays)))
    assert values["loads_oracle"] == pytest.approx(values["loads_lru"])  # the same accesses in the same order
    assert values["hit_oracle"] == 100.0


def test_stage_findings_use_recall_at_k_and_the_larger_cache(scores):
    summary, _ = stage.recall_table(scores, confidence=0.9, n_boot=50)
    differences, _ = stage.versus_controls(scores, confidence=0.9, n_boot=50)
    _, _, cache_values = stage.cache_summary(scores)
    found = stage.stage_findings("m", scores, summary, differences, cache_values, confidence=0.9)
    hsdl = _recall(scores, rp.KEYS["hsdl"], K) * 100
    assert f"HSDL {hsdl:.1f}%" in found["finding_prediction"] and f"on {N_TOKENS} held-out tokens" in found[
        "finding_prediction"]
    assert f"LRU alone hits {cache_values['hit_lru']:.1f}%" in found["finding_prefetch"]


def test_the_checks_refuse_a_sample_dictionary_and_another_model(random_models, tmp_path):
    with pytest.raises(ValueError, match="granularity='token'"):
        stage.require_token_dictionary(SimpleNamespace(manifest_={"x_spec": {"granularity": "sample"}}))
    assert stage.require_token_dictionary(SimpleNamespace(manifest_={"x_spec": {"granularity": "token"}})) == {
        "granularity": "token"}
    model, tok = random_models["olmoe"]
    store = capture_routing(model, tok, ["one short text"], out_dir=tmp_path / "s", progress=False)
    stage.require_same_model(model, store, "random:olmoe")
    with pytest.raises(ValueError, match="not the model of stage 1's store"):
        stage.require_same_model(random_models["qwen2_moe"][0], store, "random:qwen2_moe")


@pytest.fixture
def stage_inputs(olmoe, tmp_path, monkeypatch):
    """Stage 1's store and stage 2's dictionary of the tiny OLMoE on real MMLU-Pro questions."""
    if not (SHARED_DATA / "mmlu_pro").is_dir():
        pytest.skip("needs the local MMLU-Pro copy")
    monkeypatch.setenv("MOE_MMLU_PRO_DIR", str(SHARED_DATA / "mmlu_pro"))
    model, tok = olmoe
    paths = stage_paths(tmp_path / "artifacts")
    texts, labels, _ = load_prompts(["math", "law"], n_per_category=3, seed=0)
    store = capture_routing(model, tok, texts, out_dir=paths.store, labels=labels, max_length=48, progress=False,
                            data_spec={"categories": ["math", "law"], "n_per_category": 3, "seed": 0})
    X = expert_matrix(store, "token", "weight")
    hsdl = HSDL(levels=[1.0], n_steps=20, batch_size=64, layout=(store.n_layers, store.n_experts), device="cpu",
                random_state=0).fit(X)
    hsdl.save(paths.hsdl, extra=hsdl_report.artifact_extra(store, X, granularity="token", value="weight"))
    return paths, store


def test_the_stage_on_a_real_model_and_real_questions(olmoe, stage_inputs):
    paths, fitted = stage_inputs
    model, tok = olmoe
    fit_store, hsdl = stage.open_fitted(paths)
    assert fit_store.n_tokens == fitted.n_tokens and hsdl.manifest_["x_spec"]["granularity"] == "token"
    held = stage.open_heldout(paths, fit_store, hsdl, model, tok, "random:olmoe", horizons=[1, 2], per_category=2,
                              seed=1, batch_size=4, max_length=48)
    spec = fitted.manifest["data"]
    stage1 = set(load_prompts(spec["categories"], spec["n_per_category"], spec["seed"])[2]["question_id"])
    assert len(held.questions) == 4 and not stage1 & set(held.questions["question_id"])  # none of stage 1's
    text, values = stage.describe(held, "random:olmoe", per_category=2, seed=1, confidence=0.9)
    assert values == {"n_test_tokens": held.store.n_tokens, "model_name": "random:olmoe",
                      "n_experts": held.store.n_experts, "confidence_pct": 90.0}
    assert f"**Fitting tokens:** {fitted.n_tokens} (stage 1)" in text
    scores = stage.score(held, [1, 2], n_steps=10)
    truth = np.asarray(held.store.topk_indices)
    for name in rp.PREDICTORS:
        np.testing.assert_array_equal(scores.hits[1][name][scores.k], _hits_by_hand(scores.ranked[1][name], truth,
                                                                                    scores.k))
    assert (scores.hits[1]["oracle"][scores.k][:, 1:] == scores.k).all()
    summary, _ = stage.recall_table(scores, confidence=0.9, n_boot=20)
    ahead = stage.ahead_table(scores, confidence=0.9, n_boot=20)
    differences, _ = stage.versus_controls(scores, confidence=0.9, n_boot=20)
    cache, _, _ = stage.cache_summary(scores)
    stage.save_results(paths.prediction, "random:olmoe", held, summary, ahead, differences, cache)
    manifest = read_artifact(paths.prediction, what="stage 6's results", fix="re-run stage 6",
                             format="moe-routing-prediction/1", required=["results.json"])
    results = json.loads((paths.prediction / "results.json").read_text())
    assert manifest["model"] == "random:olmoe" and results["n_test_tokens"] == held.store.n_tokens
    assert sorted(results["heldout_question_ids"]) == sorted(held.questions["question_id"].tolist())
