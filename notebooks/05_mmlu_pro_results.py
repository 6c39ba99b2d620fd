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
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from moe_utils import caep, calibration, domains, plotting, pruning, stats
from moe_utils.data import load_prompts
from moe_utils.evaluation import MC_GROUP, PPL_GROUP, category_slug, resolve_category
from moe_utils.expert_matrix import expert_matrix
from moe_utils.expert_surgery import allowed_counts
from moe_utils.hsdl import HSDL
from moe_utils.models import load_model
from moe_utils.pruning import PruningMask, hsdl_factors, load_pruning, mask_overlap
from moe_utils.routing import model_identity
from moe_utils.store import RoutingStore, atomic_write_bytes, atomic_write_json

plotting.use_style()
started = time.perf_counter()
store_dir = Path(artifacts_dir) / "01_capture" / "store"
hsdl_dir = Path(artifacts_dir) / "02_hsdl"
pruning_dir = Path(artifacts_dir) / "04_pruning"
out_dir = Path(artifacts_dir) / "05_mmlu_pro_results"
domain_names = [resolve_category(c) for c in categories]
is_random = model.startswith("random:")
metric = domain_metric or ("byte_perplexity" if model == "embedded" or is_random else "acc")
lower_is_better = domains.LOWER_IS_BETTER[metric]
metric_label = {"byte_perplexity": "byte perplexity", "word_perplexity": "word perplexity",
                "bits_per_byte": "bits per byte", "acc": "accuracy"}[metric]

# %% [markdown]
# ## 1. Inputs

# %%
store = RoutingStore.open(store_dir)
hsdl = HSDL.load(hsdl_dir)
granularity = domains.check_alignment(hsdl, store)
missing = sorted(set(domain_names) - set(store.tokens["label"]))
assert not missing, f"stage 1 captured no tokens of {missing}: capture the same categories"
assert store.manifest["model"]["name"] == model, "stage 1 captured another model: re-run it"
lm, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
layer_sizes = [store.n_experts] * store.n_layers
guard = store.top_k if min_per_layer is None else min_per_layer
allowed = allowed_counts(lm)  # group-limited routers (DeepSeek-V3 family) allow only some keep counts
try:
    _, stage4, stage4_manifest = load_pruning(pruning_dir)
except FileNotFoundError:
    stage4 = None
tokens_per_domain = store.tokens["label"].value_counts().reindex(domain_names)
glue("model_name", model, display=False)
glue("ratio_pct", domain_prune_ratio * 100, display=False)
glue("n_domains", len(domain_names), display=False)
glue("metric_label", metric_label, display=False)
display(Markdown(
    f"**Model:** `{model}` ({store.n_layers} MoE layers x {store.n_experts} experts, top-{store.top_k}). "
    f"**Pruning fitted on:** the {n_per_category} MMLU-Pro test questions per domain captured in stage 1 "
    f"({', '.join(f'{d}: {n} tokens' for d, n in tokens_per_domain.items())}). "
    f"**Pruned:** {domain_prune_ratio:.0%} of the {store.n_layers * store.n_experts} routed experts. "
    f"**Stage 4 results:** {'found' if stage4 is not None else 'missing (run 04_pruning): its sections are skipped'}."
))
if is_random:
    display(Markdown("**This run used a randomly initialised model: its routing is noise, not learned "
                     "collaboration. Nothing below is a finding.**"))
elif model == "embedded":
    display(Markdown(
        "The embedded model is a 7M-parameter MoE trained on WikiText-2. It cannot answer MMLU-Pro "
        "questions (its multiple-choice accuracy sits near chance, section 4), so the heatmaps use the "
        "**perplexity of each category's question text** (per byte, so that tokenisation does not "
        "matter), which moves measurably when experts are pruned. A real model's profile uses accuracy, "
        "as the paper does."))

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
if domain_baseline is not None:
    baseline, baseline_reason = domain_baseline, "set by the profile"
else:
    baseline, baseline_reason = domains.strongest_baseline(
        stage4, domain_prune_ratio, task_prefix=PPL_GROUP if metric != "acc" else MC_GROUP)
