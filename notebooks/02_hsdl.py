# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage 2: hierarchical sparse dictionary learning (HSDL)
#
# *Which groups of experts work together, across layers, at several levels of detail?*
#
# This stage factorises the expert activation matrix X of stage 1 into a dictionary of
# collaboration patterns, level by level: X ~ D_1 R_1, then D_1 ~ D_2 R_2, ... (the paper's
# section 3, {cite}`tang2025unveiling`). Each column of a dictionary, an *atom*, is a group of
# experts that fire together, possibly in different MoE layers; the codes R say how strongly each
# token uses each atom. The loss, its three terms per level and the decisions the paper leaves
# open are on the {doc}`../method` page.
#
# **What you will see:** the fit and how its loss terms evolve; how many experts and layers the
# atoms span at each level; the most used atoms drawn as layer x expert maps; how finer atoms
# compose coarser ones; and the paper's Fig 6, whether the atoms are among the expert pairs and
# triplets that exhaustive counting finds most often. The fitted model is saved for the
# annotation and pruning stages.

# %% tags=["parameters"]
artifacts_dir = "artifacts/tiny"
granularity = "token"
value = "weight"
hsdl_levels = [1.0, 2.0]
hsdl_lambda_hier = 500.0
hsdl_lambda_rec = 1000.0
hsdl_steps = 600
hsdl_batch_size = 512
hsdl_seed = 0
device = None
atom_threshold = 0.5

# %% tags=["hide-input"]
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from moe_utils import patterns, plotting
from moe_utils.expert_matrix import expert_matrix
from moe_utils.hsdl import HSDL
from moe_utils.store import RoutingStore

plotting.use_style()
store_dir = Path(artifacts_dir) / "01_capture" / "store"
out_dir = Path(artifacts_dir) / "02_hsdl"

# %% [markdown]
# ## 1. The matrix to factorise

# %%
store = RoutingStore.open(store_dir)
X = expert_matrix(store, granularity=granularity, value=value)
layout = (store.n_layers, store.n_experts)
model_name = store.manifest["model"]["name"]
n_columns = store.n_tokens if granularity == "token" else store.n_samples
assert X.shape == (store.n_layers * store.n_experts, n_columns)
glue("n_rows", X.shape[0], display=False)
glue("n_cols", X.shape[1], display=False)
glue("nnz_per_col", float(X.nnz / X.shape[1]), display=False)
display(Markdown(
    f"**X:** {X.shape[0]} experts ({store.n_layers} MoE layers x {store.n_experts}) x {X.shape[1]} "
    f"{granularity} columns of `{value}` values from `{model_name}`, "
    f"{X.nnz / X.shape[1]:.1f} non-zeros per column."
))
if model_name.startswith("random:"):
    display(Markdown("**The routing comes from a randomly initialised model: the patterns below are "
                     "noise, not learned collaboration. Nothing here is a finding.**"))

# %% [markdown]
# ## 2. Fitting the hierarchy
#
# Level sizes are given relative to the number of experts N_e (a float is a multiple of N_e), so
# the same parameters fit a small or a large model.

# %%
model = HSDL(levels=hsdl_levels, lambda_hier=hsdl_lambda_hier, lambda_rec=hsdl_lambda_rec,
             n_steps=hsdl_steps, batch_size=hsdl_batch_size, layout=layout, device=device or "auto",
             random_state=hsdl_seed).fit(X)
history = model.loss_history_
rel_error = model.score(X)
codes = model.codes_[0]
nnz_per_code = float((codes != 0).sum(axis=0).mean())
assert all(0 <= d.min() and d.max() <= 1 for d in model.dictionaries_)
assert codes.min() >= 0 and all(r.min() >= 0 for r in model.codes_[1:])
assert np.mean(history["total"][-5:]) < np.mean(history["total"][:5]), "the loss did not decrease"
glue("level_sizes", ", ".join(map(str, model.level_sizes_)), display=False)
glue("fit_seconds", float(model.fit_seconds_), display=False)
glue("n_steps", int(model.n_steps_), display=False)
glue("rel_error", float(rel_error), display=False)
glue("nnz_per_code", nnz_per_code, display=False)
plotting.glue_figure("fig_loss", plotting.hsdl_loss_curves(history))
model

