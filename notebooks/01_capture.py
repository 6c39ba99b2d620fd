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
# # Stage 1: capturing expert routing
#
# *Which experts does every token visit, in every MoE layer?*
#
# This stage runs the model on MMLU-Pro questions and records, for every real token (never
# padding) and every MoE layer, the top-k experts the router chose and their routing weights:
# the paper's "expert activation collection" step {cite}`tang2025unveiling`. Everything later in
# the study (the dictionary of collaboration patterns, their labels, pruning) reads the routing
# store written here.
#
# **What you will see:** what was captured and from which model; how evenly each layer spreads
# its tokens over its experts; how confident the routers are; the paper's Fig 2, the
# probability that two experts in different layers are chosen for the same token; and its
# control: how much of that co-activation the token's identity explains by itself.

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
record_probs = True
artifacts_dir = "artifacts/tiny"
null_bootstrap = 200

# %% tags=["hide-input"]
from IPython.display import Markdown, display

from moe_utils.common import plotting
from moe_utils.evaluation.data import load_prompts
from moe_utils.models.loading import load_model
from moe_utils.patterns import expert_matrix as xm
from moe_utils.patterns import null_plots
from moe_utils.stages import capture as capture_report
from moe_utils.stages import glue_values, model_caveat, stage_paths

plotting.use_style()

# %% [markdown]
# ## 1. The model and the prompts

# %%
lm, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
texts, labels, questions = load_prompts(categories, n_per_category=n_per_category, seed=seed, data_dir=data_dir)
inputs, values = capture_report.describe_inputs(model, lm, labels, categories=categories,
                                                n_per_category=n_per_category, seed=seed)
glue_values(**values)
display(Markdown(inputs))
if caveat := model_caveat(model):
    display(Markdown(caveat))

# %% [markdown]
# ## 2. Capture
#
# Hooks on the routers record their own top-k choice; the store is written batch by batch and
# resumes if interrupted. Re-running this notebook with unchanged inputs reuses the store; with
# other inputs it replaces it.

# %%
store, values = capture_report.capture(
    lm, tokenizer, texts, labels, stage_paths(artifacts_dir).store, categories=categories,
    n_per_category=n_per_category, seed=seed, data_dir=data_dir, batch_size=batch_size, max_length=max_length,
    record_probs=record_probs)
glue_values(**values)
store

# %% [markdown]
# The store holds {glue:text}`n_tokens` tokens from {glue:text}`n_questions` questions:
# {glue:text}`n_layers` MoE layers of {glue:text}`n_experts` experts, top-{glue:text}`top_k`,
# so the expert activation matrix X has N_e = {glue:text}`n_rows` rows.

# %%
store.tokens.head(12)

# %% [markdown]
# ## 3. How evenly does each layer use its experts?

# %%
usage, values = capture_report.usage_summary(store)
glue_values(**values)
plotting.glue_figure("fig_usage", plotting.expert_usage(usage))

# %% [markdown]
# ```{glue:figure} fig_usage
# :name: fig-capture-usage
#
# Share of each layer's routed slots taken by each expert on the captured MMLU-Pro tokens.
# The least used expert takes {glue:text}`min_usage_pct:.2f`% and the most used
# {glue:text}`max_usage_pct:.2f`%.
# ```

# %%
plotting.glue_figure("fig_weights", plotting.routing_weight_histogram(store.topk_weights))

# %% [markdown]
# ```{glue:figure} fig_weights
# :name: fig-capture-weights
#
# Routing weights of the selected experts, by rank of the choice: how decisively the routers pick.
# ```
#
# ## 4. Which experts fire together across layers? (the paper's Fig 2)
#
# For every pair of experts, the probability that both are chosen for the same token. Shown as
# lift over independence, log2 P(a, b) / (P(a) P(b)): red pairs are chosen together more often
# than chance, blue pairs avoid each other.

# %%
co, pairs, values = capture_report.coactivation_summary(store)
glue_values(**values)
plotting.glue_figure("fig_coactivation", plotting.coactivation_heatmap(co, store.n_experts))

# %% [markdown]
# ```{glue:figure} fig_coactivation
# :name: fig-capture-coactivation
#
# Co-activation of all experts of all MoE layers, as log2 lift over independent choice.
# Black lines separate layers; off-diagonal blocks are cross-layer collaboration.
# ```
#
# The strongest cross-layer pair is {glue:text}`top_pair`, chosen together for
# {glue:text}`top_pair_p:.1%` of the tokens ({glue:text}`top_pair_lift:.1f` times what independent
# choices would give). The ten strongest:

# %%
pairs.style.format(capture_report.PAIRS_FORMAT, escape="html")

# %% [markdown]
# ## 5. Collaboration, or the token? (the token-identity control)
#
# A token's identity largely decides its experts in every layer, and that alone makes experts of
# different layers fire together: "the" goes to the same experts in layer 1 and in layer 4 without
# any collaboration between them. The control compares each cross-layer pair's co-selection with
# what independent layers would give *given the token*: each expert's frequency per token id,
# estimated on one half of the questions and applied to the tokens of the other half, both ways
# round (cross-fitting: a token seen once cannot explain its own co-selection). Over the pairs
# chosen together more often than plain independence predicts, the share of their excess that
# token identity accounts for is what the token explains; the rest is what this page may call
# collaboration, the part of co-activation that depends on the context. The interval is a
# Bayesian bootstrap over questions ({glue:text}`null_bootstrap` replicates, {glue:text}`null_replicates`).

# %%
co_null, null_pairs, values = capture_report.token_control(store, co, n_boot=null_bootstrap, seed=seed)
glue_values(**values)
plotting.glue_figure("fig_coactivation_null", null_plots.lift_heatmaps(capture_report.lift_maps(co_null),
                                                                      store.n_experts))
null_pairs.style.format(capture_report.NULL_PAIRS_FORMAT, escape="html")

# %% [markdown]
# Token identity explains {glue:text}`token_share:.0f`% [{glue:text}`token_share_low:.0f`,
# {glue:text}`token_share_high:.0f`] of the cross-layer excess co-selection; the part that depends
# on the context, the only part that can be collaboration, is {glue:text}`context_share:.0f`%
# [{glue:text}`context_share_low:.0f`, {glue:text}`context_share_high:.0f`]. Over the
# {glue:text}`n_excess_pairs` cross-layer pairs chosen together more often than chance, the lift is
# {glue:text}`excess_lift_plain:.2f` over independent layers but {glue:text}`excess_lift_token:.2f`
# over independent layers given the token. The ten most frequent pairs above have lift
# {glue:text}`top10_lift_plain_min:.1f` to {glue:text}`top10_lift_plain_max:.1f`, and
# {glue:text}`top10_lift_token_min:.2f` to {glue:text}`top10_lift_token_max:.2f` given the token:
# {glue:text}`null_top_pair` is chosen together for {glue:text}`top_pair_observed` tokens, against
# {glue:text}`top_pair_expected_plain:.0f` for independent layers and
# {glue:text}`top_pair_expected_token:.0f` for independent layers given the token (lift
# {glue:text}`top_pair_lift_token:.2f`). Most of what Fig 2 shows is the token, not collaboration;
# later stages test their patterns against the same control.
#
# The position in the text is a second cause shared by all layers. Conditioning on the token and
# its position (bins 0, 1, 2-3, 4-7, ... tokens from the start of the question) explains
# {glue:text}`position_share:.0f`% [{glue:text}`position_share_low:.0f`,
# {glue:text}`position_share_high:.0f`] of the excess, {glue:text}`position_vs_token` the interval
# of the token alone. Finer strata are estimated from fewer tokens each, so out of sample they can
# explain less than the token alone even where position matters; the token-only control is the
# one the later stages use.
#
# ```{glue:figure} fig_coactivation_null
# :name: fig-capture-coactivation-null
#
# The co-activation map of Fig 2 in its two forms, as log2 lift on one colour scale: over
# independent layers (left, as above) and over independent layers given the token id
# (right, cross-fitted over question halves). What stays red on the right depends on the context.
# ```
#
# ## 6. Do domains use experts differently?
#
# The share of each category's tokens that select each expert: a first look at the domain view
# the annotation stage develops (the paper's Fig 7).

# %%
plotting.glue_figure("fig_profiles", plotting.label_usage_profiles(xm.label_profiles(store)))

# %% [markdown]
# ```{glue:figure} fig_profiles
# :name: fig-capture-profiles
#
# Expert-selection frequency per MMLU-Pro category (rows), for every expert of every layer (columns).
# ```
#
# ## Summary
#
# - The routing of {glue:text}`n_tokens` tokens through {glue:text}`n_rows` experts is stored,
#   verified by checksums, for the next stages.
# - The co-activation map shows experts of different layers chosen together more often than
#   independent layers would choose them, but token identity explains
#   {glue:text}`token_share:.0f`% [{glue:text}`token_share_low:.0f`, {glue:text}`token_share_high:.0f`]
#   of that excess: {glue:text}`context_share:.0f`% depends on the context, and only that part is
#   collaboration between layers beyond what each layer does with the token.