texts, labels, _ = load_prompts(domain_names, n_per_category=n_per_category, seed=seed, data_dir=data_dir)
per_sample = store.tokens.groupby("sample_id")["label"].first().tolist()
assert per_sample == list(labels), "the stage-1 store holds other questions than this profile's: re-run stage 1"
domain_calibration = {d: [t for t, label in zip(texts, labels) if label == d] for d in domain_names}
X = expert_matrix(store, granularity, hsdl.manifest_["x_spec"]["value"]) if domain_refit_hsdl else None
calibrate_kwargs = {"batch_size": batch_size, "max_length": max_length}
mask_key = {"store": store.manifest["fingerprint"], "hsdl": hsdl.manifest_["files"], "model": model_identity(lm),
            "domains": domain_names, "ratio": domain_prune_ratio, "threshold": caep_threshold_ratio, "level": caep_level,
            "methods": ["caep", baseline], "min_per_layer": guard, "refit": domain_refit_hsdl,
            "calibration": domain_calibration, "calibrate": calibrate_kwargs,
            "code": domains.code_digest(domains, pruning, caep, calibration)}
masks, masks_cached = domains.cached_masks(out_dir / "masks", mask_key, lambda: domains.domain_masks(
    hsdl, store, domain_names, ratio=domain_prune_ratio, methods=["caep", baseline], min_per_layer=guard,
    threshold_ratio=caep_threshold_ratio, calibration=domain_calibration, model=lm, tokenizer=tokenizer, level=caep_level,
    refit=domain_refit_hsdl, X=X, calibrate_kwargs=calibrate_kwargs, allowed=allowed))
general = caep.caep(*hsdl_factors(hsdl, level=caep_level), caep_threshold_ratio, domain_prune_ratio,
                    layer_sizes=layer_sizes, min_per_layer=guard, allowed=allowed)
masks[("caep", "all domains")] = PruningMask("caep", domain_prune_ratio, general.keep, note=general.note)
for mask in masks.values():
    assert caep.kept_per_layer(mask.keep, layer_sizes).min() >= guard
overview = pd.DataFrame([{"method": m, "fitted on": d, "experts kept": int(k.keep.sum()), "note": k.note}
                         for (m, d), k in masks.items()])
caep_masks = [PruningMask(d, domain_prune_ratio, masks[("caep", d)].keep) for d in domain_names]
jaccard = mask_overlap(caep_masks)
kept = pd.DataFrame([caep.kept_per_layer(m.keep, layer_sizes) for m in caep_masks], index=domain_names)
off_diagonal = jaccard.to_numpy()[~np.eye(len(domain_names), dtype=bool)]
baseline_jaccard = mask_overlap([PruningMask(d, domain_prune_ratio, masks[(baseline, d)].keep) for d in domain_names])
glue("baseline", baseline, display=False)
glue("baseline_reason", baseline_reason, display=False)
caep_kept = overview.loc[(overview["method"] == "caep") & (overview["fitted on"] != "all domains"), "experts kept"]
glue("caep_kept_min", int(caep_kept.min()), display=False)
glue("caep_kept_max", int(caep_kept.max()), display=False)
glue("target_kept", int(np.floor((1 - domain_prune_ratio) * sum(layer_sizes))), display=False)
glue("jaccard_mean", float(off_diagonal.mean()) if off_diagonal.size else float("nan"), display=False)
glue("baseline_jaccard_mean", float(baseline_jaccard.to_numpy()[~np.eye(len(domain_names), dtype=bool)].mean())
     if len(domain_names) > 1 else float("nan"), display=False)
plotting.glue_figure("fig_overlap", plotting.domain_mask_overlap(jaccard, kept))
overview.style.hide(axis="index")

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
# scores. Each (model, mask, settings) evaluation is cached in this stage's artifact directory.

