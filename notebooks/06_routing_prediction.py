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
# # Stage 6: do collaboration patterns predict where a token goes next?
#
# *Beyond the paper: routing prediction and expert prefetching.*
#
# If experts collaborate across layers, a token's experts in the early layers should tell which
# experts it needs later. MoE inference systems that keep experts off the accelerator need exactly
# that: they prefetch the experts of layer l+1 while layer l runs. An LRU expert cache alone hits
# about 40-60% on Mixtral {cite}`eliseev2023offloading`; predictors that read the hidden state reach
# about 90-97% {cite}`fang2025fate,zhu2025preattention`; ExFlow {cite}`yao2024exflow` exploits the affinity
# between consecutive layers' experts. The paper {cite}`tang2025unveiling` does not test whether its
# cross-layer patterns carry information beyond pairwise co-activation. This stage does.
#
# **What you will see:** seven predictors of a token's top-k experts at MoE layer l+1, given what is
# known once layer l has run, scored on held-out tokens, among them two controls for HSDL: the token's
# identity alone, and pairwise statistics of the same layers HSDL reads; how the scores change with
# depth and when predicting two and three layers ahead; and what each predictor is worth to an LRU
# expert cache, in hits and in the expert loads that prefetching costs.

# %% tags=["parameters"]
model = "embedded"
device = None
dtype = None
trust_remote_code = False
data_dir = None
batch_size = 8
max_length = 512
artifacts_dir = "artifacts/tiny"
heldout_per_category = 6
heldout_seed = 1
prediction_horizons = [1, 2, 3]
hsdl_inference_steps = 100
n_bootstrap = 1000
confidence = 0.95

# %% tags=["hide-input"]
import json
from itertools import product

import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from moe_utils.prediction import expert_cache
from moe_utils.common import plotting
from moe_utils.stages import routing_prediction as prediction_report
from moe_utils.common.artifacts import write_artifact
from moe_utils.prediction import routing_prediction as rp
from moe_utils.evaluation.data import load_prompts
from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.prediction.hidden_prediction import capture_with_hidden_predictions
from moe_utils.common.markup import code_span
from moe_utils.patterns.hsdl import HSDL
from moe_utils.models.loading import load_model
from moe_utils.capture.routing import router_fingerprint
from moe_utils.stages import glue_values, model_caveat, stage_paths
from moe_utils.common.stats import Interval
from moe_utils.capture.store import RoutingStore

plotting.use_style()
out_dir = (paths := stage_paths(artifacts_dir)).prediction

# %% [markdown]
# ## 1. The held-out protocol
#
# The dictionary of stage 2 and the statistics of the routing-only predictors (usage, affinity) were
# fitted on stage 1's tokens. They are evaluated here on other tokens: MMLU-Pro questions of the same
# categories that are not among stage 1's sample (its question ids are excluded before sampling, with
# another seed), run through the same model now. While they run, a hook on every decoder layer holding
# an MoE block applies the next MoE layers' routers to the hidden state that layer hands on.

# %%
fit_store = RoutingStore.open(paths.store)
hsdl = HSDL.load(paths.hsdl)
x_spec, spec = hsdl.manifest_["x_spec"], fit_store.manifest["data"]
if x_spec["granularity"] != "token":
    raise ValueError("stage 6 reads a dictionary fitted on token columns: run stage 2 with granularity='token'")
lm, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
if router_fingerprint(lm) != fit_store.manifest["fingerprint"]["model"]:
    raise ValueError(f"model {model!r} is not the model of stage 1's store: run both stages with the same model")
texts, labels, questions = load_prompts(spec["categories"], heldout_per_category, heldout_seed, data_dir, exclude_ids=(
    load_prompts(spec["categories"], spec["n_per_category"], spec["seed"], data_dir)[2]["question_id"]))
