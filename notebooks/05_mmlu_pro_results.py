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
# # Stage 5: MMLU-Pro results and findings
#
# *Does pruning for one domain cost the others?*
#
# The paper prunes half of Phi-3.5-MoE's experts with CAEP fitted on the activations of one
# MMLU-Pro domain, evaluates the pruned model on every domain, and shows that each domain is hurt
# least by the pruning fitted on it: the diagonal of its Fig 9 {cite}`tang2025unveiling`. This
# stage repeats that experiment with the statistics the paper leaves out, and gathers the study's
# findings.
#
# **What you will see:**
# 1. how different the experts kept for each domain are;
# 2. the paper's Fig 9 for CAEP and for the strongest baseline of stage 4, each pruning fitted on
#    one domain and evaluated on every domain, with a permutation test of "the diagonal is best",
#    bootstrap intervals, and the comparison with CAEP fitted on all domains;
# 3. multiple-choice accuracy with binomial intervals;
# 4. stage 4's general pruning per MMLU-Pro category: which categories break first;
# 5. the findings, side by side with what the paper reports.

# %% tags=["parameters"]
model = "embedded"
device = None
dtype = None
trust_remote_code = False
categories = ["math", "computer science", "physics", "law", "psychology"]
n_per_category = 20
seed = 0
data_dir = None
batch_size = 8
max_length = 512
artifacts_dir = "artifacts/tiny"
caep_threshold_ratio = 0.9
caep_level = 1
min_per_layer = None
eval_batch_size = 8
eval_num_fewshot = 0
domain_prune_ratio = 0.5
domain_baseline = None
domain_refit_hsdl = False
domain_metric = None
domain_ppl_limit = 40
domain_mc_limit = 20
n_bootstrap = 1000
confidence = 0.95

# %% tags=["hide-input"]
import time

from IPython.display import Markdown, display

from moe_utils.common import plotting
from moe_utils.evaluation.harness import resolve_category
from moe_utils.stages import glue_values, model_caveat, stage_paths
from moe_utils.stages import mmlu_pro_results as results5

plotting.use_style()
started = time.perf_counter()
paths = stage_paths(artifacts_dir)
domain_names = [resolve_category(c) for c in categories]
metric, metric_label = results5.domain_metric(model, domain_metric)

# %% [markdown]
# ## 1. Inputs

# %%
inputs = results5.open_inputs(paths, model, domain_names, min_per_layer=min_per_layer, device=device, dtype=dtype,
                              trust_remote_code=trust_remote_code)  # the pruning budget is stage 4's
glue_values(model_name=model, ratio_pct=domain_prune_ratio * 100, n_domains=len(domain_names), metric_label=metric_label)
display(Markdown(results5.describe_inputs(inputs, model, domain_names, n_per_category=n_per_category,
                                          ratio=domain_prune_ratio)))
if caveat := model_caveat(model, results5.SMALL_MODEL_CAVEAT):
    display(Markdown(caveat))

# %% [markdown]
# ## 2. Pruning fitted on one domain
#
# **CAEP for one domain.** The dictionary D_1 of stage 2 was fitted on the tokens of all domains.
# CAEP's contribution e = D_1 R_sum (Algorithm 1) sums each atom's codes over the columns of X;
# restricting R to the columns of one domain's tokens makes e, and so the mask, specific to that
# domain, without refitting the dictionary (the {doc}`../method` page discusses this choice;
# `domain_refit_hsdl = True` refits HSDL on each domain instead). Each layer keeps at least top-k
# experts, as in stage 4.
#
# **The baseline** is the calibration baseline that lost least in stage 4 at this ratio,
# recalibrated on each domain's questions alone.

# %%
fitted = results5.fit_masks(
    inputs, domain_names, ratio=domain_prune_ratio, threshold_ratio=caep_threshold_ratio, level=caep_level,
    calibration_texts=results5.calibration_texts(inputs.store, domain_names, n_per_category=n_per_category,
                                                 seed=seed, data_dir=data_dir),
    metric=metric, baseline=domain_baseline, refit=domain_refit_hsdl, cache_dir=paths.results / "masks",
    calibrate_kwargs={"batch_size": batch_size, "max_length": max_length})