# %%
ppl_tasks = [f"{PPL_GROUP}_{category_slug(d)}" for d in domain_names]
mc_tasks = [f"{MC_GROUP}_{category_slug(d)}" for d in domain_names]
families = {"ppl": (ppl_tasks, domain_ppl_limit, None), "mc": (mc_tasks, domain_mc_limit, eval_num_fewshot)}
primary = "mc" if metric == "acc" else "ppl"
secondary = "ppl" if primary == "mc" else "mc"
settings = {"batch_size": eval_batch_size, "max_length": max_length, "data_dir": data_dir}
jobs = [("unpruned", "-", None, family) for family in (primary, secondary)]
jobs += [(m, d, mask.keep, primary) for (m, d), mask in masks.items()]
jobs += [("caep", d, masks[("caep", d)].keep, secondary) for d in domain_names]  # the second metric: CAEP only
held_out = set(domains.captured_questions(store, data_dir)["question_id"])
docs, log = {}, []
for method, fitted_on, keep, family in jobs:
    tasks, limit, fewshot = families[family]
    tick = time.perf_counter()
    _, frame, cached = domains.evaluate_pruned(lm, tokenizer, keep, tasks, cache_dir=out_dir / "evaluations",
                                               limit=limit, num_fewshot=fewshot, **settings)
    docs[(method, fitted_on, family)] = frame[~frame["question_id"].isin(held_out)]
    log.append({"method": method, "fitted on": fitted_on, "tasks": family, "questions per domain": limit,
                "questions left out": len(frame) - len(docs[(method, fitted_on, family)]),
                "seconds": time.perf_counter() - tick, "cached": cached})
log = pd.DataFrame(log)
n_primary = docs[("unpruned", "-", primary)].groupby("category").size().reindex(domain_names)
assert n_primary.min() > 0, "every evaluated question of some domain was a calibration question: raise the limit"
glue("n_left_out", int(log.loc[0, "questions left out"]), display=False)
glue("n_eval_models", int((log["tasks"] == primary).sum()), display=False)
glue("n_questions_min", int(n_primary.min()), display=False)
glue("n_questions_max", int(n_primary.max()), display=False)
glue("eval_seconds", float(log["seconds"].sum()), display=False)
glue("n_cached", int(log["cached"].sum()), display=False)
log.style.format({"seconds": "{:.1f}"}, escape="html").hide(axis="index")

# %% [markdown]
# {glue:text}`n_eval_models` pruned and unpruned models were scored on
# {glue:text}`n_questions_min`-{glue:text}`n_questions_max` questions per domain
# ({glue:text}`eval_seconds:.0f` s; {glue:text}`n_cached` evaluations came from the cache;
# {glue:text}`n_left_out` of the unpruned model's questions were calibration questions, left out).
# Multiple choice is zero-shot here: few-shot prompts of MMLU-Pro run to thousands of tokens,
# which the budget of this stage does not allow, and the small model cannot use them anyway.

# %%
original = docs[("unpruned", "-", primary)]
results = {}
for method in ("caep", baseline):
    pruned = {d: docs[(method, d, primary)] for d in domain_names}
    table = domains.relative_change_table(original, pruned, metric, domain_names, confidence=confidence,
                                          n_boot=n_bootstrap, random_state=seed)
    test, advantage = domains.diagonal_summary(original, pruned, metric, domain_names, confidence=confidence,
                                               n_boot=n_bootstrap, random_state=seed)
    results[method] = (table, test, advantage)
    assert np.isclose(np.diag(domains.change_matrix(table, domain_names)).mean(), test.diagonal_mean)
    assert np.isclose(advantage.estimate, test.advantage) and test.exact == (len(domain_names) <= 8)
    assert test.p_value >= 1 / math.factorial(len(domain_names)) - 1e-12 or not test.exact
caep_table, caep_test, caep_adv = results["caep"]
base_table, base_test, base_adv = results[baseline]
for name, (table, test, adv) in {"caep": results["caep"], "baseline": results[baseline]}.items():
    glue(f"p_{name}", test.p_value, display=False)
    glue(f"n_perm_{name}", test.n_permutations, display=False)
    glue(f"best_cols_{name}", test.n_best_columns, display=False)
    glue(f"adv_{name}", adv.estimate * 100, display=False)
    glue(f"adv_low_{name}", adv.low * 100, display=False)
    glue(f"adv_high_{name}", adv.high * 100, display=False)
    glue(f"diag_{name}", test.diagonal_mean * 100, display=False)
    glue(f"offdiag_{name}", float(table.loc[table["target"] != table["evaluated"], "change"].mean() * 100)
         if len(domain_names) > 1 else float("nan"), display=False)
