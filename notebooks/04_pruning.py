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
# # Stage 4: pruning experts (CAEP and baselines)
#
# *Which experts can be dropped, what does dropping them cost, and can we tell the methods apart?*
#
# The paper's second contribution is contribution-aware expert pruning (CAEP, its Algorithm 1,
# {cite}`tang2025unveiling`): the dictionary of collaboration patterns from stage 2 says how much
# each expert contributes to the patterns the model uses, and the experts that contribute least
# are dropped. This stage runs CAEP next to the baselines a reviewer would ask for today: random
# masks (several seeds), selection frequency and mean routing weight (the SEER-MoE family
# {cite}`muzio2024seermoe`), expert activation norm (EAN {cite}`jaiswal2025fantastic`), REAP
# {cite}`lasby2025reap`, an output-based search (the NAEE family {cite}`lu2024notall`) and the
# other family of MoE compression, expert merging (HC-SMoE {cite}`chen2024hcsmoe`, M-SMoE
# {cite}`li2024msmoe`), then
# evaluates every compressed model through lm-evaluation-harness {cite}`eval-harness`, keeping every
# document's result so that each comparison is paired (same BLiMP pairs, same articles). How CAEP
# and the baselines are defined is on the {doc}`../method` page.
#
# **What you will see:** the calibration pass and how the methods' scores relate; what CAEP's
# loop does at each ratio; which experts every method keeps; every method placed among many
# random masks (uniform per layer, and with the method's own per-layer allocation); how much
# CAEP's mask moves when its dictionary is refitted; the paper's Table 1 with 95% intervals,
# each method's paired difference from the unpruned model, from random masks and from CAEP, and
# the smallest differences these samples can detect; its Fig 8; a verdict per method; an
# ablation of CAEP's settings.

# %% tags=["parameters"]
model = "embedded"
device = None
dtype = None
trust_remote_code = False
categories = ["math", "computer science", "physics", "law", "psychology"]
n_per_category = 20
seed = 0
data_dir = None
wikitext_dir = None
blimp_dir = None
batch_size = 8
max_length = 512
artifacts_dir = "artifacts/tiny"
prune_ratios = [0.25, 0.5, 0.75]
pruning_methods = None  # None: every registered method (moe_utils.compression.registry)
random_seeds = [0, 1, 2]
caep_threshold_ratio = 0.9
caep_level = 1
min_per_layer = None
calibration_data = None
calibration_samples = None
calibration_tokens = None
calibration_dir = None
output_tokens = 512
eval_tasks = None
eval_limit = None
eval_task_limits = None
wikitext_words = None  # score each WikiText-2 article's first whole lines holding this many words (None: whole articles)
eval_num_fewshot = 0
eval_batch_size = 8
eval_threads = None  # torch threads while evaluating (None: torch's default)
n_bootstrap = 1000
ablation = {"k1": [0.8, 0.99], "sizes": [0.5, 2.0], "samples": 64, "tokens": 256}  # None: no ablation
reference_masks = 20  # random masks per ratio in each reference distribution (uniform; each other allocation)
reference_tasks = None  # the tasks the reference distributions and refits are scored on (None: eval_tasks)
caep_refits = {"seeds": [1, 2], "resamples": 2}  # CAEP refitted with other HSDL seeds / resampled questions; None: none
primary_endpoint = None  # None: BLiMP macro accuracy at 50%, CAEP minus random masks of its own allocation

# %% tags=["hide-input"]
import time

from IPython.display import Markdown, display

from moe_utils.compression import ablation as abl
from moe_utils.compression import calibration, pruning
from moe_utils.compression import reference, sensitivity, verdicts
from moe_utils.common import plotting
from moe_utils.evaluation import pruning_eval
from moe_utils.stages import pruning as pruning_stage
from moe_utils.stages import glue_values, stage_paths

