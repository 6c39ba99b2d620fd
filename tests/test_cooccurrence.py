"""Gram-matrix co-selection counts against exhaustive enumeration of each column's subsets."""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import scipy.sparse as sp

from moe_utils.patterns import cooccurrence, atoms as patterns
from moe_utils.patterns.cooccurrence import Cooccurrence


def _exhaustive(selected: np.ndarray, order: int) -> Counter:
    """Reference: every ``order``-subset of each column's non-zero rows, counted."""
    counts = Counter()
    for column in selected.T:
        counts.update(combinations(np.nonzero(column)[0].tolist(), order))
    return counts


def _reference_coverage(atoms, selected: np.ndarray, order: int, percents, mode: str) -> list[float]:
    """Reference: the top k% of the exhaustively counted sets, ranked by count, ties sharing a rank."""
    counts = _exhaustive(selected, order)
    ranked = sorted(counts.values(), reverse=True)
    eligible = [sorted(a[:order]) if mode == "core" else list(a) for a in atoms if len(a) >= order]
    out = []
    for percent in percents:
        cutoff = ranked[max(1, math.ceil(percent / 100 * len(ranked))) - 1]
        covered = [all(counts.get(tuple(sorted(s)), 0) >= cutoff for s in combinations(a, order)) for a in eligible]
        out.append(float(np.mean(covered)))
    return out


def _random_store(seed: int) -> np.ndarray:
    """Experts x columns, a varying number of non-zero (non-binary) entries per column."""
    rng = np.random.default_rng(seed)
    return (rng.random((14, 240)) < 0.3) * rng.uniform(0.1, 1.0, (14, 240))