subtitles = {title: f"diagonal p = {res[1].p_value:.3f}, best in {res[1].n_best_columns}/{len(domain_names)} columns"
             for title, res in (("CAEP", results["caep"]), (baseline, results[baseline]))}
plotting.glue_figure("fig_heatmap", plotting.domain_change_heatmaps(
    {"CAEP": domains.change_matrix(caep_table, domain_names),
     baseline: domains.change_matrix(base_table, domain_names)},
    label=metric_label, lower_is_better=lower_is_better, subtitles=subtitles,
    title=f"Pruned {domain_prune_ratio:.0%} for one domain, evaluated on every domain ({model})"))

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
cell_se = domains.cell_errors(caep_table, domain_names, confidence)
power = stats.diagonal_power(domains.change_matrix(caep_table, domain_names), cell_se,
                             np.linspace(0, 4 * float(cell_se.to_numpy().max()), 21), lower_is_better=lower_is_better,
                             random_state=seed)
glue("diag_mde_caep", stats.detectable_advantage(power) * 100, display=False)
power.assign(advantage=power["advantage"] * 100).rename(columns={"advantage": "planted advantage (points)"}).T

# %% [markdown]
# The smallest planted advantage the test detects with 80% power at these sample sizes is
# {glue:text}`diag_mde_caep:.1f` points of relative change (NaN: none on the grid); an
# advantage smaller than that, such as the one measured above, would usually go unseen. Every
# cell with its interval:

# %%
cells = pd.concat([caep_table.assign(method="CAEP"), base_table.assign(method=baseline)], ignore_index=True)
cells["change (%)"] = [f"{c * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"
                       for c, lo, hi in zip(cells["change"], cells["low"], cells["high"])]
cells.pivot(index=["method", "target"], columns="evaluated", values="change (%)")[domain_names]

# %% [markdown]
# **Does fitting on the domain beat fitting on all of them?** The same CAEP with the codes of
# all domains (stage 4's CAEP at this ratio), evaluated on the same questions:
# the gain is how much less the domain-specific pruning costs its own domain (positive: better),
# with a paired bootstrap interval.

# %%
general_docs = docs[("caep", "all domains", primary)]
vs_general = domains.versus_general(original, {d: docs[("caep", d, primary)] for d in domain_names}, general_docs,
                                    metric, domain_names, confidence=confidence, n_boot=n_bootstrap,
                                    random_state=seed)
glue("gain_mean", float(vs_general["gain"].mean() * 100), display=False)
glue("gain_positive", int((vs_general["low"] > 0).sum()), display=False)
vs_general.style.format({c: "{:+.1%}" for c in ("specific", "general", "gain", "low", "high")}, escape="html").hide(axis="index")

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
acc_models = {"unpruned": docs[("unpruned", "-", "mc")]}
acc_models.update({f"CAEP for {d}": docs[("caep", d, "mc")] for d in domain_names})
accuracies = pd.concat([domains.category_scores(frame, "acc", domain_names, confidence=confidence).assign(model=name)
                        for name, frame in acc_models.items()], ignore_index=True)
