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
# *Which experts can be dropped, and what does dropping them cost?*
#
# The paper's second contribution is contribution-aware expert pruning (CAEP, its Algorithm 1,
# {cite}`tang2025unveiling`): the dictionary of collaboration patterns from stage 2 says how much
# each expert contributes to the patterns the model uses, and the experts that contribute least
# are dropped. This stage runs CAEP next to the baselines a reviewer would ask for today: random
# masks (several seeds), selection frequency and mean routing weight (the SEER-MoE family
# {cite}`muzio2024seermoe`), expert activation norm (EAN {cite}`jaiswal2025fantastic`), REAP
# {cite}`lasby2025reap` and an output-based search (the NAEE family {cite}`lu2024notall`), then
# evaluates every pruned model through lm-evaluation-harness {cite}`eval-harness`. How CAEP and
# the baselines are defined, and what the paper leaves open, is on the {doc}`../method` page.
#
# **What you will see:** the calibration pass and how the methods' scores relate; what CAEP's
# loop does at each pruning ratio and how the per-layer guard changes it; which experts every
# method keeps; the paper's Table 1 (one row per method, the unpruned model first) and its Fig 8
# (score against the share pruned, per task and method). Masks and results are saved for the
# next stages.

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
batch_size = 8
max_length = 512
artifacts_dir = "artifacts/tiny"
prune_ratios = [0.25, 0.5, 0.75]
pruning_methods = ["caep", "caep_layer", "frequency", "router_weight", "ean", "reap", "output", "random"]
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
eval_num_fewshot = 0
eval_batch_size = 8

# %% tags=["hide-input"]
import time

import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from moe_utils import caep, calibration, plotting, pruning
from moe_utils.artifacts import sha256_file
from moe_utils.data import load_prompts
from moe_utils.hsdl import HSDL
from moe_utils.models import load_model, moe_layers
from moe_utils.routing import model_identity
from moe_utils.stages import show_model_caveat, stage_paths
from moe_utils.store import RoutingStore

