"""Stage 4's per-document evaluation (moe_utils.compression.evaluate, measures of moe_utils.evaluation.pruning_eval) through the real harness on the
embedded model: cached per mask, aligned over models, and its measures equal to the harness's own
numbers and to hand computations from the per-document rows."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_utils import pruning_eval  # noqa: E402
from moe_utils.compression.caep import PruningBudget, random_mask  # noqa: E402
from moe_utils.compression.evaluate import evaluate_compressions  # noqa: E402
from moe_utils.compression.pruning import PruningMask, unpruned_mask  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DIRS = dict(blimp_dir=Path(os.environ.get("MOE_BLIMP_DIR") or SHARED / "blimp"),
            wikitext_dir=Path(os.environ.get("MOE_WIKITEXT_DIR") or SHARED / "wikitext-2"))
RUNS = [{"tasks": ["blimp_wh_island", "blimp_passive_1"], "limit": 5}, {"tasks": ["wikitext2_ppl"], "limit": 1}]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from moe_utils.models.loading import load_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model("embedded")
    budget = PruningBudget((16,) * 6, 2)
    masks = [unpruned_mask(96)] + [PruningMask("random", 0.5, random_mask(budget, 0.5, s), seed=s)
                                   for s in (0, 1)]
    cache = tmp_path_factory.mktemp("cache")
    first = evaluate_compressions(model, tok, masks, RUNS, cache_dir=cache, progress=False, batch_size=16,
                                  max_length=256, **DIRS)
    second = evaluate_compressions(model, tok, masks, RUNS, cache_dir=cache, progress=False, batch_size=16,
                                   max_length=256, **DIRS)
    torch.set_num_threads(before)
    return first, second


def test_documents_are_kept_and_cached(evaluated):
    (results, samples), (results2, samples2) = evaluated
    assert not results["cached"].any() and results2["cached"].all()
    assert samples.equals(samples2)
    counts = samples.groupby(["method", "seed"], dropna=False).size()
    assert (counts == 11).all() and len(counts) == 3  # 2 x 5 pairs + 1 article per model


def test_a_warm_run_reads_back_exactly_what_the_cold_run_computed(evaluated):
    """Lossless caches: every number of the warm (cached) run equals the cold run's bit for bit,
    and so does everything computed from them (a rounded cache could break a tie the other way)."""
    (results, samples), (results2, samples2) = evaluated
    pd.testing.assert_frame_equal(results.drop(columns="cached"), results2.drop(columns="cached"), check_exact=True)
    pd.testing.assert_frame_equal(samples, samples2, check_exact=True)
    assert results["value"].map(lambda v: len(repr(v))).max() > 12  # numbers a 10-decimal cache would round
    cold = pruning_eval.model_scores(samples, ["blimp", "wikitext"], n_boot=50)
    warm = pruning_eval.model_scores(samples2, ["blimp", "wikitext"], n_boot=50)
    pd.testing.assert_frame_equal(cold, warm, check_exact=True)


def test_measures_match_the_harness_and_hand_computation(evaluated):
    results, samples = evaluated[0]
    scores = pruning_eval.model_scores(samples, ["blimp", "wikitext"], n_boot=200).set_index(["measure", "method"])
    unpruned = samples[samples["method"] == "unpruned"]
    blimp = unpruned[unpruned["task"].str.startswith("blimp_")]
    macro = blimp.groupby("task")["correct"].mean().mean()
    assert scores.loc[("blimp", "unpruned"), "estimate"] == pytest.approx(macro)
    harness = results[(results["method"] == "unpruned") & (results["task"] == "wikitext2_ppl")
                      & (results["metric"] == "word_perplexity")]["value"].iloc[0]
    assert scores.loc[("wikitext", "unpruned"), "estimate"] == pytest.approx(harness, rel=1e-9)
    row = scores.loc[("blimp", "random")]
    assert row["n_seeds"] == 2 and row["low"] <= row["estimate"] <= row["high"]

    compared = pruning_eval.comparisons(samples, ["blimp", "wikitext"], n_boot=200)
    assert set(compared["reference"]) == {"unpruned"}  # random is not compared with itself
    acc = compared.set_index("measure").loc["blimp", "estimate"]
    rand = samples[(samples["method"] == "random") & samples["task"].str.startswith("blimp_")]
    assert acc == pytest.approx(rand.groupby("task")["correct"].mean().mean()
                                - blimp.groupby("task")["correct"].mean().mean())
    ppl = compared.set_index("measure").loc["wikitext", "estimate"]
    wiki = samples[samples["task"] == "wikitext2_ppl"].set_index(["method", "seed"])
    log_ppl = -wiki["loglikelihood"] / wiki["n_words"]
    expected = np.exp(log_ppl.loc["random"].mean() - log_ppl.loc["unpruned"].iloc[0]) - 1
    assert ppl == pytest.approx(expected) and ppl > 0  # pruning half the experts hurts


def test_different_documents_are_refused(evaluated):
    samples = evaluated[0][1]
    fewer = samples.drop(samples[(samples["method"] == "random") & (samples["doc_id"] == 4)].index)
    with pytest.raises(ValueError, match="different documents"):
        pruning_eval.measure_values(fewer, "blimp")


def test_other_tasks_become_accuracy_measures():
    """A real model's stock multiple-choice task gets its own paired accuracy measure."""
    import pandas as pd

    rows = []
    for method, ratio, correct in [("unpruned", 0.0, [1, 1, 0, 1]), ("caep", 0.5, [1, 0, 0, 0])]:
        rows += [{"method": method, "ratio": ratio, "seed": pd.NA, "task": "arc_easy", "doc_id": i,
                  "correct": float(c), "loglikelihood": np.nan, "n_words": np.nan, "n_bytes": np.nan, "margin": 0.0}
                 for i, c in enumerate(correct)]
        rows.append({"method": method, "ratio": ratio, "seed": pd.NA, "task": "blimp_wh_island", "doc_id": 0,
                     "correct": 1.0, "loglikelihood": np.nan, "n_words": np.nan, "n_bytes": np.nan, "margin": 1.0})
    samples = pd.DataFrame(rows)
    measures = pruning_eval.available_measures(samples)
    assert measures == ["blimp", "task:arc_easy"]
    compared = pruning_eval.comparisons(samples, measures, references=("unpruned",), n_boot=100).set_index("measure")
    assert compared.loc["task:arc_easy", "estimate"] == pytest.approx(0.25 - 0.75)
    assert pruning_eval.measure_spec("task:arc_easy")[1] == "arc_easy accuracy"
