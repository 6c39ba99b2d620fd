"""Pattern views of HSDL against hand-built dictionaries and brute-force counting."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import scipy.sparse as sp
from matplotlib.figure import Figure

from moe_utils.patterns import atoms as patterns
from moe_utils.common import plotting
from moe_utils.patterns.hsdl import HSDL

matplotlib.use("Agg")


@pytest.fixture
def toy():
    """3 layers x 4 experts; level 1: atom 0 = {L0E1, L2E3} (cross-layer), atom 1 = {L1E0}, atom 2 dead;
    level 2 splits atom 0 into its two experts and keeps atom 1."""
    d1 = np.zeros((12, 3), np.float32)
    d1[[1, 11], 0] = [1.0, 0.8]
    d1[4, 1] = 0.9
    d1[5, 1] = 0.3  # below the threshold
    d2 = np.zeros((12, 3), np.float32)
    d2[1, 0], d2[11, 1], d2[4, 2] = 1.0, 0.8, 0.9
    r2 = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]], np.float32)  # (p2, p1)
    r1 = sp.csr_matrix(np.array([[2.0, 0, 1.0], [0, 1.0, 0], [0, 0, 0]], np.float32))
    return SimpleNamespace(dictionaries_=[d1, d2], codes_=[r1, r2], layout=(3, 4))


def test_atom_table(toy):
    table = patterns.atom_table(toy, level=1)
    assert table["experts"].tolist() == [("L0E1", "L2E3"), ("L1E0",), ()]
    assert table["cross_layer"].tolist() == [True, False, False]
    assert table["layers"].tolist() == [(0, 2), (1,), ()]
    assert table["alive"].tolist() == [True, True, False]
    np.testing.assert_allclose(table["usage"], [0.75, 0.25, 0.0])
    level2 = patterns.atom_table(toy, level=2)
    assert level2["n_experts"].tolist() == [1, 1, 1]
    np.testing.assert_allclose(level2["usage"], [3 / 7, 3 / 7, 1 / 7])  # R_2 @ [3, 1, 0], normalised
    with pytest.raises(ValueError, match="level"):
        patterns.atom_table(toy, level=3)


def test_atom_experts_strongest_first():
    d = np.array([[0.6], [0.0], [0.9], [0.5]])
    assert patterns.atom_experts(d, threshold=0.5)[0].tolist() == [2, 0, 3]


def test_hierarchy_edges(toy):
    edges = patterns.hierarchy(toy, level=1)
    assert sorted(map(tuple, edges[["parent", "child"]].to_numpy().tolist())) == [(0, 0), (0, 1), (1, 2)]
    np.testing.assert_allclose(edges.groupby("parent")["share"].sum(), [1.0, 1.0])
    with pytest.raises(ValueError, match="no level"):
        patterns.hierarchy(toy, level=2)


def test_coverage_of_frequent_and_random_atoms():
    rng = np.random.default_rng(1)
    n_e, n_cols = 20, 2000
    selected = np.zeros((n_e, n_cols))
    for j in range(n_cols):
        selected[rng.choice(n_e, 3, replace=False), j] = 1
        if j % 2 == 0:
            selected[[0, 1, 2], j] = 1  # a planted frequent triplet
        if j % 3 == 0:
            selected[[5, 6], j] = 1  # a planted frequent pair
    x = sp.csr_matrix(selected)
    frequent = [[0, 1, 2], [5, 6], [2, 1]]
    table = patterns.coverage(frequent, x, orders=(2, 3), top_percent=(1, 2, 10, 100))
    pairs = table[table["order"] == 2].set_index("top_percent")["coverage"]
    # 190 observed pairs: the top 1% are 2 pairs of the planted triplet, the top 2% (4 pairs) add
    # its third pair and the planted pair, so all three atoms are covered
    assert pairs.loc[1.0] == pytest.approx(1 / 3) and pairs.loc[2.0] == 1.0
    triplets = table[table["order"] == 3]
    assert triplets["n_atoms"].iloc[0] == 1 and triplets["coverage"].tolist() == [1.0] * 4
    chance = patterns.coverage(patterns.random_atoms(frequent * 20, n_e, random_state=0), x, orders=(2,),
                               top_percent=(1, 10, 100))
    assert chance["coverage"].iloc[0] < 0.3
    assert chance["coverage"].is_monotonic_increasing and chance["coverage"].iloc[-1] <= 1.0
    strict = patterns.coverage([[0, 1, 2, 17]], x, orders=(2,), top_percent=(1,), mode="all")
    assert strict["coverage"].iloc[0] == 0.0  # (0, 17) is not a frequent pair
    with pytest.raises(ValueError, match="mode"):
        patterns.coverage(frequent, x, mode="some")


def test_views_and_figures_on_a_fitted_model():
    rng = np.random.default_rng(0)
    x = sp.random(24, 400, density=0.2, random_state=0, dtype=np.float32).tocsr()
    x.data = rng.uniform(0.1, 1.0, x.nnz).astype(np.float32)
    model = HSDL(levels=[6, 9], layout=(3, 8), n_steps=60, batch_size=128, random_state=0).fit(x)
    tables = [patterns.atom_table(model, level=k, threshold=0.3) for k in (1, 2)]
    edges = [patterns.hierarchy(model, 1, min_share=0.05)]
    usages = [patterns.atom_usage(model, k) for k in (1, 2)]
    np.testing.assert_allclose([u.sum() for u in usages], [1.0, 1.0], rtol=1e-6)
    cover = patterns.coverage(patterns.atom_experts(model.dictionaries_[0], 0.3), x)
    chance = patterns.coverage(patterns.random_atoms(patterns.atom_experts(model.dictionaries_[0], 0.3), 24), x)
    import pandas as pd

    figures = [
        plotting.hsdl_loss_curves(model.loss_history_),
        plotting.atom_size_distribution(pd.concat(tables)),
        plotting.atom_maps(model.dictionaries_[0], (3, 8), range(6)),
        plotting.hierarchy_tree(edges, usages),
        plotting.coverage_curves(cover, chance),
    ]
    assert all(isinstance(f, Figure) for f in figures)
    matplotlib.pyplot.close("all")
