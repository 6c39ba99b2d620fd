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
from IPython.display import Markdown, display

from moe_utils.common import plotting
from moe_utils.models.loading import load_model
from moe_utils.stages import glue_values, model_caveat, stage_paths
from moe_utils.stages import routing_prediction as prediction_report

plotting.use_style()
paths = stage_paths(artifacts_dir)

# %% [markdown]
# ## 1. The held-out protocol
#
# The dictionary of stage 2 and the statistics of the routing-only predictors (usage, affinity) were
# fitted on stage 1's tokens. They are evaluated here on other tokens: MMLU-Pro questions of the same
# categories that are not among stage 1's sample (its question ids are excluded before sampling, with
# another seed), run through the same model now. While they run, a hook on every decoder layer holding
# an MoE block applies the next MoE layers' routers to the hidden state that layer hands on.

# %%
fit_store, hsdl = prediction_report.open_fitted(paths)  # checked before the model loads
lm, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
held = prediction_report.open_heldout(paths, fit_store, hsdl, lm, tokenizer, model, horizons=prediction_horizons,
                                      per_category=heldout_per_category, seed=heldout_seed, data_dir=data_dir,
                                      batch_size=batch_size, max_length=max_length)
inputs, values = prediction_report.describe(held, model, per_category=heldout_per_category, seed=heldout_seed,
                                            confidence=confidence)
glue_values(**values)
display(Markdown(inputs))
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
scores = prediction_report.score(held, prediction_horizons, n_steps=hsdl_inference_steps)
summary, values = prediction_report.recall_table(scores, confidence=confidence, n_boot=n_bootstrap)
glue_values(**values)
summary.style.format({c: "{:.3f}" for c in summary.columns if c not in ("predictor", "m")}, escape="html").hide(
    axis="index")

# %%
plotting.glue_figure("fig_recall_layers", plotting.recall_by_layer(prediction_report.recall_layers(
    scores, confidence=confidence, n_boot=n_bootstrap), k=scores.k))

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
differences, values = prediction_report.versus_controls(scores, confidence=confidence, n_boot=n_bootstrap)
glue_values(**values)

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
ahead = prediction_report.ahead_table(scores, confidence=confidence, n_boot=n_bootstrap)
ahead.pivot(index="predictor", columns="horizon", values="recall").style.format("{:.3f}", escape="html")

# %% [markdown]
# ## 5. What is a predictor worth to an expert cache?
#
# Each MoE layer keeps c experts (c from k to E) in an LRU cache; tokens are served one at a time in
# order. With prefetching, the predictor's top-k for the token are accessed before its true experts are
# requested (loaded if missing, evicting the least recently used). Loads count prefetch and miss loads
# alike; layer 0, which nothing predicts, is left out for every strategy.

# %%
cache, table, cache_values = prediction_report.cache_summary(scores)
glue_values(**cache_values)
plotting.glue_figure("fig_cache", plotting.cache_hit_rates(cache, n_experts=scores.n_experts))
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
glue_values(**prediction_report.stage_findings(model, scores, summary, differences, cache_values,
                                               confidence=confidence))
prediction_report.save_results(paths.prediction, model, held, summary, ahead, differences, cache)

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
