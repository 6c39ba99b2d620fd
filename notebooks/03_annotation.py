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
# # Stage 3: semantic annotation of collaboration patterns
#
# *What does each collaboration pattern respond to, and how do domains use experts?*
#
# {cite:t}`tang2025unveiling` read their patterns by hand, colouring the tokens of a few prompts by
# the pattern that explains them (their Fig 5), and name that manual labelling as the main
# limitation of their study. This stage labels every atom of every HSDL level automatically, from
# all captured tokens: which atom explains each token best, which tokens and token classes each
# atom explains, and which MMLU-Pro categories it prefers, with a significance test corrected for
# the number of atoms. It then compares how the domains use experts (their Fig 7). Definitions
# are on the {doc}`../method` page.
#
# **What you will see:** the labelled atoms of each level; the hierarchy as a tree of labelled
# atoms, with a check of whether finer atoms refine coarser ones; the prompts of one question
# per domain coloured by their level-1 and level-2 atoms; how similar the domains' expert usage
# is, with intervals over questions and each domain's likeness with itself as the reference; and
# which atoms are specific to a domain, with questions as the unit and holding the token fixed.

# %% tags=["parameters"]
artifacts_dir = "artifacts/tiny"
atom_threshold = 0.5
annotation_alpha = 0.01
annotation_correction = "bh"
annotation_rows = 20
render_max_tokens = 160
n_bootstrap = 1000
confidence = 0.95

# %% tags=["hide-input"]
import pandas as pd
from IPython.display import HTML, Markdown, display

from moe_utils.patterns import annotation
from moe_utils.stages import annotation as annotation_report
from moe_utils.common import plotting
from moe_utils.patterns.hsdl import HSDL
from moe_utils.common.markup import code_span
from moe_utils.stages import glue_values, model_caveat, stage_paths
from moe_utils.capture.store import RoutingStore

plotting.use_style()
paths = stage_paths(artifacts_dir)
pd.set_option("display.max_colwidth", 90)

# %% [markdown]
# ## 1. Inputs: the routing store, the fitted HSDL and the tokenizer
#
# The HSDL of stage 2 was fitted on one column of X per captured token, so its level-1 codes line
# up with the store's token table. Token classes need the tokenizer's raw pieces (they carry the
# word-start markers `Ġ`, `▁` or `##`); only the tokenizer is loaded, not the model.

# %%
store = RoutingStore.open(paths.store)
hsdl = HSDL.load(paths.hsdl)
annotation_report.require_token_columns(hsdl, paths.hsdl)
model_name = store.manifest["model"]["name"]
tokenizer = annotation.tokenizer_for(store)
result = annotation.annotate(store, hsdl, tokenizer, alpha=annotation_alpha, correction=annotation_correction,
                             threshold=atom_threshold)
tokens = result.tokens
categories = sorted(tokens["label"].unique())
assert len(tokens) == store.n_tokens
glue_values(model_name=model_name, alpha=annotation_alpha, n_tokens=int(len(tokens)), n_questions=int(store.n_samples),
            n_categories=len(categories), level_sizes=", ".join(map(str, hsdl.level_sizes_)))
display(Markdown(
    f"**Model:** {code_span(model_name)}. **Data:** {store.n_tokens} tokens of {store.n_samples} MMLU-Pro questions "
    f"from {', '.join(categories)}. **HSDL:** {len(result.levels)} levels of "
    f"{', '.join(map(str, hsdl.level_sizes_))} atoms. **Tokenizer:** `{type(tokenizer).__name__}`."
))
if caveat := model_caveat(model_name):
    display(Markdown(caveat))
annotation_report.class_table(tokens).style.format({"share": "{:.1%}"}, escape="html")

# %% [markdown]
# The table gives the token classes over all captured tokens: the base rates against which each
# atom's profile is read.
#
# ## 2. Which atom explains each token?
#
# The contribution of an atom to a token is the routing mass of the token that the atom
# reconstructs: its code for the token times the sum of its dictionary column. Level-2 codes of a
# token are those of the hierarchy, $R_2 R_1$. Each token is assigned, at each level, to the atom
# with the largest contribution.

