"""Controls for what stage 2 reads from a fitted HSDL (the paper's section 3 and Fig 6): chance
levels, stability, the hierarchy's shape and the token-identity surrogates.

* :func:`random_atom_rows`, :func:`cross_layer_chance`, :func:`coverage_chance`: atoms of the
  same sizes with experts drawn at random, uniformly or in proportion to how often each expert is
  selected, over many draws: the chance level of "atoms span several layers" and of the
  coverage curves, with intervals (the spread over draws).
* :func:`match_atoms`: two fits' atoms matched one to one (Hungarian matching on the Jaccard
  similarity of their expert sets): how well one fit reproduces another (another seed, another
  initialisation, the other half of the questions).
* :func:`hierarchy_structure`: whether level 2 refines level 1 (smaller children, parents split)
  or copies it.
* :func:`surrogate_fits`: HSDL refitted on token-stratified surrogate stores
  (:func:`moe_utils.patterns.token_null.surrogate_store`), and the stage's statistics for each.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from moe_utils.patterns import atoms as patterns
from moe_utils.patterns.cooccurrence import Cooccurrence
from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.patterns.token_null import question_halves, surrogate_store


def _interval(values: np.ndarray, level: float) -> tuple[float, float, float]:
    """Mean and central ``level`` percentile interval of ``values``."""
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(np.mean(values)), float(low), float(high)


#: rounds of draws with replacement before the atoms still short of rows are completed by Gumbel keys
_ROUNDS = 4
_BLOCK_DRAWS = 4_000_000  # candidate rows (or Gumbel keys) drawn at a time: bounded memory


def random_atom_rows(sizes, n_rows: int, *, n_draws: int = 1000, weights: np.ndarray | None = None,
                     seed: int = 0) -> np.ndarray:
    """(n_draws, n_atoms, max(sizes)) rows of random atoms of the given sizes, -1 beyond each size.

    Each atom's rows are distinct, drawn uniformly or, with ``weights`` (one per row, >= 0),
    one after another in proportion to the weights of the rows not yet drawn (successive sampling),
    in draw order (the first rows play the "strongest" experts of
    :func:`moe_utils.patterns.atoms.coverage`); rows of weight 0 come only after every row of
    positive weight, in uniformly random order.

    Cost about n_draws x sum(sizes), not n_draws x n_atoms x n_rows: rows are drawn with replacement
    in proportion to the weights and each atom keeps the first occurrence of each row, which is
    successive sampling exactly (the next new row of an i.i.d. sequence is drawn in proportion to
    the weights of the rows not yet seen). The few atoms still short of rows after a few rounds of
    such draws (collisions with heavy rows, weights of 0) are completed from the rows they lack by
    Gumbel top-k keys, the same successive sampling given the rows drawn so far.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.min() < 0 or sizes.max() > n_rows):
        raise ValueError(f"atom sizes must lie in 0..{n_rows}, got {sizes.min()}..{sizes.max()}")
    cdf = None
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (n_rows,) or weights.min() < 0 or not weights.sum() > 0:
            raise ValueError(f"weights must be {n_rows} non-negative numbers, not all zero")
        cdf = np.cumsum(weights)
    rng = np.random.default_rng(seed)
    width = int(sizes.max()) if sizes.size else 0
    out = np.full((n_draws, len(sizes), width), -1, dtype=np.int64)
    if width == 0:
        return out
    per_draw = max(1, int(sizes.sum()) + 2 * len(sizes))
    step = max(1, _BLOCK_DRAWS // per_draw)
    for start in range(0, n_draws, step):
        block = out[start:start + step].reshape(-1, width)  # one row per (draw, atom): a view of out
        need = np.tile(sizes, len(block) // max(1, len(sizes)))
        filled = np.zeros(len(block), dtype=np.int64)
        for _ in range(_ROUNDS):
            active = np.flatnonzero(filled < need)
            if not active.size:
                break
            _draw_round(block, active, need[active] - filled[active], filled, n_rows, cdf, rng)
        short = np.flatnonzero(filled < need)
        if short.size:
            _complete_by_keys(block, short, need, filled, n_rows, weights, rng)
    return out


def _draw_round(block: np.ndarray, active: np.ndarray, missing: np.ndarray, filled: np.ndarray, n_rows: int,
                cdf: np.ndarray | None, rng) -> None:
    """One round of :func:`random_atom_rows`' draws with replacement for the atoms ``active`` (rows of
    ``block``, ``missing`` rows short): ``missing + 2`` candidates each; the first occurrences of rows
    an atom does not hold yet are appended in draw order, up to ``missing``."""
    n_candidates = missing + 2
    total = int(n_candidates.sum())
    if cdf is None:
        rows = rng.integers(0, n_rows, total)
    else:  # inverse CDF: rows of weight 0 have an empty interval and are never drawn
        rows = np.searchsorted(cdf, rng.random(total) * cdf[-1], side="right")
        # rounding at the top: the last row of weight > 0
        rows = np.minimum(rows, np.searchsorted(cdf, cdf[-1]))
    held_slot, held_column = np.nonzero(np.arange(block.shape[1])[None, :] < filled[active][:, None])
    # the rows each atom holds, then the candidates, atom by atom in draw order
    slot = np.concatenate([held_slot, np.repeat(np.arange(len(active)), n_candidates)])
    rows = np.concatenate([block[active[held_slot], held_column], rows])
    key = slot * n_rows + rows
    first = np.argsort(key, kind="stable")  # per atom and row, the earliest occurrence first
    key = key[first]
    first = first[np.r_[True, key[1:] != key[:-1]]]
    new = np.sort(first[first >= len(held_slot)])  # rows new to their atom, by atom and in draw order
    slot, rows = slot[new], rows[new]
    rank = np.arange(len(slot)) - np.searchsorted(slot, slot)
    keep = rank < missing[slot]
    slot, rows, rank = slot[keep], rows[keep], rank[keep]
    block[active[slot], filled[active[slot]] + rank] = rows
    filled[active] += np.bincount(slot, minlength=len(active))


def _complete_by_keys(block: np.ndarray, short: np.ndarray, need: np.ndarray, filled: np.ndarray, n_rows: int,
                      weights: np.ndarray | None, rng) -> None:
    """Complete the atoms ``short`` (rows of ``block``) by successive sampling from the rows each
    lacks: Gumbel top-k, the largest ``log w + G`` first (G standard Gumbel); rows of weight 0 after
    the others, in random order."""
    positive = np.ones(n_rows, dtype=bool) if weights is None else weights > 0
    with np.errstate(divide="ignore"):
        log_w = np.zeros(n_rows) if weights is None else np.log(weights)
    step = max(1, _BLOCK_DRAWS // n_rows)
    for start in range(0, len(short), step):
        atoms = short[start:start + step]
        gumbel = rng.gumbel(size=(len(atoms), n_rows))
        keys = np.where(positive, log_w + gumbel, gumbel - 1e10)
        held_atom, held_column = np.nonzero(np.arange(block.shape[1])[None, :] < filled[atoms][:, None])
        keys[held_atom, block[atoms[held_atom], held_column]] = -np.inf
        missing = need[atoms] - filled[atoms]
        top = np.argsort(-keys, axis=1)[:, :int(missing.max())]
        atom, column = np.nonzero(np.arange(top.shape[1])[None, :] < missing[:, None])
        block[atoms[atom], filled[atoms[atom]] + column] = top[atom, column]
        filled[atoms] = need[atoms]


def cross_layer_chance(sizes, layout: tuple[int, int], *, n_draws: int = 1000, weights: np.ndarray | None = None,
                       seed: int = 0, level: float = 0.95) -> dict:
    """Share of random atoms of the given sizes that span more than one layer: mean over
    ``n_draws`` draws and the ``level`` interval of the per-draw share (``mean``, ``low``, ``high``)."""
    draws = random_atom_rows(sizes, layout[0] * layout[1], n_draws=n_draws, weights=weights, seed=seed)
    layers = np.where(draws >= 0, draws // layout[1], -1)
    first = layers[:, :, :1]
    crosses = ((layers != first) & (layers >= 0)).any(axis=2)
    mean, low, high = _interval(crosses.mean(axis=1), level)
    return {"mean": mean, "low": low, "high": high, "n_draws": int(n_draws)}


def coverage_chance(sizes, counts: Cooccurrence, *, percents, n_draws: int = 1000,
                    weights: np.ndarray | None = None, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """The coverage (``mode="core"`` of :func:`moe_utils.patterns.atoms.coverage`) of random atoms of the
    given sizes over ``n_draws`` draws, against the exact co-selection ``counts`` shared with the
    fitted atoms' coverage: one row per order and k% with ``mean``, ``low``, ``high`` (the ``level``
    interval of the draws)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    draws = random_atom_rows(sizes, counts.n_rows, n_draws=n_draws, weights=weights, seed=seed)
    rows = []
    for order in (2, 3):
        eligible = sizes >= order
        if not eligible.any():  # no atom to count: the order's histogram is not needed
            continue
        n_observed = counts.n_observed(order)
        if not n_observed:
            continue
        sets = draws[:, eligible, :order]
        atom_counts = counts.count(sets.reshape(-1, order)).reshape(sets.shape[:2])
        for percent in percents:
            cutoff = counts.count_at_rank(order, max(1, int(np.ceil(percent / 100 * n_observed))))
            share = ((atom_counts >= cutoff) & (atom_counts > 0)).mean(axis=1)
            mean, low, high = _interval(share, level)
            rows.append({"order": order, "top_percent": float(percent), "mean": mean, "low": low, "high": high,
                         "n_atoms": int(eligible.sum()), "n_draws": int(n_draws)})
    return pd.DataFrame(rows)


def match_atoms(atoms_a, atoms_b) -> np.ndarray:
    """Jaccard similarity of the expert sets of the atoms of two fits, matched one to one so that
    the total similarity is largest (Hungarian matching); one value per atom of the smaller fit."""
    sets_a, sets_b = [set(map(int, a)) for a in atoms_a], [set(map(int, b)) for b in atoms_b]
    if not sets_a or not sets_b:
        return np.zeros(0)
    jaccard = np.array([[len(a & b) / len(a | b) if a | b else 0.0 for b in sets_b] for a in sets_a])
    rows, cols = linear_sum_assignment(jaccard, maximize=True)
    return jaccard[rows, cols]


def multi_expert_atoms(hsdl, threshold: float) -> list[tuple]:
    """The expert rows of the level-1 atoms in use with two or more experts (the collaborations)."""
    table = patterns.atom_table(hsdl, level=1, threshold=threshold)
    return list(table.loc[table["alive"] & (table["n_experts"] >= 2), "rows"])


def stability(hsdl, X, column_questions: np.ndarray, threshold: float, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Matched Jaccard (:func:`match_atoms`) of the multi-expert level-1 atoms of refits of
    ``hsdl``'s parameters on X: the fit against a refit with another seed (another initial sample
    and batch order), against a refit from random initial atoms (``init="random"``), and a fit on
    one half of the questions against a fit on the other half (``column_questions``: the question
    of each column of X)."""
    params = hsdl.get_params()
    base_seed = 0 if params["random_state"] is None else int(params["random_state"])

    def refit(matrix, **changes):
        return multi_expert_atoms(type(hsdl)(**{**params, **changes}).fit(matrix), threshold)

    X = sp.csc_matrix(X)
    in_a = question_halves(column_questions, seed)
    base = multi_expert_atoms(hsdl, threshold)
    return {"another seed": match_atoms(base, refit(X, random_state=base_seed + 1)),
            "random initialisation": match_atoms(base, refit(X, init="random")),
            "question halves": match_atoms(refit(X[:, in_a]), refit(X[:, ~in_a]))}


def stability_summary(matched: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per comparison (name -> matched Jaccard of :func:`match_atoms`): atoms matched, the share
    reproduced exactly (Jaccard 1) and the median Jaccard."""
    return pd.DataFrame([{"comparison": name, "atoms": len(j), "exact": float(np.mean(j == 1.0)) if len(j) else np.nan,
                          "median_jaccard": float(np.median(j)) if len(j) else np.nan}
                         for name, j in matched.items()])


def hierarchy_structure(tables: pd.DataFrame, edges: pd.DataFrame, *, copy_share: float = 0.9) -> dict:
    """How level 2 relates to level 1 (of :func:`moe_utils.patterns.atoms.atom_sizes`' tables and
    :func:`moe_utils.patterns.atoms.hierarchy`'s edges between levels 1 and 2).

    Returns the mean size (experts) of the level-1 and level-2 atoms in use, the number of
    level-1 parents with edges, how many split into two or more children, how many are copied
    by one child (a child holding at least ``copy_share`` of the parent's weight) and how many
    of those copies have exactly the parent's experts, and the share of edges whose child has
    fewer, as many or more experts than its parent.
    """
    live = tables[tables["alive"]]
    size = {(level, atom): n for level, atom, n in live[["level", "atom", "n_experts"]].itertuples(index=False)}
    rows = {(level, atom): set(r) for level, atom, r in live[["level", "atom", "rows"]].itertuples(index=False)}
    edges = edges[[(1, p) in size and (2, c) in size for p, c in zip(edges["parent"], edges["child"])]]
    per_parent = edges.groupby("parent")
    top = edges.loc[per_parent["share"].idxmax()] if len(edges) else edges
    copies = top[top["share"] >= copy_share]
    delta = np.array([size[(2, c)] - size[(1, p)] for p, c in zip(edges["parent"], edges["child"])])
    return {
        "mean_size_1": float(live.loc[live["level"] == 1, "n_experts"].mean()),
        "mean_size_2": float(live.loc[live["level"] == 2, "n_experts"].mean()),
        "n_parents": int(per_parent.ngroups),
        "n_split": int((per_parent.size() >= 2).sum()),
        "n_copied": int(len(copies)),
        "n_copied_exact": int(sum(rows[(1, p)] == rows[(2, c)] for p, c in zip(copies["parent"], copies["child"]))),
        "edges_smaller": float(np.mean(delta < 0)) if len(delta) else np.nan,
        "edges_same": float(np.mean(delta == 0)) if len(delta) else np.nan,
        "edges_larger": float(np.mean(delta > 0)) if len(delta) else np.nan,
    }


def fit_statistics(hsdl, X, selected: sp.spmatrix, threshold: float) -> dict:
    """The statistics stage 2 reports for one fit, as stage 2 reports them:
    relative L1 error, level-1 atoms in use, their mean size and cross-layer share (%), and the
    coverage of their strongest pair and triplet at 10% (%)."""
    tables, _, sizes = patterns.atom_sizes(hsdl, threshold)
    atoms = [np.asarray(r) for r in patterns.live_atoms(tables).sort_values("atom")["rows"]]
    at10 = patterns.coverage(atoms, selected, orders=(2, 3), top_percent=(10,)).set_index("order")["coverage"]
    return {"rel_error": float(hsdl.score(X)), **sizes, "cover_pairs_10": float(at10.get(2, np.nan) * 100),
            "cover_triplets_10": float(at10.get(3, np.nan) * 100)}


def surrogate_fits(hsdl, store, threshold: float, *, n_surrogates: int = 3, granularity: str = "token",
                   value: str = "weight", seed: int = 0) -> pd.DataFrame:
    """:func:`fit_statistics` of HSDL (``hsdl``'s parameters) refitted on ``n_surrogates``
    token-stratified surrogates of ``store``, one row per surrogate seed."""
    rows = []
    for draw in range(n_surrogates):
        surrogate = surrogate_store(store, seed=seed + draw)
        X = expert_matrix(surrogate, granularity=granularity, value=value)
        fit = type(hsdl)(**hsdl.get_params()).fit(X)
        rows.append({"surrogate": seed + draw, **fit_statistics(
            fit, X, expert_matrix(surrogate, "token", "binary"), threshold)})
    return pd.DataFrame(rows)


def finding(*, cover_pairs_10: float, cover_chance_uniform_2_10: float, cover_chance_usage_2_10: float,
            surr_cover_pairs_10_min: float, surr_cover_pairs_10_max: float, surr_vs_cover_pairs_10: str,
            cross_share_1: float,
            cross_chance_uniform: float, cross_vs_chance: str, stable_seed_exact: float,
            tree_mean_size_1: float | None = None, tree_mean_size_2: float | None = None) -> str:
    """The stage-2 verdict for the introduction: whether HSDL's atoms are more than chance and more
    than token identity, how stable they are and which way the hierarchy goes (percentages in %).

    ``surr_vs_cover_pairs_10`` and ``cross_vs_chance`` are where the real value lies against the
    surrogates' range and the chance interval (:func:`moe_utils.patterns.token_null.against`); "above" by
    less than 5 points reads "slightly more". The hierarchy's
    direction is left out when the fit has one level (no ``tree_mean_size_2``)."""
    beyond_token = {"above": "slightly more frequent than" if cover_pairs_10 - surr_cover_pairs_10_max < 5
                    else "more frequent than", "within": "as frequent as",
                    "below": "less frequent than"}[surr_vs_cover_pairs_10]
    opening = ("HSDL's atoms are frequently co-selected expert sets, "
               f"{beyond_token} those HSDL finds when only token identity couples the layers")
    crossing = {"above": "more often than", "within": "about as often as",
                "below": "less often than"}[cross_vs_chance]
    hierarchy = ("" if tree_mean_size_2 is None else
                 f", and level 2 is {'coarser' if tree_mean_size_2 > tree_mean_size_1 else 'finer'} than level 1 "
                 f"({tree_mean_size_2:.2f} against {tree_mean_size_1:.2f} experts per atom)")
    return (f"{opening}: {cover_pairs_10:.0f}% of the level-1 atoms are among the top 10% of pairs "
            f"(random atoms {cover_chance_uniform_2_10:.0f} to {cover_chance_usage_2_10:.0f}%, token-only "
            f"surrogates {surr_cover_pairs_10_min:.0f} to {surr_cover_pairs_10_max:.0f}%). They span several layers ({cross_share_1:.0f}%) "
            f"{crossing} random atoms of the same sizes ({cross_chance_uniform:.0f}%), another seed "
            f"reproduces {stable_seed_exact:.0f}% of them exactly{hierarchy}.")
