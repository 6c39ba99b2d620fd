"""Collaboration patterns read from a fitted HSDL (paper section 3 and Fig 6).

* :func:`atom_table`: each atom of a level as the set of (layer, expert) pairs whose dictionary
  entry is at least ``threshold``; an atom spanning several layers is a cross-layer collaboration.
  :func:`atom_sizes` gathers every level's table with the sizes stage 2 reports, :func:`live_atoms`
  the atoms of a level in use.
* :func:`hierarchy`: which level-(k+1) atoms compose each level-k atom, read from R_{k+1}.
* :func:`coverage`: the paper's "top k% coverage": the share of atoms whose expert pairs (or
  triplets) are among the k% most frequently co-selected pairs (triplets), counted exactly by
  :mod:`moe_utils.patterns.cooccurrence` without enumerating each token's subsets.

Dictionary entries lie in [0, 1], so the default ``threshold=0.5`` keeps the experts an atom
switches on at least half-way.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd

from moe_utils.patterns.cooccurrence import Cooccurrence
from moe_utils.patterns.expert_matrix import expert_label


def atom_experts(dictionary: np.ndarray, threshold: float = 0.5) -> list[np.ndarray]:
    """Rows (experts) of each atom (column of ``dictionary``) with entry >= ``threshold``, strongest first."""
    out = []
    for column in np.asarray(dictionary).T:
        rows = np.nonzero(column >= threshold)[0]
        out.append(rows[np.argsort(-column[rows], kind="stable")])
    return out


def atom_usage(model, level: int = 1) -> np.ndarray:
    """Share of the code mass of X that flows through each atom of ``level`` (sums to 1).

    Level 1: the row sums of R_1; level k + 1: R_{k+1} applied to the usage of level k.
    """
    usage = np.asarray(model.codes_[0].sum(axis=1)).ravel().astype(np.float64)
    for r in model.codes_[1:level]:
        usage = np.asarray(r, dtype=np.float64) @ usage
    total = usage.sum()
    return usage / total if total > 0 else usage


def atom_table(model, level: int = 1, threshold: float = 0.5,
               layout: tuple[int, int] | None = None) -> pd.DataFrame:
    """One row per atom of ``level`` (1-based): its experts, layers, size, usage and whether it crosses layers.

    ``layout = (n_layers, n_experts)`` defaults to the model's ``layout``.
    """
    layout = layout or model.layout
    if layout is None:
        raise ValueError("pass layout=(n_layers, n_experts) (or fit HSDL with layout=) to map rows to experts")
    if not 1 <= level <= len(model.dictionaries_):
        raise ValueError(f"level must be in 1..{len(model.dictionaries_)}, got {level}")
    n_experts = layout[1]
    usage = atom_usage(model, level)
    rows = []
    for atom, experts in enumerate(atom_experts(model.dictionaries_[level - 1], threshold)):
        layers = sorted({int(e) // n_experts for e in experts})
        rows.append({
            "level": level, "atom": atom, "n_experts": len(experts), "n_layers": len(layers),
            "layers": tuple(layers), "experts": tuple(expert_label(int(e), n_experts) for e in experts),
            "rows": tuple(int(e) for e in experts), "cross_layer": len(layers) > 1, "usage": usage[atom],
            "alive": bool(usage[atom] > 0 and len(experts) > 0),
        })
    return pd.DataFrame(rows)


def atom_sizes(hsdl, threshold: float) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``(tables, summary, values)``: :func:`atom_table` of every level, the
    atoms in use per level (count, mean experts and layers, share spanning layers), and level 1's
    atoms in use, mean experts and cross-layer share (%)."""
    tables = pd.concat([atom_table(hsdl, level=k + 1, threshold=threshold)
                        for k in range(len(hsdl.level_sizes_))], ignore_index=True)
    for level, usage in tables.groupby("level")["usage"].sum().items():
        if not np.isclose(usage, 1.0, rtol=1e-5):
            raise RuntimeError(f"the atom usages of level {level} sum to {usage}, not 1")
    live = tables[tables["alive"]]
    summary = live.groupby("level").agg(atoms=("atom", "size"), mean_experts=("n_experts", "mean"),
                                        mean_layers=("n_layers", "mean"), cross_layer=("cross_layer", "mean"))
    level1 = live[live["level"] == 1]
    values = {"n_live_1": int(len(level1)),
              "cross_share_1": float(level1["cross_layer"].mean() * 100) if len(level1) else 0.0,
              "mean_experts_1": float(level1["n_experts"].mean()) if len(level1) else 0.0}
    return tables, summary, values


