"""What stage 2 reports about a fitted HSDL (the paper's section 3 and Fig 6), as tables and numbers.

Each function takes a fitted :class:`moe_utils.patterns.hsdl.HSDL` (and what it was fitted on) and returns
the tables a page shows and a dict of the values it glues into its text, after checking what must
hold (the loss fell, the dictionaries lie in [0, 1], usages sum to 1, coverage grows with k):
:func:`fit_summary`, :func:`atom_sizes`, :func:`top_atoms`, :func:`hierarchy_summary`,
:func:`coverage_against_chance`; :func:`artifact_extra` is what the saved model records about its
input, and :func:`benchmark` reads the committed ``bench/hsdl.py`` results.

The controls of each statistic (:mod:`moe_utils.patterns.hsdl_controls`) are reported by
:func:`cross_layer_controls` (chance of spanning layers), :func:`coverage_controls` (chance
coverage), :func:`tree_structure` (copied or split atoms), :func:`stability_controls` (refits) and
:func:`surrogate_comparison` (token-identity surrogates); :func:`stage_finding` is the stage's
verdict, :func:`open_matrix`, :func:`describe_matrix` and :func:`save_checked` open and close the page.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from moe_utils.common.project import BENCH_RESULTS, resolve
from moe_utils.patterns import atoms as patterns
from moe_utils.patterns import hsdl_controls
from moe_utils.patterns.atoms import atom_sizes, live_atoms  # noqa: F401 (stage 2's tables, named here too)
from moe_utils.common.artifacts import sha256_file
from moe_utils.common.markup import code_span
from moe_utils.patterns.cooccurrence import Cooccurrence
from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.patterns.token_null import against
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


def open_matrix(path: str | Path, *, granularity: str, value: str) -> tuple[RoutingStore, sp.csr_matrix]:
    """Stage 1's routing store at ``path`` (verified) and the expert activation matrix X HSDL factorises
    (:func:`moe_utils.patterns.expert_matrix.expert_matrix`)."""
    store = RoutingStore.open(path)
    return store, expert_matrix(store, granularity=granularity, value=value)


def describe_matrix(store: RoutingStore, X, *, granularity: str, value: str) -> tuple[str, dict]:
    """The page's line on X (Markdown, the model's name escaped) and its glued shape and non-zeros
    per column; RuntimeError when X is not (layers x experts) x (tokens or questions)."""
    columns = store.n_tokens if granularity == "token" else store.n_samples
    if X.shape != (store.n_layers * store.n_experts, columns):
        raise RuntimeError(f"X is {X.shape}, not {store.n_layers * store.n_experts} experts x {columns} {granularity}s")
    per_column = float(X.nnz / X.shape[1])
    text = (f"**X:** {X.shape[0]} experts ({store.n_layers} MoE layers x {store.n_experts}) x {X.shape[1]} "
            f"{granularity} columns of `{value}` values from {code_span(store.manifest['model']['name'])}, "
            f"{per_column:.1f} non-zeros per column.")
    return text, {"n_rows": X.shape[0], "n_cols": X.shape[1], "nnz_per_col": per_column}


def selections(store: RoutingStore) -> tuple[sp.csr_matrix, np.ndarray]:
    """The binary token matrix (which experts each token selects) and how many tokens select each expert."""
    selected = expert_matrix(store, granularity="token", value="binary")
    return selected, np.asarray(selected.sum(axis=1)).ravel()


def cross_layer_controls(tables: pd.DataFrame, cross_share: float, layout: tuple[int, int], usage: np.ndarray, *,
                         n_draws: int, seed: int = 0) -> tuple[dict, dict]:
    """How often random atoms of the sizes of the level-1 atoms in use span several layers, experts
    drawn uniformly or by ``usage`` (:func:`moe_utils.patterns.hsdl_controls.cross_layer_chance`):
    ``({"uniform": chance, "usage": chance}, values)`` with the glued means and intervals (%) and where
    the fitted atoms' ``cross_share`` (%) lies against both intervals."""
    sizes = live_atoms(tables)["n_experts"].to_numpy()
    chances = {name: hsdl_controls.cross_layer_chance(sizes, layout, n_draws=n_draws, weights=weights, seed=seed)
               for name, weights in (("uniform", None), ("usage", usage))}
    values = {f"cross_chance_{name}{suffix}": chance[key] * 100 for name, chance in chances.items()
              for suffix, key in (("", "mean"), ("_low", "low"), ("_high", "high"))}
    values["cross_vs_chance"] = against(cross_share / 100, min(c["low"] for c in chances.values()),
                                        max(c["high"] for c in chances.values()))
    return chances, {"control_draws": n_draws, **values}


