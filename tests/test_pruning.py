"""Expert scores and masks (moe_utils.pruning): CAEP against hand-computed cases and a brute-force
loop written independently, the calibration pass against the routing store and hand-written
matmuls with the fused expert weights, the output-based method against physical expert removal."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from moe_utils import pruning
from moe_utils.expert_surgery import remove_experts
from moe_utils.models import moe_layers
from moe_utils.routing import capture_routing, record_routing

from .conftest import ARCHITECTURES, SHARED_DATA, TEXTS


# ------------------------------------------------------------------------------------ CAEP
def reference_caep(D, R, k1, k2):
    """Algorithm 1 as the paper states it, with Python lists and exact sums (no numpy algebra)."""
    D, R = np.asarray(D).tolist(), np.asarray(R).tolist()
    n_e, n_p = len(D), len(D[0])
    usage = [math.fsum(row) for row in R]

    def contribution(atoms):
        return [math.fsum(D[i][j] * usage[j] for j in atoms) for i in range(n_e)]

    alive = list(range(n_p))
    e = contribution(alive)
    f = sorted(e, reverse=True)[math.ceil(k1 * n_e) - 1]
    m = [x >= f for x in e]
    removed = []
    while sum(m) > (1 - k2) * n_e and alive:
        j = min(alive, key=lambda a: (usage[a], a))
        alive.remove(j)
        removed.append(j)
        m = [x >= f for x in contribution(alive)]
    return np.array(m), removed


def test_caep_hand_computed_loop():
    D = [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]]
    R = [[1, 0], [1, 1], [2, 2]]  # usage 1, 2, 4 -> e = 1, 3, 2, 4; k1 = 0.75: f = 2 (rank 3)
    result = pruning.caep(D, R, 0.75, 0.5)
    assert result.threshold == 2.0
    np.testing.assert_array_equal(result.contribution, [1, 3, 2, 4])
    # m = [F T T T] (3 > 2): drop atom 0 -> e = 0 2 2 4, still 3; drop atom 1 -> e = 0 0 0 4
    np.testing.assert_array_equal(result.keep, [False, False, False, True])
    assert result.atoms_removed.tolist() == [0, 1] and result.reached and result.guard is None
    np.testing.assert_array_equal(pruning.caep_mask(D, R, 0.75, 0.5), result.keep)


def test_caep_ties_go_to_the_lowest_index():
    # two atoms used equally: the first one goes; the other tie-break would keep expert 0 instead
    result = pruning.caep([[1, 0], [0, 1], [0, 0]], [[1.0], [1.0]], 0.5, 0.5)
    np.testing.assert_array_equal(result.keep, [False, True, False])
    assert result.atoms_removed.tolist() == [0]


def test_caep_threshold_keeps_ties_and_loop_may_not_run():
    D = np.diag([3.0, 2.0, 2.0, 1.0])
    result = pruning.caep(D, np.ones((4, 1)), 0.5, 0.25)  # rank 2 -> f = 2; both 2s kept; 3 <= 3
    assert result.threshold == 2.0
    np.testing.assert_array_equal(result.keep, [True, True, True, False])
    assert len(result.atoms_removed) == 0


def test_caep_atoms_running_out():
    # f = 0 (an expert contributes nothing): e >= f for every expert whatever is removed
    result = pruning.caep(np.diag([0.0, 1.0, 2.0]), sp.csr_matrix(np.ones((3, 2))), 0.99, 0.5)
    assert result.threshold == 0.0 and not result.reached
    assert result.keep.all() and result.atoms_removed.tolist() == [0, 1, 2]
    assert "ran out" in result.note


def test_caep_guard_restores_and_compensates():
    # e = 1..6; k1 = 0.99 -> f = 1; atoms 0, 1, 2 go -> layer 0 empty, layer 1 full
    D, R = np.eye(6), np.arange(1.0, 7.0)[:, None]
    bare = pruning.caep(D, R, 0.99, 0.5)
    np.testing.assert_array_equal(bare.keep, [False, False, False, True, True, True])
    guarded = pruning.caep(D, R, 0.99, 0.5, layer_sizes=[3, 3], min_per_layer=1)
    np.testing.assert_array_equal(guarded.keep, [False, False, True, False, True, True])
    np.testing.assert_array_equal(guarded.algorithm_keep, bare.keep)
    assert guarded.guard.restored == ["L0E2"] and guarded.guard.dropped == ["L1E0"]
    assert guarded.guard.short_layers == {0: 0} and "restored L0E2" in guarded.note


def test_guard_grows_the_budget_only_when_no_layer_has_room():
    keep, note = pruning.guard_min_per_layer([False, False, True, False], [1.0, 3.0, 2.0, 4.0], [2, 2], 1)
    np.testing.assert_array_equal(keep, [False, True, True, False])
    assert note.restored == ["L0E1"] and note.dropped == []
    assert "1 more experts kept" in str(note)
    unchanged, quiet = pruning.guard_min_per_layer([True, False, True, False], [1, 1, 1, 1], [2, 2], 1)
    assert not quiet.changed and unchanged.tolist() == [True, False, True, False]


@pytest.mark.parametrize("trial", range(40))
def test_caep_matches_the_brute_force_loop(trial):
    rng = np.random.default_rng(trial)
    n_e, n_p, n_s = rng.integers(4, 30), rng.integers(1, 25), rng.integers(1, 12)
    D = rng.random((n_e, n_p)) * (rng.random((n_e, n_p)) < 0.3)
    R = rng.random((n_p, n_s)) * (rng.random((n_p, n_s)) < 0.5)
    k1, k2 = rng.uniform(0.05, 0.99), rng.uniform(0.05, 0.95)
    expected_keep, expected_removed = reference_caep(D, R, k1, k2)
    result = pruning.caep(D, sp.csr_matrix(R) if trial % 2 else R, k1, k2)
    np.testing.assert_array_equal(result.keep, expected_keep)
    assert result.atoms_removed.tolist() == expected_removed


def test_caep_rejects_bad_inputs():
    with pytest.raises(ValueError, match="threshold_ratio"):
        pruning.caep(np.eye(2), np.ones((2, 1)), 1.0, 0.5)
    with pytest.raises(ValueError, match="negative"):
        pruning.caep(-np.eye(2), np.ones((2, 1)), 0.5, 0.5)
    with pytest.raises(ValueError, match="N_p"):
        pruning.caep(np.eye(2), np.ones((3, 1)), 0.5, 0.5)
    with pytest.raises(ValueError, match="sum to"):
        pruning.caep(np.eye(4), np.ones((4, 1)), 0.5, 0.5, layer_sizes=[2, 1], min_per_layer=1)


# ------------------------------------------------------------------------ per-layer masks
def test_layerwise_mask_quota_ties_and_guard():
    scores = np.array([5, 1, 1, 3, 2, 0, 9, 9], dtype=float)
    assert pruning.layer_quota([4, 4], 0.5).tolist() == [2, 2]
    assert pruning.layer_quota([6], 0.25).tolist() == [4]  # 1.5 experts rounds up to 2 pruned
    keep = pruning.layerwise_mask(scores, [4, 4], 0.25)  # one per layer; the tie 1, 1: expert 1 goes
    np.testing.assert_array_equal(keep, [True, False, True, True, True, False, True, True])
    np.testing.assert_array_equal(pruning.layerwise_mask(scores, [4, 4], 0.5),
                                  [True, False, False, True, False, False, True, True])
    assert pruning.layerwise_mask(scores, [4, 4], 0.75, min_per_layer=2).sum() == 4  # guard: 2 per layer, not 1
    a, b = (pruning.random_mask([8, 8], 0.5, seed) for seed in (0, 1))
    assert pruning.kept_per_layer(a, [8, 8]).tolist() == [4, 4] and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, pruning.random_mask([8, 8], 0.5, 0))


# ------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def olmoe_stats(olmoe):
    model, tok = olmoe
    return pruning.calibrate(model, tok, TEXTS, batch_size=3, max_length=64, keep_hidden=64, progress=False)


def test_frequency_equals_the_routing_store(olmoe, olmoe_stats, tmp_path):
    model, tok = olmoe
    store = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", batch_size=3, max_length=64, progress=False)
    counts = np.stack([np.bincount(np.asarray(store.topk_indices[:, layer]).ravel(), minlength=store.n_experts)
                       for layer in range(store.n_layers)])
    np.testing.assert_array_equal(olmoe_stats.counts, counts)
    assert olmoe_stats.n_tokens == store.n_tokens
    np.testing.assert_allclose(olmoe_stats.score("frequency"), counts.ravel() / store.n_tokens)
    weights = np.zeros_like(counts, dtype=float)
    for layer in range(store.n_layers):
        np.add.at(weights[layer], np.asarray(store.topk_indices[:, layer]).ravel(),
                  np.asarray(store.topk_weights[:, layer]).ravel())
    np.testing.assert_allclose(olmoe_stats.weight_sum, weights, rtol=1e-5)


def _olmoe_expert(experts, e, x):
    """An OLMoE expert by hand: down(silu(gate x) * up x), gate = first half of gate_up_proj."""
    gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ experts.down_proj[e].T


def test_expert_output_is_the_fused_weights_matmul(olmoe):
    model, _ = olmoe
    layer = moe_layers(model)[1]
    x = torch.randn(10, model.config.hidden_size)
    index = torch.arange(10) % layer.num_experts
    with torch.no_grad():
        out = pruning.expert_outputs(layer, x, index)
        expected = torch.stack([_olmoe_expert(layer.experts, int(e), x[i]) for i, e in enumerate(index)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_ean_and_reap_by_hand(olmoe, olmoe_stats):
    """Block inputs from a hook of our own, choices from record_routing, outputs by hand."""
    model, tok = olmoe
    layers = moe_layers(model)
    inputs = {}
    hooks = [layer.block.register_forward_pre_hook(
        lambda _m, args, i=layer.index: inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for layer in layers]
    norm, weighted = np.zeros(olmoe_stats.counts.shape), np.zeros(olmoe_stats.counts.shape)
    try:
        with torch.no_grad(), record_routing(model) as recorder:
            for start in range(0, len(TEXTS), 3):
                enc = tok(TEXTS[start:start + 3], return_tensors="pt", padding=True, truncation=True, max_length=64)
                model(**enc, use_cache=False)
                real = enc["attention_mask"].reshape(-1).bool()
                for layer, routed in zip(layers, recorder.pop()):
                    states = inputs[layer.index].pop()
                    for t in np.flatnonzero(real.numpy()):
                        for slot in range(layer.top_k):
                            e, w = int(routed.indices[t, slot]), float(routed.weights[t, slot])
                            size = float(_olmoe_expert(layer.experts, e, states[t]).norm())
                            norm[layer.index, e] += size
                            weighted[layer.index, e] += w * size
    finally:
        for hook in hooks:
            hook.remove()
    np.testing.assert_allclose(olmoe_stats.norm_sum, norm, rtol=1e-4)
    np.testing.assert_allclose(olmoe_stats.weighted_norm_sum, weighted, rtol=1e-4)
    routed = np.maximum(olmoe_stats.counts, 1).ravel()
    np.testing.assert_allclose(olmoe_stats.score("reap"), weighted.ravel() / routed, rtol=1e-4)
    assert all(len(h) == 64 for h in olmoe_stats.hidden)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_calibration_runs_on_every_architecture(random_models, arch):
    model, tok = random_models[arch]
    stats = pruning.calibrate(model, tok, TEXTS[:3], batch_size=3, max_length=32, progress=False)
    layers = moe_layers(model)
    np.testing.assert_array_equal(stats.counts.sum(axis=1), [stats.n_tokens * layer.top_k for layer in layers])
    routed = stats.counts > 0
    assert (stats.norm_sum[routed] > 0).all() and np.isfinite(stats.score("reap")).all()
    assert (stats.score("ean")[~routed.ravel()] == 0).all()


def test_calibration_and_output_search_are_cached(olmoe, olmoe_stats, tmp_path):
    model, tok = olmoe
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        first = pruning.calibrate(model, tok, TEXTS, batch_size=3, max_length=64, keep_hidden=64,
                                  cache_dir=tmp_path, progress=False)
        n_calls = len(calls)
        again = pruning.calibrate(model, tok, TEXTS, batch_size=3, max_length=64, keep_hidden=64,
                                  cache_dir=tmp_path, progress=False)
        assert len(calls) == n_calls > 0  # read back, not recomputed
        pruning.calibrate(model, tok, TEXTS, batch_size=3, max_length=32, cache_dir=tmp_path, progress=False)
        assert len(calls) > n_calls  # other settings: computed
    finally:
        hook.remove()
    for name in ("counts", "weight_sum", "norm_sum", "weighted_norm_sum"):
        np.testing.assert_array_equal(getattr(again, name), getattr(olmoe_stats, name))
    assert all(torch.equal(a, b) for a, b in zip(again.hidden, first.hidden))
    orders = pruning.output_removal_order(model, again.hidden, [1, 1, 1], cache_dir=tmp_path, progress=False)
    assert pruning.output_removal_order(model, again.hidden, [1, 1, 1], cache_dir=tmp_path, progress=False) == orders
    assert len(list(tmp_path.glob("output-*.json"))) == 1


# ------------------------------------------------------------------------ output-based
def test_output_search_first_choice_matches_physical_removal(olmoe, olmoe_stats):
    """The first expert the greedy search removes changes the block output least, measured on
    copies of the model with each candidate physically removed (another code path than masking)."""
    model, _ = olmoe
    orders = pruning.output_removal_order(model, olmoe_stats.hidden, [3, 3, 3], progress=False)
    assert all(len(set(order)) == 3 for order in orders)
    layer = moe_layers(model)[0]
    states = olmoe_stats.hidden[0][None]
    with torch.no_grad():
        reference = layer.block(states)
        changes = []
        for candidate in range(layer.num_experts):
            keep = np.ones(len(moe_layers(model)) * layer.num_experts, dtype=bool)
            keep[candidate] = False
            removed = remove_experts(copy.deepcopy(model), keep)
            changes.append(float((moe_layers(removed)[0].block(states) - reference).pow(2).sum()))
    assert orders[0][0] == int(np.argmin(changes))


def test_pruning_masks_for_every_method(olmoe, olmoe_stats):
    model, _ = olmoe
    D = np.random.default_rng(0).random((24, 5))
    R = sp.random(5, 40, density=0.4, random_state=0, format="csr")
    masks = pruning.pruning_masks([0.25, 0.5], layer_sizes=[8, 8, 8], min_per_layer=2, stats=olmoe_stats,
                                  dictionary=(D, R), seeds=(0, 1), model=model, progress=False)
    assert [m.label for m in masks[:4]] == ["caep", "caep", "caep_layer", "caep_layer"]
    assert len(masks) == 2 * (len(pruning.METHODS) + 1)
    for mask in masks:
        counts = pruning.kept_per_layer(mask.keep, [8, 8, 8])
        assert (counts >= 2).all()
        if mask.method != "caep":
            assert counts.tolist() == [6, 6, 6] if mask.ratio == 0.25 else [4, 4, 4]
    output = {m.ratio: m.keep for m in masks if m.method == "output"}
    assert (output[0.25] >= output[0.5]).all()  # nested: the greedy order serves every ratio
    np.testing.assert_array_equal(next(m.keep for m in masks if m.method == "frequency" and m.ratio == 0.5),
                                  pruning.layerwise_mask(olmoe_stats.score("frequency"), [8] * 3, 0.5))
    with pytest.raises(ValueError, match="caep needs dictionary"):
        pruning.pruning_masks([0.5], layer_sizes=[8] * 3, min_per_layer=2, methods=["caep"])
    overlap = pruning.mask_overlap(masks[:2])
    assert overlap.iloc[0, 0] == 1.0 and 0 <= overlap.iloc[0, 1] <= 1


# ----------------------------------------------------------------------- domain restriction
def test_label_columns_and_hsdl_factors(olmoe, tmp_path):
    model, tok = olmoe
    labels = ["math" if i % 2 else "law" for i in range(len(TEXTS))]
    store = capture_routing(model, tok, TEXTS, labels=labels, out_dir=tmp_path / "s", batch_size=3, progress=False)
    tokens = pruning.label_columns(store, "math")
    assert tokens.sum() == (store.tokens["label"] == "math").sum()
    samples = pruning.label_columns(store, ["math"], granularity="sample")
    assert samples.tolist() == [label == "math" for label in labels]
    with pytest.raises(ValueError, match="not in the store"):
        pruning.label_columns(store, "physics")
    rng = np.random.default_rng(0)
    r1 = sp.random(4, len(tokens), density=0.3, random_state=1, format="csr")
    fake = SimpleNamespace(dictionaries_=[rng.random((24, 4)), rng.random((24, 3))], codes_=[r1, rng.random((3, 4))])
    D, R = pruning.hsdl_factors(fake, columns=tokens)
    np.testing.assert_array_equal(R.toarray(), r1.toarray()[:, tokens])
    D2, R2 = pruning.hsdl_factors(fake, level=2, columns=tokens)
    np.testing.assert_allclose(R2.toarray(), fake.codes_[1] @ r1.toarray()[:, tokens])
    assert D2 is fake.dictionaries_[1] or np.array_equal(D2, fake.dictionaries_[1])


# ---------------------------------------------------------------------------- evaluation
def test_evaluation_runs_group_by_limit():
    runs = pruning.evaluation_runs(["mmlu_pro_ppl", "mmlu_pro_mc", "wikitext2_ppl"], ["math", "computer science"],
                                   4, {"wikitext2_ppl": 1})
    assert runs == [{"tasks": ["mmlu_pro_ppl_math", "mmlu_pro_ppl_computer_science", "mmlu_pro_mc_math",
                               "mmlu_pro_mc_computer_science"], "limit": 4},
                    {"tasks": ["wikitext2_ppl"], "limit": 1}]
    assert pruning.evaluation_runs(["wikitext2_ppl"], [], 4, {"arc_easy": 1}) == [{"tasks": ["wikitext2_ppl"],
                                                                                    "limit": 4}]
    assert pruning.resolve_evaluation("embedded")["task_limits"] == {"wikitext2_ppl": 1}
    real = pruning.resolve_evaluation("allenai/OLMoE-1B-7B-0924")
    assert real["tasks"] == list(pruning.PAPER_TASKS) and real["limit"] is None


def test_evaluate_masks_caches_by_mask_and_settings(olmoe, tmp_path, monkeypatch):
    """evaluate() stands in for the harness here: the model's loss on a text, which masks change."""
    model, tok = olmoe
    calls = []

    def fake_evaluate(m, t, tasks, *, limit=None, **settings):
        calls.append((tuple(tasks), limit))
        enc = t(TEXTS[0], return_tensors="pt")
        with torch.no_grad():
            loss = float(m(**enc, labels=enc["input_ids"]).loss)
        return pd.DataFrame({"task": list(tasks), "metric": "loss", "value": loss, "stderr": np.nan, "n": 1})

    monkeypatch.setattr("moe_utils.evaluation.evaluate", fake_evaluate)
    masks = [pruning.unpruned_mask(24), pruning.PruningMask("random", 0.5, pruning.random_mask([8] * 3, 0.5, 0), seed=0)]
    runs = [{"tasks": ["a", "b"], "limit": 2}, {"tasks": ["c"], "limit": 1}]
    first = pruning.evaluate_masks(model, tok, masks, runs, cache_dir=tmp_path, progress=False, batch_size=4)
    assert len(calls) == 4 and not first["cached"].any()
    assert first.loc[first["method"] == "unpruned", "value"].iloc[0] != first.loc[first["method"] == "random", "value"].iloc[0]
    again = pruning.evaluate_masks(model, tok, masks, runs, cache_dir=tmp_path, progress=False, batch_size=4)
    assert len(calls) == 4 and again["cached"].all()
    pd.testing.assert_series_equal(first["value"], again["value"])
    pruning.evaluate_masks(model, tok, masks[:1], runs[:1], cache_dir=tmp_path, progress=False, batch_size=8)
    assert len(calls) == 5  # other settings: evaluated again