store, hidden = capture_with_hidden_predictions(
    lm, tokenizer, texts, out_dir=out_dir / "heldout_store", horizons=prediction_horizons, labels=labels,
    batch_size=batch_size, max_length=max_length, record_probs=x_spec["value"] == "prob",
    data_spec={"dataset": "TIGER-Lab/MMLU-Pro", "split": "test", "categories": spec["categories"],
               "n_per_category": heldout_per_category, "seed": heldout_seed, "excluded": "stage 1's questions"})
n_layers, n_experts, k = store.n_layers, store.n_experts, store.top_k
fit, test, samples = np.asarray(fit_store.topk_indices), np.asarray(store.topk_indices), store.tokens["sample_id"]
for name, value in (("n_test_tokens", store.n_tokens), ("model_name", model), ("n_experts", n_experts),
                    ("confidence_pct", confidence * 100)):
    glue(name, value, display=False)
display(Markdown(f"**Model:** {code_span(model)}, {n_layers} MoE layers of {n_experts} experts, top-{k}. **Fitting tokens:** "
                 f"{fit_store.n_tokens} (stage 1). **Held-out tokens:** {store.n_tokens} from {len(texts)} other "
                 f"MMLU-Pro questions ({heldout_per_category} per category, seed {heldout_seed}), none of stage 1's."))
if caveat := model_caveat(model, "These predictions are not those of the paper's Phi-3.5-MoE or of any production model."):
    display(Markdown(caveat))

# %% [markdown]
# **What the hidden-state predictor sees.** In these pre-norm decoder layers the router of MoE layer
# l+1 reads `post_attention_layernorm(x + attention(input_layernorm(x)))`, with x the residual stream
# leaving layer l. When layer l has run, x is known but layer l+1's attention is not: the predictor
# scores `router_{l+1}(post_attention_layernorm_{l+1}(x))`, the exact input without layer l+1's
# attention update, through the router's own code. Predicting h layers ahead uses the router and norm
# of layer l+h on the same x.
#
# ## 2. Recall and precision one layer ahead
#
# Every predictor ranks the experts of layer l+1: the usage prior (layer l+1's most used experts); the
# token id (the experts the token's type chose most often at layer l+1 on the fitting tokens: in a
# vocabulary this small a token largely fixes its experts); the first-order affinity P(e at l+1 | the
# token's experts at l); naive Bayes over the token's experts in every layer <= l (pairwise
# statistics of exactly the layers HSDL reads, without its patterns); HSDL (the token's code fitted
# to its routing in layers <= l only, with the dictionary rows of later layers masked out, and layer
# l+1 read from D r); the next router on the hidden state; and the oracle. Recall@m is the share of the true
# top-k among the m best ranked; precision@m the share of those m that are true (at m = k the two are
# equal). Intervals: {glue:text}`confidence_pct:.0f`% bootstrap over the held-out questions.

# %%
m_values = sorted({k, min(2 * k, n_experts)})
ranked = rp.all_rankings(fit, test, n_experts, prediction_horizons, m_values[-1], hsdl=hsdl, hidden=hidden,
                         x=expert_matrix(store, "token", x_spec["value"]), n_steps=hsdl_inference_steps,
                         fit_token_ids=fit_store.tokens["token_id"], token_ids=store.tokens["token_id"])
hits = {h: {name: {m: rp.hit_counts(r, test, m) for m in m_values} for name, r in ranked[h].items()}
        for h in prediction_horizons}
targets = {h: np.arange(h, n_layers) for h in prediction_horizons}
summary = rp.recall_summary(hits[1], samples, targets[1], k, confidence=confidence, n_boot=n_bootstrap)
by_m = summary.set_index(["m", "predictor"])
for (m, suffix), (key, name), column in product(zip(m_values, ("", "_2k")), rp.KEYS.items(),
                                                ("recall", "recall_low", "recall_high")):
    glue(f"{key}_{column}{suffix}", float(by_m.loc[(m, name), column] * 100), display=False)
summary.style.format({c: "{:.3f}" for c in summary.columns if c not in ("predictor", "m")}, escape="html").hide(
    axis="index")