# %%
levels_table, explained = annotation_report.levels_table(result)
glue_values(**explained)
levels_table.style.format({"median share of the best atom": "{:.0%}", "tokens no atom explains": "{:.1%}"}, escape="html")

# %% [markdown]
# At level 1, {glue:text}`n_explaining_1` atoms are the best explanation of at least one token,
# and the best atom holds a median {glue:text}`best_share_1:.0f`% of a token's reconstructed
# routing: a token is explained by a few atoms together, and the labels below describe each
# atom by the tokens where it is the largest part. The sparsity terms may set every code of a
# rare column to zero: {glue:text}`unexplained_1:.1f`% of the tokens have no level-1 atom and
# are left out of the atoms' profiles.
#
# ## 3. The labelled atoms
#
# A label joins the atom's dominant token classes (share at least 20% and 1.5 times their base
# rate), its most characteristic tokens (ranked by count x log2 lift) and, in brackets, the
# categories in which it is significantly over-represented with questions as the unit (one-sided
# Mann-Whitney test of each question's share of tokens the atom explains, q < {glue:text}`alpha`
# after correction over all atoms and categories of the level; section 7). The tables list the
# atoms explaining the most tokens, with the smallest q-value of that test.

# %%
for level in result.levels[:2]:
    display(Markdown(f"**Level {level.level}**"))
    display(annotation_report.atom_view(level, annotation_rows).style.hide(axis="index")
            .format({"q (questions)": "{:.1e}"}, escape="html"))

# %%
top_level1 = annotation_report.most_explaining(result.level(1), annotation_rows)["atom"].tolist()
base_rates = tokens["token_class"].value_counts(normalize=True)
plotting.glue_figure("fig_classes", plotting.token_class_heatmap(
    result.level(1).classes, base_rates, top_level1, labels=result.level(1).labels,
    title="Token classes of the level-1 atoms explaining the most tokens"))

# %% [markdown]
# ```{glue:figure} fig_classes
# :name: fig-annotation-classes
#
# Token-class profile of the level-1 atoms explaining the most tokens: log2 of a class's share
# among the atom's tokens over its share among all tokens (purple: over-represented; blank: the
# atom explains no token of the class).
# ```
#
# ## 4. The hierarchy: do finer atoms refine coarser ones?
#
# Each level-1 atom is listed with the level-2 atoms that make up at least 10% of it in the
# dictionary ($D_1 \approx D_2 R_2$). A child *refines* its parent if its tokens lie inside the
# parent's (nesting: the share of the child's tokens that the parent explains at level 1) and its
# token classes are purer (lower entropy of its class profile).

# %%
shown, refinement = annotation_report.hierarchy_findings(result, hsdl, top_level1, min_share=0.1)
glue_values(**refinement)
display(Markdown("*The HSDL has one level: there is no hierarchy to read.*") if shown is None else shown.style.hide(
    axis="index").format({"share": "{:.2f}", "taken": "{:.0%}", "nesting": "{:.0%}"}, na_rep="-", escape="html"))

# %% [markdown]
# Of the {glue:text}`n_parents` level-1 atoms with children, {glue:text}`copy_share:.0f`% are
# essentially copied by one level-2 atom (one child holds more than 95% of the parent), and the
# tokens of {glue:text}`split_share:.0f`% are shared out between two or more children (each taking
# at least 10% of them: the `taken` column). On average
# {glue:text}`nesting:.0f`% of a child's tokens belong to its parent; {glue:text}`purer_share:.0f`%
# of the children are purer in token classes than their parent, and {glue:text}`same_class_share:.0f`%
# keep the parent's most frequent class. Level-2 codes are those of the hierarchy ($R_2 R_1$): a
# token that a single level-1 atom explains goes to that atom's largest child, so children can only
# divide a parent's tokens where tokens mix several level-1 atoms. The paper's loss lets a level copy
# the one above (see {doc}`02_hsdl`), and the coarse-to-fine refinement it describes appears here
# only where these numbers say so.
#
# ## 5. Prompts coloured by their atoms (the paper's Fig 5)
#
# The shortest question of each domain, each token coloured by the atom that explains it best at
# level 1 (first row) and level 2 (second row). The atoms explaining most of the question's tokens
# have their own colour (legend); the others are grey. Hover over a token to see its atom.

