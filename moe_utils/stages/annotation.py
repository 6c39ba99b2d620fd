"""What stage 3 reports about the annotated atoms (the paper's Figs 5 and 7), as tables and numbers.

Each function takes the :class:`moe_utils.patterns.annotation.Annotation` of a routing store and its HSDL
(or the store) and returns the tables a page shows with a dict of the values it glues into its
text: :func:`levels_table` (how well atoms explain tokens), :func:`atom_view` (the labelled atoms
of a level), :func:`hierarchy_findings` (do finer atoms refine coarser ones),
:func:`shortest_questions` (what the coloured prompts show), :func:`domain_summary` (how alike the
domains use experts), :func:`similarity_intervals` (how sure that is, questions resampled),
:func:`enrichment_summary` (which atoms prefer a domain) and :func:`findings` (the stage's verdicts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moe_utils.patterns import annotation, domain_intervals
from moe_utils.capture.store import RoutingStore

CORRECTIONS = {"bh": "Benjamini-Hochberg", "bonferroni": "Bonferroni"}
#: The values :func:`hierarchy_findings` glues, all 0 for a single-level HSDL.
HIERARCHY_VALUES = ("n_parents", "copy_share", "split_share", "nesting", "purer_share", "same_class_share")


def require_token_columns(hsdl, path: str | Path) -> None:
    """Annotation reads one column of X per token: ValueError, saying how to re-fit, otherwise."""
    x_spec = hsdl.manifest_.get("x_spec", {})
    if x_spec.get("granularity", "token") != "token":
        raise ValueError(f"{path} was fitted on {x_spec['granularity']} columns; annotation needs token "
                         "columns: re-run stage 2 with granularity='token'")


def class_table(tokens: pd.DataFrame) -> pd.DataFrame:
    """Token classes over all captured tokens (count and share): the base rates of the profiles."""
    return tokens["token_class"].value_counts().rename("tokens").to_frame().assign(
        share=lambda f: f["tokens"] / f["tokens"].sum())


def levels_table(result: annotation.Annotation) -> tuple[pd.DataFrame, dict]:
    """Per level: atoms, atoms explaining a token, share of tokens no atom explains, median share of
    a token's best atom and domain-specific atoms (over tokens, over questions and holding the token
    fixed); with level 1's
    median best share (%), atoms explaining a token and unexplained tokens (%)."""
    tokens, rows = result.tokens, []
    for k, level in enumerate(result.levels, start=1):
        used = level.atoms[level.atoms["n_tokens"] > 0]
        rows.append({"level": k, "atoms": len(level.atoms), "atoms explaining a token": len(used),
                     "tokens no atom explains": float((tokens[f"atom_{k}"] < 0).mean()),
                     "median share of the best atom": float(tokens[f"share_{k}"].median()),
                     "domain-specific atoms (tokens)": int(level.atoms["domain_specific"].sum()),
                     "domain-specific atoms (questions)": int(level.atoms["domain_specific_by_sample"].sum()),
                     "domain-specific atoms (given the token)": int(level.atoms["domain_specific_by_type"].sum())})
    table = pd.DataFrame(rows).set_index("level")
    return table, {"best_share_1": float(table.loc[1, "median share of the best atom"] * 100),
                   "n_explaining_1": int(table.loc[1, "atoms explaining a token"]),
                   "unexplained_1": float(table.loc[1, "tokens no atom explains"] * 100)}


def most_explaining(level: annotation.LevelAnnotation, n: int) -> pd.DataFrame:
    """The ``n`` atoms of a level that explain the most tokens (ties: lowest atom first)."""
    return level.atoms.sort_values(["n_tokens", "atom"], ascending=[False, True]).head(n)


def atom_view(level: annotation.LevelAnnotation, n: int) -> pd.DataFrame:
    """The labelled atoms of :func:`most_explaining`: atom, first experts, tokens, label, q over questions."""
    view = most_explaining(level, n)
    view = view.assign(experts=view["experts"].map(lambda e: " ".join(e[:4]) + (" ..." if len(e) > 4 else "")))
    return (view[["atom", "experts", "n_tokens", "label", "min_q_by_sample"]]
            .rename(columns={"n_tokens": "tokens", "min_q_by_sample": "q (questions)"}))


def hierarchy_findings(result: annotation.Annotation, hsdl, shown_parents, *,
                       min_share: float = 0.1) -> tuple[pd.DataFrame | None, dict]:
    """Do level-2 atoms refine level-1 ones? The edges of :func:`moe_utils.patterns.annotation.hierarchy_tree`
    for ``shown_parents`` and the numbers: parents, shares (%) copied by one child (> 95%), split
    between children (two or more taking >= 10% of its tokens), mean nesting, children purer than
    their parent and keeping its top class. ``(None, zeros)`` for a single-level HSDL."""
    if len(result.levels) < 2:
        return None, dict.fromkeys(HIERARCHY_VALUES, 0)
    tree = annotation.hierarchy_tree(result, hsdl, level=1, min_share=min_share)
    with_tokens = tree[tree["child_tokens"] > 0]
    splits = (tree["taken"] >= 0.1).groupby(tree["parent"]).sum()  # children taking >= 10% of the parent's tokens
    copies = tree.groupby("parent")["share"].max() > 0.95
    purer = (with_tokens["child_entropy"] < with_tokens["parent_entropy"]).mean() if len(with_tokens) else 0.0
    values = {"n_parents": int(tree["parent"].nunique()), "copy_share": float(copies.mean() * 100),
              "split_share": float((splits >= 2).mean() * 100) if len(splits) else 0.0,
              "nesting": float(with_tokens["nesting"].mean() * 100) if len(with_tokens) else 0.0,
              "purer_share": float(purer * 100),
              "same_class_share": float(with_tokens["same_top_class"].mean() * 100) if len(with_tokens) else 0.0}
    shown = tree[tree["parent"].isin(shown_parents)].sort_values(["parent", "share"], ascending=[True, False])
    return shown[["parent", "parent_label", "child", "share", "child_label", "taken", "nesting"]], values


def shortest_questions(tokens: pd.DataFrame, categories) -> list[tuple[int, str]]:
    """The shortest captured question of each category (ties: lowest sample first) with a caption."""
    lengths = tokens.groupby("sample_id").agg(n=("position", "size"), label=("label", "first"))
    out = []
    for category in categories:
        sample = int(lengths[lengths["label"] == category].sort_values(["n"], kind="stable").index[0])
        out.append((sample, f"{category} (question {sample}, {lengths.at[sample, 'n']} tokens)"))
    return out


def domain_summary(store: RoutingStore) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """The paper's Fig 7: each domain's expert-selection profile, their cosine similarity (raw and
    after removing the mean profile), the ranked pairs, and the closest and farthest pair."""
    profiles = annotation.domain_profiles(store)
    similarity = annotation.domain_similarity(profiles)
    centered = annotation.domain_similarity(profiles, centered=True)
    matrix = similarity.to_numpy()
    if not (np.allclose(np.diag(matrix), 1.0, rtol=1e-9) and np.allclose(matrix, matrix.T)):
        raise RuntimeError("the domain similarity is not a symmetric matrix with a unit diagonal")
    pairs = annotation.ranked_pairs(similarity)
    closest, farthest = pairs.iloc[0], pairs.iloc[-1]
    values = {"closest_pair": f"{closest['a']} and {closest['b']}", "closest_cos": float(closest["cosine"]),
              "farthest_pair": f"{farthest['a']} and {farthest['b']}", "farthest_cos": float(farthest["cosine"])}
    return profiles, similarity, centered, pairs, values


def similarity_intervals(store: RoutingStore, *, n_boot: int = 1000,
                         confidence: float = 0.95) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Fig 7 with questions resampled (:mod:`moe_utils.patterns.domain_intervals`): every pair's cosine with its
    interval, how often it is the closest and, at half the questions, its cosine beside each
    domain's split-half cosine; with the values :func:`moe_utils.patterns.domain_intervals.closeness_values`
    glues."""
    counts, labels = domain_intervals.question_selections(store)
    pairs = domain_intervals.similarity_bootstrap(counts, labels, n_boot=n_boot, confidence=confidence)
    within, cross = domain_intervals.split_half(counts, labels, n_splits=n_boot, confidence=confidence)
    table = pairs.join(cross.set_index(["a", "b"])[["cosine", "below_within"]].rename(
        columns={"cosine": "cosine at half size", "below_within": "below both domains' halves"}), on=["a", "b"])
    return table, within, domain_intervals.closeness_values(pairs, within, cross, confidence=confidence)