def _results():
    rows = []
    for method, ratio, seed, acc, ppl in [("unpruned", 0.0, None, 0.5, 10.0), ("caep", 0.5, None, 0.4, 20.0),
                                          ("frequency", 0.5, None, 0.45, 30.0), ("random", 0.5, 0, 0.2, 50.0),
                                          ("random", 0.5, 1, 0.3, 70.0)]:
        for task, metric, value in [("t1", "acc", acc), ("t2", "acc", acc / 2), ("wikitext2_ppl", "word_perplexity", ppl),
                                    ("wikitext2_ppl", "bits_per_byte", 1.0)]:
            rows.append(dict(method=method, ratio=ratio, seed=seed, pruned_share=ratio, task=task, metric=metric,
                             value=value, stderr=np.nan, n=4, seconds=1.0, cached=False))
    return pd.DataFrame(rows)


def test_table1_layout_and_ranks():
    summary = pruning.score_summary(_results())
    table = pruning.table1(summary, 0.5)
    assert table.index.tolist() == ["unpruned", "caep", "frequency", "random"]
    assert table.columns.tolist() == ["pruned", "AVG", "t1", "t2", "wikitext2_ppl"]
    assert table.loc["random", "wikitext2_ppl"] == f"60.000 ± {np.std([50, 70], ddof=1):.3f}"
    assert table.loc["caep", "AVG"] == "0.300" and table.loc["unpruned", "pruned"] == "0%"
    ranks = pruning.method_ranks(summary, 0.5)
    assert ranks.index.tolist() == ["frequency", "caep", "random"]  # accuracy higher, perplexity lower