# %% [markdown]
# Levels of {glue:text}`level_sizes` atoms were fitted in {glue:text}`n_steps` Adam steps
# ({glue:text}`fit_seconds:.1f` s). Level 1 reconstructs X with a relative L1 error of
# {glue:text}`rel_error:.3f`, using {glue:text}`nnz_per_code:.2f` atoms per column on average.
#
# ```{glue:figure} fig_loss
# :name: fig-hsdl-loss
#
# The three loss terms of every level during training (unweighted; the objective weighs them
# 1 : lambda_hier : lambda_rec). The early part optimises a smoothed reconstruction and ramps the
# sparsity terms in; after it the objective is exactly the paper's.
# ```

# %% [markdown]
# ## 3. How big are the atoms?
#
# An atom's experts are the (layer, expert) pairs whose dictionary entry is at least the
# threshold; atoms whose experts lie in more than one layer are cross-layer collaborations.

# %%
tables = pd.concat([patterns.atom_table(model, level=k + 1, threshold=atom_threshold)
                    for k in range(len(model.level_sizes_))], ignore_index=True)
live = tables[tables["alive"]]
summary = live.groupby("level").agg(atoms=("atom", "size"), mean_experts=("n_experts", "mean"),
                                    mean_layers=("n_layers", "mean"), cross_layer=("cross_layer", "mean"))
for level in range(1, len(model.level_sizes_) + 1):
    np.testing.assert_allclose(tables.loc[tables["level"] == level, "usage"].sum(), 1.0, rtol=1e-5)
level1 = live[live["level"] == 1]
glue("n_live_1", int(len(level1)), display=False)
glue("cross_share_1", float(level1["cross_layer"].mean() * 100) if len(level1) else 0.0, display=False)
glue("mean_experts_1", float(level1["n_experts"].mean()) if len(level1) else 0.0, display=False)
plotting.glue_figure("fig_sizes", plotting.atom_size_distribution(tables))
summary.style.format({"mean_experts": "{:.2f}", "mean_layers": "{:.2f}", "cross_layer": "{:.0%}"}, escape="html")

# %% [markdown]
# At level 1, {glue:text}`n_live_1` atoms are in use, with {glue:text}`mean_experts_1:.1f` experts
# each on average; {glue:text}`cross_share_1:.0f`% of them span more than one MoE layer.
#
# ```{glue:figure} fig_sizes
# :name: fig-hsdl-sizes
#
# Experts per atom (left) and MoE layers spanned per atom (right), per level, over the atoms in
# use (dictionary entries >= the threshold).
# ```
#
# ## 4. The most used collaborations
#
# Each map is one atom of at least two experts: rows are MoE layers, columns experts, darker =
# larger dictionary entry.

# %%
groups = level1[level1["n_experts"] >= 2]
top = (groups if len(groups) else level1).sort_values("usage", ascending=False).head(8)
titles = [f"atom {a}: {u:.1%} of use" for a, u in zip(top["atom"], top["usage"])]
glue("n_groups_1", int(len(groups)), display=False)
plotting.glue_figure("fig_atoms", plotting.atom_maps(
    model.dictionaries_[0], layout, top["atom"].tolist(), titles=titles,
    title="The most used level-1 atoms of two or more experts"))
top[["atom", "usage", "n_layers", "experts"]].style.format({"usage": "{:.1%}"}, escape="html").hide(axis="index")

# %% [markdown]
# ```{glue:figure} fig_atoms
# :name: fig-hsdl-atoms
#
# The most used level-1 atoms of two or more experts ({glue:text}`n_groups_1` such atoms in all)
# as layer x expert maps, with their share of the code mass.
# ```
#
# ## 5. How finer atoms compose coarser ones
#
# Level k+1 explains each level-k atom as a non-negative mix of its own atoms
# (D_k ~ D_{k+1} R_{k+1}); an edge joins an atom to the finer atoms that make up at least 10% of it.