def enrichment_summary(level: annotation.LevelAnnotation, categories, *, correction: str,
                       n: int) -> tuple[list[int], pd.DataFrame, dict]:
    """Which atoms of a level prefer a domain, with questions as the unit (the test the labels use):
    the ``n`` atoms of smallest question-level q (for the heatmap); the ``n`` most significant
    question-level (atom, category) rows with labels, beside the same pair's q over tokens and
    holding the token fixed (``q (tokens)``, ``q (given the token)``, and the lift given the token);
    and the counts of domain-specific atoms: over tokens, over questions, in both, holding the token
    fixed, over questions and holding the token, and over tokens only (an enrichment carried by a
    few long questions), with the question-level count per category."""
    tests = {"tokens": level.enrichment, "questions": level.enrichment_by_sample, "types": level.enrichment_by_type}
    for name, table in tests.items():
        if not (table["q"] >= table["p"] - 1e-12).all():
            raise RuntimeError(f"a corrected q-value lies below its p-value (enrichment over {name})")
    tested = level.atoms[level.atoms["n_tokens"] > 0]
    by_sample = level.enrichment_by_sample
    per_category = by_sample[by_sample["significant"]].groupby("category").size().reindex(categories, fill_value=0)
    token, sample, typed = (tested[f"domain_specific{c}"] for c in ("", "_by_sample", "_by_type"))
    values = {"n_tested_1": int(len(tested)), "n_specific_1": int(token.sum()),
              "n_specific_sample_1": int(sample.sum()), "n_specific_both_1": int((token & sample).sum()),
              "n_specific_type_1": int(typed.sum()), "n_specific_sample_type_1": int((sample & typed).sum()),
              "n_token_only_1": int((token & ~sample).sum()), "correction": CORRECTIONS[correction],
              "specific_per_category": ", ".join(f"{c}: {k}" for c, k in per_category.items())}
    shown = tested.sort_values(["min_q_by_sample", "n_tokens", "atom"], ascending=[True, False, True]).head(n)
    key = ["atom", "category"]
    others = (level.enrichment.set_index(key)["q"].rename("q (tokens)").to_frame()
              .join(level.enrichment_by_type.set_index(key)[["q", "lift"]]
                    .rename(columns={"q": "q (given the token)", "lift": "lift given the token"})))
    table = (by_sample[by_sample["significant"]].sort_values(["q", "atom"]).head(n)
             .join(others, on=key).assign(label=lambda f: f["atom"].map(level.labels))
             [["atom", "category", "n_atom", "lift", "q", "q (tokens)", "lift given the token", "q (given the token)",
               "label"]].rename(columns={"q": "q (questions)"}))
    return shown["atom"].tolist(), table, values