def tree_structure(tables: pd.DataFrame, edges: list[pd.DataFrame]) -> tuple[dict, dict]:
    """:func:`moe_utils.patterns.hsdl_controls.hierarchy_structure` between levels 1 and 2 (empty for one
    level) and its glued values ``tree_<key>``, the edge shares in %."""
    structure = hsdl_controls.hierarchy_structure(tables, edges[0]) if edges else {}
    return structure, {f"tree_{key}": (value * 100 if key.startswith("edges_") else value)
                       for key, value in structure.items()}


def coverage_controls(tables: pd.DataFrame, selected, usage: np.ndarray, *, n_draws: int, seed: int = 0):
    """The paper's Fig 6 with its chance levels: ``(observed, chances, values)``, the coverage of the
    level-1 atoms in use (:func:`coverage_against_chance`), that of random atoms of the same sizes over
    ``n_draws`` draws, experts drawn uniformly or by ``usage``, and the glued coverages at 10% (%),
    ``cover_chance_<uniform|usage>_<order>_10[_low|_high]`` for pairs and triplets."""
    counted = Cooccurrence(selected)  # exact co-selection counts, shared by the atoms and every chance draw
    observed, _, values = coverage_against_chance(tables, counted, random_state=seed)
    sizes = live_atoms(tables)["n_experts"].to_numpy()
    chances = {}
    for key, name, weights in (("uniform", "random atoms, uniform", None), ("usage", "random atoms, by usage", usage)):
        chances[name] = frame = hsdl_controls.coverage_chance(sizes, counted, percents=COVERAGE_PERCENTS,
                                                              n_draws=n_draws, weights=weights, seed=seed)
        at10 = frame[frame["top_percent"] == 10].set_index("order")
        values.update({f"cover_chance_{key}_{order}_10{suffix}": float(at10.loc[order, column] * 100)
                       for order in (2, 3) if order in at10.index
                       for suffix, column in (("", "mean"), ("_low", "low"), ("_high", "high"))})
    return observed, chances, values


def coverage_table(observed: pd.DataFrame) -> pd.DataFrame:
    """Coverage per k% (rows) of pairs and triplets (columns)."""
    return observed.pivot(index="top_percent", columns="order", values="coverage").rename(
        columns={2: "pairs", 3: "triplets"})


#: The refits of :func:`moe_utils.patterns.hsdl_controls.stability` and their glued names.
STABILITY = {"another seed": "seed", "random initialisation": "init", "question halves": "halves"}


def stability_controls(hsdl, X, store: RoutingStore, threshold: float, *, granularity: str, seed: int = 0):
    """Refits of ``hsdl`` with another seed, from random atoms and on question halves
    (:func:`moe_utils.patterns.hsdl_controls.stability`): ``(matched, table, values)`` with the matched
    Jaccard of every comparison, its summary and the glued shares reproduced exactly (%) and medians."""
    questions = store.tokens["sample_id"].to_numpy()
    column_questions = questions if granularity == "token" else np.unique(questions)
    matched = hsdl_controls.stability(hsdl, X, column_questions, threshold, seed=seed)
    table = hsdl_controls.stability_summary(matched).set_index("comparison")
    values = {f"stable_{key}_{column}": float(table.loc[name, column] * (100 if column == "exact" else 1))
              for name, key in STABILITY.items() for column in ("exact", "median_jaccard")}
    return matched, table, values


#: The statistics compared with the surrogates, as the table names them.
SURROGATE_STATISTICS = {"rel_error": "relative L1 error", "n_live_1": "level-1 atoms in use",
                        "mean_experts_1": "experts per atom", "cross_share_1": "% spanning several layers",
                        "cover_pairs_10": "% covered at 10% (pairs)",
                        "cover_triplets_10": "% covered at 10% (triplets)"}