# %%
n_levels = len(model.level_sizes_)
edges = [patterns.hierarchy(model, level=k, min_share=0.1) for k in range(1, n_levels)]
usages = [patterns.atom_usage(model, level=k) for k in range(1, n_levels + 1)]
hier_errors = model.hierarchy_error()
glue("hier_error", float(hier_errors[0]) if hier_errors else 0.0, display=False)
glue("children_per_atom", float(edges[0].groupby("parent").size().mean()) if edges and len(edges[0]) else 0.0,
     display=False)
if n_levels > 1:
    assert hier_errors[0] < 0.5, f"level 2 does not reconstruct level 1 (relative L1 error {hier_errors[0]:.2f})"
    plotting.glue_figure("fig_tree", plotting.hierarchy_tree(edges, usages))
else:
    plotting.glue_figure("fig_tree", plotting.atom_maps(model.dictionaries_[0], layout, [],
                                                        title="(one level: no hierarchy)"))

# %% [markdown]
# Level 2 reproduces the level-1 dictionary with a relative L1 error of
# {glue:text}`hier_error:.3f`; a level-1 atom is made of {glue:text}`children_per_atom:.1f` finer
# atoms on average.
#
# ```{glue:figure} fig_tree
# :name: fig-hsdl-tree
#
# The most used level-1 atoms (top row, node size = usage) and the finer atoms of the next
# level(s) that compose them; edge width follows the share of the parent.
# ```
#
# Under the paper's loss a deeper level may simply copy the atoms above it (one child with
# share 1): copying costs no more than splitting, so finer sub-patterns appear only where several
# atoms share them. The method page discusses this.
#
# ## 6. Do the atoms match exhaustive counting? (the paper's Fig 6)
#
# Exhaustive counting ranks every pair (triplet) of experts by how many tokens select all of them.
# An atom is *covered* at k% if its strongest pair (triplet) is among the top k% of the observed
# pairs (triplets). Random atoms of the same sizes give the chance level.

# %%
selected = expert_matrix(store, granularity="token", value="binary")
atoms = [np.asarray(r) for r in level1.sort_values("atom")["rows"]]
ks = (1, 2, 5, 10, 20, 50, 100)
observed = patterns.coverage(atoms, selected, orders=(2, 3), top_percent=ks)
chance = patterns.coverage(patterns.random_atoms(atoms, X.shape[0], random_state=hsdl_seed), selected,
                           orders=(2, 3), top_percent=ks)
for frame in (observed, chance):
    for _, group in frame.groupby("order"):
        values = group["coverage"].dropna().to_numpy()
        assert np.all(np.diff(values) >= 0), "coverage must grow with k"
at10 = observed[observed["top_percent"] == 10].set_index("order")["coverage"]
chance10 = chance[chance["top_percent"] == 10].set_index("order")["coverage"]
glue("cover_pairs_10", float(at10.get(2, np.nan) * 100), display=False)
glue("cover_triplets_10", float(at10.get(3, np.nan) * 100), display=False)
glue("chance_pairs_10", float(chance10.get(2, np.nan) * 100), display=False)
plotting.glue_figure("fig_coverage", plotting.coverage_curves(observed, chance))
observed.pivot(index="top_percent", columns="order", values="coverage").rename(
    columns={2: "pairs", 3: "triplets"}).style.format("{:.0%}", escape="html")

# %% [markdown]
# {glue:text}`cover_pairs_10:.0f`% of the level-1 atoms have their strongest pair among the top
# 10% of co-selected pairs ({glue:text}`cover_triplets_10:.0f`% for triplets), against
# {glue:text}`chance_pairs_10:.0f`% for random atoms of the same sizes. The paper reports about 60%
# at 10% for Phi-3.5-MoE.
#
# ```{glue:figure} fig_coverage
# :name: fig-hsdl-coverage
#
# Share of level-1 atoms whose strongest expert pair (triplet) is among the top k% most frequently
# co-selected pairs (triplets) of exhaustive counting over all tokens; dashed: random atoms of the
# same sizes; star: the paper's reported point.
# ```
#
# ## 7. The artifact for the next stages
#
# The model is written with a manifest naming its parameters, the matrix it was fitted on and the
# routing store (by the checksum of its manifest), and is read back through that manifest.