def findings(model: str, specific: dict, closeness: dict, stability: dict, *, alpha: float) -> dict[str, str]:
    """Stage 3's findings for the book's introduction, each opening with a plain sentence that says
    what was found, followed by its numbers: ``finding_domain_atoms`` (which atoms prefer a domain
    with questions as the unit, and how many stay so holding the token fixed; the values of
    :func:`enrichment_summary`) and ``finding_domain_similarity`` (Fig 7: the closest pair, how
    stable it is and how it compares with a domain's likeness with itself; the values of
    :func:`domain_summary` and :func:`similarity_intervals`)."""
    n, by_question = specific["n_tested_1"], specific["n_specific_sample_1"]
    beyond = specific["n_specific_sample_type_1"]
    if by_question == 0:
        verdict = "No level-1 atom prefers a domain once questions, not tokens, are the unit."
    elif beyond == 0:
        verdict = ("Every domain preference of the atoms goes with the tokens the domains use: none survives "
                   "holding the token fixed.")
    elif 3 * beyond < by_question:
        verdict = ("Most domain preferences of the atoms go with the tokens the domains use; a minority survives "
                   "holding the token fixed.")
    elif 3 * beyond <= 2 * by_question:
        verdict = ("About half of the atoms that prefer a domain keep that preference when the token is held "
                   "fixed; the rest go with the tokens the domains use.")
    else:
        verdict = "Most atoms that prefer a domain keep that preference when the token is held fixed."
    atoms = (f"{verdict} On {model}, {by_question} of {n} level-1 atoms are enriched in an MMLU-Pro domain with "
             f"questions as the unit (q < {alpha:g}, {specific['correction']}), {beyond} of them also among "
             f"occurrences of the same token; {specific['n_token_only_1']} more pass the token-level test only, "
             f"carried by a few questions.")
    pair, share = closeness["closest_pair"], stability["closest_share"]
    settled = share >= 95 and stability["within_verdict"].startswith("both domains are more alike")
    opening = (f"{pair[0].upper()}{pair[1:]} use experts most alike, and the sample settles it." if settled else
               "Which domains use experts most alike is not settled by this sample of questions.")
    similarity = (f"{opening} The closest pair, {pair}, has cosine {closeness['closest_cos']:.3f} "
                  f"[{stability['closest_low']:.3f}, {stability['closest_high']:.3f}] and is the closest in "
                  f"{share:.0f}% of the question resamples; at half the questions it stays below both domains' "
                  f"split-half cosines in {stability['below_within_share']:.0f}% of the random splits; the farthest "
                  f"pair is {closeness['farthest_pair']} ({closeness['farthest_cos']:.3f}).")
    return {"finding_domain_atoms": atoms, "finding_domain_similarity": similarity}