mc_ids = acc_models["unpruned"]["question_id"].unique()
chance = domains.chance_accuracy(mc_ids, data_dir)
unpruned_acc = accuracies[accuracies["model"] == "unpruned"]
pooled = acc_models["unpruned"]["correct"]
pooled_low, pooled_high = (float(v) for v in stats.wilson_interval(pooled.sum(), len(pooled), confidence))
glue("acc_unpruned", float(pooled.mean() * 100), display=False)
glue("acc_unpruned_low", pooled_low * 100, display=False)
glue("acc_unpruned_high", pooled_high * 100, display=False)
glue("acc_n", int(len(pooled)), display=False)
glue("acc_chance", chance * 100, display=False)
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
if stage4 is not None:
    family = MC_GROUP if metric == "acc" else PPL_GROUP
    breakdown = domains.category_breakdown(stage4, task_prefix=family)
    stage4_metric = breakdown["metric"].iloc[0]
    order = domains.breaking_order(breakdown)
    first_ratio = order.index[0]
    first_to_break, last_to_break = order.loc[first_ratio].idxmax(), order.loc[first_ratio].idxmin()
    glue("first_to_break", first_to_break, display=False)
    glue("first_ratio_pct", float(first_ratio * 100), display=False)
    glue("stage4_metric", stage4_metric.replace("_", " "), display=False)
    glue("last_to_break", last_to_break, display=False)
    plotting.glue_figure("fig_breakdown", plotting.category_breakdown_curves(
        breakdown, label=stage4_metric.replace("_", " ")))
    breakdown["cell"] = [f"{c:+.1%}" + (f" ({lo:+.1%}..{hi:+.1%})" if n > 1 else "")
                         for c, lo, hi, n in zip(breakdown["change"], breakdown["change_min"], breakdown["change_max"],
                                                 breakdown["n_seeds"])]
    display(breakdown.pivot(index=["method", "ratio"], columns="category", values="cell")[
        [c for c in domain_names if c in set(breakdown["category"])]])
else:
    for name in ("first_to_break", "stage4_metric", "last_to_break"):
        glue(name, "n/a (stage 4 missing)", display=False)
    glue("first_ratio_pct", float("nan"), display=False)
    plotting.glue_figure("fig_breakdown", plotting.category_breakdown_curves(
        pd.DataFrame(columns=["method", "ratio", "category", "change", "change_min", "change_max", "n_seeds"]),
        label="-"))
    display(Markdown("**Stage 4's results are missing: run `04_pruning` first.**"))

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
data_text = (f"MMLU-Pro test, {len(domain_names)} domains ({', '.join(domain_names)}); pruning fitted on "
             f"{n_per_category} questions per domain, scores on {int(n_primary.min())}-{int(n_primary.max())} other "
             f"questions per domain")
findings = {
    "finding_model": model,
    "finding_data": data_text,
    "finding_metric": metric_label,
    "finding_ratio_pct": float(domain_prune_ratio * 100),
    "finding_diagonal_p_caep": float(caep_test.p_value),
    "finding_diagonal_best_columns_caep": int(caep_test.n_best_columns),
    "finding_diagonal_advantage_caep": float(caep_adv.estimate * 100),
    "finding_diagonal_advantage_low_caep": float(caep_adv.low * 100),
    "finding_diagonal_advantage_high_caep": float(caep_adv.high * 100),
    "finding_baseline": baseline,
    "finding_diagonal_p_baseline": float(base_test.p_value),
    "finding_diagonal_advantage_baseline": float(base_adv.estimate * 100),
    "finding_domain_vs_general_gain": float(vs_general["gain"].mean() * 100),
    "finding_mask_jaccard": float(off_diagonal.mean()) if off_diagonal.size else float("nan"),
    "finding_mc_accuracy": float(pooled.mean() * 100),
    "finding_mc_chance": chance * 100,
    "finding_first_to_break": first_to_break if stage4 is not None else "n/a",
    "finding_diagonal_mde_caep": stats.detectable_advantage(power) * 100,
    "finding_diagonal_verdict": (
        f"On {model}, the diagonal of CAEP's domain x domain matrix is "
        + ("better than" if caep_test.p_value < 0.05 and caep_adv.low > 0 else "not distinguishable from")
        + f" permuted domain labels (p = {caep_test.p_value:.3f}; advantage {caep_adv.estimate * 100:+.2f} points, "
        f"{confidence:.0%} interval [{caep_adv.low * 100:+.2f}, {caep_adv.high * 100:+.2f}]); at these sample sizes "
        f"the test detects a planted diagonal advantage with 80% power only from "
        f"{stats.detectable_advantage(power) * 100:.1f} points on"),
}
for name, value in findings.items():
    glue(name, value, display=False)

general_text = {}
for ratio in (0.25, 0.75):
    versus = (domains.caep_versus_best_baseline(stage4, ratio, task_prefix=PPL_GROUP if metric != "acc" else MC_GROUP)
              if stage4 is not None else None)
    general_text[ratio] = ("not evaluated by stage 4" if versus is None else
                           f"mean relative change over {versus['n_tasks']} MMLU-Pro categories (+ is better): CAEP "
                           f"{versus['caep']:+.1%}, best baseline ({versus['baseline']}) {versus['baseline_score']:+.1%}")