# %%
store_manifest = store_dir / "manifest.json"
model.save(out_dir, extra={
    "x_spec": {"granularity": granularity, "value": value, "shape": list(X.shape), "nnz": int(X.nnz),
               "layout": list(layout)},
    "store": {"path": str(store_dir), "manifest_sha256": hashlib.sha256(store_manifest.read_bytes()).hexdigest(),
              "fingerprint": store.manifest.get("fingerprint"), "model": store.manifest["model"]},
})
reloaded = HSDL.load(out_dir)
sample = X[:, : min(X.shape[1], 2000)]
assert (reloaded.transform(sample) != model.transform(sample)).nnz == 0
glue("artifact_dir", str(out_dir), display=False)
sorted(p.name for p in out_dir.iterdir())

# %% [markdown]
# ## 8. How fast is it? (benchmark)
#
# `bench/hsdl.py` times HSDL's level 1 against scikit-learn's `NMF` (coordinate descent and
# multiplicative updates) and `MiniBatchDictionaryLearning` on the same matrix and number of
# atoms: the default store's token matrix and a synthetic matrix shaped like DeepSeek-MoE-16B
# (N_e = 1728, 100,000 tokens). These figures come from the committed benchmark run named below,
# not from this notebook's run; the command to reproduce them is in `bench/README.md`.

# %%
bench_path = Path("bench/results/hsdl.json")
if bench_path.is_file():
    bench = json.loads(bench_path.read_text())
    rows = [{"case": case["case"], "X": " x ".join(map(str, case["shape"])), "atoms": case["n_atoms"],
             "method": r["method"], "seconds": r["seconds"], "L1 error": r["rel_error_l1"],
             "Frobenius error": r["rel_error_fro"], "codes per column": r["mean_nnz_per_code"]}
            for case in bench["cases"] for r in case["results"]]
    speedups = {case["case"]: case["hsdl_runs"]["HSDL"]["speedup_vs_fastest"] for case in bench["cases"]}
    glue("bench_date", bench["date"][:10], display=False)
    glue("bench_speedup_store", float(speedups.get("store", np.nan)), display=False)
    glue("bench_speedup_synthetic", float(speedups.get("synthetic", np.nan)), display=False)
    cpus = bench["machine"].get("cpu_count", bench["machine"].get("cpus"))
    display(Markdown(f"Benchmark of {bench['date'][:10]} on {cpus} CPU cores, "
                     f"{bench['machine']['torch_threads']} torch thread(s)."))
    display(pd.DataFrame(rows).style.format({"seconds": "{:.1f}", "L1 error": "{:.3f}",
                                             "Frobenius error": "{:.3f}", "codes per column": "{:.1f}"}, escape="html")
            .hide(axis="index"))
else:
    glue("bench_date", "n/a", display=False)
    for name in ("bench_speedup_store", "bench_speedup_synthetic"):
        glue(name, float("nan"), display=False)
    display(Markdown("No benchmark results: run `python bench/hsdl.py`."))

# %% [markdown]
# With its default settings HSDL is {glue:text}`bench_speedup_store:.1f`x faster than the fastest
# scikit-learn method on the store and {glue:text}`bench_speedup_synthetic:.1f`x on the
# DeepSeek-shaped matrix (benchmark of {glue:text}`bench_date`), with a lower L1 error (the
# paper's loss) and sparser codes. Its Frobenius error is higher: NMF and dictionary learning
# minimise that norm, HSDL does not.
#
# ## Summary
#
# - HSDL factorised the {glue:text}`n_rows` x {glue:text}`n_cols` activation matrix into levels of
#   {glue:text}`level_sizes` atoms; level 1 reconstructs X with a relative L1 error of
#   {glue:text}`rel_error:.3f` using {glue:text}`nnz_per_code:.2f` atoms per column.
# - {glue:text}`cross_share_1:.0f`% of the level-1 atoms in use span several MoE layers: the
#   cross-layer collaboration the paper describes.
# - Against exhaustive counting, {glue:text}`cover_pairs_10:.0f`% of the atoms fall in the top
#   10% of co-selected pairs (chance: {glue:text}`chance_pairs_10:.0f`%).
# - The model is saved in {glue:text}`artifact_dir` for annotation (stage 3) and pruning (stage 4).
