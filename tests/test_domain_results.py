"""Stage 5 assembled (moe_utils.stages.mmlu_pro_results): the evaluation grid with held-out questions left
out, the Fig 9 analysis on a planted diagonal, the findings, accuracies against the Wilson formula
written out, stage 4's breakdown, and the checksummed artifact."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from moe_utils.stages import mmlu_pro_results as results5
from moe_utils.common import stats
from moe_utils.common.artifacts import ArtifactError
from moe_utils.compression.pruning import PruningMask
from moe_utils.stages import stage_paths

from .test_domains import _docs, _stage4_results

CATS = ["math", "law", "physics", "psychology"]  # 4! = 24 permutations: p can fall below 0.05


def test_domain_metric():
    assert results5.domain_metric("embedded") == ("bits_per_byte", "bits per byte")
    assert results5.domain_metric("random:olmoe")[0] == "bits_per_byte"
    assert results5.domain_metric("org/real-moe") == ("acc", "accuracy")
    assert results5.domain_metric("embedded", "byte_perplexity") == ("byte_perplexity", "byte perplexity")
    with pytest.raises(ValueError, match="domain_metric must be one of"):
        results5.domain_metric("embedded", "f1")


def test_inputs_are_checked_against_the_profile():
    store = SimpleNamespace(tokens=pd.DataFrame({"sample_id": [0, 0, 1], "label": ["math", "math", "law"]}),
                            manifest={"model": {"name": "embedded"}})
    results5.check_inputs(store, ["math", "law"], "embedded")
    with pytest.raises(ValueError, match=r"no tokens of \['physics'\]"):
        results5.check_inputs(store, ["math", "physics"], "embedded")
    with pytest.raises(ValueError, match="not 'random:olmoe': re-run 01_capture"):
        results5.check_inputs(store, ["math"], "random:olmoe")
    assert results5.domain_calibration(store, ["q0", "q1"], ["math", "law"], ["math", "law"]) == {
        "math": ["q0"], "law": ["q1"]}
    with pytest.raises(ValueError, match="other questions"):
        results5.domain_calibration(store, ["q0", "q1"], ["law", "math"], ["math", "law"])


def _planted_grid(rng):
    """Per-question scores where pruning for a domain costs it 5% of log-likelihood, others 30%."""
    base = {c: list(-rng.uniform(20, 40, size=12)) for c in CATS}
    original = _docs(base)
    docs = {("unpruned", "-", "ppl"): original}
    for method, own in (("caep", 1.05), ("frequency", 1.3)):  # frequency: no diagonal
        for target in CATS:
            frame = _docs({c: [ll * (own if c == target else 1.3) * rng.uniform(0.98, 1.02) for ll in base[c]]
                           for c in CATS})
            frame["question_id"] = original["question_id"]
            docs[(method, target, "ppl")] = frame
    docs[("caep", "all domains", "ppl")] = docs[("frequency", "math", "ppl")]
    return results5.EvaluationGrid(docs, pd.DataFrame(), "ppl", {"n_questions_min": 12, "n_questions_max": 12})


def test_fig9_analysis_and_findings_on_a_planted_diagonal():
    grid = _planted_grid(np.random.default_rng(0))
    results, values = results5.diagonal_results(grid, ["caep", "frequency"], CATS, metric="byte_perplexity",
                                                confidence=0.95, n_boot=200, seed=0)
    assert values["p_caep"] == pytest.approx(1 / math.factorial(4)) and values["best_cols_caep"] == 4
    assert values["adv_low_caep"] > 0 and values["p_baseline"] > values["p_caep"]
    cells, shown = results5.cells_table(results, CATS)
    assert len(cells) == 2 * 16 and shown.shape == (8, 4) and set(cells["method"]) == {"CAEP", "frequency"}
    cell = cells[(cells["method"] == "CAEP") & (cells["target"] == "law") & (cells["evaluated"] == "law")].iloc[0]
    assert shown.loc[("CAEP", "law"), "law"] == f"{cell['change'] * 100:+.1f} [{cell['low'] * 100:+.1f}, " \
                                                f"{cell['high'] * 100:+.1f}]"
    matrices, subtitles = results5.heatmaps(results, CATS)
    assert list(matrices) == ["CAEP", "frequency"] and "best in 4/4 columns" in subtitles["CAEP"]
    figure = results5.heatmap_figure(results, CATS, metric="byte_perplexity", metric_label="bpb", ratio=0.5, model="m")
    assert any(subtitles["CAEP"] in ax.get_title() for ax in figure.axes)
    assert figure.get_suptitle() == "Pruned 50% for one domain, evaluated on every domain (m)"
    versus, gain = results5.versus_general(grid, CATS, metric="byte_perplexity", confidence=0.95, n_boot=50, seed=0)
    assert gain["gain_positive"] == (versus["low"] > 0).sum() and gain["gain_mean"] > 0
    masks = SimpleNamespace(baseline="frequency", values={"jaccard_mean": 0.25})
    found = results5.findings("embedded", CATS, n_per_category=20, ratio=0.5, metric_label="byte perplexity",
                              grid=grid, masks=masks, results=results, versus=versus,
                              accuracy={"acc_unpruned": 30.0, "acc_chance": 10.0}, first_to_break=None,
                              confidence=0.95, detectable=0.031)
    assert found["finding_diagonal_verdict"].startswith("On embedded, the diagonal of CAEP's domain x domain matrix "
                                                        "is better than permuted domain labels")
    assert found["finding_diagonal_verdict"].endswith("with 80% power only from 3.1 points on")
    assert found["finding_diagonal_mde_caep"] == pytest.approx(3.1)
    assert found["finding_first_to_break"] == "n/a" and "scores on 12-12 other questions" in found["finding_data"]
    flat = results5.findings("embedded", CATS, n_per_category=20, ratio=0.5, metric_label="m", grid=grid,
                             masks=SimpleNamespace(baseline="caep", values={"jaccard_mean": 0.0}),
                             results={"caep": results["frequency"]}, versus=versus, accuracy=found | {
                                 "acc_unpruned": 1.0, "acc_chance": 1.0}, first_to_break="law", confidence=0.95,
                             detectable=float("nan"))
    assert "not distinguishable from" in flat["finding_diagonal_verdict"]
    power, detectable = results5.diagonal_power(results, CATS, 0.95, "byte_perplexity", 0, n_sizes=5)
    assert len(power) == 5 and power["advantage"].iloc[0] == 0 and power["power"].between(0, 1).all()
    expected = stats.detectable_advantage(power)  # the smallest planted size detected with 80% power
    assert (np.isnan(detectable) and np.isnan(expected)) or detectable == expected


def test_evaluation_grid_leaves_out_the_calibration_questions(monkeypatch):
    calls = []

    def fake_evaluate(model, tokenizer, compressions, runs, *, cache_dir, model_id, threads, progress, num_fewshot,
                      **settings):
        (run,) = runs
        calls.append(([int(np.sum(c.keep)) for c in compressions], tuple(run["tasks"]), run["limit"], num_fewshot))
        docs, results = [], []
        for c in compressions:
            for k, task in enumerate(run["tasks"]):
                docs.append(pd.DataFrame({"digest": c.digest, "task": task, "doc_id": range(3),
                                          "question_id": [3 * k + 1, 3 * k + 2, 3 * k + 3]}))
            results.append({"digest": c.digest, "seconds": 1.0, "cached": c.keep.all()})
        return pd.DataFrame(results), pd.concat(docs, ignore_index=True)

    monkeypatch.setattr(results5, "evaluate_compressions", fake_evaluate)
    masks = {(m, d): PruningMask(m, 0.5, np.array([True, False, True, True] if m == "caep" else [True, True, False, True]))
             for m in ("caep", "reap") for d in ("math", "law")}
    inputs = SimpleNamespace(lm=None, tokenizer=None, model_id={})
    grid = results5.evaluate_grid(inputs, masks, ["math", "law"], metric="byte_perplexity", held_out={1, 4},
                                  ppl_limit=3, mc_limit=2, mc_fewshot=0, settings={}, cache_dir=None)
    assert grid.primary == "ppl" and len(calls) == 2  # one call per family: its models scored together
    assert calls[0] == ([4, 3, 3, 3, 3], ("mmlu_pro_ppl_math", "mmlu_pro_ppl_law"), 3, None)
    assert calls[1] == ([4, 3, 3], ("mmlu_pro_mc_math", "mmlu_pro_mc_law"), 2, 0)  # CAEP's second family
    assert len(grid.log) == 2 + 4 + 2
    assert grid.docs[("reap", "law", "ppl")]["question_id"].tolist() == [2, 3, 5, 6]
    assert grid.values["n_left_out"] == 2 and grid.values["n_questions_min"] == 2 and grid.values["n_cached"] == 2
    assert grid.settings == {"ppl_limit": 3, "mc_limit": 2, "mc_fewshot": 0}  # what the artifact records
    with pytest.raises(ValueError, match="raise the limit"):
        results5.evaluate_grid(inputs, masks, ["math", "law"], metric="acc", held_out={1, 2, 3}, ppl_limit=3,
                               mc_limit=2, mc_fewshot=0, settings={}, cache_dir=None)


def test_accuracy_summary_against_the_wilson_formula(monkeypatch):
    monkeypatch.setattr(results5.domains, "chance_accuracy", lambda ids, data_dir: 0.1)
    correct = {"math": [1, 1, 0, 1], "law": [0, 0, 1, 0]}
    mc = pd.DataFrame([{"task": f"mmlu_pro_mc_{c}", "doc_id": i, "question_id": 10 * k + i, "correct": float(v)}
                       for k, (c, values) in enumerate(correct.items()) for i, v in enumerate(values)])
    grid = results5.EvaluationGrid({("unpruned", "-", "mc"): mc, ("caep", "math", "mc"): mc,
                                    ("caep", "law", "mc"): mc}, pd.DataFrame(), "ppl", {})
    accuracies, chance, values = results5.accuracy_summary(grid, ["math", "law"], confidence=0.95, data_dir=None)
    n, p, z = 8, 4 / 8, 1.959963984540054
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    assert values["acc_unpruned"] == 50.0 and values["acc_n"] == 8 and chance == 0.1
    assert values["acc_unpruned_low"] == pytest.approx((centre - half) * 100)
    assert values["acc_unpruned_high"] == pytest.approx((centre + half) * 100)
    assert len(accuracies) == 3 * 2  # unpruned and CAEP for each domain, per domain


def test_stage4_breakdown_with_and_without_stage_4():
    breakdown, cells, label, values = results5.stage4_breakdown(None, CATS, metric="byte_perplexity")
    assert breakdown.empty and cells is None and values["first_to_break"] == "n/a (stage 4 missing)"
    assert math.isnan(values["first_ratio_pct"])
    breakdown, cells, label, values = results5.stage4_breakdown(_stage4_results(), ["math", "law"],
                                                                metric="byte_perplexity")
    assert label == "bits per byte" and values["first_ratio_pct"] == 25.0
    assert values["first_to_break"] == "law" and values["last_to_break"] == "math"  # law pays 5% more everywhere
    assert cells.columns.tolist() == ["math", "law"] and ".." in cells.loc[("random", 0.5), "law"]


def test_results_artifact_is_checksummed(tmp_path):
    paths = stage_paths(tmp_path)
    inputs = SimpleNamespace(store=SimpleNamespace(manifest={"model": {"name": "embedded"}}), stage4=None)
    masks = {("caep", "math"): PruningMask("caep", 0.5, np.array([True, False])),
             ("caep", "all domains"): PruningMask("caep", 0.5, np.array([False, True]))}
    cells, versus = pd.DataFrame({"change": [0.1]}), pd.DataFrame({"gain": [0.2]})
    fitted = SimpleNamespace(masks=masks, settings={"ratio": 0.5, "baseline": "frequency"})
    grid = SimpleNamespace(settings={"ppl_limit": 40})
    written = results5.save_results(paths, inputs, fitted, grid, cells, versus, {"finding_model": "embedded"},
                                    analysis={"seed": 3})
    keeps, cells_read, _, manifest = results5.load_results(paths.results)
    assert list(keeps) == ["caep:math", "caep:all domains"] and keeps["caep:math"].tolist() == [True, False]
    assert manifest == written and manifest["stage4"] is None and cells_read["change"].item() == 0.1
    assert manifest["parameters"] == {"ratio": 0.5, "baseline": "frequency", "ppl_limit": 40, "seed": 3}
    (paths.results / "cells.csv").write_text("change\n0.2\n")
    with pytest.raises(ArtifactError, match="checksum of cells.csv"):
        results5.load_results(paths.results)


def test_versus_general_sentence_counts_domains_both_ways():
    versus = pd.DataFrame({"domain": ["math", "law", "physics"], "gain": [0.02, -0.03, 0.001],
                           "low": [0.01, -0.05, -0.01], "high": [0.03, -0.01, 0.012]})
    text = results5.versus_general_sentence(versus, "embedded", "bits per byte")
    assert text.startswith("On embedded, CAEP fitted on one domain is mixed against CAEP fitted on all domains")
    assert "more in 2 of 3 domains" in text and "above zero in 1 (math) and below zero in 1 (law)" in text
    worse = versus.assign(low=versus["low"] - 0.1, gain=-versus["gain"].abs(), high=[-0.01, -0.01, 0.0])
    assert "is worse than CAEP fitted on all domains" in results5.versus_general_sentence(worse, "m", "x")


def test_calibration_texts_are_the_stores_questions_by_domain(monkeypatch):
    texts, labels = ["q1", "q2", "q3", "q4"], ["math", "law", "math", "law"]
    asked = []

    def fake_prompts(categories, *, n_per_category, seed, data_dir):
        asked.append((list(categories), n_per_category, seed, data_dir))
        return texts, labels, None

    monkeypatch.setattr(results5, "load_prompts", fake_prompts)
    store = SimpleNamespace(tokens=pd.DataFrame({"sample_id": [0, 0, 1, 2, 3, 3], "label": ["math", "math", "law",
                                                                                           "math", "law", "law"]}))
    assert results5.calibration_texts(store, ["math", "law"], n_per_category=2, seed=5, data_dir="d") == {
        "math": ["q1", "q3"], "law": ["q2", "q4"]}
    assert asked == [(["math", "law"], 2, 5, "d")]
    other = SimpleNamespace(tokens=store.tokens.assign(label=["law"] * 6))
    with pytest.raises(ValueError, match="re-run stage 1"):
        results5.calibration_texts(other, ["math", "law"], n_per_category=2, seed=5)


def test_calibration_questions_are_those_load_prompts_draws(monkeypatch):
    from moe_utils.evaluation.data import load_prompts

    from .conftest import SHARED_DATA

    if not (SHARED_DATA / "mmlu_pro").is_dir():
        pytest.skip("needs the local MMLU-Pro copy")
    monkeypatch.setenv("MOE_MMLU_PRO_DIR", str(SHARED_DATA / "mmlu_pro"))
    store = SimpleNamespace(manifest={"data": {"categories": ["math", "law"], "n_per_category": 3, "seed": 2}})
    drawn = load_prompts(["math", "law"], n_per_category=3, seed=2)[2]["question_id"]
    assert results5.calibration_questions(store) == {int(i) for i in drawn} and len(drawn) == 6
    assert results5.calibration_questions(SimpleNamespace(manifest={})) == set()  # no spec: none left out
