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
# triplets that exhaustive counting finds most often. Every statistic stands beside its control:
# random atoms of the same sizes (chance), refits (stability) and HSDL on surrogate stores where
# token identity alone couples the layers. The fitted model is saved for the annotation and
# pruning stages.

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
control_draws = 1000
n_surrogates = 3

# %% tags=["hide-input"]
from IPython.display import Markdown, display

from moe_utils.common import plotting
from moe_utils.patterns import hsdl_controls, null_plots
from moe_utils.patterns.hsdl import HSDL
from moe_utils.stages import glue_values, model_caveat, stage_paths
from moe_utils.stages import hsdl as hsdl_report

plotting.use_style()
paths = stage_paths(artifacts_dir)

# %% [markdown]
# ## 1. The matrix to factorise

# %%
store, X = hsdl_report.open_matrix(paths.store, granularity=granularity, value=value)
layout = (store.n_layers, store.n_experts)
text, values = hsdl_report.describe_matrix(store, X, granularity=granularity, value=value)
glue_values(**values)
display(Markdown(text))
if caveat := model_caveat(store.manifest["model"]["name"]):
    display(Markdown(caveat))

# %% [markdown]
# ## 2. Fitting the hierarchy
#
# Level sizes are given relative to the number of experts N_e (a float is a multiple of N_e), so
# the same parameters fit a small or a large model.

# %%
hsdl = HSDL(levels=hsdl_levels, lambda_hier=hsdl_lambda_hier, lambda_rec=hsdl_lambda_rec,
            n_steps=hsdl_steps, batch_size=hsdl_batch_size, layout=layout, device=device or "auto",
            random_state=hsdl_seed).fit(X)
fit = hsdl_report.fit_summary(hsdl, X)
glue_values(**fit)
plotting.glue_figure("fig_loss", plotting.hsdl_loss_curves(hsdl.loss_history_))
hsdl

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
tables, summary, sizes = hsdl_report.atom_sizes(hsdl, atom_threshold)
glue_values(**sizes)
plotting.glue_figure("fig_sizes", plotting.atom_size_distribution(tables))
summary.style.format({"mean_experts": "{:.2f}", "mean_layers": "{:.2f}", "cross_layer": "{:.0%}"}, escape="html")

# %% [markdown]
# At level 1, {glue:text}`n_live_1` atoms are in use, with {glue:text}`mean_experts_1:.1f` experts
# each on average; {glue:text}`cross_share_1:.0f`% of them span more than one MoE layer.
#
# Is that a finding? An atom of several experts drawn at random also spans several layers most of
# the time, since most of its experts lie in other layers than the first. The chance level below
# draws {glue:text}`control_draws` sets of random atoms of the same sizes, experts drawn uniformly
# or in proportion to how often each expert is selected (intervals: 95% of the draws).

# %%
selected, usage = hsdl_report.selections(store)
_, cross = hsdl_report.cross_layer_controls(tables, sizes["cross_share_1"], layout, usage, n_draws=control_draws,
                                            seed=hsdl_seed)
glue_values(**cross)