glue_values(**fitted.values)
plotting.glue_figure("fig_overlap", plotting.domain_mask_overlap(fitted.jaccard, fitted.kept))
fitted.overview.style.hide(axis="index")

# %% [markdown]
# Algorithm 1 stops once at most the target number of experts contribute above its threshold;
# dropping one atom can take several experts below it at once, so the domain CAEP masks keep
# {glue:text}`caep_kept_min`-{glue:text}`caep_kept_max` experts where the target is
# {glue:text}`target_kept` (the per-layer baseline keeps exactly the target). A mask that keeps
# fewer experts costs more everywhere: that is a row effect, which the diagonal test below ignores.
#
# The baseline is **{glue:text}`baseline`** ({glue:text}`baseline_reason`). Two domains' CAEP
# masks prune on average sets of experts with a Jaccard similarity of
# {glue:text}`jaccard_mean:.2f` ({glue:text}`baseline_jaccard_mean:.2f` for the baseline's masks;
# 1 would mean that every domain drops the same experts).
#
# ```{glue:figure} fig_overlap
# :name: fig-results-overlap
#
# CAEP fitted on each domain: how similar the pruned expert sets are (left) and how many experts
# each layer keeps (right; global pruning lets layers differ, the guard keeps at least top-k).
# ```
#
# ## 3. Pruned for one domain, evaluated on every domain (the paper's Fig 9)
#
# Every pruned model is evaluated through lm-evaluation-harness on the MMLU-Pro test questions of
# each domain, with its experts masked (never selected; each token's top-k is re-chosen among the
# remaining experts). The questions used to fit the pruning (stage 1's) are left out of the
# scores. The evaluator is stage 4's (`moe_utils.compression.evaluate`: the masks of one task family
# scored together in shared forward passes); each (model, mask, settings) evaluation is cached in this
# stage's artifact directory.

# %%
grid = results5.evaluate_grid(
    inputs, fitted.masks, domain_names, metric=metric, ppl_limit=domain_ppl_limit, mc_limit=domain_mc_limit,
    held_out=results5.calibration_questions(inputs.store, data_dir), mc_fewshot=eval_num_fewshot,
    settings={"batch_size": eval_batch_size, "max_length": max_length, "data_dir": data_dir},
    cache_dir=paths.results / "evaluations")
glue_values(**grid.values)
grid.log.style.format({"seconds": "{:.1f}"}, escape="html").hide(axis="index")

# %% [markdown]
# {glue:text}`n_eval_models` pruned and unpruned models were scored on
# {glue:text}`n_questions_min`-{glue:text}`n_questions_max` questions per domain
# ({glue:text}`eval_seconds:.0f` s; {glue:text}`n_cached` evaluations came from the cache;
# {glue:text}`n_left_out` of the unpruned model's questions were calibration questions, left out).
# Multiple choice is zero-shot here: few-shot prompts of MMLU-Pro run to thousands of tokens,
# which the budget of this stage does not allow, and the small model cannot use them anyway.

# %%
results, diagonal = results5.diagonal_results(grid, ["caep", fitted.baseline], domain_names, metric=metric,
                                              confidence=confidence, n_boot=n_bootstrap, seed=seed)
glue_values(**diagonal)
plotting.glue_figure("fig_heatmap", results5.heatmap_figure(
    results, domain_names, metric=metric, metric_label=metric_label, ratio=domain_prune_ratio, model=model))