side_by_side = pd.DataFrame([
    {"claim": "Pruning fitted on a domain hurts that domain least (Fig 9)",
     "the paper reports": "yes, read off a heatmap (Phi-3.5-MoE, CAEP, 50% pruned, 5 domains, relative "
                          "accuracy change); no test or interval",
     "this run measured": f"CAEP: diagonal best in {caep_test.n_best_columns}/{len(domain_names)} columns, "
                          f"permutation p = {caep_test.p_value:.3f}, advantage {caep_adv.estimate * 100:+.2f} points "
                          f"[{caep_adv.low * 100:+.2f}, {caep_adv.high * 100:+.2f}]; {baseline}: p = {base_test.p_value:.3f}"},
    {"claim": "CAEP beats the best baseline at 25% pruning (Table 1)",
     "the paper reports": "average zero-shot accuracy .612 vs .587 for SEER-MoE and GEM (+2.5 points; "
                          "DeepSeek-MoE-16B); Phi-3.5-MoE: .652 vs .636 (GEM)",
     "this run measured": general_text[0.25]},
    {"claim": "... and at 75% pruning",
     "the paper reports": "average accuracy .398 vs .387 (GEM) and .363 (SEER-MoE)",
     "this run measured": general_text[0.75]},
    {"claim": "Model and data",
     "the paper reports": "Phi-3.5-MoE (32 layers x 16 experts, top-2) and DeepSeek-MoE-16B; 2,812 MMLU-Pro "
                          "questions of 5 domains; calibration 128 MMLU samples x 2,048 tokens",
     "this run measured": f"{model} ({store.n_layers} x {store.n_experts}, top-{store.top_k}); {data_text}"},
])
glue("finding_paper_vs_run", side_by_side.style.hide(axis="index"), display=False)
side_by_side.style.hide(axis="index")

# %% [markdown]
# ## 7. The artifact
#
# The masks, every cell of the heatmaps and the findings are written to this stage's directory,
# with a manifest; the per-question evaluations stay in its `evaluations/` cache.

# %%
mask_names = [f"{m}:{d}" for (m, d) in masks]
arrays = pd.DataFrame(np.array([k.keep for k in masks.values()]).T.astype(int), columns=mask_names)
files = {"masks.csv": arrays.to_csv(index=False).encode(), "cells.csv": cells.to_csv(index=False).encode(),
         "versus_general.csv": vs_general.to_csv(index=False).encode()}
for name, payload in files.items():
    atomic_write_bytes(out_dir / name, payload)
atomic_write_json(out_dir / "manifest.json", {
    "model": model, "store": str(store_dir), "hsdl": str(hsdl_dir), "stage4": str(pruning_dir) if stage4 is not None else None,
    "parameters": {"categories": domain_names, "ratio": domain_prune_ratio, "threshold_ratio": caep_threshold_ratio,
                   "caep_level": caep_level, "min_per_layer": guard, "baseline": baseline,
                   "refit_hsdl": domain_refit_hsdl, "metric": metric, "ppl_limit": domain_ppl_limit,
                   "mc_limit": domain_mc_limit, "mc_fewshot": eval_num_fewshot,
                   "n_bootstrap": n_bootstrap, "confidence": confidence, "seed": seed},
    "findings": findings, "files": sorted(files)})
glue("stage_seconds", time.perf_counter() - started, display=False)
sorted(p.name for p in out_dir.iterdir())

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
# - Against CAEP fitted on all domains, fitting on the domain changes its own domain's relative
#   {glue:text}`metric_label` change by {glue:text}`gain_mean:+.2f` points on average (positive:
#   better).
# - Multiple-choice accuracy of the unpruned model: {glue:text}`acc_unpruned:.1f`% (chance
#   {glue:text}`acc_chance:.1f`%).
# - In stage 4's general pruning, {glue:text}`first_to_break` breaks first.
# - This stage ran in {glue:text}`stage_seconds:.0f` s.
