"""Chance levels, atom matching and the hierarchy's shape (moe_utils.patterns.hsdl_controls)."""

from __future__ import annotations

from collections import Counter
from itertools import permutations
from math import comb

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moe_utils.patterns import hsdl_controls as hc
from moe_utils.patterns import atoms as patterns
from moe_utils.patterns.cooccurrence import Cooccurrence
from tests.test_token_null import synthetic_store


def test_random_atoms_are_distinct_rows_of_the_right_sizes():
    sizes = [1, 3, 5, 2]
    draws = hc.random_atom_rows(sizes, 12, n_draws=40, seed=1)
    assert draws.shape == (40, 4, 5)
    for draw in draws:
        for atom, size in zip(draw, sizes):
            rows = atom[atom >= 0]
            assert len(rows) == size == len(set(rows.tolist())) and rows.max() < 12
            assert np.all(atom[size:] == -1)


def test_weighted_draws_follow_the_weights():
    weights = np.array([0, 1, 0, 3, 0, 6, 0, 0], dtype=float)
    draws = hc.random_atom_rows([1, 2], 8, n_draws=4000, weights=weights, seed=0)
    assert set(np.unique(draws[:, 1])) <= {1, 3, 5}
    first = np.bincount(draws[:, 0, 0], minlength=8) / 4000
    np.testing.assert_allclose(first, weights / weights.sum(), atol=0.025)
    with pytest.raises(ValueError, match="non-negative"):
        hc.random_atom_rows([1], 8, weights=-weights)


def _successive_sampling(weights, size: int) -> dict[tuple, float]:
    """Exact probability of each ordered tuple of ``size`` distinct rows drawn one after another in
    proportion to the weights of the rows not yet drawn (every weight > 0)."""
    out = {}
    for rows in permutations(range(len(weights)), size):
        p, left = 1.0, float(np.sum(weights))
        for row in rows:
            p *= weights[row] / left
            left -= weights[row]
        out[rows] = p
    return out


def _chi_square_p(draws: np.ndarray, exact: dict[tuple, float]) -> float:
    """p-value of the frequencies of the ordered tuples (rows of ``draws``) against ``exact``."""
    seen = Counter(map(tuple, draws.tolist()))
    assert set(seen) <= set(exact)
    keys = list(exact)
    return stats.chisquare([seen.get(k, 0) for k in keys], [exact[k] * len(draws) for k in keys]).pvalue


@pytest.mark.parametrize("rounds", [0, 1, 4])  # completed by Gumbel keys only, mostly, or rarely
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 3.0, 4.0, 0.5]])
def test_draws_are_successive_sampling_in_draw_order(rounds, weights, monkeypatch):
    """The ordered rows of each atom against the exact successive-sampling probabilities (every
    ordered tuple, including full permutations), whichever path completed them."""
    monkeypatch.setattr(hc, "_ROUNDS", rounds)
    monkeypatch.setattr(hc, "_BLOCK_DRAWS", 5_000)  # several blocks of draws
    w = np.ones(5) if weights is None else np.asarray(weights)
    sizes = [3, 5, 1, 2]
    draws = hc.random_atom_rows(sizes, 5, n_draws=6000, weights=None if weights is None else w, seed=4)
    for atom, size in enumerate(sizes):
        assert _chi_square_p(draws[:, atom, :size], _successive_sampling(w, size)) > 1e-3


def test_rows_of_weight_zero_come_last_in_random_order():
    weights = np.array([0, 1, 0, 3, 0, 6, 0, 0], dtype=float)
    draws = hc.random_atom_rows([5], 8, n_draws=6000, weights=weights, seed=5)[:, 0]
    positive = weights[[1, 3, 5]]
    exact = {tuple(np.array([1, 3, 5])[list(k)]): p for k, p in _successive_sampling(positive, 3).items()}
    assert _chi_square_p(draws[:, :3], exact) > 1e-3
    zeros = {k: 1 / 20 for k in permutations([0, 2, 4, 6, 7], 2)}
    assert _chi_square_p(draws[:, 3:], zeros) > 1e-3


def test_cross_layer_chance_matches_the_exact_probability():
    n_layers, n_experts = 4, 6
    sizes = [2, 3, 3, 4, 1]
    exact = np.mean([1 - n_layers * comb(n_experts, m) / comb(n_layers * n_experts, m) if m > 1 else 0.0
                     for m in sizes])
    chance = hc.cross_layer_chance(sizes, (n_layers, n_experts), n_draws=3000, seed=2)
    assert abs(chance["mean"] - exact) < 0.01
    assert chance["low"] <= exact <= chance["high"]


def test_coverage_chance_of_one_draw_is_patterns_coverage():
    store = synthetic_store(planted=True, n_questions=10, per_question=40)
    from moe_utils.patterns.expert_matrix import expert_matrix

    selected = expert_matrix(store, "token", "binary")
    sizes = [2, 3, 4, 2, 1, 5]
    chance = hc.coverage_chance(sizes, Cooccurrence(selected), percents=(1, 10, 50),
                                n_draws=1, seed=3)
    atoms = [a[a >= 0] for a in hc.random_atom_rows(sizes, selected.shape[0], n_draws=1, seed=3)[0]]
    truth = patterns.coverage(atoms, selected, orders=(2, 3), top_percent=(1, 10, 50))
    merged = chance.merge(truth, on=["order", "top_percent"])
    assert len(merged) == 6
    np.testing.assert_allclose(merged["mean"], merged["coverage"])