# %% [markdown]
# ```{glue:figure} fig_heatmap
# :name: fig-results-heatmap
#
# The paper's Fig 9 on this run: relative change (%) of the {glue:text}`metric_label` of each
# evaluated domain (columns) after pruning {glue:text}`ratio_pct:.0f`% of the experts with the
# method fitted on one domain (rows). Red is worse. The diagonal (boxed) is "pruned for the domain
# it is evaluated on".
# ```
#
# **Is the diagonal best?** The test statistic is the diagonal's mean relative change; the null
# distribution permutes the domain labels of the columns ({glue:text}`n_perm_caep` permutations:
# all of them up to 8 domains, a random sample beyond). Every permutation uses each row and each
# column once, so a pruning that hurts all
# domains, or a domain that suffers under any pruning, does not count: only "fitted on d,
# evaluated on d" does. The advantage is the diagonal's mean minus the permutation mean, positive
# when the diagonal is better, with a bootstrap interval that resamples each domain's questions
# (the same draw for every model).
#
# - **CAEP:** diagonal {glue:text}`diag_caep:+.1f`% against {glue:text}`offdiag_caep:+.1f`% off
#   it; advantage {glue:text}`adv_caep:.2f` points
#   [{glue:text}`adv_low_caep:.2f`, {glue:text}`adv_high_caep:.2f`]; permutation
#   p = {glue:text}`p_caep:.3f`; the diagonal is the best cell of {glue:text}`best_cols_caep` of
#   {glue:text}`n_domains` columns.
# - **{glue:text}`baseline`:** diagonal {glue:text}`diag_baseline:+.1f`% against
#   {glue:text}`offdiag_baseline:+.1f`%; advantage {glue:text}`adv_baseline:.2f` points
#   [{glue:text}`adv_low_baseline:.2f`, {glue:text}`adv_high_baseline:.2f`];
#   p = {glue:text}`p_baseline:.3f`; best in {glue:text}`best_cols_baseline` of
#   {glue:text}`n_domains` columns.
#
# With {glue:text}`n_domains` domains the smallest possible p-value is 1/{glue:text}`n_perm_caep`.
# The permutation test takes the matrix as given; the bootstrap interval of the advantage is what
# accounts for the questions being a sample.
#
# **Could the test have seen an effect?** A diagonal advantage of known size is planted into
# CAEP's matrix reduced to its row and column effects, with each cell's noise drawn from its
# measured standard error (its bootstrap interval over the questions), and the test is run on
# 1,000 such matrices per size:

# %%
power, detectable = results5.diagonal_power(results, domain_names, confidence, metric, seed)
glue_values(diag_mde_caep=detectable * 100)
power.assign(advantage=power["advantage"] * 100).rename(columns={"advantage": "planted advantage (points)"}).T

# %% [markdown]
# The smallest planted advantage the test detects with 80% power at these sample sizes is
# {glue:text}`diag_mde_caep:.1f` points of relative change (NaN: none on the grid); an
# advantage smaller than that, such as the one measured above, would usually go unseen. Every
# cell with its interval:

# %%
cells, cells_shown = results5.cells_table(results, domain_names)
cells_shown

# %% [markdown]
# **Does fitting on the domain beat fitting on all of them?** The same CAEP with the codes of
# all domains (stage 4's CAEP at this ratio), evaluated on the same questions:
# the gain is how much less the domain-specific pruning costs its own domain (positive: better),
# with a paired bootstrap interval.

# %%
vs_general, gain = results5.versus_general(grid, domain_names, metric=metric, confidence=confidence,
                                           n_boot=n_bootstrap, seed=seed)
glue_values(**gain)
results5.versus_general_style(vs_general)

# %% [markdown]
# Averaged over domains the gain is {glue:text}`gain_mean:+.2f` points of relative
# {glue:text}`metric_label` change (positive: fitting on the domain spares it more than fitting
# on all domains); its interval lies above zero for {glue:text}`gain_positive` of
# {glue:text}`n_domains` domains.
#
# ## 4. Multiple-choice accuracy
#
# Accuracy per domain with Wilson intervals, for the unpruned model and CAEP fitted on each domain.

# %%
accuracies, chance, accuracy = results5.accuracy_summary(grid, domain_names, confidence=confidence, data_dir=data_dir)
glue_values(**accuracy)
plotting.glue_figure("fig_accuracy", plotting.accuracy_intervals(
    accuracies, chance=chance, title=f"Multiple-choice accuracy, {eval_num_fewshot}-shot ({model})"))
accuracies.pivot(index="model", columns="category", values="value")[domain_names].style.format("{:.0%}", escape="html")

# %% [markdown]
# Unpruned, the model answers {glue:text}`acc_unpruned:.1f`%
# [{glue:text}`acc_unpruned_low:.1f`, {glue:text}`acc_unpruned_high:.1f`] of
# {glue:text}`acc_n` questions correctly; guessing uniformly would give
# {glue:text}`acc_chance:.1f`%.
#
# ```{glue:figure} fig_accuracy
# :name: fig-results-accuracy
#
# Multiple-choice accuracy per domain with Wilson intervals; dashed: uniform guessing over each
# question's options.
# ```