# %%
for sample, caption in annotation_report.shortest_questions(tokens, categories):
    display(HTML(result.render(sample, max_tokens=render_max_tokens, caption=caption)))

# %% [markdown]
# ## 6. How similarly do domains use experts? (the paper's Fig 7)
#
# Each domain's expert-selection frequency distribution is the share of its tokens' top-k slots
# that each expert of each layer receives; domains are compared by the cosine similarity of these
# distributions. Because all domains share most of their routing, the second heatmap removes the
# mean distribution over domains first and shows what sets each domain apart.

# %%
profiles, similarity, centered, _, closeness = annotation_report.domain_summary(store)
glue_values(**closeness)
plotting.glue_figure("fig_domains", plotting.domain_similarity(profiles, similarity, centered,
                                                               n_experts=store.n_experts))

# %% [markdown]
# The closest domains are {glue:text}`closest_pair` (cosine {glue:text}`closest_cos:.3f`), the
# farthest {glue:text}`farthest_pair` ({glue:text}`farthest_cos:.3f`). The paper reports, for
# Phi-3.5-MoE, that math, physics and computer science are close and math and law far apart.
#
# ```{glue:figure} fig_domains
# :name: fig-annotation-domains
#
# Left: share of each domain's expert selections per expert (all MoE layers, layer-major; grey
# lines separate layers). Middle: cosine similarity of these distributions. Right: the same after
# removing the mean distribution over domains.
# ```
#
# **How sure is that ranking?** The questions of each domain are resampled with replacement
# ({glue:text}`n_bootstrap` times): each pair's cosine gets a {glue:text}`confidence_pct:.0f`%
# interval, and we count how often each pair comes out closest. As a reference, each domain's
# questions are split at random into two halves: two halves of one domain differ only by the
# question sample, so a pair of domains (compared at the same half size) is told apart from a domain
# with itself only if its cosine stays below both domains' split-half cosines in at least
# {glue:text}`confidence_pct:.0f`% of the random splits.

# %%
interval_pairs, within, stability = annotation_report.similarity_intervals(store, n_boot=n_bootstrap,
                                                                           confidence=confidence)
glue_values(**stability, n_bootstrap=n_bootstrap, confidence_pct=confidence * 100)
plotting.glue_figure("fig_domain_intervals", plotting.domain_similarity_intervals(interval_pairs, within,
                                                                                  confidence=confidence))
interval_pairs.style.format({c: "{:.3f}" for c in ("cosine", "low", "high", "cosine at half size")} | {
    c: "{:.0%}" for c in ("closest_share", "farthest_share", "below both domains' halves")}, escape="html").hide(
    axis="index")

# %% [markdown]
# The closest pair, {glue:text}`closest_pair`, has cosine {glue:text}`closest_cos:.3f`
# [{glue:text}`closest_low:.3f`, {glue:text}`closest_high:.3f`] and is the closest in
# {glue:text}`closest_share:.0f`% of the resamples. At half the questions its cosine is
# {glue:text}`closest_half_cos:.3f`, against {glue:text}`within_pair_cos:.3f`
# [{glue:text}`within_pair_low:.3f`, {glue:text}`within_pair_high:.3f`] between two random halves of
# {glue:text}`within_pair_domain`, the one of the two least alike itself; the pair stays below both
# domains' halves in {glue:text}`below_within_share:.0f`% of the splits: {glue:text}`within_verdict`.
#
# ```{glue:figure} fig_domain_intervals
# :name: fig-annotation-domain-intervals
#
# Every pair of domains: cosine of their expert-selection frequencies (filled dots, with the
# interval over resampled questions and the share of resamples in which the pair is the closest)
# and at half the questions (open dots); below, each domain against itself, two random halves of
# its questions (grey squares, with the range over random splits).
# ```
#
# ## 7. Which atoms are specific to a domain?
#
# Tokens of one question are not independent (a long question repeats its words), so the unit
# of the test is the question: for every level-1 atom and category, each question's share of
# tokens explained by the atom, the category's questions against the others (one-sided
# Mann-Whitney U, corrected over all atoms and categories). The lift is the category's mean share
# over the mean share of all questions; a dot marks q < {glue:text}`alpha`. The same over tokens
# (hypergeometric test) is shown for comparison: an atom specific to a domain over tokens but not
# over questions is carried by a few long questions. Domains also differ in their tokens (digits in
# math, legal words in law), and a token largely fixes its experts; so the test is repeated holding
# the token fixed (a Mantel-Haenszel test over the occurrences of each token id: are the category's
# occurrences of a token assigned to the atom more often than the other occurrences of the same
# token?). A ring marks an enrichment that survives it.

