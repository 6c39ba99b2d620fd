"""CAEP's sensitivity to its inputs (moe_utils.compression.sensitivity): question resamples draw whole
questions, each refit equals CAEP run by hand on a dictionary fitted with that seed or those columns,
and the mask movement is the Jaccard overlap of the pruned experts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from moe_utils.compression import caep
from moe_utils.compression.ablation import is_variant
from moe_utils.compression import sensitivity
from moe_utils.compression.value import Compression
from moe_utils.patterns.hsdl import HSDL
from moe_utils.compression.pruning import hsdl_factors

FAST = dict(n_steps=30, batch_size=64, random_state=0)


def test_resampled_columns_draw_whole_questions():
    questions = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    for seed in range(5):
        cols = sensitivity.resampled_columns(questions, seed)
        drawn = questions[cols]
        # every question drawn brings all its columns, as often as it was drawn
        counts = {q: int((drawn == q).sum()) for q in np.unique(drawn)}
        sizes = {q: int((questions == q).sum()) for q in np.unique(questions)}
        assert all(counts[q] % sizes[q] == 0 for q in counts)
        assert sum(counts[q] // sizes[q] for q in counts) == 4  # as many questions as there are


def test_jaccard_of_pruned_experts():
    a = np.array([1, 0, 0, 1, 0, 1], bool)
    b = np.array([1, 0, 1, 0, 0, 1], bool)
    # pruned: a {1, 2, 4}, b {1, 3, 4}: intersection 2, union 4
    assert sensitivity.jaccard_pruned(a, b) == pytest.approx(0.5)
    assert sensitivity.jaccard_pruned(a, a) == 1.0 and sensitivity.jaccard_pruned(np.ones(3, bool), np.ones(3, bool)) == 1.0


def test_refits_equal_caep_on_refitted_dictionaries(tmp_path):
    rng = np.random.default_rng(0)
    n_layers, n_experts, n_tokens = 3, 6, 240
    dense = np.zeros((n_layers * n_experts, n_tokens), np.float32)
    for t in range(n_tokens):
        for layer in range(n_layers):
            chosen = rng.choice(n_experts, 2, replace=False, p=np.arange(1, n_experts + 1) / 21)
            dense[layer * n_experts + chosen, t] = rng.random(2)
    X = sp.csr_matrix(dense)
    questions = np.repeat(np.arange(24), 10)
    hsdl = HSDL(levels=[1.0], layout=(n_layers, n_experts), **FAST).fit(X)
    budget = caep.PruningBudget((n_experts,) * n_layers, 2)
    rows = sensitivity.caep_refits(hsdl, X, questions, 0.5, budget=budget, threshold_ratio=0.9, seeds=(0, 3),
                                   n_resamples=1, cache_dir=tmp_path)
    assert rows[["input", "setting"]].values.tolist() == [["HSDL seed", "seed 3"],
                                                          ["calibration resample", "resample 1"]]
    assert all(is_variant(m.method) for m in rows["mask"])  # kept out of Table 1
    by_hand = HSDL(levels=[1.0], layout=(n_layers, n_experts), **(FAST | {"random_state": 3})).fit(X)
    expected = caep.caep(*hsdl_factors(by_hand), 0.9, 0.5, budget=budget).keep
    np.testing.assert_array_equal(rows["mask"].iloc[0].keep, expected)
    resampled = HSDL(levels=[1.0], layout=(n_layers, n_experts), **FAST).fit(
        sp.csc_matrix(X)[:, sensitivity.resampled_columns(questions, 0)])
    np.testing.assert_array_equal(rows["mask"].iloc[1].keep,
                                  caep.caep(*hsdl_factors(resampled), 0.9, 0.5, budget=budget).keep)
    reference = caep.caep(*hsdl_factors(hsdl), 0.9, 0.5, budget=budget)
    moved = sensitivity.mask_movement(rows, Compression("caep", 0.5, reference.keep), budget)
    for (_, _, c), j in zip(rows.itertuples(index=False), moved["Jaccard of pruned experts"]):
        assert j == pytest.approx(sensitivity.jaccard_pruned(c.keep, reference.keep))
