"""The random-mask reference distribution (moe_utils.compression.reference): matched masks keep exactly
a method's per-layer counts, uniform masks are the registry's random masks, and a method's placement
(percentile, difference from the distribution's mean) equals its hand computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moe_utils.compression.caep import PruningBudget, random_mask
from moe_utils.compression import reference
from moe_utils.compression.value import Compression

BUDGET = PruningBudget((8, 8, 8), 2)


def test_matched_masks_keep_exactly_the_counts_and_are_uniform_within_layers():
    counts = np.array([6, 2, 4])
    masks = np.stack([reference.matched_random_mask(BUDGET, counts, seed) for seed in range(2000)])
    for keep in masks[:50]:
        assert BUDGET.kept_per_layer(keep).tolist() == counts.tolist()
    # each expert of a layer is kept with probability counts / size (binomial: 4 standard errors)
    share = masks.mean(axis=0)
    expected = np.repeat(counts / 8, 8)
    assert np.abs(share - expected).max() < 4 * np.sqrt(0.25 / 2000)
    assert len({m.tobytes() for m in masks}) > 1000  # not a handful of masks repeated


def test_matched_masks_with_the_quota_are_the_random_masks():
    for ratio in (0.25, 0.5, 0.75):
        for seed in range(5):
            np.testing.assert_array_equal(reference.matched_random_mask(BUDGET, BUDGET.quota(ratio), seed),
                                          random_mask(BUDGET, ratio, seed))


def test_matched_counts_are_checked():
    with pytest.raises(ValueError, match="counts"):
        reference.matched_random_mask(BUDGET, [9, 2, 2], 0)


def _global(counts):
    keep = np.zeros(24, dtype=bool)
    for layer, n in enumerate(counts):
        keep[layer * 8: layer * 8 + n] = True
    return keep


def test_reference_masks_one_distribution_per_distinct_allocation():
    quota = BUDGET.quota(0.5)
    methods = [Compression("caep", 0.5, _global([6, 2, 4])), Compression("reap", 0.5, _global(quota)),
               Compression("caep_layer", 0.5, _global(quota)), Compression("output", 0.5, _global([6, 2, 4]))]
    masks = reference.reference_masks(methods, BUDGET, [0.5], n_masks=5, skip_seeds=[0, 1])
    names = pd.Series([m.method for m in masks]).value_counts()
    assert names.to_dict() == {"random": 3, "random [caep allocation]": 5}  # output shares caep's allocation
    for m in masks:
        want = [6, 2, 4] if m.method != "random" else quota.tolist()
        assert BUDGET.kept_per_layer(m.keep).tolist() == want
    assert reference.allocations(methods, BUDGET) == {
        ("caep", 0.5): "random [caep allocation]", ("reap", 0.5): "random",
        ("caep_layer", 0.5): "random", ("output", 0.5): "random [caep allocation]"}
    with pytest.raises(ValueError, match="at least 2"):
        reference.reference_masks(methods, BUDGET, [0.5], n_masks=1)


def _samples(rng, models):
    """Per-document rows of BLiMP-like pairs (two paradigms) and WikiText-like articles."""
    rows = []
    for method, seed, p_correct, nats in models:
        for task in ("blimp_wh_island", "blimp_passive_1"):
            for doc in range(30):
                rows.append({"method": method, "ratio": 0.5, "seed": seed, "task": task, "doc_id": doc,
                             "correct": float(rng.random() < p_correct), "loglikelihood": np.nan,
                             "n_words": np.nan, "n_bytes": np.nan})
        for doc in range(6):
            rows.append({"method": method, "ratio": 0.5, "seed": seed, "task": "wikitext2_ppl", "doc_id": doc,
                         "correct": np.nan, "loglikelihood": -nats * (100 + doc), "n_words": 100.0 + doc,
                         "n_bytes": 500.0})
    frame = pd.DataFrame(rows)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def test_placement_against_hand_computation():
    rng = np.random.default_rng(0)
    models = [("caep", None, 0.8, 4.0), ("reap", None, 0.6, 5.0)]
    models += [("random", s, 0.5 + 0.02 * s, 4.5 + 0.1 * s) for s in range(6)]
    models += [("random [caep allocation]", s, 0.55 + 0.05 * s, 3.8 + 0.1 * s) for s in range(4)]
    samples = _samples(rng, models)
    dist = {("caep", 0.5): "random [caep allocation]", ("reap", 0.5): "random"}
    placed = reference.placement(samples, ["blimp", "wikitext"], dist, n_boot=300).set_index(
        ["measure", "method", "distribution"])
    assert set(placed.index) == {(m, meth, d) for m in ("blimp", "wikitext") for meth, d in
                                 (("caep", "uniform"), ("caep", "matched"), ("reap", "uniform"))}

    def macro(method, seed=None):
        part = samples[(samples["method"] == method) & samples["task"].str.startswith("blimp")]
        if seed is not None:
            part = part[part["seed"] == seed]
        return part.groupby("task")["correct"].mean().mean()

    rand = np.array([macro("random", s) for s in range(6)])
    row = placed.loc[("blimp", "caep", "uniform")]
    assert row["score"] == pytest.approx(macro("caep"))
    assert row["estimate"] == pytest.approx(macro("caep") - rand.mean())
    assert row["percentile"] == pytest.approx(100 * np.mean((macro("caep") > rand) + 0.5 * (macro("caep") == rand)))
    assert row["n_masks"] == 6 and row["low"] <= row["estimate"] <= row["high"]
    matched = np.array([macro("random [caep allocation]", s) for s in range(4)])
    assert placed.loc[("blimp", "caep", "matched"), "reference_mean"] == pytest.approx(matched.mean())
    # perplexity: lower is better; caep's 4.0 nats per word beats every uniform mask (4.5 .. 5.0)
    assert placed.loc[("wikitext", "caep", "uniform"), "percentile"] == 100
    assert placed.loc[("wikitext", "caep", "matched"), "percentile"] == pytest.approx(100 * 1.5 / 4)  # 3.8; 3.9 tie
    compared = reference.matched_comparisons(placed.reset_index())
    assert set(compared["reference"]) == {reference.MATCHED_REFERENCE} and set(compared["method"]) == {"caep"}


def test_reference_figure_places_every_method_on_its_distributions():
    from moe_utils.common import plotting

    rows = [{"method": "random", "ratio": r, "seed": s, "measure": "blimp", "value": 0.5 + 0.01 * s}
            for r in (0.25, 0.5) for s in range(5)]
    rows += [{"method": "random [caep allocation]", "ratio": 0.5, "seed": s, "measure": "blimp", "value": 0.6}
             for s in range(3)]
    rows += [{"method": m, "ratio": r, "seed": None, "measure": "blimp", "value": v}
             for m, v in (("caep", 0.7), ("reap", 0.4)) for r in (0.25, 0.5)]
    fig = plotting.reference_distribution(pd.DataFrame(rows), {"blimp": "BLiMP"},
                                          ["random", "random [caep allocation]"])
    axes = fig.axes
    assert len(axes) == 2 and [a.get_title() for a in axes] == ["25% pruned", "50% pruned"]
    assert [t.get_text() for t in axes[1].get_yticklabels()] == [
        "random (5 masks)", "random [caep allocation] (3 masks)", "caep", "reap"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["random (5 masks)", "caep", "reap"]
    # the methods' diamonds sit at their scores
    diamonds = [c.get_offsets()[0][0] for c in axes[1].collections if len(c.get_offsets()) == 1]
    assert sorted(diamonds) == [0.4, 0.7]
