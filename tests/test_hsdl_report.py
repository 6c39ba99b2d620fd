"""Stage 2's report on a fitted HSDL (moe_utils.stages.hsdl): hand-built models whose atoms,
usages and coverage are known, and the checks that refuse a broken fit."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from moe_utils.stages import hsdl as hsdl_report


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