plotting.use_style()
started = time.perf_counter()
paths = stage_paths(artifacts_dir)
store_dir, hsdl_dir, out_dir = paths.store, paths.hsdl, paths.pruning
cache_dir = paths.pruning_cache  # calibration, output-based search and evaluations, keyed by their inputs
evaluation = pruning.resolve_evaluation(model, eval_tasks, eval_limit, eval_task_limits)
calibration_spec = calibration.resolve_calibration(model, calibration_data, calibration_samples, calibration_tokens)
ratios = [float(r) for r in prune_ratios]
middle = ratios[len(ratios) // 2]

# %% [markdown]
# ## 1. The model, the routing and the dictionary

# %%
store = RoutingStore.open(store_dir)
hsdl = HSDL.load(hsdl_dir)
lm, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
layers = moe_layers(lm)
# experts per layer, the guard (top-k unless set) and the keep counts group-limited routers allow
budget = caep.PruningBudget.for_model(lm, layers, min_per_layer=min_per_layer)
layer_sizes, guard = list(budget.layer_sizes), budget.min_per_layer
top_k = max(layer.top_k for layer in layers)
skipped = pruning.unsupported_methods(pruning_methods, budget)
methods = [m for m in pruning_methods if m not in skipped]
assert store.manifest["model"]["name"] == model, "stage 1 captured another model: re-run it"
assert hsdl.dictionaries_[0].shape[0] == sum(layer_sizes) == store.n_layers * store.n_experts
glue("guard", guard, display=False)
display(Markdown(
    f"**Model:** `{model}` ({lm.config.model_type}, {len(layers)} MoE layers of {layer_sizes[0]} routed experts, "
    f"top-{top_k}). **Dictionary:** level {caep_level} of the HSDL model of stage 2, "
    f"{hsdl.dictionaries_[caep_level - 1].shape[1]} atoms."
))
show_model_caveat(model, "Its multiple-choice accuracy sits at chance, so its perplexities are what pruning "
                         "visibly changes.")
for method, why in skipped.items():
    display(Markdown(f"**Skipped for this model:** `{method}` {why}."))

# %% [markdown]
# ## 2. One calibration pass
#
# The baselines score experts from one pass of the model over calibration texts. A hook on each
# layer's experts module reads the MoE block's input and the router's choices; for every
# (token, chosen expert) pair the expert's own output f_e(x) is computed with the fused expert
# weights. Per expert this gives the selection frequency, the mean routing weight, EAN (mean
# ||f_e(x)|| over the tokens routed to it) and REAP (mean routing weight x ||f_e(x)|| over them).

# %%
if calibration_spec["source"] == "capture":
    prompts, _, _ = load_prompts(categories, n_per_category=n_per_category, seed=seed, data_dir=data_dir)
    calibration_set = calibration.calibration_texts(tokenizer, "capture", n_samples=calibration_spec["n_samples"],
                                                    prompts=prompts, seed=seed)
    calibration_length = max_length
else:
    calibration_set = calibration.calibration_texts(
        tokenizer, calibration_spec["source"], n_samples=calibration_spec["n_samples"],
        n_tokens=calibration_spec["n_tokens"], seed=seed, data_dir=calibration_dir)
    calibration_length = calibration_spec["n_tokens"]
t0 = time.perf_counter()
stats = calibration.calibrate(lm, tokenizer, calibration_set, batch_size=batch_size, max_length=calibration_length,
                              keep_hidden=output_tokens if "output" in methods else 0, cache_dir=cache_dir)
calibration_seconds = time.perf_counter() - t0
np.testing.assert_array_equal(stats.counts.sum(axis=1), stats.n_tokens * np.array([layer.top_k for layer in layers]))
if calibration_spec["source"] == "capture" and len(calibration_set) == store.n_samples:
    # the same texts as stage 1: the pass must see exactly the routing the store recorded
    captured = np.stack([np.bincount(np.asarray(store.topk_indices[:, j]).ravel(), minlength=store.n_experts)
                         for j in range(store.n_layers)])
    np.testing.assert_array_equal(stats.counts, captured)
glue("calib_source", {"capture": "the stage-1 prompts (the texts CAEP's dictionary was fitted on)",
                      "mmlu": "MMLU test questions", "wikitext": "WikiText-2 train"}[calibration_spec["source"]],
     display=False)
glue("calib_texts", len(calibration_set), display=False)
glue("calib_tokens", stats.n_tokens, display=False)
glue("calib_seconds", calibration_seconds, display=False)
scores = pd.DataFrame({"caep contribution": caep.contribution_scores(*pruning.hsdl_factors(hsdl, level=caep_level)),
                       **{name: stats.score(name) for name in calibration.SCORES}})
scores.corr(method="spearman").style.format("{:.2f}", escape="html")

# %% [markdown]
# The calibration set is {glue:text}`calib_source`: {glue:text}`calib_texts` texts,
# {glue:text}`calib_tokens` tokens, one pass ({glue:text}`calib_seconds:.1f` s, or the time to read it
# back from the cache). The table gives
# the rank (Spearman) correlation of the scores over all experts. CAEP's contribution
# e = D R_sum approximates each expert's total routing weight (D R approximates X), so it is
# close to the mean routing weight when every method sees the same data; the norm-based scores
# (EAN, REAP) rank experts differently.
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
D, R = pruning.hsdl_factors(hsdl, level=caep_level)
glue("k1", caep_threshold_ratio, display=False)
steps = []
for ratio in ratios:
    result = caep.caep(D, R, caep_threshold_ratio, ratio, budget=budget)
    assert (budget.kept_per_layer(result.keep) >= guard).all()
    steps.append({"ratio": f"{ratio:.0%}", "target kept": int(np.floor(result.target)),
                  "kept by Algorithm 1": int(result.algorithm_keep.sum()),
                  "atoms removed": f"{len(result.atoms_removed)} of {D.shape[1]}",
                  "per layer, Algorithm 1": " ".join(map(str, budget.kept_per_layer(result.algorithm_keep))),
                  "per layer, guarded": " ".join(map(str, budget.kept_per_layer(result.keep))),
                  "guard": "no change" if not result.guard.changed else
                  f"restored {len(result.guard.restored)}, dropped {len(result.guard.dropped)}",
                  "restored for the router's groups": len(result.rounded)})
steps = pd.DataFrame(steps)
if not budget.restricted:  # only group-limited routers restrict the counts
    steps = steps.drop(columns="restored for the router's groups")
glue("caep_guard_changes", int((steps["guard"] != "no change").sum()), display=False)
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

# %%
t0 = time.perf_counter()
masks = pruning.pruning_masks(ratios, budget=budget, methods=methods,
                              stats=stats, dictionary=(D, R), threshold_ratio=caep_threshold_ratio,
                              seeds=random_seeds, model=lm, cache_dir=cache_dir)
mask_seconds = time.perf_counter() - t0
for mask in masks:
    kept = budget.kept_per_layer(mask.keep)
    assert (kept >= guard).all(), f"{mask.label} at {mask.ratio}: a layer keeps fewer than {guard} experts"
    if mask.method != "caep":
        assert kept.tolist() == budget.quota(mask.ratio).tolist()
glue("n_seeds", len(random_seeds), display=False)
glue("output_tokens", int(min(output_tokens, stats.n_tokens)), display=False)
glue("mask_seconds", mask_seconds, display=False)
shown = [m for m in masks if m.ratio == middle and (m.seed is None or m.seed == random_seeds[0])]
plotting.glue_figure("fig_masks", plotting.pruning_mask_maps(shown, (len(layers), layer_sizes[0])))
pruning.mask_overlap(shown).style.format("{:.2f}", escape="html").background_gradient(cmap="Greens", vmin=0, vmax=1)

# %% [markdown]
# ```{glue:figure} fig_masks
# :name: fig-pruning-masks
#
# The experts each method keeps (dark) at the middle ratio, layer by layer; random: its first seed.
# ```
#
# The table gives, for each pair of methods at the same ratio, the Jaccard overlap of the experts
# they prune (1: the same experts). The masks took {glue:text}`mask_seconds:.1f` s; the
# output-based search takes most of that when it is not read from the cache.
#
# ## 5. Evaluating the pruned models
#
# Every mask is applied exactly (`moe_utils.expert_surgery.masked_experts`: pruned experts can
# never be chosen, each token's top-k is re-chosen among the remaining experts by the model's own
# rule) and the model is evaluated with lm-evaluation-harness. The calibration pass, the
# output-based search and every evaluation are cached in the stage's directory, keyed by their
# inputs (each evaluation by the mask, the tasks and limits, the other settings and the model),
# so a re-run with unchanged inputs only reads them.

# %%
runs = pruning.evaluation_runs(evaluation["tasks"], categories, evaluation["limit"], evaluation["task_limits"])
t0 = time.perf_counter()
results = pruning.evaluate_masks(
    lm, tokenizer, [pruning.unpruned_mask(sum(layer_sizes)), *masks], runs, cache_dir=cache_dir,
    num_fewshot=eval_num_fewshot, batch_size=eval_batch_size, categories=categories, data_dir=data_dir,
    wikitext_dir=wikitext_dir, bootstrap_iters=0)
eval_seconds = time.perf_counter() - t0
summary = pruning.score_summary(results)
assert results.groupby(["method", "ratio", "seed"], dropna=False).ngroups == len(masks) + 1
sizes = results.groupby("task")["n"].first()
glue("n_evaluations", len(masks) + 1, display=False)
glue("n_cached", int(results.drop_duplicates(["method", "ratio", "seed", "task"])["cached"].mean() * 100),
     display=False)
glue("eval_seconds", eval_seconds, display=False)
pd.DataFrame({"documents per task": sizes}).rename_axis("task")

# %% [markdown]
# {glue:text}`n_evaluations` models were evaluated ({glue:text}`n_cached`% of the evaluations read
# from the cache) in {glue:text}`eval_seconds:.0f` s. The sample sizes above are small by design, so
# that the whole stage runs in minutes on a laptop CPU: the differences between methods are paired
# (every model sees the same documents), but a difference of a few hundredths in accuracy is noise.
#
# ## 6. The paper's Table 1

# %%
table_tasks = [task for run in runs for task in run["tasks"]]  # as asked: no sub-tasks of stock groups
for ratio in ratios:
    display(Markdown(f"**{ratio:.0%} of the routed experts pruned**"))
    display(pruning.table1(summary, ratio, tasks=table_tasks))

# %% [markdown]
# Rows: the unpruned model, then each method; random is the mean ± standard deviation over
# {glue:text}`n_seeds` seeds. Columns: accuracy for multiple choice (higher is better; AVG is their
# mean), bits per byte for MMLU-Pro question text and word perplexity for WikiText-2 (lower is
# better); `pruned` is the share of experts actually pruned.
#
# ## 7. The paper's Fig 8

# %%
plotting.glue_figure("fig_curves", plotting.pruning_curves(summary, tasks=table_tasks))
ranks = pd.DataFrame({f"{ratio:.0%}": pruning.method_ranks(summary, ratio, tasks=table_tasks) for ratio in ratios})
ranks.style.format("{:.1f}", escape="html")

# %% [markdown]
# ```{glue:figure} fig_curves
# :name: fig-pruning-curves
#
# Each task's score against the share of routed experts pruned, one line per method from the
# unpruned model at 0%; random: mean over seeds with a band of ± one standard deviation.
# ```
#
# The table ranks the methods at each ratio by their mean rank over the tasks (1 = best on every
# task). Where the calibration set is the stage-1 prompts, CAEP's dictionary and every baseline's
# scores come from MMLU-Pro questions: MMLU-Pro perplexity measures the pruned models on the kind
# of text the methods were fitted on, WikiText-2 (the embedded model's training text) away from it.

# %%
headline = "wikitext2_ppl" if "wikitext2_ppl" in set(summary["task"]) else table_tasks[0]
at_middle = summary[(summary["task"] == headline) & ((summary["ratio"] == middle) | (summary["method"] == "unpruned"))]
value = at_middle.set_index("method")["mean"]
glue("headline_task", headline, display=False)
glue("headline_metric", at_middle["metric"].iloc[0], display=False)
headline_name = "WikiText-2" if headline == "wikitext2_ppl" else headline
glue("headline_label", f"{headline_name} {at_middle['metric'].iloc[0].replace('_', ' ')}", display=False)
glue("middle_pct", f"{middle:.0%}", display=False)
for name in ("unpruned", "caep", "frequency", "random"):
    glue(f"headline_{name}", float(value.get(name, np.nan)), display=False)
best = pruning.method_ranks(summary, middle, tasks=table_tasks)
glue("best_method", best.index[0], display=False)
glue("caep_rank", float(best.get("caep", np.nan)), display=False)
glue("n_methods", len(best), display=False)

# %% [markdown]
# On {glue:text}`headline_task` ({glue:text}`headline_metric`), with {glue:text}`middle_pct` of
# the experts pruned: unpruned {glue:text}`headline_unpruned:.4g`, CAEP
# {glue:text}`headline_caep:.4g`, frequency {glue:text}`headline_frequency:.4g`, random
# {glue:text}`headline_random:.4g` (mean over seeds). Over all tasks at that ratio the best mean
# rank goes to {glue:text}`best_method`; CAEP's mean rank is {glue:text}`caep_rank:.1f` among
# {glue:text}`n_methods` methods.
#
# ## 8. The artifact
#
# Masks (one keep-mask per method, ratio and seed, in the layer-major order of X), the results
# table and the calibration sums are written with a checksummed manifest naming the inputs.

# %%
inputs = {name: sha256_file(path / "manifest.json") for name, path in (("store", store_dir), ("hsdl", hsdl_dir))}
pruning.save_pruning(out_dir, [pruning.unpruned_mask(sum(layer_sizes)), *masks], results, stats=stats, extra={
    "model": model_identity(lm) | {"layer_sizes": layer_sizes, "top_k": top_k},
    "inputs": {"store": str(store_dir), "store_manifest_sha256": inputs["store"], "hsdl": str(hsdl_dir),
               "hsdl_manifest_sha256": inputs["hsdl"]},
    "parameters": {"prune_ratios": ratios, "methods": methods, "skipped_methods": skipped, "random_seeds": random_seeds,
                   "caep_threshold_ratio": caep_threshold_ratio, "caep_level": caep_level, "min_per_layer": guard,
                   "calibration": calibration_spec | {"n_texts": len(calibration_set), "n_tokens_seen": stats.n_tokens},
                   "output_tokens": output_tokens, "eval_runs": runs, "eval_num_fewshot": eval_num_fewshot},
})
reloaded, _, manifest = pruning.load_pruning(out_dir)
assert all(np.array_equal(a.keep, b.keep) for a, b in zip(reloaded[1:], masks))
glue("artifact_dir", str(out_dir), display=False)
glue("stage_seconds", time.perf_counter() - started, display=False)
sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))

