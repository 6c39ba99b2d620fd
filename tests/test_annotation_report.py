"""Stage 3's report on annotated atoms (moe_utils.stages.annotation): hand-built annotations whose
tables and counts are known."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from moe_utils.stages import annotation as annotation_report


def _level(level, atoms, enrichment=None, by_sample=None, by_type=None):
    table = pd.DataFrame(atoms)
    return SimpleNamespace(level=level, atoms=table, enrichment=enrichment, enrichment_by_sample=by_sample,
                           enrichment_by_type=by_type,
                           labels=dict(zip(table["atom"], table.get("label", table["atom"].astype(str)))))


TOKENS = pd.DataFrame({"sample_id": [0, 0, 0, 1, 1, 2], "position": [0, 1, 2, 0, 1, 0],
                       "label": ["math", "math", "math", "law", "law", "math"],
                       "token_class": ["word", "word", "digit", "word", "punct", "word"],
                       "atom_1": [0, 0, 1, -1, 1, 0], "share_1": [0.5, 0.7, 0.2, 0.0, 0.9, 0.4]})
ATOMS_1 = {"atom": [0, 1, 2], "n_tokens": [3, 2, 0], "domain_specific": [True, False, False],
           "domain_specific_by_sample": [True, True, False], "domain_specific_by_type": [False, True, False],
           "experts": [("L0E1", "L1E2"), ("L0E0",), ()],
           "label": ["a", "b", "(explains no token)"], "min_q_by_sample": [0.003, 0.002, 1.0],
           "min_q": [0.001, 0.5, 1.0]}


def test_class_table_and_levels_table_by_hand():
    classes = annotation_report.class_table(TOKENS)
    assert classes.loc["word", "tokens"] == 4 and classes.loc["word", "share"] == pytest.approx(4 / 6)
    result = SimpleNamespace(tokens=TOKENS, levels=[_level(1, ATOMS_1)])
    table, values = annotation_report.levels_table(result)
    assert table.loc[1, "atoms explaining a token"] == 2 and table.loc[1, "domain-specific atoms (questions)"] == 2
    assert values == {"best_share_1": 45.0, "n_explaining_1": 2, "unexplained_1": pytest.approx(100 / 6)}


def test_atom_view_and_shortest_questions():
    view = annotation_report.atom_view(_level(1, ATOMS_1), 2)
    assert view["atom"].tolist() == [0, 1] and view.columns.tolist() == ["atom", "experts", "tokens", "label",
                                                                         "q (questions)"]
    assert view.loc[0, "experts"] == "L0E1 L1E2"
    assert annotation_report.shortest_questions(TOKENS, ["math", "law"]) == [
        (2, "math (question 2, 1 tokens)"), (1, "law (question 1, 2 tokens)")]


def test_hierarchy_of_one_level_and_token_columns():
    shown, values = annotation_report.hierarchy_findings(SimpleNamespace(levels=[None]), None, [0])
    assert shown is None and values == dict.fromkeys(annotation_report.HIERARCHY_VALUES, 0)
    with pytest.raises(ValueError, match="granularity='token'"):
        annotation_report.require_token_columns(SimpleNamespace(manifest_={"x_spec": {"granularity": "sample"}}), "p")
    annotation_report.require_token_columns(SimpleNamespace(manifest_={}), "p")  # token columns by default


def test_enrichment_summary_counts_by_hand():
    pairs = {"atom": [0, 0, 1, 1], "category": ["math", "law", "math", "law"]}
    by_token = pd.DataFrame({**pairs, "n_atom": [3, 3, 2, 2], "overlap": [3, 0, 1, 1], "expected": [2.0, 1.0, 1.3, 0.7],
                             "lift": [1.5, 0.0, 0.75, 1.5], "p": [0.001, 1, 0.5, 0.4], "q": [0.001, 1, 0.5, 0.5],
                             "significant": [True, False, False, False]})
    by_sample = pd.DataFrame({**pairs, "n_atom": [3, 3, 2, 2], "lift": [1.4, 0.1, 1.8, 0.2], "p": [0.003, 1, 0.001, 1],
                              "q": [0.003, 1, 0.002, 1], "significant": [True, False, True, False]})
    by_type = pd.DataFrame({**pairs, "lift": [1.0, 1.0, 1.6, 0.5], "p": [0.4, 0.6, 0.001, 1], "q": [0.5, 0.6, 0.004, 1],
                            "significant": [False, False, True, False]})
    level = _level(1, ATOMS_1, by_token, by_sample, by_type)
    shown, table, values = annotation_report.enrichment_summary(level, ["law", "math"], correction="bh", n=5)
    assert shown == [1, 0]  # question-level q: atom 1 (0.002) before atom 0 (0.003)
    assert table["atom"].tolist() == [1, 0] and table["label"].tolist() == ["b", "a"]
    assert table["q (tokens)"].tolist() == [0.5, 0.001] and table["q (given the token)"].tolist() == [0.004, 0.5]
    assert table["lift given the token"].tolist() == [1.6, 1.0]
    assert values == {"n_tested_1": 2, "n_specific_1": 1, "n_specific_sample_1": 2, "n_specific_both_1": 1,
                      "n_specific_type_1": 1, "n_specific_sample_type_1": 1, "n_token_only_1": 0,
                      "correction": "Benjamini-Hochberg", "specific_per_category": "law: 0, math: 2"}
    broken = by_type.assign(q=[0.3, 0.6, 0.0005, 1])  # a q below its p cannot come from a correction
    with pytest.raises(RuntimeError, match=r"below its p-value \(enrichment over types\)"):
        annotation_report.enrichment_summary(_level(1, ATOMS_1, by_token, by_sample, broken), ["law", "math"],
                                             correction="bh", n=5)


def test_domain_summary_of_a_store(olmoe, tmp_path):
    from moe_utils.capture.routing import capture_routing

    from .conftest import TEXTS

    model, tok = olmoe
    store = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", labels=list("aabbbcc"), progress=False)
    profiles, similarity, _, pairs, values = annotation_report.domain_summary(store)
    unit = profiles.to_numpy() / np.linalg.norm(profiles.to_numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(similarity.to_numpy(), unit @ unit.T)  # cosine similarity, computed directly
    best = max(((a, b) for a in "abc" for b in "abc" if a < b), key=lambda p: similarity.loc[p[0], p[1]])
    assert values["closest_pair"] == f"{best[0]} and {best[1]}" and len(pairs) == 3
    intervals, within, stability = annotation_report.similarity_intervals(store, n_boot=50)
    for row in intervals.itertuples():  # the same cosines, from per-question counts
        assert row.cosine == pytest.approx(similarity.loc[row.a, row.b])
    assert (intervals.loc[0, "a"], intervals.loc[0, "b"]) == best and within["domain"].tolist() == list("abc")
    assert stability["closest_share"] == pytest.approx(intervals.loc[0, "closest_share"] * 100)


def test_findings_open_with_the_verdict_the_numbers_support():
    specific = {"n_tested_1": 94, "n_specific_sample_1": 40, "n_specific_sample_type_1": 21, "n_token_only_1": 29,
                "correction": "Benjamini-Hochberg"}
    closeness = {"closest_pair": "math and physics", "closest_cos": 0.97, "farthest_pair": "law and math",
                 "farthest_cos": 0.73}
    stable = {"closest_share": 99.0, "closest_low": 0.96, "closest_high": 0.98, "below_within_share": 97.0,
              "within_verdict": "both domains are more alike to themselves than to each other"}
    found = annotation_report.findings("embedded", specific, closeness, stable, alpha=0.01)
    assert found["finding_domain_atoms"].startswith("About half of the atoms that prefer a domain keep")
    most = annotation_report.findings("embedded", {**specific, "n_specific_sample_type_1": 30}, closeness, stable,
                                      alpha=0.01)
    assert most["finding_domain_atoms"].startswith("Most atoms that prefer a domain keep")
    assert "40 of 94 level-1 atoms" in found["finding_domain_atoms"] and "21 of them" in found["finding_domain_atoms"]
    assert found["finding_domain_similarity"].startswith("Math and physics use experts most alike")
    assert "closest in 99% of the question resamples" in found["finding_domain_similarity"]
    unstable = {**stable, "closest_share": 50.5}
    found = annotation_report.findings("embedded", {**specific, "n_specific_sample_type_1": 5}, closeness, unstable,
                                       alpha=0.01)
    assert found["finding_domain_atoms"].startswith("Most domain preferences of the atoms go with the tokens")
    assert found["finding_domain_similarity"].startswith("Which domains use experts most alike is not settled")
    none = annotation_report.findings("embedded", {**specific, "n_specific_sample_1": 0}, closeness, stable, alpha=0.01)
    assert none["finding_domain_atoms"].startswith("No level-1 atom prefers a domain")