def live_atoms(tables: pd.DataFrame, level: int = 1) -> pd.DataFrame:
    """The atoms of ``level`` in use (of :func:`atom_sizes`' tables)."""
    return tables[tables["alive"] & (tables["level"] == level)]


def hierarchy(model, level: int = 1, min_share: float = 0.1) -> pd.DataFrame:
    """Edges from each level-``level`` atom (parent) to the level-(``level`` + 1) atoms composing it.

    ``weight`` is R_{k+1}[child, parent]; ``share`` is the weight's share of the parent's column;
    edges below ``min_share`` are left out.
    """
    if not 1 <= level < len(model.dictionaries_):
        raise ValueError(f"there is no level {level + 1} below level {level} "
                         f"(levels: {len(model.dictionaries_)})")
    r = np.asarray(model.codes_[level])  # (p_{k+1}, p_k)
    totals = r.sum(axis=0)
    rows = []
    for parent in range(r.shape[1]):
        if totals[parent] <= 0:
            continue
        for child in np.nonzero(r[:, parent] > 0)[0]:
            share = r[child, parent] / totals[parent]
            if share >= min_share:
                rows.append({"parent": parent, "child": int(child), "weight": float(r[child, parent]),
                             "share": float(share)})
    return pd.DataFrame(rows, columns=["parent", "child", "weight", "share"])


# ------------------------------------------------------------------------------- coverage
def coverage(atoms: Sequence[Sequence[int]], selected, *, orders: Sequence[int] = (2, 3),
             top_percent: Sequence[float] = (1, 2, 5, 10, 20, 30, 50, 75, 100), mode: str = "core",
             max_columns: int | None = 50_000, random_state=0) -> pd.DataFrame:
    """The paper's Fig 6: share of atoms among the top k% most frequent co-selected pairs/triplets.

    ``atoms`` are expert rows per atom, strongest first (:func:`atom_experts`). ``selected`` is X
    (N_e, N_s), or its :class:`~moe_utils.patterns.cooccurrence.Cooccurrence` counts to share them between
    calls (``max_columns`` and ``random_state`` then do not apply). For each ``order`` r, the
    r-sets observed in ``selected`` are ranked by count (ties share a rank), and an atom with at
    least r experts is covered at k% if its r-sets are among the top k% of the observed ones: in
    ``mode="core"`` its strongest r experts, in ``mode="all"`` every r-subset. Atoms with fewer than
    r experts are not counted for that order (``n_atoms``); ``n_columns`` says how many columns
    were counted (all of them unless X has more than ``max_columns``).
    """
    if mode not in ("core", "all"):
        raise ValueError(f"mode must be 'core' or 'all', got {mode!r}")
    counts = selected if isinstance(selected, Cooccurrence) else Cooccurrence(
        selected, max_columns=max_columns, random_state=random_state)
    rows = []
    for order in orders:
        eligible = [list(a) for a in atoms if len(a) >= order]
        if mode == "core":
            groups = [[a[:order]] for a in eligible]
        else:
            groups = [list(combinations(a, order)) for a in eligible]
        flat = counts.count(np.array([s for g in groups for s in g], dtype=np.int64).reshape(-1, order))
        bounds = np.cumsum([0] + [len(g) for g in groups])
        atom_counts = [flat[bounds[i]:bounds[i + 1]] for i in range(len(groups))]
        n_observed = counts.n_observed(order)
        for percent in top_percent:
            if n_observed == 0:
                cutoff = math.inf
            else:
                cutoff = counts.count_at_rank(order, max(1, math.ceil(percent / 100 * n_observed)))
            covered = [bool(np.all((c >= cutoff) & (c > 0))) for c in atom_counts]
            rows.append({"order": order, "top_percent": float(percent),
                         "coverage": float(np.mean(covered)) if covered else float("nan"),
                         "n_atoms": len(eligible), "n_observed_sets": n_observed, "mode": mode,
                         "n_columns": counts.n_columns})
    return pd.DataFrame(rows)


def random_atoms(atoms: Sequence[Sequence[int]], n_rows: int, random_state=0) -> list[np.ndarray]:
    """Atoms of the same sizes with experts drawn uniformly at random: the chance level of :func:`coverage`."""
    rng = np.random.default_rng(random_state)
    return [rng.choice(n_rows, size=len(a), replace=False) for a in atoms]