def test_match_atoms_is_the_best_one_to_one_matching():
    a = [[0, 1], [2, 3, 4], [5], [1, 2]]
    b = [[2, 3], [0, 1], [5, 6], [1, 2, 3], [7]]
    matched = hc.match_atoms(a, b)

    def jac(x, y):
        return len(set(x) & set(y)) / len(set(x) | set(y))
    best = max(sum(jac(x, b[j]) for x, j in zip(a, perm)) for perm in permutations(range(len(b)), len(a)))
    assert len(matched) == 4 and matched.sum() == pytest.approx(best)
    np.testing.assert_array_equal(hc.match_atoms(a, a[::-1]), np.ones(4))
    summary = hc.stability_summary({"same": hc.match_atoms(a, a), "other": matched})
    assert summary.set_index("comparison").loc["same", "exact"] == 1.0
    assert summary.set_index("comparison").loc["other", "exact"] == 0.25


def test_hierarchy_structure_counts_splits_and_copies():
    tables = pd.DataFrame([
        {"level": 1, "atom": 0, "n_experts": 3, "rows": (0, 1, 2), "alive": True},
        {"level": 1, "atom": 1, "n_experts": 2, "rows": (3, 4), "alive": True},
        {"level": 1, "atom": 2, "n_experts": 2, "rows": (5, 6), "alive": True},
        {"level": 2, "atom": 0, "n_experts": 2, "rows": (0, 1), "alive": True},
        {"level": 2, "atom": 1, "n_experts": 1, "rows": (2,), "alive": True},
        {"level": 2, "atom": 2, "n_experts": 2, "rows": (3, 4), "alive": True},
        {"level": 2, "atom": 3, "n_experts": 3, "rows": (5, 6, 7), "alive": True},
    ])
    edges = pd.DataFrame({"parent": [0, 0, 1, 2], "child": [0, 1, 2, 3], "weight": [1, 1, 1, 1],
                          "share": [0.6, 0.4, 1.0, 0.95]})
    out = hc.hierarchy_structure(tables, edges)
    assert out["n_parents"] == 3 and out["n_split"] == 1 and out["n_copied"] == 2 and out["n_copied_exact"] == 1
    assert out["mean_size_1"] == pytest.approx(7 / 3) and out["mean_size_2"] == 2.0
    assert (out["edges_smaller"], out["edges_same"], out["edges_larger"]) == (0.5, 0.25, 0.25)


def test_surrogate_fits_and_stability_report_every_statistic():
    from moe_utils.patterns.expert_matrix import expert_matrix
    from moe_utils.patterns.hsdl import HSDL

    store = synthetic_store(planted=True, n_questions=8, per_question=50)
    hsdl = HSDL(levels=[1.0, 2.0], n_steps=30, batch_size=128, layout=(store.n_layers, store.n_experts),
                device="cpu", random_state=0)
    hsdl.fit(expert_matrix(store, "token", "weight"))
    table = hc.surrogate_fits(hsdl, store, 0.5, n_surrogates=2)
    assert list(table["surrogate"]) == [0, 1]
    for column in ("rel_error", "n_live_1", "mean_experts_1", "cross_share_1", "cover_pairs_10"):
        assert np.isfinite(table[column]).all()
    X = expert_matrix(store, "token", "weight")
    matched = hc.stability(hsdl, X, store.tokens["sample_id"].to_numpy(), 0.5)
    assert set(matched) == {"another seed", "random initialisation", "question halves"}
    for jaccard in matched.values():
        assert len(jaccard) and np.all((jaccard >= 0) & (jaccard <= 1))
    same = hc.match_atoms(hc.multi_expert_atoms(hsdl, 0.5), hc.multi_expert_atoms(hsdl, 0.5))
    assert np.all(same == 1.0)


def test_finding_says_what_the_controls_show():
    values = dict(cover_pairs_10=73.0, cover_chance_uniform_2_10=10.0, cover_chance_usage_2_10=18.0,
                  surr_cover_pairs_10_min=69.0, surr_cover_pairs_10_max=74.0, surr_vs_cover_pairs_10="within",
                  cross_share_1=90.0,
                  cross_chance_uniform=81.0, cross_vs_chance="above", stable_seed_exact=53.0,
                  tree_mean_size_1=2.48, tree_mean_size_2=2.86)
    sentence = hc.finding(**values)
    assert "as frequent as those HSDL finds when only token identity couples" in sentence
    assert "more often than random atoms" in sentence and "level 2 is coarser than level 1" in sentence
    assert "73% of the level-1 atoms" in sentence and "surrogates 69 to 74%" in sentence
    finer = hc.finding(**{**values, "tree_mean_size_2": 2.0, "surr_vs_cover_pairs_10": "above",
                          "surr_cover_pairs_10_max": 60.0, "cross_vs_chance": "within"})
    assert "level 2 is finer" in finer and ", more frequent than those" in finer and "about as often as" in finer
    slightly = hc.finding(**{**values, "surr_vs_cover_pairs_10": "above", "surr_cover_pairs_10_max": 72.0})
    assert "slightly more frequent than those" in slightly
    one_level = hc.finding(**{**values, "tree_mean_size_1": None, "tree_mean_size_2": None})
    assert "level 2" not in one_level and one_level.endswith("exactly.")
    with pytest.raises(KeyError):
        hc.finding(**{**values, "cross_vs_chance": "sideways"})