# %%
plotting.glue_figure("fig_recall_layers", plotting.recall_by_layer(rp.recall_by_layer(
    {n: v[k] for n, v in hits[1].items()}, samples, targets[1], k, confidence=confidence, n_boot=n_bootstrap), k=k))

# %% [markdown]
# ```{glue:figure} fig_recall_layers
# :name: fig-prediction-layers
#
# Recall@k of each predictor for each predicted MoE layer l+1, on the held-out tokens, with
# bootstrap intervals over the questions. The oracle is 100% by construction.
# ```
#
# ## 3. Does HSDL predict better than first-order affinity, and than its controls?
#
# The paired difference of recall@k, HSDL minus affinity, on the same tokens, resampling questions.
# This is the comparison an offloading system faces, not a controlled one: HSDL reads the token's
# routing in every layer up to l, affinity only layer l. The controlled comparisons are HSDL minus
# naive Bayes, which reads the same layers through pairwise statistics only, and HSDL minus the
# token id, which reads no routing at all.

# %%
differences = {}
for m, suffix in zip(m_values, ("", "_2k")):
    for prefix, other in (("", "affinity"), ("bayes_", "bayes"), ("token_", "token")):
        d = rp.paired_difference(hits[1][rp.KEYS["hsdl"]][m], hits[1][rp.KEYS[other]][m], samples, targets[1], k,
                                 confidence=confidence, n_boot=n_bootstrap)
        differences[f"hsdl_minus_{other}_m{m}"] = d
        glue_values(**{f"{prefix}diff{suffix}": d.estimate * 100, f"{prefix}diff_low{suffix}": d.low * 100,
                       f"{prefix}diff_high{suffix}": d.high * 100,
                       f"{prefix or 'hsdl_'}verdict{suffix}": rp.verdict(d)})

# %% [markdown]
# HSDL's recall@k is {glue:text}`hsdl_recall:.1f`% [{glue:text}`hsdl_recall_low:.1f`,
# {glue:text}`hsdl_recall_high:.1f`], first-order affinity's {glue:text}`affinity_recall:.1f`%
# [{glue:text}`affinity_recall_low:.1f`, {glue:text}`affinity_recall_high:.1f`]: the paired difference
# is {glue:text}`diff:+.1f` points [{glue:text}`diff_low:+.1f`, {glue:text}`diff_high:+.1f`], so HSDL is
# **{glue:text}`hsdl_verdict`** pairwise affinity here. The next router on the hidden state reaches
# {glue:text}`hidden_recall:.1f`% [{glue:text}`hidden_recall_low:.1f`, {glue:text}`hidden_recall_high:.1f`],
# the usage prior {glue:text}`prior_recall:.1f`%. With twice as many experts ranked (m = 2k, the table
# above), HSDL recovers {glue:text}`hsdl_recall_2k:.1f`% [{glue:text}`hsdl_recall_low_2k:.1f`,
# {glue:text}`hsdl_recall_high_2k:.1f`] and affinity {glue:text}`affinity_recall_2k:.1f`%
# [{glue:text}`affinity_recall_low_2k:.1f`, {glue:text}`affinity_recall_high_2k:.1f`]: a paired difference
# of {glue:text}`diff_2k:+.1f` points [{glue:text}`diff_low_2k:+.1f`, {glue:text}`diff_high_2k:+.1f`], HSDL
# **{glue:text}`hsdl_verdict_2k`** affinity. Which predictor ranks better can depend on how many experts a
# prefetcher can afford to load.
#
# Given the same layers, naive Bayes recovers {glue:text}`bayes_recall:.1f`%
# [{glue:text}`bayes_recall_low:.1f`, {glue:text}`bayes_recall_high:.1f`]: HSDL minus naive Bayes is
# {glue:text}`bayes_diff:+.1f` points [{glue:text}`bayes_diff_low:+.1f`, {glue:text}`bayes_diff_high:+.1f`],
# HSDL is {glue:text}`bayes_verdict` pairwise statistics of the same layers. The token's identity alone
# recovers {glue:text}`token_recall:.1f`% [{glue:text}`token_recall_low:.1f`,
# {glue:text}`token_recall_high:.1f`]: HSDL minus the token id is {glue:text}`token_diff:+.1f` points
# [{glue:text}`token_diff_low:+.1f`, {glue:text}`token_diff_high:+.1f`], HSDL is
# {glue:text}`token_verdict` a lookup of the token's usual experts.
#
# ## 4. Two and three layers ahead
#
# The same predictors for layer l+h from what is known after layer l (affinity between layers l and
# l+h, HSDL from layers <= l, the router of layer l+h on the state leaving layer l), recall@k over the
# layers that have a layer h before them.