def _routing_store(seed: int, n_layers=3, n_experts=6, top_k=2, n_tokens=300) -> np.ndarray:
    """Structured: each token selects ``top_k`` experts per layer, with skewed expert popularity,
    a planted cross-layer triplet and repeated columns (many tied counts)."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(n_experts, 0.5))
    x = np.zeros((n_layers * n_experts, n_tokens))
    for t in range(n_tokens):
        for layer in range(n_layers):
            picks = rng.choice(n_experts, top_k, replace=False, p=popularity)
            if t % 4 == 0 and layer < 2:
                picks = np.array([0, 1]) if layer == 0 else np.array([3, picks[0] if picks[0] != 3 else 4])
            x[layer * n_experts + picks, t] = 1
    x[:, 250:] = x[:, :50]  # repeated tokens: ties
    return x


STORES = [_random_store(0), _random_store(1), _routing_store(0), _routing_store(1, n_experts=5, top_k=3)]


@pytest.mark.parametrize("store", range(len(STORES)))
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("gram_first", [False, True])  # sets counted through bitsets, or read from B^T B
def test_histogram_ranks_and_counts_match_exhaustive_counting(store, order, gram_first, monkeypatch):
    monkeypatch.setattr(cooccurrence, "_BLOCK_ENTRIES", 500)  # several blocks of tokens and of sets
    dense = STORES[store]
    expected = _exhaustive(dense, order)
    counts = Cooccurrence(sp.csr_matrix(dense), max_columns=None)
    if not gram_first:
        observed = list(expected)
        np.testing.assert_array_equal(counts.count(np.array(observed)), [expected[s] for s in observed])
    hist = counts.histogram(order)
    assert hist[0] == 0 and counts.n_observed(order) == len(expected)
    np.testing.assert_array_equal(hist, np.bincount(list(expected.values()), minlength=dense.shape[1] + 1) * (
        np.arange(dense.shape[1] + 1) > 0))
    ranked = sorted(expected.values(), reverse=True)
    assert [counts.count_at_rank(order, r) for r in range(1, len(ranked) + 1)] == ranked
    observed = list(expected)
    np.testing.assert_array_equal(counts.count(np.array(observed)), [expected[s] for s in observed])
    every = np.array(list(combinations(range(dense.shape[0]), order)))
    np.testing.assert_array_equal(counts.count(every[:, ::-1]),  # any order of the rows in a set
                                  [expected.get(tuple(s), 0) for s in every])


@pytest.mark.parametrize("store", range(len(STORES)))
@pytest.mark.parametrize("mode", ["core", "all"])
def test_coverage_matches_coverage_from_exhaustive_counting(store, mode):
    dense = STORES[store]
    rng = np.random.default_rng(store)
    frequent = [list(k) for k, _ in _exhaustive(dense, 3).most_common(6)]
    atoms = frequent + [list(rng.choice(dense.shape[0], size, replace=False)) for size in (2, 3, 4, 5, 2, 3)]
    percents = (1, 2, 5, 10, 20, 50, 75, 100)
    table = patterns.coverage(atoms, sp.csr_matrix(dense), orders=(2, 3), top_percent=percents, mode=mode,
                              max_columns=None)
    for order in (2, 3):
        got = table[table["order"] == order]["coverage"].tolist()
        assert got == pytest.approx(_reference_coverage(atoms, dense, order, percents, mode))
    assert set(table["n_columns"]) == {dense.shape[1]}


def test_a_subsample_of_columns_is_counted_exactly():
    dense = _routing_store(2)
    counts = Cooccurrence(sp.csr_matrix(dense), max_columns=120, random_state=3)
    keep = np.sort(np.random.default_rng(3).choice(dense.shape[1], 120, replace=False))
    expected = _exhaustive(dense[:, keep], 3)
    assert (counts.n_columns, counts.n_columns_total) == (120, dense.shape[1])
    assert counts.n_observed(3) == len(expected)
    np.testing.assert_array_equal(counts.count(np.array(list(expected))), list(expected.values()))


def test_shared_counts_give_the_same_coverage_and_bad_input_is_refused():
    dense = _routing_store(3)
    counts = Cooccurrence(dense, max_columns=None)
    atoms = [[0, 1, 9], [2, 7]]
    assert patterns.coverage(atoms, counts).equals(patterns.coverage(atoms, sp.csc_matrix(dense), max_columns=None))
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        counts.histogram(4)
    with pytest.raises(ValueError, match="expert rows"):
        counts.count([[0, 99]])
    with pytest.raises(ValueError, match="repeat"):
        counts.count([[2, 2]])
    with pytest.raises(ValueError, match="rank must be"):
        counts.count_at_rank(2, counts.n_observed(2) + 1)
    with pytest.raises(ValueError, match="max_columns"):
        Cooccurrence(dense, max_columns=0)
    empty = Cooccurrence(sp.csr_matrix((5, 10)))
    assert empty.n_observed(3) == 0
    table = patterns.coverage([[0, 1, 2]], empty, top_percent=(10,))
    assert table["coverage"].tolist() == [0.0, 0.0]


def test_counting_cost_does_not_grow_with_the_subsets_of_a_column():
    """A top-8 shape (24 layers x 32 experts) that exhaustive enumeration could not count: 1.2 million
    triplets per token. The Gram counts still agree with enumeration on a few tokens' worth of sets."""
    rng = np.random.default_rng(0)
    n_layers, n_experts, top_k, n_tokens = 24, 32, 8, 200
    rows = (np.arange(n_layers)[:, None] * n_experts
            + np.array([rng.choice(n_experts, top_k, replace=False) for _ in range(n_layers)]))
    x = np.zeros((n_layers * n_experts, n_tokens), np.float32)
    for t in range(n_tokens):
        layer_rows = (np.arange(n_layers)[:, None] * n_experts
                      + np.array([rng.choice(n_experts, top_k, replace=False) for _ in range(n_layers)]))
        x[(rows if t % 2 else layer_rows).ravel(), t] = 1  # every other token repeats one routing
    counts = Cooccurrence(sp.csr_matrix(x), max_columns=None)
    sample = np.array([sorted(rng.choice(rows.ravel(), 3, replace=False)) for _ in range(50)])
    expected = [int(np.all(x[s] > 0, axis=0).sum()) for s in sample]
    np.testing.assert_array_equal(counts.count(sample), expected)
    hist = counts.histogram(3)
    # every token's C(192, 3) triplets are in the histogram exactly once per token
    assert int(hist @ np.arange(len(hist))) == n_tokens * math.comb(n_layers * top_k, 3)
    assert counts.count_at_rank(3, 1) >= max(expected) >= n_tokens // 2
    assert counts.n_observed(3) >= math.comb(n_layers * top_k, 3)