# %% [markdown]
# ## 5. Which categories break first? (stage 4, per category)
#
# Stage 4 pruned the model with every method at several ratios, fitted on all domains, and
# evaluated each category. Here its results are split by category: the relative change of each
# category's score from the unpruned model. Random masks show their spread over seeds (band, and
# min..max in the table). Stage 4 kept only per-category aggregates, so these cells have no
# per-question interval; the seed spread of random pruning is the yardstick of noise.

# %%
breakdown, breakdown_cells, breakdown_label, breaking = results5.stage4_breakdown(inputs.stage4, domain_names,
                                                                                   metric=metric)
glue_values(**breaking)
plotting.glue_figure("fig_breakdown", plotting.category_breakdown_curves(breakdown, label=breakdown_label))
display(breakdown_cells if breakdown_cells is not None else Markdown(results5.STAGE4_MISSING))

# %% [markdown]
# Averaged over methods, pruning {glue:text}`first_ratio_pct:.0f`% of the experts hurts
# **{glue:text}`first_to_break`** most and {glue:text}`last_to_break` least (change of
# {glue:text}`stage4_metric`).
#
# ```{glue:figure} fig_breakdown
# :name: fig-results-breakdown
#
# Stage 4's general pruning, one panel per method: relative change of each MMLU-Pro category's
# score against the share of experts pruned (bands: the seeds of random masks).
# ```
#
# ## 6. Findings
#
# The headline numbers of this run, glued under stable names (`finding_*`) for the book's
# introduction, each with the model and data that produced it; then the paper's reported
# figures next to this run's.

# %%
findings = results5.findings(
    model, domain_names, n_per_category=n_per_category, ratio=domain_prune_ratio, metric_label=metric_label,
    grid=grid, masks=fitted, results=results, versus=vs_general, accuracy=accuracy, confidence=confidence,
    first_to_break=breaking["first_to_break"] if inputs.stage4 is not None else None, detectable=detectable)
side_by_side = results5.paper_comparison(findings, results, inputs.stage4, inputs.store, domain_names, metric=metric)
glue_values(**findings, finding_paper_vs_run=side_by_side.style.hide(axis="index"))
side_by_side.style.hide(axis="index")

# %% [markdown]
# ## 7. The artifact
#
# The masks, every cell of the heatmaps and the findings are written to this stage's directory,
# with a manifest; the per-question evaluations stay in its `evaluations/` cache.

# %%
results5.save_results(paths, inputs, fitted, grid, cells, vs_general, findings,
                      analysis={"n_bootstrap": n_bootstrap, "confidence": confidence, "seed": seed})
glue_values(stage_seconds=time.perf_counter() - started)
sorted(results5.load_results(paths.results)[-1]["files"])  # read back, verified against its checksums

# %% [markdown]
# ## Summary
#
# - Fitted on one domain's tokens, CAEP drops experts whose sets overlap with a Jaccard similarity
#   of {glue:text}`jaccard_mean:.2f` between domains.
# - Pruning {glue:text}`ratio_pct:.0f`% of the experts for one domain and evaluating on every
#   domain: for CAEP the diagonal's advantage is {glue:text}`adv_caep:.2f` points
#   [{glue:text}`adv_low_caep:.2f`, {glue:text}`adv_high_caep:.2f`] of relative
#   {glue:text}`metric_label` change, permutation p = {glue:text}`p_caep:.3f`; for
#   {glue:text}`baseline`, p = {glue:text}`p_baseline:.3f`.
# - {glue:text}`finding_diagonal_verdict`.
# - {glue:text}`finding_domain_vs_general`
# - Multiple-choice accuracy of the unpruned model: {glue:text}`acc_unpruned:.1f`% (chance
#   {glue:text}`acc_chance:.1f`%).
# - In stage 4's general pruning, {glue:text}`first_to_break` breaks first.
# - This stage ran in {glue:text}`stage_seconds:.0f` s.
