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
# is; and which atoms are specific to a domain.

# %% tags=["parameters"]
artifacts_dir = "artifacts/tiny"
atom_threshold = 0.5
annotation_alpha = 0.01
annotation_correction = "bh"
annotation_rows = 20
render_max_tokens = 160

# %% tags=["hide-input"]
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import HTML, Markdown, display
from myst_nb import glue

from moe_utils import annotation, plotting
from moe_utils.hsdl import HSDL
from moe_utils.store import RoutingStore

plotting.use_style()
store_dir = Path(artifacts_dir) / "01_capture" / "store"
hsdl_dir = Path(artifacts_dir) / "02_hsdl"
pd.set_option("display.max_colwidth", 90)

# %% [markdown]
# ## 1. Inputs: the routing store, the fitted HSDL and the tokenizer
#
# The HSDL of stage 2 was fitted on one column of X per captured token, so its level-1 codes line
# up with the store's token table. Token classes need the tokenizer's raw pieces (they carry the
# word-start markers `Ġ`, `▁` or `##`); only the tokenizer is loaded, not the model.

# %%
store = RoutingStore.open(store_dir)
model = HSDL.load(hsdl_dir)
model_name = store.manifest["model"]["name"]
x_spec = model.manifest_.get("x_spec", {})
if x_spec.get("granularity", "token") != "token":
    raise ValueError(f"{hsdl_dir} was fitted on {x_spec['granularity']} columns; annotation needs token "
                     "columns: re-run stage 2 with granularity='token'")
tokenizer = annotation.tokenizer_for(store)
result = annotation.annotate(store, model, tokenizer, alpha=annotation_alpha, correction=annotation_correction,
                             threshold=atom_threshold)
tokens = result.tokens
n_levels = len(result.levels)
categories = sorted(tokens["label"].unique())
assert len(tokens) == store.n_tokens
glue("model_name", model_name, display=False)
glue("alpha", annotation_alpha, display=False)
glue("n_tokens", int(len(tokens)), display=False)
glue("n_questions", int(store.n_samples), display=False)
glue("n_categories", len(categories), display=False)
glue("level_sizes", ", ".join(map(str, model.level_sizes_)), display=False)
display(Markdown(
    f"**Model:** `{model_name}`. **Data:** {store.n_tokens} tokens of {store.n_samples} MMLU-Pro questions "
    f"from {', '.join(categories)}. **HSDL:** {n_levels} levels of {', '.join(map(str, model.level_sizes_))} "
    f"atoms. **Tokenizer:** `{type(tokenizer).__name__}`."
))
if model_name.startswith("random:"):
    display(Markdown("**The routing comes from a randomly initialised model: the labels below describe "
                     "noise, not learned collaboration. Nothing here is a finding.**"))
elif model_name == "embedded":
    display(Markdown("The embedded model is a small MoE trained here on WikiText-2: its patterns are real, "
                     "learned routing, but of a tiny model. They illustrate the method and are not the "
                     "paper's Phi-3.5-MoE results."))
tokens["token_class"].value_counts().rename("tokens").to_frame().assign(
    share=lambda f: f["tokens"] / f["tokens"].sum()).style.format({"share": "{:.1%}"}, escape="html")

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
level_rows = []
for k, level in enumerate(result.levels, start=1):
    used = level.atoms[level.atoms["n_tokens"] > 0]
    level_rows.append({"level": k, "atoms": len(level.atoms), "atoms explaining a token": len(used),
                       "tokens no atom explains": float((tokens[f"atom_{k}"] < 0).mean()),
                       "median share of the best atom": float(tokens[f"share_{k}"].median()),
                       "domain-specific atoms (tokens)": int(level.atoms["domain_specific"].sum()),
                       "domain-specific atoms (questions)": int(level.atoms["domain_specific_by_sample"].sum())})
levels_table = pd.DataFrame(level_rows).set_index("level")
glue("best_share_1", float(levels_table.loc[1, "median share of the best atom"] * 100), display=False)
glue("n_explaining_1", int(levels_table.loc[1, "atoms explaining a token"]), display=False)
glue("unexplained_1", float(levels_table.loc[1, "tokens no atom explains"] * 100), display=False)
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
# categories in which it is significantly over-represented (one-sided hypergeometric test over
# tokens, q < {glue:text}`alpha` after correction over all atoms and categories of the level).
# The tables list the atoms explaining the most tokens, with the smallest q-value of the same test
# over questions (section 7).