# %%
level1 = result.level(1)
shown_atoms, enriched, specific = annotation_report.enrichment_summary(level1, categories,
                                                                       correction=annotation_correction,
                                                                       n=annotation_rows)
glue_values(**specific, **annotation_report.findings(model_name, specific, closeness, stability,
                                                     alpha=annotation_alpha))
plotting.glue_figure("fig_enrichment", plotting.enrichment_heatmap(
    level1.enrichment_by_sample, shown_atoms, labels=level1.labels, alpha=annotation_alpha,
    title="Domain enrichment of the most significant level-1 atoms (questions as the unit)",
    given_token=level1.enrichment_by_type))
enriched.style.hide(axis="index").format({"lift": "{:.2f}", "lift given the token": "{:.2f}", "q (questions)": "{:.1e}",
                                          "q (tokens)": "{:.1e}", "q (given the token)": "{:.1e}"}, escape="html")

# %% [markdown]
# Of the {glue:text}`n_tested_1` level-1 atoms that explain at least one token,
# {glue:text}`n_specific_sample_1` are domain-specific with questions as the unit at
# q < {glue:text}`alpha` ({glue:text}`correction` correction over atoms and categories; per
# category: {glue:text}`specific_per_category`); {glue:text}`n_specific_sample_type_1` of them stay
# so holding the token fixed. Over tokens {glue:text}`n_specific_1` atoms pass the test, and
# {glue:text}`n_token_only_1` of those fail it over questions: their enrichment comes from a few
# questions. Holding the token fixed (over tokens), {glue:text}`n_specific_type_1` atoms are
# domain-specific.
#
# ```{glue:figure} fig_enrichment
# :name: fig-annotation-enrichment
#
# Level-1 atoms with the smallest question-level q-values (rows, with their labels) against the
# MMLU-Pro categories: log2 of the category's mean share of tokens the atom explains over the mean
# of all questions; dots mark q below the threshold with questions as the unit, rings an enrichment
# that also holds with the token fixed.
# ```
#
# ## Summary
#
# - Every atom of every level carries an automatic label built from the tokens it explains: token
#   classes, characteristic tokens and significantly enriched categories.
# - {glue:text}`n_specific_sample_1` of {glue:text}`n_tested_1` level-1 atoms prefer a domain with
#   questions as the unit (q < {glue:text}`alpha`), {glue:text}`n_specific_sample_type_1` of them
#   also holding the token fixed; {glue:text}`n_token_only_1` atoms that pass over tokens fail over
#   questions.
# - Finer atoms: {glue:text}`copy_share:.0f`% of level-1 atoms are copied by one child;
#   {glue:text}`purer_share:.0f`% of the children are purer in token classes than their parent.
# - Domains: {glue:text}`closest_pair` use experts most alike (cosine {glue:text}`closest_cos:.3f`
#   [{glue:text}`closest_low:.3f`, {glue:text}`closest_high:.3f`], closest in
#   {glue:text}`closest_share:.0f`% of the resamples), {glue:text}`farthest_pair` least
#   ({glue:text}`farthest_cos:.3f`); for the closest pair, {glue:text}`within_verdict`.
#
# **Exercise.** Re-run this notebook with `annotation_correction = "bonferroni"` and compare the
# number of domain-specific atoms; then colour a question of your own choice with
# `result.render(sample_id)`.