# %%
ahead = pd.concat([rp.recall_summary(hits[h], samples, targets[h], k, confidence=confidence, n_boot=n_bootstrap)
                   .assign(horizon=h) for h in prediction_horizons if len(targets[h])])
ahead = ahead[ahead["m"] == k]
ahead.pivot(index="predictor", columns="horizon", values="recall").style.format("{:.3f}", escape="html")

# %% [markdown]
# ## 5. What is a predictor worth to an expert cache?
#
# Each MoE layer keeps c experts (c from k to E) in an LRU cache; tokens are served one at a time in
# order. With prefetching, the predictor's top-k for the token are accessed before its true experts are
# requested (loaded if missing, evicting the least recently used). Loads count prefetch and miss loads
# alike; layer 0, which nothing predicts, is left out for every strategy.

# %%
prefetchers = {"LRU alone": None, **{f"LRU + {n}": r[:, :, :k] for n, r in ranked[1].items()}}
cache = expert_cache.compare(test, prefetchers, targets[1], range(k, n_experts + 1), n_experts)
plotting.glue_figure("fig_cache", plotting.cache_hit_rates(cache, n_experts=n_experts))
sizes = sorted({max(k, n_experts // 4), max(k, n_experts // 2)})
table = cache[cache["cache_size"].isin(sizes)].pivot(index="strategy", columns="cache_size",
                                                     values=["hit_rate", "loads_per_token"])
strategies = {"lru": "LRU alone", **{key: f"LRU + {name}" for key, name in rp.KEYS.items()}}
for key, strategy in strategies.items():
    glue_values(**{f"hit_{key}": float(table.loc[strategy, ("hit_rate", sizes[-1])] * 100),
                   f"loads_{key}": float(table.loc[strategy, ("loads_per_token", sizes[-1])])})
glue_values(cache_size=sizes[-1], cache_size_small=sizes[0],
            loads_small_lru=float(table.loc["LRU alone", ("loads_per_token", sizes[0])]),
            loads_small_hsdl=float(table.loc[strategies["hsdl"], ("loads_per_token", sizes[0])]))
table.style.format("{:.3f}", escape="html")

# %% [markdown]
# ```{glue:figure} fig_cache
# :name: fig-prediction-cache
#
# Hit rate (left) and expert loads per token and layer (right) of a per-layer LRU cache of c experts,
# alone (dashed black) and with each predictor (colours as above) prefetching its top-k before the token's experts are
# requested, on the held-out tokens. Prefetch loads count as loads. The oracle loads exactly what LRU
# alone loads (the same accesses in the same order), so its line covers the dashed one on the right.
# ```
#
# With {glue:text}`cache_size` of {glue:text}`n_experts` experts resident per layer, LRU alone hits
# {glue:text}`hit_lru:.1f`% of requests and loads {glue:text}`loads_lru:.2f` experts per token and
# layer. Prefetching raises the hit rate and pays for it in loads whenever it guesses wrong: by the
# token id {glue:text}`hit_token:.1f`% at {glue:text}`loads_token:.2f` loads, by affinity
# {glue:text}`hit_affinity:.1f`% at {glue:text}`loads_affinity:.2f`, by naive Bayes
# {glue:text}`hit_bayes:.1f`% at {glue:text}`loads_bayes:.2f`, by HSDL {glue:text}`hit_hsdl:.1f`% at
# {glue:text}`loads_hsdl:.2f`, by the next router {glue:text}`hit_hidden:.1f`% at
# {glue:text}`loads_hidden:.2f` (the oracle: {glue:text}`loads_oracle:.2f`, what LRU alone loads). With
# {glue:text}`cache_size_small` experts per layer, HSDL prefetching takes the loads from
# {glue:text}`loads_small_lru:.2f` to {glue:text}`loads_small_hsdl:.2f`. A prefetcher saves transfers
# only where it loads less than LRU alone; otherwise it buys hits, which hide latency, with bandwidth.

# %%
at_k = {key: Interval(*by_m.loc[(k, name), ["recall", "recall_low", "recall_high"]], confidence)
        for key, name in rp.KEYS.items()}
glue_values(**prediction_report.findings(
    model, store.n_tokens, at_k, {o: differences[f"hsdl_minus_{o}_m{k}"] for o in ("affinity", "bayes", "token")},
    loads={key: table.loc[s, ("loads_per_token", sizes[-1])] for key, s in strategies.items()},
    hits={key: table.loc[s, ("hit_rate", sizes[-1])] for key, s in strategies.items()},
    cache_size=sizes[-1], n_experts=n_experts))
write_artifact(out_dir, {"results.json": json.dumps({
    "recall": summary.to_dict(orient="records"), "ahead": ahead.to_dict(orient="records"),
    "differences": {name: vars(d) for name, d in differences.items()}, "cache": cache.to_dict(orient="records"),
    "n_test_tokens": store.n_tokens, "heldout_question_ids": questions["question_id"].tolist()},
    indent=1, sort_keys=True, default=str).encode()}, {"format": "moe-routing-prediction/1", "model": model})

# %% [markdown]
# ## Summary
#
# - On {glue:text}`n_test_tokens` held-out tokens of {glue:text}`model_name`, recall@k one layer ahead:
#   usage prior {glue:text}`prior_recall:.1f`%, token id {glue:text}`token_recall:.1f`%, first-order
#   affinity {glue:text}`affinity_recall:.1f`%, naive Bayes over layers <= l {glue:text}`bayes_recall:.1f`%,
#   HSDL {glue:text}`hsdl_recall:.1f`%, the next router on the hidden state {glue:text}`hidden_recall:.1f`%.
# - HSDL minus affinity, recall@k: {glue:text}`diff:+.1f` points [{glue:text}`diff_low:+.1f`,
#   {glue:text}`diff_high:+.1f`]: at the top-k the patterns are {glue:text}`hsdl_verdict` pairwise
#   affinity as a predictor of the next layer's experts; ranking 2k experts, HSDL is
#   {glue:text}`hsdl_verdict_2k` affinity ({glue:text}`diff_2k:+.1f` points [{glue:text}`diff_low_2k:+.1f`,
#   {glue:text}`diff_high_2k:+.1f`]).
# - Against its controls, HSDL is {glue:text}`bayes_verdict` naive Bayes over the same layers
#   ({glue:text}`bayes_diff:+.1f` points [{glue:text}`bayes_diff_low:+.1f`, {glue:text}`bayes_diff_high:+.1f`])
#   and {glue:text}`token_verdict` the token-id lookup ({glue:text}`token_diff:+.1f` points
#   [{glue:text}`token_diff_low:+.1f`, {glue:text}`token_diff_high:+.1f`]).
# - An LRU cache of {glue:text}`cache_size` experts per layer hits {glue:text}`hit_lru:.1f`% alone at
#   {glue:text}`loads_lru:.2f` expert loads per token and layer; HSDL prefetching hits
#   {glue:text}`hit_hsdl:.1f`% at {glue:text}`loads_hsdl:.2f` loads, hidden-state prefetching
#   {glue:text}`hit_hidden:.1f`% at {glue:text}`loads_hidden:.2f`.