# %%
for level in result.levels[:2]:
    view = level.atoms.sort_values(["n_tokens", "atom"], ascending=[False, True]).head(annotation_rows)
    view = view.assign(experts=view["experts"].map(lambda e: " ".join(e[:4]) + (" ..." if len(e) > 4 else "")))
    display(Markdown(f"**Level {level.level}**"))
    display(view[["atom", "experts", "n_tokens", "label", "min_q_by_sample"]]
            .rename(columns={"n_tokens": "tokens", "min_q_by_sample": "q (questions)"})
            .style.hide(axis="index").format({"q (questions)": "{:.1e}"}, escape="html"))

# %%
top_level1 = (result.level(1).atoms.sort_values(["n_tokens", "atom"], ascending=[False, True])
              .head(annotation_rows)["atom"].tolist())
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
if n_levels > 1:
    tree = annotation.hierarchy_tree(result, model, level=1, min_share=0.1)
    with_tokens = tree[tree["child_tokens"] > 0]
    splits = (tree["taken"] >= 0.1).groupby(tree["parent"]).sum()  # children taking >= 10% of the parent's tokens
    copies = tree.groupby("parent")["share"].max() > 0.95
    glue("n_parents", int(tree["parent"].nunique()), display=False)
    glue("copy_share", float(copies.mean() * 100), display=False)
    glue("split_share", float((splits >= 2).mean() * 100) if len(splits) else 0.0, display=False)
    glue("nesting", float(with_tokens["nesting"].mean() * 100) if len(with_tokens) else 0.0, display=False)
    purer = (with_tokens["child_entropy"] < with_tokens["parent_entropy"]).mean() if len(with_tokens) else 0.0
    glue("purer_share", float(purer * 100), display=False)
    glue("same_class_share", float(with_tokens["same_top_class"].mean() * 100) if len(with_tokens) else 0.0,
         display=False)
    shown = tree[tree["parent"].isin(top_level1)].sort_values(["parent", "share"], ascending=[True, False])
    display(shown[["parent", "parent_label", "child", "share", "child_label", "taken", "nesting"]]
            .style.hide(axis="index").format({"share": "{:.2f}", "taken": "{:.0%}", "nesting": "{:.0%}"}, na_rep="-", escape="html"))
else:
    display(Markdown("*The HSDL has one level: there is no hierarchy to read.*"))
    for name in ("n_parents", "copy_share", "split_share", "nesting", "purer_share", "same_class_share"):
        glue(name, 0, display=False)

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
lengths = tokens.groupby("sample_id").agg(n=("position", "size"), label=("label", "first"))
for category in categories:
    sample = int(lengths[lengths["label"] == category].sort_values(["n"], kind="stable").index[0])
    display(HTML(result.render(sample, max_tokens=render_max_tokens,
                               caption=f"{category} (question {sample}, {lengths.at[sample, 'n']} tokens)")))

# %% [markdown]
# ## 6. How similarly do domains use experts? (the paper's Fig 7)
#
# Each domain's expert-selection frequency distribution is the share of its tokens' top-k slots
# that each expert of each layer receives; domains are compared by the cosine similarity of these
# distributions. Because all domains share most of their routing, the second heatmap removes the
# mean distribution over domains first and shows what sets each domain apart.

# %%
profiles = annotation.domain_profiles(store)
similarity = annotation.domain_similarity(profiles)
centered = annotation.domain_similarity(profiles, centered=True)
np.testing.assert_allclose(np.diag(similarity), 1.0, rtol=1e-9)
np.testing.assert_allclose(similarity.to_numpy(), similarity.to_numpy().T)
pairs = annotation.ranked_pairs(similarity)
closest, farthest = pairs.iloc[0], pairs.iloc[-1]
glue("closest_pair", f"{closest['a']} and {closest['b']}", display=False)
glue("closest_cos", float(closest["cosine"]), display=False)
glue("farthest_pair", f"{farthest['a']} and {farthest['b']}", display=False)
glue("farthest_cos", float(farthest["cosine"]), display=False)
plotting.glue_figure("fig_domains", plotting.domain_similarity(profiles, similarity, centered,
                                                               n_experts=store.n_experts))