def surrogate_comparison(real: dict, surrogates: pd.DataFrame) -> tuple[pd.DataFrame, dict, dict]:
    """The real store's statistics (``real``: :data:`SURROGATE_STATISTICS` at least) against HSDL on the
    token-identity surrogates (one row each, :func:`moe_utils.patterns.hsdl_controls.surrogate_fits`):
    ``(table, comparison, values)`` with the surrogates' mean, min and max, and the glued ``surr_<k>``,
    ``surr_<k>_min``, ``surr_<k>_max`` and where the real value lies, ``surr_vs_<k>``."""
    statistics = list(SURROGATE_STATISTICS)
    comparison = {"real store": {k: real[k] for k in statistics},
                  "surrogates, mean": surrogates[statistics].mean().to_dict(),
                  "surrogates, min": surrogates[statistics].min().to_dict(),
                  "surrogates, max": surrogates[statistics].max().to_dict()}
    low, high = comparison["surrogates, min"], comparison["surrogates, max"]
    values = {f"surr_vs_{k}": against(real[k], low[k], high[k]) for k in statistics}
    for name, suffix in (("surrogates, mean", ""), ("surrogates, min", "_min"), ("surrogates, max", "_max")):
        values.update({f"surr_{k}{suffix}": float(v) for k, v in comparison[name].items()})
    return pd.DataFrame(comparison).rename(index=SURROGATE_STATISTICS), comparison, values


def stage_finding(values: dict) -> dict:
    """``finding_hsdl`` (:func:`moe_utils.patterns.hsdl_controls.finding`) from the values the page glued
    (of :func:`atom_sizes`, :func:`cross_layer_controls`, :func:`coverage_controls`,
    :func:`stability_controls`, :func:`tree_structure` and :func:`surrogate_comparison`)."""
    return {"finding_hsdl": hsdl_controls.finding(
        cover_pairs_10=values["cover_pairs_10"], cover_chance_uniform_2_10=values["cover_chance_uniform_2_10"],
        cover_chance_usage_2_10=values["cover_chance_usage_2_10"],
        surr_cover_pairs_10_min=values["surr_cover_pairs_10_min"],
        surr_cover_pairs_10_max=values["surr_cover_pairs_10_max"],
        surr_vs_cover_pairs_10=values["surr_vs_cover_pairs_10"],
        cross_share_1=values["cross_share_1"], cross_chance_uniform=values["cross_chance_uniform"],
        cross_vs_chance=values["cross_vs_chance"], stable_seed_exact=values["stable_seed_exact"],
        tree_mean_size_1=values.get("tree_mean_size_1"), tree_mean_size_2=values.get("tree_mean_size_2"))}


def save_checked(hsdl, path: str | Path, store: RoutingStore, X, *, granularity: str, value: str,
                 n_check: int = 2000) -> list[str]:
    """Save ``hsdl`` to ``path`` with :func:`artifact_extra` and read it back: RuntimeError unless the
    loaded model gives the same codes on the first ``n_check`` columns of X. Returns the files written."""
    hsdl.save(path, extra=artifact_extra(store, X, granularity=granularity, value=value))
    sample = X[:, : min(X.shape[1], n_check)]
    if (type(hsdl).load(path).transform(sample) != hsdl.transform(sample)).nnz:
        raise RuntimeError(f"the HSDL read back from {path} codes X differently from the one saved")
    return sorted(p.name for p in Path(path).iterdir())


#: How the page formats :func:`benchmark`'s table.
BENCH_FORMAT = {"seconds": "{:.1f}", "L1 error": "{:.3f}", "Frobenius error": "{:.3f}", "codes per column": "{:.1f}"}


def benchmark_view(path: str | Path = BENCH_RESULTS / "hsdl.json") -> tuple[str, pd.DataFrame | None, dict]:
    """What the page shows of :func:`benchmark`: the machine line (Markdown), the table and the glued
    values; without results, how to produce them, no table and values that say so (n/a, NaN)."""
    bench = benchmark(path)
    if bench is None:
        return ("No benchmark results: run `python bench/hsdl.py`.", None,
                {"bench_date": "n/a", "bench_speedup_store": float("nan"), "bench_speedup_synthetic": float("nan")})
    table, values, machine = bench
    return machine, table, values
