"""Stage 2's report on a fitted HSDL (moe_utils.stages.hsdl): hand-built models whose atoms,
usages and coverage are known, and the checks that refuse a broken fit."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from moe_utils.capture.store import write_store
from moe_utils.patterns import hsdl_controls
from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.patterns.hsdl import HSDL
from moe_utils.stages import hsdl as hsdl_report

from .test_token_null import N_EXPERTS, N_LAYERS, TOP_K, synthetic_store


def _model(d1, r1, d2=None, r2=None, *, loss=(4.0, 3.0, 2.0, 1.0, 1.0, 0.5)):
    """A fitted-HSDL stand-in: 2 layers x 2 experts, known dictionaries and codes."""
    dictionaries = [np.asarray(d1, float)] + ([np.asarray(d2, float)] if d2 is not None else [])
    codes = [sp.csr_matrix(np.asarray(r1, float))] + ([np.asarray(r2, float)] if r2 is not None else [])
    return SimpleNamespace(dictionaries_=dictionaries, codes_=codes, layout=(2, 2),
                           level_sizes_=[d.shape[1] for d in dictionaries], loss_history_={"total": list(loss)},
                           fit_seconds_=1.5, n_steps_=6, score=lambda X: 0.25,
                           hierarchy_error=lambda: [0.1] if d2 is not None else [])


# rows L0E0, L0E1, L1E0, L1E1; atom 0 = {L0E0, L1E0} (cross-layer), atom 1 = {L0E1}, atom 2 unused
D1 = [[1, 0, 0], [0, 1, 0], [0.9, 0, 0], [0, 0.2, 0]]
R1 = [[1, 2, 0, 1], [0, 0, 2, 0], [0, 0, 0, 0]]  # usage 4 : 2 : 0


def test_fit_summary_and_its_checks():
    model = _model(D1, R1)
    values = hsdl_report.fit_summary(model, None)
    assert values == {"level_sizes": "3", "fit_seconds": 1.5, "n_steps": 6, "rel_error": 0.25,
                      "nnz_per_code": 1.0}  # every column of R1 uses exactly one atom
    with pytest.raises(RuntimeError, match="did not decrease"):
        hsdl_report.fit_summary(_model(D1, R1, loss=(1, 1, 1, 1, 1, 2)), None)
    with pytest.raises(RuntimeError, match=r"left \[0, 1\]"):
        hsdl_report.fit_summary(_model(np.asarray(D1) * 2, R1), None)


def test_atom_sizes_and_top_atoms_by_hand():
    tables, summary, values = hsdl_report.atom_sizes(_model(D1, R1), threshold=0.5)
    level1 = hsdl_report.live_atoms(tables)
    assert level1["atom"].tolist() == [0, 1]  # atom 2 is unused
    assert summary.loc[1, "atoms"] == 2 and summary.loc[1, "mean_experts"] == 1.5
    assert values == {"n_live_1": 2, "cross_share_1": 50.0, "mean_experts_1": 1.5}
    top, n_groups = hsdl_report.top_atoms(tables)
    assert top["atom"].tolist() == [0] and n_groups == 1  # the only atom of two or more experts


def test_hierarchy_summary_refuses_a_level_that_does_not_reconstruct():
    d2, r2 = [[1, 0], [0, 1], [1, 0], [0, 0]], [[1, 0, 0], [0, 1, 0]]
    edges, usages, values = hsdl_report.hierarchy_summary(_model(D1, R1, d2, r2))
    assert len(edges) == 1 and len(usages) == 2 and values["hier_error"] == 0.1
    assert values["children_per_atom"] == edges[0].groupby("parent").size().mean()
    broken = _model(D1, R1, d2, r2)
    broken.hierarchy_error = lambda: [0.7]
    with pytest.raises(RuntimeError, match="does not reconstruct"):
        hsdl_report.hierarchy_summary(broken)
    assert hsdl_report.hierarchy_summary(_model(D1, R1))[2] == {"hier_error": 0.0, "children_per_atom": 0.0}


def test_coverage_of_atoms_that_are_the_most_frequent_pair():
    tables, _, _ = hsdl_report.atom_sizes(_model(D1, R1), threshold=0.5)
    # tokens: L0E0 + L1E0 together 5 times (atom 0's pair), L0E1 + L1E1 once
    columns = [[1, 0, 1, 0]] * 5 + [[0, 1, 0, 1]]
    selected = sp.csr_matrix(np.array(columns).T)
    observed, chance, values = hsdl_report.coverage_against_chance(tables, selected, percents=(10, 100))
    assert values["cover_pairs_10"] == 100.0  # the one two-expert atom is the top pair
    assert np.isnan(values["cover_triplets_10"])  # no atom has three experts
    assert set(chance["top_percent"]) == {10.0, 100.0}


def test_artifact_extra_names_the_store_by_its_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text('{"x": 1}')
    store = SimpleNamespace(path=tmp_path, n_layers=2, n_experts=2, manifest={"fingerprint": {"f": 1},
                                                                             "model": {"name": "m"}})
    extra = hsdl_report.artifact_extra(store, sp.csr_matrix(np.eye(4)), granularity="token", value="weight")
    assert extra["x_spec"] == {"granularity": "token", "value": "weight", "shape": [4, 4], "nnz": 4, "layout": [2, 2]}
    assert extra["store"]["manifest_sha256"] == hashlib.sha256(b'{"x": 1}').hexdigest()


def test_benchmark_results(tmp_path):
    assert hsdl_report.benchmark(tmp_path / "none.json") is None
    result = {"date": "2026-01-02T03:04", "machine": {"cpu_count": 2, "torch_threads": 1},
              "cases": [{"case": "store", "shape": [96, 500], "n_atoms": 96, "hsdl_runs": {"HSDL": {"speedup_vs_fastest": 3.0}},
                         "results": [{"method": "HSDL", "seconds": 1.0, "rel_error_l1": 0.1, "rel_error_fro": 0.2,
                                      "mean_nnz_per_code": 2.0}]}]}
    (tmp_path / "hsdl.json").write_text(json.dumps(result))
    table, values, machine = hsdl_report.benchmark(tmp_path / "hsdl.json")
    assert table.loc[0, "X"] == "96 x 500" and values["bench_speedup_store"] == 3.0
    assert np.isnan(values["bench_speedup_synthetic"]) and values["bench_date"] == "2026-01-02"
    assert "2 CPU cores, 1 torch thread(s)" in machine


# --- the controls and the page's opening and closing (stage 2's notebook calls these) ---

@pytest.fixture(scope="module")
def small_store():
    return synthetic_store(planted=True, n_questions=8, per_question=50)


@pytest.fixture(scope="module")
def small_fit(small_store):
    X = expert_matrix(small_store, "token", "weight")
    hsdl = HSDL(levels=[1.0, 2.0], n_steps=30, batch_size=128, layout=(N_LAYERS, N_EXPERTS), device="cpu",
                random_state=0).fit(X)
    return hsdl, X


def test_open_and_describe_the_matrix(small_store, tmp_path):
    store = small_store
    write_store(tmp_path / "store", store.manifest, {"topk_indices": np.asarray(store.topk_indices),
                                                     "topk_weights": np.asarray(store.topk_weights)}, store.tokens)
    opened, X = hsdl_report.open_matrix(tmp_path / "store", granularity="token", value="binary")
    text, values = hsdl_report.describe_matrix(opened, X, granularity="token", value="binary")
    # every token selects k experts in each layer: L * k non-zeros per column
    assert values == {"n_rows": N_LAYERS * N_EXPERTS, "n_cols": store.n_tokens, "nnz_per_col": float(N_LAYERS * TOP_K)}
    assert f"{N_LAYERS * N_EXPERTS} experts ({N_LAYERS} MoE layers x {N_EXPERTS})" in text and "`synthetic`" in text
    with pytest.raises(RuntimeError, match="not 32 experts x 8 samples"):
        hsdl_report.describe_matrix(opened, X, granularity="sample", value="binary")


def test_selections_count_each_experts_tokens(small_store):
    selected, usage = hsdl_report.selections(small_store)
    picks = np.asarray(small_store.topk_indices)
    by_hand = [(picks[:, layer] == expert).any(axis=1).sum()
               for layer in range(N_LAYERS) for expert in range(N_EXPERTS)]
    assert usage.tolist() == by_hand and selected.shape == (N_LAYERS * N_EXPERTS, small_store.n_tokens)


def test_cross_layer_controls_against_the_exact_chance():
    tables, _, _ = hsdl_report.atom_sizes(_model(D1, R1), threshold=0.5)  # live atoms of 2 and 1 experts
    chances, values = hsdl_report.cross_layer_controls(tables, 50.0, (2, 2), np.array([5.0, 5.0, 0.0, 0.0]),
                                                       n_draws=4000, seed=0)
    # uniform: 4 of the 6 pairs of 4 rows span both layers, a single expert never does: (4/6 + 0) / 2
    assert values["cross_chance_uniform"] == pytest.approx(100 / 3, abs=1.5)
    assert values["cross_chance_usage"] == 0.0  # only layer 0's experts are ever used
    assert values["control_draws"] == 4000 and values["cross_vs_chance"] == "within"  # draws give 0% or 50%
    _, above = hsdl_report.cross_layer_controls(tables, 100.0, (2, 2), np.ones(4), n_draws=200)
    assert above["cross_vs_chance"] == "above"


def test_tree_structure_in_percent_and_empty_for_one_level():
    d2, r2 = [[1, 0], [0, 1], [1, 0], [0, 0]], [[1, 0, 0], [0, 1, 0]]
    model = _model(D1, R1, d2, r2)
    tables, _, _ = hsdl_report.atom_sizes(model, threshold=0.5)
    edges, _, _ = hsdl_report.hierarchy_summary(model)
    structure, values = hsdl_report.tree_structure(tables, edges)
    assert structure == hsdl_controls.hierarchy_structure(tables, edges[0])
    assert values["tree_edges_same"] == structure["edges_same"] * 100
    assert values["tree_n_parents"] == structure["n_parents"] == 2  # atom 0 -> child 0, atom 1 -> child 1
    assert hsdl_report.tree_structure(tables, []) == ({}, {})


def test_coverage_controls_and_table():
    tables, _, _ = hsdl_report.atom_sizes(_model(D1, R1), threshold=0.5)
    columns = [[1, 0, 1, 0]] * 5 + [[0, 1, 0, 1]]  # the two-expert atom is the most frequent pair
    selected = sp.csr_matrix(np.array(columns).T)
    observed, chances, values = hsdl_report.coverage_controls(tables, selected, np.array([5.0, 1, 5, 1]), n_draws=300)
    assert values["cover_pairs_10"] == 100.0
    assert list(chances) == ["random atoms, uniform", "random atoms, by usage"]
    # by hand: a random pair of 4 rows is the top pair (L0E0, L1E0) 1 time in 6 (the pairs of 4 observed)
    assert values["cover_chance_uniform_2_10"] == pytest.approx(100 / 6, abs=5)
    low, high = values["cover_chance_usage_2_10_low"], values["cover_chance_usage_2_10_high"]
    assert low <= values["cover_chance_usage_2_10"] <= high
    table = hsdl_report.coverage_table(observed)
    assert list(table.columns) == ["pairs", "triplets"] and table.loc[100.0, "pairs"] == 1.0


def test_stability_controls_of_a_real_fit(small_store, small_fit):
    hsdl, X = small_fit
    matched, table, values = hsdl_report.stability_controls(hsdl, X, small_store, 0.5, granularity="token")
    assert set(matched) == set(hsdl_report.STABILITY)
    for name, key in hsdl_report.STABILITY.items():
        assert values[f"stable_{key}_exact"] == pytest.approx(np.mean(matched[name] == 1.0) * 100)
        assert values[f"stable_{key}_median_jaccard"] == pytest.approx(np.median(matched[name]))


def test_surrogate_comparison_by_hand():
    real = {"rel_error": 0.3, "n_live_1": 10, "mean_experts_1": 2.0, "cross_share_1": 90.0, "cover_pairs_10": 80.0,
            "cover_triplets_10": 50.0, "other": 1}
    surrogates = pd.DataFrame({"rel_error": [0.2, 0.4], "n_live_1": [8, 9], "mean_experts_1": [2.0, 2.0],
                               "cross_share_1": [95.0, 99.0], "cover_pairs_10": [70.0, 72.0],
                               "cover_triplets_10": [40.0, 60.0]})
    table, comparison, values = hsdl_report.surrogate_comparison(real, surrogates)
    assert values["surr_rel_error"] == pytest.approx(0.3) and values["surr_n_live_1_max"] == 9
    assert (values["surr_vs_rel_error"], values["surr_vs_n_live_1"], values["surr_vs_cross_share_1"]) == \
        ("within", "above", "below")
    assert table.loc["% covered at 10% (pairs)", "real store"] == 80.0 and "other" not in comparison["real store"]


def test_stage_finding_reads_the_glued_values():
    values = dict(cover_pairs_10=73.0, cover_chance_uniform_2_10=10.0, cover_chance_usage_2_10=18.0,
                  surr_cover_pairs_10_min=69.0, surr_cover_pairs_10_max=74.0, surr_vs_cover_pairs_10="within",
                  cross_share_1=90.0, cross_chance_uniform=81.0, cross_vs_chance="above", stable_seed_exact=53.0)
    sentence = hsdl_report.stage_finding({**values, "n_live_1": 4})["finding_hsdl"]
    assert sentence == hsdl_controls.finding(**values)  # one level: no tree values, no hierarchy clause
    with pytest.raises(KeyError):
        hsdl_report.stage_finding({k: v for k, v in values.items() if k != "stable_seed_exact"})


def test_save_checked_reads_the_model_back(small_store, small_fit, tmp_path, monkeypatch):
    hsdl, X = small_fit
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text("{}")
    store = SimpleNamespace(path=tmp_path / "store", n_layers=N_LAYERS, n_experts=N_EXPERTS,
                            manifest={"model": {"name": "synthetic"}})
    files = hsdl_report.save_checked(hsdl, tmp_path / "hsdl", store, X, granularity="token", value="weight")
    assert "manifest.json" in files and HSDL.load(tmp_path / "hsdl").manifest_["x_spec"]["shape"] == list(X.shape)
    other = HSDL(levels=[1.0], n_steps=5, batch_size=128, layout=(N_LAYERS, N_EXPERTS), device="cpu",
                 random_state=3).fit(X)
    monkeypatch.setattr(HSDL, "load", classmethod(lambda cls, path: other))  # a model that codes X otherwise
    with pytest.raises(RuntimeError, match="codes X differently"):
        hsdl_report.save_checked(hsdl, tmp_path / "hsdl", store, X, granularity="token", value="weight")


def test_benchmark_view_with_and_without_results(tmp_path):
    text, table, values = hsdl_report.benchmark_view(tmp_path / "none.json")
    assert table is None and "bench/hsdl.py" in text and values["bench_date"] == "n/a"
    assert np.isnan(values["bench_speedup_store"])
    test_benchmark_results(tmp_path)  # writes tmp_path / "hsdl.json"
    text, table, values = hsdl_report.benchmark_view(tmp_path / "hsdl.json")
    assert len(table) == 1 and values["bench_speedup_store"] == 3.0 and text.startswith("Benchmark of 2026-01-02")