pairs.style.format({"cosine": "{:.3f}"}, escape="html").hide(axis="index")

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
# ## 7. Which atoms are specific to a domain?
#
# For every level-1 atom and category, the lift is the category's share among the atom's tokens
# over its share among all tokens; a dot marks q < {glue:text}`alpha` (one-sided hypergeometric
# test, corrected over all atoms and categories). Tokens of one question are not independent, so
# the test is repeated with questions as the unit (Mann-Whitney U on each question's share of
# tokens explained by the atom): an atom specific to a domain in both tests is not carried by a
# few long questions.

# %%
level1 = result.level(1)
tested1 = level1.atoms[level1.atoms["n_tokens"] > 0]
n_specific = int(tested1["domain_specific"].sum())
n_specific_sample = int(tested1["domain_specific_by_sample"].sum())
n_both = int((tested1["domain_specific"] & tested1["domain_specific_by_sample"]).sum())
assert (level1.enrichment["q"] >= level1.enrichment["p"] - 1e-12).all()
glue("n_tested_1", int(len(tested1)), display=False)
glue("n_specific_1", n_specific, display=False)
glue("n_specific_sample_1", n_specific_sample, display=False)
glue("n_specific_both_1", n_both, display=False)
glue("correction", {"bh": "Benjamini-Hochberg", "bonferroni": "Bonferroni"}[annotation_correction], display=False)
per_category = (level1.enrichment[level1.enrichment["significant"]].groupby("category").size()
                .reindex(categories, fill_value=0))
glue("specific_per_category", ", ".join(f"{c}: {n}" for c, n in per_category.items()), display=False)
shown_atoms = (tested1.sort_values(["min_q", "n_tokens", "atom"], ascending=[True, False, True])
               .head(annotation_rows)["atom"].tolist())
plotting.glue_figure("fig_enrichment", plotting.enrichment_heatmap(
    level1.enrichment, shown_atoms, labels=level1.labels, alpha=annotation_alpha,
    title="Domain enrichment of the most significant level-1 atoms"))
(level1.enrichment[level1.enrichment["significant"]].sort_values(["q", "atom"]).head(annotation_rows)
 .assign(label=lambda f: f["atom"].map(level1.labels))
 [["atom", "category", "n_atom", "overlap", "expected", "lift", "q", "label"]]
 .style.hide(axis="index").format({"expected": "{:.1f}", "lift": "{:.2f}", "q": "{:.1e}"}, escape="html"))

# %% [markdown]
# Of the {glue:text}`n_tested_1` level-1 atoms that explain at least one token,
# {glue:text}`n_specific_1` are domain-specific at q < {glue:text}`alpha`
# ({glue:text}`correction` correction over atoms and categories; per category:
# {glue:text}`specific_per_category`). With questions as the unit, {glue:text}`n_specific_sample_1`
# are, {glue:text}`n_specific_both_1` in both tests.
#
# ```{glue:figure} fig_enrichment
# :name: fig-annotation-enrichment
#
# Level-1 atoms with the smallest corrected q-values (rows, with their labels) against the
# MMLU-Pro categories: log2 lift of the category among the atom's tokens; dots mark q below the
# threshold.
# ```
#
# ## Summary
#
# - Every atom of every level carries an automatic label built from the tokens it explains: token
#   classes, characteristic tokens and significantly enriched categories.
# - {glue:text}`n_specific_1` of {glue:text}`n_tested_1` level-1 atoms prefer a domain at
#   q < {glue:text}`alpha` over tokens, {glue:text}`n_specific_sample_1` with questions as the
#   unit.
# - Finer atoms: {glue:text}`copy_share:.0f`% of level-1 atoms are copied by one child;
#   {glue:text}`purer_share:.0f`% of the children are purer in token classes than their parent.
# - Domains: {glue:text}`closest_pair` use experts most alike (cosine {glue:text}`closest_cos:.3f`),
#   {glue:text}`farthest_pair` least ({glue:text}`farthest_cos:.3f`).
#
# **Exercise.** Re-run this notebook with `annotation_correction = "bonferroni"` and compare the
# number of domain-specific atoms; then colour a question of your own choice with
# `result.render(sample_id)`.