# %% [markdown]
# Random atoms of the same sizes span several layers {glue:text}`cross_chance_uniform:.0f`%
# [{glue:text}`cross_chance_uniform_low:.0f`, {glue:text}`cross_chance_uniform_high:.0f`] of the
# time with experts drawn uniformly and {glue:text}`cross_chance_usage:.0f`%
# [{glue:text}`cross_chance_usage_low:.0f`, {glue:text}`cross_chance_usage_high:.0f`] drawn by
# usage, against {glue:text}`cross_share_1:.0f`% for the fitted atoms, {glue:text}`cross_vs_chance`
# the 95% range of both chance levels. Most of the cross-layer share is what atoms of these sizes
# do by chance; only the difference from chance says anything about collaboration.
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
top, n_groups = hsdl_report.top_atoms(tables)
titles = [f"atom {a}: {u:.1%} of use" for a, u in zip(top["atom"], top["usage"])]
glue_values(n_groups_1=n_groups)
plotting.glue_figure("fig_atoms", plotting.atom_maps(
    hsdl.dictionaries_[0], layout, top["atom"].tolist(), titles=titles,
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
edges, usages, hierarchy = hsdl_report.hierarchy_summary(hsdl, min_share=0.1)
glue_values(**hierarchy)
plotting.glue_figure("fig_tree", plotting.hierarchy_tree(edges, usages) if edges else plotting.atom_maps(
    hsdl.dictionaries_[0], layout, [], title="(one level: no hierarchy)"))

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
# atoms share them. The method page discusses this. What this fit shows:

# %%
structure, tree = hsdl_report.tree_structure(tables, edges)
glue_values(**tree)
structure

# %% [markdown]
# Level-2 atoms have {glue:text}`tree_mean_size_2:.2f` experts on average against
# {glue:text}`tree_mean_size_1:.2f` at level 1. Of the {glue:text}`tree_n_parents` level-1 atoms
# with children, {glue:text}`tree_n_split` split into two or more finer atoms and
# {glue:text}`tree_n_copied` are copied by one child holding at least 90% of their weight
# ({glue:text}`tree_n_copied_exact` of these with exactly the parent's experts). Of the edges,
# {glue:text}`tree_edges_smaller:.0f`% lead to a child with fewer experts than its parent,
# {glue:text}`tree_edges_same:.0f`% to one as large and {glue:text}`tree_edges_larger:.0f`% to a
# larger one. The paper describes level 2 as finer than level 1; where the children are not
# smaller, this fit's second level is not that coarse-to-fine refinement.
#
# ## 6. Do the atoms match exhaustive counting? (the paper's Fig 6)
#
# Exhaustive counting ranks every pair (triplet) of experts by how many tokens select all of them.
# An atom is *covered* at k% if its strongest pair (triplet) is among the top k% of the observed
# pairs (triplets). Random atoms of the same sizes give the chance level, averaged over
# {glue:text}`control_draws` draws, experts drawn uniformly or by usage.

# %%
observed, chances, coverage = hsdl_report.coverage_controls(tables, selected, usage, n_draws=control_draws,
                                                            seed=hsdl_seed)
glue_values(**coverage)
plotting.glue_figure("fig_coverage", null_plots.coverage_with_chance(observed, chances))
hsdl_report.coverage_table(observed).style.format("{:.0%}", escape="html")

# %% [markdown]
# {glue:text}`cover_pairs_10:.0f`% of the level-1 atoms have their strongest pair among the top
# 10% of co-selected pairs ({glue:text}`cover_triplets_10:.0f`% for triplets), against
# {glue:text}`cover_chance_uniform_2_10:.0f`% [{glue:text}`cover_chance_uniform_2_10_low:.0f`,
# {glue:text}`cover_chance_uniform_2_10_high:.0f`] for random atoms of the same sizes drawn
# uniformly and {glue:text}`cover_chance_usage_2_10:.0f`% [{glue:text}`cover_chance_usage_2_10_low:.0f`,
# {glue:text}`cover_chance_usage_2_10_high:.0f`] drawn by usage (triplets:
# {glue:text}`cover_chance_uniform_3_10:.0f`% and {glue:text}`cover_chance_usage_3_10:.0f`%). The
# paper reports about 60% at 10% for Phi-3.5-MoE. Coverage says the atoms are frequent sets; the
# next two sections ask whether they are stable, and whether they are more than token identity.
#
# ```{glue:figure} fig_coverage
# :name: fig-hsdl-coverage
#
# Share of level-1 atoms whose strongest expert pair (triplet) is among the top k% most frequently
# co-selected pairs (triplets) of exhaustive counting over all tokens; dashed and dotted: random
# atoms of the same sizes, experts drawn uniformly or by usage (mean of the draws, shaded: 95% of
# the draws); star: the paper's reported point.
# ```
#
# ## 7. Are the atoms stable?
#
# A label given to an atom describes the model only if another fit finds the atom again. The
# multi-expert level-1 atoms are refitted three ways, and the atoms of two fits are matched one
# to one (Hungarian matching on the Jaccard similarity of their experts): with another seed
# (another initial sample and batch order), from random initial atoms instead of the most
# co-selected pairs, and on one half of the questions against the other half.

# %%
matched, stable, stability = hsdl_report.stability_controls(hsdl, X, store, atom_threshold,
                                                            granularity=granularity, seed=hsdl_seed)
glue_values(**stability)
plotting.glue_figure("fig_stability", null_plots.atom_stability(matched))
stable.style.format({"exact": "{:.0%}", "median_jaccard": "{:.2f}"}, escape="html")

# %% [markdown]
# A refit with another seed reproduces {glue:text}`stable_seed_exact:.0f`% of the multi-expert
# atoms exactly (median Jaccard {glue:text}`stable_seed_median_jaccard:.2f`), one from random
# initial atoms {glue:text}`stable_init_exact:.0f`% (median {glue:text}`stable_init_median_jaccard:.2f`),
# and fits on the two halves of the questions share {glue:text}`stable_halves_exact:.0f`%
# (median {glue:text}`stable_halves_median_jaccard:.2f`). Atoms that are not reproduced describe
# one fit rather than the model; the labels of stage 3 are read with that in mind.
#
# ```{glue:figure} fig_stability
# :name: fig-hsdl-stability
#
# Share of the multi-expert level-1 atoms whose one-to-one match in another fit has at least a
# given Jaccard similarity (1: the same experts), per comparison.
# ```
#
# ## 8. Are the atoms more than token identity? (surrogate stores)
#
# The token-identity control of stage 1, applied to the whole fit: in a surrogate store, each
# layer's routing is permuted among the occurrences of the same token, independently per layer.
# Every layer's routing given the token is kept exactly; whatever couples the layers through the
# context is gone. HSDL is refitted on {glue:text}`n_surrogates` surrogates with the same
# parameters; where a statistic is as large on the surrogates as on the real store, token
# identity explains it.

# %%
surrogates = hsdl_controls.surrogate_fits(hsdl, store, atom_threshold, n_surrogates=n_surrogates,
                                          granularity=granularity, value=value, seed=hsdl_seed)
table, _, surrogate = hsdl_report.surrogate_comparison({**fit, **sizes, **coverage}, surrogates)
glue_values(n_surrogates=n_surrogates, **surrogate, **hsdl_report.stage_finding(
    {**sizes, **cross, **tree, **coverage, **stability, **surrogate}))
table.style.format("{:.2f}", escape="html")

# %% [markdown]
# On the surrogates, where only token identity couples the layers, HSDL reconstructs X with a
# relative L1 error of {glue:text}`surr_rel_error:.3f` ({glue:text}`surr_rel_error_min:.3f` to
# {glue:text}`surr_rel_error_max:.3f`; real store {glue:text}`rel_error:.3f`), with
# {glue:text}`surr_mean_experts_1:.2f` experts per atom (real {glue:text}`mean_experts_1:.2f`),
# {glue:text}`surr_cross_share_1:.0f`% of the atoms spanning several layers (real
# {glue:text}`cross_share_1:.0f`%) and {glue:text}`surr_cover_pairs_10:.0f`% covered at 10%
# ({glue:text}`surr_cover_pairs_10_min:.0f` to {glue:text}`surr_cover_pairs_10_max:.0f`; real
# {glue:text}`cover_pairs_10:.0f`%). Against the range of the surrogates, the real store's
# reconstruction error is {glue:text}`surr_vs_rel_error`, its atom size
# {glue:text}`surr_vs_mean_experts_1`, its cross-layer share {glue:text}`surr_vs_cross_share_1` and
# its coverage {glue:text}`surr_vs_cover_pairs_10` (pairs) and {glue:text}`surr_vs_cover_triplets_10`
# (triplets). A statistic within or near the surrogates' range is what token identity produces
# by itself; with {glue:text}`n_surrogates` surrogates the range is narrow, so "above" or "below"
# by a small margin is weak evidence of collaboration through the context.
#
# ## 9. The artifact for the next stages
#
# The model is written with a manifest naming its parameters, the matrix it was fitted on and the
# routing store (by the checksum of its manifest), and is read back through that manifest.

# %%
files = hsdl_report.save_checked(hsdl, paths.hsdl, store, X, granularity=granularity, value=value)
glue_values(artifact_dir=str(paths.hsdl))
files

# %% [markdown]
# ## 10. How fast is it? (benchmark)
#
# `bench/hsdl.py` times HSDL's level 1 against scikit-learn's `NMF` (coordinate descent and
# multiplicative updates) and `MiniBatchDictionaryLearning` on the same matrix and number of
# atoms: the default store's token matrix and a synthetic matrix shaped like DeepSeek-MoE-16B
# (N_e = 1728, 100,000 tokens). These figures come from the committed benchmark run named below,
# not from this notebook's run; the command to reproduce them is in `bench/README.md`.

# %%
machine, table, values = hsdl_report.benchmark_view()  # bench/results/hsdl.json of the project
glue_values(**values)
display(Markdown(machine))
if table is not None:
    display(table.style.format(hsdl_report.BENCH_FORMAT, escape="html").hide(axis="index"))

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
# - {glue:text}`cross_share_1:.0f`% of the level-1 atoms in use span several MoE layers, but random
#   atoms of the same sizes do so {glue:text}`cross_chance_uniform:.0f`% (uniform) to
#   {glue:text}`cross_chance_usage:.0f`% (by usage) of the time: crossing layers is not by itself
#   evidence of collaboration.
# - Against exhaustive counting, {glue:text}`cover_pairs_10:.0f`% of the atoms fall in the top
#   10% of co-selected pairs (chance over {glue:text}`control_draws` draws:
#   {glue:text}`cover_chance_uniform_2_10:.0f`% uniform, {glue:text}`cover_chance_usage_2_10:.0f`% by
#   usage); HSDL on token-identity surrogates reaches {glue:text}`surr_cover_pairs_10:.0f`%.
# - Level-2 atoms have {glue:text}`tree_mean_size_2:.2f` experts against {glue:text}`tree_mean_size_1:.2f`
#   at level 1; {glue:text}`tree_n_split` of {glue:text}`tree_n_parents` level-1 atoms split,
#   {glue:text}`tree_n_copied` are copied by one child.
# - Another seed reproduces {glue:text}`stable_seed_exact:.0f`% of the multi-expert atoms exactly,
#   random initial atoms {glue:text}`stable_init_exact:.0f`%, the other half of the questions
#   {glue:text}`stable_halves_exact:.0f`%.
# - The model is saved in {glue:text}`artifact_dir` for annotation (stage 3) and pruning (stage 4).