def test_save_and_load_pruning(tmp_path, olmoe_stats):
    masks = [pruning.unpruned_mask(24), pruning.PruningMask("random", 0.5, pruning.random_mask([8] * 3, 0.5, 3),
                                                             seed=3, note="n")]
    pruning.save_pruning(tmp_path, masks, _results(), stats=olmoe_stats, extra={"parameters": {"x": 1}})
    loaded, results, manifest = pruning.load_pruning(tmp_path)
    assert [(m.method, m.seed, m.note) for m in loaded] == [(m.method, m.seed, m.note) for m in masks]
    np.testing.assert_array_equal(loaded[1].keep, masks[1].keep)
    assert manifest["parameters"] == {"x": 1} and len(results) == len(_results())
    (tmp_path / "results.csv").write_text("tampered")
    with pytest.raises(ValueError, match="checksum"):
        pruning.load_pruning(tmp_path)


# --------------------------------------------------------------------------- calibration data
def test_calibration_sets(olmoe):
    _, tok = olmoe
    assert pruning.resolve_calibration("embedded") == {"source": "capture", "n_samples": None, "n_tokens": None}
    assert pruning.resolve_calibration("allenai/OLMoE-1B-7B-0924") == {"source": "mmlu", "n_samples": 128,
                                                                        "n_tokens": 2048}
    prompts = [f"p{i}" for i in range(10)]
    subset = pruning.calibration_texts(tok, "capture", n_samples=4, prompts=prompts, seed=1)
    assert len(subset) == 4 and set(subset) <= set(prompts) and subset == sorted(subset, key=prompts.index)
    if not (SHARED_DATA / "mmlu").is_dir():
        pytest.skip("no local MMLU copy")
    texts = pruning.calibration_texts(tok, "mmlu", n_samples=3, n_tokens=100, data_dir=SHARED_DATA / "mmlu")
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert len(texts) == 3 and all(abs(n - 100) <= 5 for n in lengths) and "Answer:" in "".join(texts)