plotting.use_style()
started = time.perf_counter()
paths = stage_paths(artifacts_dir)
out_dir, cache_dir = paths.pruning, paths.pruning_cache  # calibration, output-based search, refits and evaluations, keyed by their inputs
calibration_spec = calibration.resolve_calibration(model, calibration_data, calibration_samples, calibration_tokens)
ratios = [float(r) for r in prune_ratios]
middle = ratios[len(ratios) // 2]
evaluation = pruning.resolve_evaluation(model, eval_tasks, eval_limit, eval_task_limits)
endpoint = verdicts.check_primary(primary_endpoint or {}, ratios=ratios, methods=pruning_methods or pruning.METHODS,
                                  tasks=evaluation["tasks"])
ref_tasks = pruning_stage.reference_tasks(evaluation["tasks"], reference_tasks)
glue_values(primary_text=verdicts.describe_primary(endpoint), n_reference=reference_masks,
            reference_tasks=", ".join(ref_tasks))

# %% [markdown]
# **The primary endpoint, named before the run** (the profile's `primary_endpoint`):
# {glue:text}`primary_text`. It is judged alone, by its interval. Every other comparison on
# this page is secondary: its p-value (the difference over its bootstrap standard error, normal
# approximation) is Holm-adjusted over all of them, and `*` marks it only where the adjusted
# value is below 0.05.
#
# ## 1. The model, the routing and the dictionary

# %%
setup = pruning_stage.load_setup(model, artifacts_dir, pruning_methods, min_per_layer=min_per_layer, device=device,
                                 dtype=dtype, trust_remote_code=trust_remote_code)
display(Markdown(pruning_stage.describe(setup, caep_level)))  # glues the guard

# %% [markdown]
# ## 2. One calibration pass
#
# The baselines score experts from one pass of the model over calibration texts. A hook on each
# layer's experts module reads the MoE block's input and the router's choices; for every
# (token, chosen expert) pair the expert's own output f_e(x) is computed with the fused expert
# weights. Per expert this gives the selection frequency, the mean routing weight, EAN (mean
# ||f_e(x)|| over the tokens routed to it) and REAP (mean routing weight x ||f_e(x)|| over them).

# %%
stats, n_texts = pruning_stage.calibrate(
    setup, calibration_spec, categories=categories, n_per_category=n_per_category, seed=seed, max_length=max_length,
    batch_size=batch_size, output_tokens=output_tokens, cache_dir=cache_dir, data_dir=data_dir,
    calibration_dir=calibration_dir)
D, R = pruning.hsdl_factors(setup.hsdl, level=caep_level)
glue_values(calib_source=pruning_stage.CALIBRATION_SOURCES[calibration_spec["source"]],
                          calib_texts=n_texts, calib_tokens=stats.n_tokens)
pruning_stage.score_correlations(D, R, stats).style.format("{:.2f}", escape="html")

# %% [markdown]
# The calibration set is {glue:text}`calib_source`: {glue:text}`calib_texts` texts,
# {glue:text}`calib_tokens` tokens, one pass (cached with the stage). The table gives the rank (Spearman) correlation of the scores over all
# experts. CAEP's contribution e = D R_sum approximates each expert's total routing weight (D R
# approximates X), so it is close to the mean routing weight when every method sees the same
# data; the norm-based scores (EAN, REAP) rank experts differently.
#
# ## 3. CAEP, step by step
#
# Algorithm 1 fixes a threshold f (the ceil(k1 N_e)-th largest contribution, k1 =
# {glue:text}`k1`) and drops the least used atoms until at most (1 - ratio) N_e experts still
# contribute at least f. It is global: a layer may lose more experts than it can afford, so a
# guard then makes every layer keep at least {glue:text}`guard` experts (the model's top-k),
# restoring a short layer's highest-contribution experts and dropping as many of the lowest
# elsewhere.

# %%
steps = pruning_stage.caep_steps(D, R, ratios, threshold_ratio=caep_threshold_ratio, budget=setup.budget)
glue_values(k1=caep_threshold_ratio, caep_guard_changes=int((steps["guard"] != "no change").sum()))
steps.style.hide(axis="index")

# %% [markdown]
# The guard changed the mask at {glue:text}`caep_guard_changes` of the ratios. The number kept
# can fall below the target: dropping one atom may take several experts below f at once; the
# tables below give the share each method actually pruned.
#
# ## 4. Every method's masks
#
# All calibration baselines prune the same share of every layer (the standard for them); random
# masks do too, with {glue:text}`n_seeds` seeds. The output-based method removes, per layer and one
# at a time, the expert whose removal changes the layer's output least on
# {glue:text}`output_tokens` calibration tokens, re-routing every token among the remaining experts.
#
# The merging methods keep as many experts per layer as the pruning baselines, but fold the others
# into them instead of dropping them, each kept expert becoming the usage-weighted average of its
# group (the usage: tokens routed to each expert in the calibration pass). HC-SMoE groups a layer's
# experts by hierarchical clustering (average linkage) of their outputs averaged over the
# {glue:text}`output_tokens` calibration tokens, and keeps each cluster's most used expert's router
# row. M-SMoE keeps the most used experts as dominant, puts every other expert with the dominant
# expert whose router logits on those tokens are most similar (cosine), and before averaging
# permutes each member's intermediate neurons to match the dominant expert's (a linear
# assignment on the neurons' weights). How tokens reach a merged expert: the router rows of the
# merged-away experts are dropped, as for pruning, and each token's top-k is chosen again among
# the kept experts; tokens reach the merged expert through its kept expert's own router row (the
# routing mass the router gave the other members is not added to it). A merged model is saved with
# fewer expert weights (`moe_utils.compression.merging.compress`); the map below shows, for a
# merge, the experts whose router rows it keeps.

# %%
masks = pruning.pruning_masks(ratios, budget=setup.budget, methods=setup.methods, stats=stats, dictionary=(D, R),
                              seeds=random_seeds, threshold_ratio=caep_threshold_ratio, model=setup.lm, cache_dir=cache_dir)
pruning_stage.check_masks(masks, setup)
glue_values(n_seeds=len(random_seeds), output_tokens=int(min(output_tokens, stats.n_tokens)))
shown = [m for m in masks if m.ratio == middle and (m.seed is None or m.seed == random_seeds[0])]
plotting.glue_figure("fig_masks", plotting.pruning_mask_maps(shown, (len(setup.layer_sizes), setup.layer_sizes[0])))
pruning.mask_overlap(shown).style.format("{:.2f}", escape="html").background_gradient(cmap="Greens", vmin=0, vmax=1)

# %% [markdown]
# ```{glue:figure} fig_masks
# :name: fig-pruning-masks
#
# The experts each method keeps (dark) at the middle ratio, layer by layer; random: its first seed.
# ```
#
# The table gives, for each pair of methods at the same ratio, the Jaccard overlap of the experts
# they prune (1: the same experts).
#
# **The random-mask reference.** How far random masks spread is the yardstick of every
# comparison, so each ratio gets {glue:text}`n_reference` random masks that keep each layer's
# share (uniform per layer; the `random` rows of the tables are these), and, for each method that
# keeps another number of experts in some layer (CAEP, global), {glue:text}`n_reference` random
# masks with exactly its per-layer counts: against those only the choice of experts differs, not
# how many each layer keeps. To keep the evaluation affordable the reference masks are scored on
# {glue:text}`reference_tasks` only (the primary endpoint's task first); the
# {glue:text}`n_seeds` first uniform masks are scored on every task.

# %%
references = reference.reference_masks(masks, setup.budget, ratios, n_masks=reference_masks, skip_seeds=random_seeds)
distribution = reference.allocations(masks, setup.budget)
glue_values(n_reference_models=len(references))
pruning_stage.allocation_table(distribution, references, setup.budget)
#
# ## 5. The ablation's masks: CAEP with one setting changed
#
# Why CAEP might lose to random masks here: its dictionary was fitted on MMLU-Pro prompts, far
# from the evaluation text; its contributions come from one level and size of dictionary; k1
# sets how many experts count as contributing; it prunes globally. Each variant below changes
# one of these at the middle ratio and is evaluated like every other mask (section 6). The
# WikiText-2 variant captures the model's routing on WikiText-2 train windows (the profile's
# `ablation` setting gives their number and length) and refits the dictionary on it with
# stage 2's settings; the per-layer form is the `caep_layer` method above.

# %%
variants = pruning_stage.ablation_variants(setup, middle, ablation, threshold_ratio=caep_threshold_ratio,
                                           level=caep_level, seed=seed, cache_dir=cache_dir, wikitext_dir=wikitext_dir)
variants.drop(columns="mask").assign(pruned=[f"{m.pruned_share:.0%}" for m in variants["mask"]])

# %% [markdown]
# **CAEP's sensitivity to its inputs.** CAEP reads its contributions off one HSDL fit of one
# sample of questions. The dictionary is refitted with stage 2's settings with other HSDL seeds
# and on bootstrap resamples of the stage-1 questions (all tokens of a question drawn together),
# and CAEP is run on each refit at {glue:text}`middle_pct`; the table says how far each mask is
# from the stage's (Jaccard overlap of the pruned experts). Section 11 gives how far their scores move.

# %%
refits = pruning_stage.caep_refits(setup, middle, caep_refits, threshold_ratio=caep_threshold_ratio, level=caep_level,
                                   cache_dir=cache_dir)
caep_mask = next((m for m in masks if m.method == "caep" and m.ratio == middle), None)
movement = (sensitivity.mask_movement(refits, caep_mask, setup.budget) if caep_mask is not None and len(refits)
            else None)
jaccard = movement["Jaccard of pruned experts"] if movement is not None else None
glue_values(middle_pct=f"{middle:.0%}", refit_jaccard=f"{jaccard.min():.2f} to {jaccard.max():.2f}"
            if jaccard is not None else "n/a (no refits)")
movement

# %% [markdown]
# ## 6. Evaluating the pruned models
#
# Every mask is applied exactly (`moe_utils.models.expert_surgery.masked_experts`: pruned experts can
# never be chosen, each token's top-k is re-chosen among the remaining experts by the model's own
# rule; for a merge, the merged weights are written over the kept experts first,
# `moe_utils.compression.merging.applied`, which gives the same logits as the saved smaller model)
# and the model is evaluated with lm-evaluation-harness, keeping every document's result. The pruned
# models are scored many at a time: each batch of documents is replicated once per mask and each copy
# routed as its mask routes it (`moe_utils.evaluation.multi_mask`), which gives the scores of one-at-a-time
# evaluation up to float rounding while the harness's own tasks score every model; a merge has its
# own weights and is scored alone.
# Each evaluation is cached in the stage's directory, keyed by the compressed model (the mask, and
# for a merge its groups and weights), the tasks and limits,
# the settings, the model and the evaluation code, so a re-run with unchanged inputs only reads them.

# %%
runs = pruning.evaluation_runs(categories=categories, **evaluation)
ref_runs = pruning.evaluation_runs(ref_tasks, categories, evaluation["limit"], evaluation["task_limits"])
every = [pruning.unpruned_mask(setup.n_experts), *masks, *variants["mask"]]
extra = [*references, *refits["mask"]]
t0 = time.perf_counter()
all_results, all_samples = pruning_stage.evaluate(
    setup, every, runs, extra, ref_runs, cache_dir=cache_dir, threads=eval_threads, num_fewshot=eval_num_fewshot,
    batch_size=eval_batch_size, categories=categories, data_dir=data_dir, wikitext_dir=wikitext_dir,
    wikitext_words=wikitext_words,
    blimp_dir=blimp_dir)
glue_values(n_evaluations=len(every) + len(extra), n_full=len(every), n_extra=len(extra),
            eval_seconds=time.perf_counter() - t0,
            n_cached=int(all_results.groupby(["method", "ratio", "seed"], dropna=False)["cached"].all().mean() * 100),
            **pruning_stage.merging_cost(all_results))
if wikitext_words and "wikitext2_ppl" in evaluation["tasks"]:
    display(Markdown(f"WikiText-2 is scored on the opening of each article (its first whole lines holding at least "
                     f"{wikitext_words} words): its perplexity here is that of article openings, which buys more "
                     "articles, the units of its bootstrap, at the same cost."))
# Table 1, the curves and the comparisons: every model but the matched reference masks
samples = all_samples[~all_samples["method"].map(reference.is_matched)]
results = all_results[~all_results["method"].map(reference.is_matched) & ~all_results["method"].map(abl.is_variant)
                      & (all_results["seed"].isna() | all_results["seed"].isin(random_seeds))]
measures = pruning_eval.available_measures(samples)
ref_measures = pruning_stage.reference_measures(all_samples, references)
scores = pruning_eval.model_scores(samples, measures, n_boot=n_bootstrap)
placed = reference.placement(all_samples, [m for m in measures if m in ref_measures], distribution,
                             n_boot=n_bootstrap)
compared = pruning_stage.all_comparisons(samples, measures, placed, endpoint, setup.methods, n_boot=n_bootstrap)
glue_values(n_secondary=int((compared["role"] == "secondary").sum()),
            n_secondary_rejected=int(compared.loc[compared["role"] == "secondary", "rejected"].sum()))
pruning_eval.sample_sizes(samples, measures)

# %% [markdown]
# {glue:text}`n_evaluations` models were evaluated ({glue:text}`n_full` on every task, the
# {glue:text}`n_extra` reference masks and refits on {glue:text}`reference_tasks`; for
# {glue:text}`n_cached`% of them every evaluation was read from the cache) in
# {glue:text}`eval_seconds:.0f` s, on the documents above.
# The {glue:text}`merge_models` merged models took {glue:text}`merge_eval_seconds:.0f` s of the
# {glue:text}`all_eval_seconds:.0f` s the evaluations took when computed.
#
# ## 7. The paper's Table 1, with intervals

# %%
for ratio in ratios:
    display(Markdown(f"**{ratio:.0%} of the routed experts pruned**"))
    display(pruning_eval.table1(scores, compared, ratio, measures=measures,
                                shares={m.method: m.pruned_share for m in every if m.ratio in (0.0, ratio)}))
pruning_eval.detectable(compared)

# %% [markdown]
# Each cell: the value and its 95% bootstrap interval (BLiMP: pairs resampled within paradigms;
# perplexities: articles or questions resampled; random: its masks resampled too, all
# {glue:text}`n_reference` of them on {glue:text}`reference_tasks`, the first {glue:text}`n_seeds`
# elsewhere). "vs unpruned", "vs random", "vs random, same allocation" (CAEP's matched masks)
# and "vs caep": the paired difference on the same documents (accuracy: points; perplexity:
# relative change; bits per byte: difference). `*`: the primary endpoint where its interval
# excludes 0; every other cell where its Holm-adjusted p-value over the page's
# {glue:text}`n_secondary` secondary comparisons is below 0.05 ({glue:text}`n_secondary_rejected`
# of them are). The last table gives
# the minimum detectable difference (MDE) of these comparisons: the true difference a 5%
# two-sided test detects with 80% power at these sample sizes; a smaller difference can be real
# and still look like noise here. Its last column says how many documents (pairs, articles,
# questions) would bring the median MDE down to 1 BLiMP point or 10% of a perplexity: the MDE
# falls as one over the square root of the sample, and each document costs evaluation time in
# every one of the {glue:text}`n_evaluations` models.
#
# ## 8. Every method among random masks

# %%
scored = reference.mask_scores(all_samples[all_samples["method"] != "unpruned"], [m for m in measures if m in ref_measures])
plotting.glue_figure("fig_reference", plotting.reference_distribution(
    scored[~scored["method"].map(abl.is_variant)],
    {m: f"{pruning_eval.measure_spec(m)[1]} ({'higher' if pruning_eval.measure_spec(m)[0] == 'acc' else 'lower'} is better)"
     for m in ref_measures}, [reference.UNIFORM, *dict.fromkeys(m.method for m in references if m.method != "random")]))
pruning_stage.placement_table(placed)

# %% [markdown]
# ```{glue:figure} fig_reference
# :name: fig-pruning-reference
#
# Each measure of the reference tasks at each ratio: the random masks (grey: uniform per layer;
# orange: with a method's own per-layer allocation), their mean as a bar, and every method as a
# diamond.
# ```
#
# The table places each method in its distributions: its percentile (the share of random masks it
# beats, ties counted half; 50 is no better than random), and its difference from the
# distribution's mean with a 95% interval that resamples the masks *and* the documents, so that
# the masks that happened to be drawn are part of the uncertainty.
#
# ## 9. The paper's Fig 8

# %%
curves = pruning_eval.curve_summary(samples, measures, shares={(m.method, m.ratio): m.pruned_share for m in every})
plotting.glue_figure("fig_curves", plotting.pruning_curves(curves, ncols=len(measures)))
pruning_stage.rank_table(curves, ratios).style.format("{:.1f}", escape="html")

# %% [markdown]
# ```{glue:figure} fig_curves
# :name: fig-pruning-curves
#
# Each measure against the share of routed experts pruned, one line per method from the
# unpruned model at 0%; random: mean over seeds with a band of ± one standard deviation.
# ```
#
# The table ranks the methods at each ratio by their mean rank over the measures (1 = best on every one).
#
# ## 10. The verdicts, method by method

# %%
ranks = pruning_stage.rank_table(curves, ratios)
pruning_stage.verdict_table(compared, ratios)

# %% [markdown]
# For each method and ratio, on which measures it is better or worse than random masks (CAEP:
# than random masks of its own allocation where they were scored) and than CAEP, after Holm's
# correction; "no difference": these samples cannot tell them apart.
#
# ## 11. CAEP against random masks: the ablation and the refits

# %%
pruning_stage.ablation_table(variants, compared, measures)

# %% [markdown]
# One row per variant of CAEP at {glue:text}`middle_pct` pruned (one setting changed from the
# reference row): its paired difference from random masks on the same documents, with the 95%
# interval (`*`: Holm-adjusted p below 0.05). The findings below read this table. The refits of
# section 5 (their masks overlap the stage's CAEP by a Jaccard of {glue:text}`refit_jaccard`)
# score as follows against the stage's CAEP:

# %%
sensitivity.score_spread(scored, refits, "caep", middle) if len(refits) else None

# %% [markdown]
# ## 12. The artifact
#
# Masks (one keep-mask per method, ratio and seed, in the layer-major order of X), the results
# table, the per-document results and the calibration sums, with a checksummed manifest naming the inputs.

# %%
pruning_stage.save_artifact(out_dir, setup, masks, results, stats, {
    "prune_ratios": ratios, "random_seeds": random_seeds, "caep_threshold_ratio": caep_threshold_ratio,
    "caep_level": caep_level, "calibration": calibration_spec | {"n_texts": n_texts, "n_tokens_seen": stats.n_tokens},
    "output_tokens": output_tokens, "eval_runs": runs, "eval_num_fewshot": eval_num_fewshot, "ablation": ablation})
glue_values(artifact_dir=str(out_dir),
                          stage_seconds=time.perf_counter() - started,
                          **pruning_stage.findings(model, scores, compared, variants, measures, middle),
                          **verdicts.findings(compared, placed, ranks[f"{endpoint['ratio']:.0%}"], endpoint, model=model,
                                              ratio=endpoint["ratio"]))

# %% [markdown]
# ## Summary
#
# - {glue:text}`finding_pruning_primary`
# - {glue:text}`finding_pruning_winner`
# - {glue:text}`finding_pruning_methods`
# - {glue:text}`finding_pruning_reference`
# - {glue:text}`finding_pruning_verdict`
# - {glue:text}`finding_pruning_blimp`
# - {glue:text}`finding_pruning_vs_random`
# - {glue:text}`finding_pruning_mde`
# - {glue:text}`finding_pruning_ablation`
# - The stage took {glue:text}`stage_seconds:.0f` s; masks and results are in
#   {glue:text}`artifact_dir` for the domain-specific pruning of the next stage.
#
# ## Exercises
#
# 1. Re-run with `caep_threshold_ratio` 0.8 and 0.99: how do the atoms removed and the per-layer
#    counts of section 3 change, and at which ratios does the loop not run at all?
# 2. Raise the guard (`--set min_per_layer=4`): which layers does it refill at 75%, and does CAEP
#    then do better or worse than its per-layer variant?
# 3. Raise the BLiMP pairs (`--set eval_task_limits='{blimp: 300, wikitext2_ppl: 62, mmlu_pro_ppl: 20}'`):
#    how far do the minimum detectable differences fall, and does any verdict change?