# %% [markdown]
# ## Summary
#
# - CAEP (Algorithm 1 with k1 = {glue:text}`k1` and a guard of {glue:text}`guard` experts per
#   layer), its per-layer variant, six baselines and random masks were computed at every ratio
#   from one calibration pass of {glue:text}`calib_tokens` tokens.
# - {glue:text}`n_evaluations` pruned and unpruned models were evaluated; at
#   {glue:text}`middle_pct` pruned, the {glue:text}`headline_label` is {glue:text}`headline_caep:.4g`
#   for CAEP against {glue:text}`headline_frequency:.4g` for frequency and
#   {glue:text}`headline_random:.4g` for random ({glue:text}`headline_unpruned:.4g` unpruned).
# - The stage took {glue:text}`stage_seconds:.0f` s; masks and results are in
#   {glue:text}`artifact_dir` for the domain-specific pruning of the next stage.
#
# ## Exercises
#
# 1. Re-run with `caep_threshold_ratio` 0.8 and 0.99: how do the atoms removed and the per-layer
#    counts of section 3 change, and at which ratios does the loop not run at all?
# 2. Raise the guard (`--set min_per_layer=4`): which layers does it refill at 75%, and does CAEP
#    then do better or worse than its per-layer variant?
# 3. Calibrate on WikiText-2 instead (`--set calibration_data=wikitext --set calibration_samples=16
#    --set calibration_tokens=256`): do the baselines get better or worse on MMLU-Pro?
