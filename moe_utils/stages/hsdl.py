"""What stage 2 reports about a fitted HSDL (the paper's section 3 and Fig 6), as tables and numbers.

Each function takes a fitted :class:`moe_utils.patterns.hsdl.HSDL` (and what it was fitted on) and returns
the tables a page shows and a dict of the values it glues into its text, after checking what must
hold (the loss fell, the dictionaries lie in [0, 1], usages sum to 1, coverage grows with k):
:func:`fit_summary`, :func:`atom_sizes`, :func:`top_atoms`, :func:`hierarchy_summary`,
:func:`coverage_against_chance`; :func:`artifact_extra` is what the saved model records about its
input, and :func:`benchmark` reads the committed ``bench/hsdl.py`` results.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from moe_utils.common.project import BENCH_RESULTS, resolve
from moe_utils.patterns import atoms as patterns
from moe_utils.common.artifacts import sha256_file
from moe_utils.patterns.cooccurrence import Cooccurrence
from moe_utils.capture.store import MANIFEST, RoutingStore

#: The k% of the coverage curves (the paper's Fig 6).
COVERAGE_PERCENTS = (1, 2, 5, 10, 20, 50, 100)


def fit_summary(hsdl, X) -> dict:
    """Level sizes, fit time and steps, level 1's relative L1 error on X and atoms per column;
    RuntimeError if the fit broke its constraints or the loss did not fall."""
    codes = hsdl.codes_[0]
    if not all(0 <= d.min() and d.max() <= 1 for d in hsdl.dictionaries_):
        raise RuntimeError("a dictionary left [0, 1]")
    if codes.min() < 0 or any(r.min() < 0 for r in hsdl.codes_[1:]):
        raise RuntimeError("a code is negative")
    total = hsdl.loss_history_["total"]
    if not np.mean(total[-5:]) < np.mean(total[:5]):
        raise RuntimeError("the loss did not decrease: more steps (hsdl_steps) or another learning rate")
    return {"level_sizes": ", ".join(map(str, hsdl.level_sizes_)), "fit_seconds": float(hsdl.fit_seconds_),
            "n_steps": int(hsdl.n_steps_), "rel_error": float(hsdl.score(X)),
            "nnz_per_code": float((codes != 0).sum(axis=0).mean())}


def atom_sizes(hsdl, threshold: float) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``(tables, summary, values)``: :func:`moe_utils.patterns.atoms.atom_table` of every level, the
    atoms in use per level (count, mean experts and layers, share spanning layers), and level 1's
    atoms in use, mean experts and cross-layer share (%)."""
    tables = pd.concat([patterns.atom_table(hsdl, level=k + 1, threshold=threshold)
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


def top_atoms(tables: pd.DataFrame, n: int = 8) -> tuple[pd.DataFrame, int]:
    """The ``n`` most used level-1 atoms of at least two experts (of any size where there is none)
    and how many level-1 atoms have two or more experts."""
    level1 = live_atoms(tables)
    groups = level1[level1["n_experts"] >= 2]
    return (groups if len(groups) else level1).sort_values("usage", ascending=False).head(n), int(len(groups))


def hierarchy_summary(hsdl, min_share: float = 0.1) -> tuple[list[pd.DataFrame], list[np.ndarray], dict]:
    """``(edges, usages, values)``: :func:`moe_utils.patterns.atoms.hierarchy` between consecutive levels,
    every level's atom usage, level 2's relative L1 error on D_1 and children per level-1 atom.
    RuntimeError when level 2 does not reconstruct level 1 (error >= 0.5)."""
    n_levels = len(hsdl.level_sizes_)
    edges = [patterns.hierarchy(hsdl, level=k, min_share=min_share) for k in range(1, n_levels)]
    usages = [patterns.atom_usage(hsdl, level=k) for k in range(1, n_levels + 1)]
    errors = hsdl.hierarchy_error()
    if errors and errors[0] >= 0.5:
        raise RuntimeError(f"level 2 does not reconstruct level 1 (relative L1 error {errors[0]:.2f})")
    values = {"hier_error": float(errors[0]) if errors else 0.0,
              "children_per_atom": float(edges[0].groupby("parent").size().mean()) if edges and len(edges[0]) else 0.0}
    return edges, usages, values


def coverage_against_chance(tables: pd.DataFrame, selected: sp.spmatrix | Cooccurrence, *, random_state=0,
                            percents=COVERAGE_PERCENTS) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``(observed, chance, values)``: the paper's Fig 6 coverage of the level-1 atoms in use among
    the pairs and triplets of exhaustive counting over ``selected`` (the binary token matrix, or its
    :class:`~moe_utils.patterns.cooccurrence.Cooccurrence` counts to share them), the same for one draw of
    random atoms of the same sizes, and the pairs', triplets' and chance's coverage at 10% (%).
    RuntimeError if a curve falls as k grows."""
    atoms = [np.asarray(r) for r in live_atoms(tables).sort_values("atom")["rows"]]
    counts = selected if isinstance(selected, Cooccurrence) else Cooccurrence(selected)
    observed = patterns.coverage(atoms, counts, orders=(2, 3), top_percent=percents)
    chance = patterns.coverage(patterns.random_atoms(atoms, counts.n_rows, random_state=random_state), counts,
                               orders=(2, 3), top_percent=percents)
    for frame in (observed, chance):
        for order, group in frame.groupby("order"):
            if np.any(np.diff(group["coverage"].dropna().to_numpy()) < 0):
                raise RuntimeError(f"coverage of order {order} falls as k grows")
    at10 = observed[observed["top_percent"] == 10].set_index("order")["coverage"]
    chance10 = chance[chance["top_percent"] == 10].set_index("order")["coverage"]
    values = {"cover_pairs_10": float(at10.get(2, np.nan) * 100), "cover_triplets_10": float(at10.get(3, np.nan) * 100),
              "chance_pairs_10": float(chance10.get(2, np.nan) * 100)}
    return observed, chance, values


def artifact_extra(store: RoutingStore, X, *, granularity: str, value: str) -> dict:
    """What a saved HSDL records about its input (``extra`` of :meth:`moe_utils.patterns.hsdl.HSDL.save`):
    the matrix X it was fitted on and the routing store, by the checksum of its manifest."""
    return {"x_spec": {"granularity": granularity, "value": value, "shape": list(X.shape), "nnz": int(X.nnz),
                       "layout": [store.n_layers, store.n_experts]},
            "store": {"path": str(store.path), "manifest_sha256": sha256_file(Path(store.path) / MANIFEST),
                      "fingerprint": store.manifest.get("fingerprint"), "model": store.manifest["model"]}}


def benchmark(path: str | Path = BENCH_RESULTS / "hsdl.json") -> tuple[pd.DataFrame, dict, str] | None:
    """The committed results of ``bench/hsdl.py`` at ``path``: ``(table, values, machine)`` with one
    row per case and method, the date and HSDL's speed-up over the fastest scikit-learn method per
    case, and the machine they ran on; None when there are none."""
    path = resolve(path)
    if not path.is_file():
        return None
    bench = json.loads(path.read_text())
    rows = [{"case": case["case"], "X": " x ".join(map(str, case["shape"])), "atoms": case["n_atoms"],
             "method": r["method"], "seconds": r["seconds"], "L1 error": r["rel_error_l1"],
             "Frobenius error": r["rel_error_fro"], "codes per column": r["mean_nnz_per_code"]}
            for case in bench["cases"] for r in case["results"]]
    speedups = {case["case"]: case["hsdl_runs"]["HSDL"]["speedup_vs_fastest"] for case in bench["cases"]}
    values = {"bench_date": bench["date"][:10], "bench_speedup_store": float(speedups.get("store", np.nan)),
              "bench_speedup_synthetic": float(speedups.get("synthetic", np.nan))}
    cpus = bench["machine"].get("cpu_count", bench["machine"].get("cpus"))
    machine = f"Benchmark of {bench['date'][:10]} on {cpus} CPU cores, {bench['machine']['torch_threads']} torch thread(s)."
    return pd.DataFrame(rows), values, machine
