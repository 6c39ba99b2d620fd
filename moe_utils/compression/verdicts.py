"""Stage 4's verdicts: one primary endpoint named before the run, every other comparison Holm-corrected,
and per method what it beats and what it does not.

The paper's Table 1 (section 4) ranks CAEP against SEER-MoE and GEM on single numbers. With a dozen
methods, three ratios and several measures the page makes hundreds of comparisons; read one by one
at the 5% level, some would look like differences by chance alone. So:

* the **primary endpoint** is fixed in the profile before the run (:data:`PRIMARY`: BLiMP macro
  accuracy at 50% pruned, CAEP minus random masks that keep CAEP's own number of experts in every
  layer, :mod:`moe_utils.compression.reference`) and judged alone, by its 95% interval;
* every other comparison (every method against the unpruned model, random masks, CAEP; the
  ablation's variants) is **secondary**: its p-value is Holm-adjusted over the whole family
  (:func:`moe_utils.common.stats.holm`), and it counts as a difference only where the adjusted value is
  below 0.05 (:func:`adjust`);
* :func:`method_verdicts` says, per method, on which measures it is better or worse than random
  masks and than CAEP after that correction; :func:`findings` turns this into the plain sentences
  the introduction quotes, the ones unfavourable to CAEP included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from moe_utils.evaluation import paired
from moe_utils.common import stats
from moe_utils.compression.ablation import is_variant
from moe_utils.compression.reference import MATCHED_REFERENCE
from moe_utils.evaluation.pruning_eval import difference_row, format_value, measure_spec, measure_values

#: The primary endpoint every profile names unless it says otherwise.
PRIMARY = {"method": "caep", "measure": "blimp", "ratio": 0.5, "reference": MATCHED_REFERENCE}
#: The family-wise error rate of the secondary comparisons.
ALPHA = 0.05
#: The task whose documents each measure is scored on (to check the primary endpoint up front).
MEASURE_TASKS = {"blimp": "blimp", "wikitext": "wikitext2_ppl", "mmlu_pro": "mmlu_pro_ppl", "mmlu_pro_mc": "mmlu_pro_mc"}


def check_primary(endpoint: Mapping[str, Any], *, ratios: Sequence[float], methods: Sequence[str],
                  tasks: Sequence[str]) -> dict:
    """The endpoint with :data:`PRIMARY`'s defaults filled in; ValueError, before any evaluation,
    when the run would not measure it (its method, ratio or measure's task is not in the profile)."""
    endpoint = dict(PRIMARY) | dict(endpoint or {})
    unknown = set(endpoint) - set(PRIMARY)
    if unknown:
        raise ValueError(f"primary_endpoint: unknown keys {sorted(unknown)}; known: {sorted(PRIMARY)}")
    problems = []
    if endpoint["method"] not in methods:
        problems.append(f"its method {endpoint['method']!r} is not among pruning_methods {list(methods)}")
    if not any(np.isclose(endpoint["ratio"], r) for r in ratios):
        problems.append(f"its ratio {endpoint['ratio']} is not among prune_ratios {list(ratios)}")
    task = MEASURE_TASKS.get(endpoint["measure"])
    if task is None or task not in tasks:
        problems.append(f"its measure {endpoint['measure']!r} needs the task {task!r} in eval_tasks {list(tasks)}")
    if endpoint["reference"] not in ("random", MATCHED_REFERENCE):
        problems.append(f"its reference must be 'random' or {MATCHED_REFERENCE!r}")
    if problems:
        raise ValueError("the primary endpoint cannot be measured: " + "; ".join(problems)
                         + ". Change primary_endpoint or the profile's methods, ratios and tasks.")
    return endpoint


def describe_primary(endpoint: Mapping[str, Any]) -> str:
    """The endpoint in words, for the page (stated before any result)."""
    label = measure_spec(endpoint["measure"])[1]
    reference = ("random masks that keep as many experts in every layer as it does"
                 if endpoint["reference"] == MATCHED_REFERENCE else "random masks (the same share of every layer)")
    return (f"{label} with {endpoint['ratio']:.0%} of the routed experts pruned: "
            f"{endpoint['method']} minus {reference}, paired on the same documents, 95% interval")


def versus_method(samples: pd.DataFrame, measures: Sequence[str], reference: str, *, n_boot: int = 1000,
                  confidence: float = 0.95) -> pd.DataFrame:
    """Every other method of Table 1 minus ``reference`` (CAEP) at each ratio, paired on the same
    documents: rows of :func:`moe_utils.evaluation.pruning_eval.comparisons` with ``reference`` named."""
    rows = []
    for measure in measures:
        kind = measure_spec(measure)[0]
        data = measure_values(samples, measure)
        models = data["models"]
        for (method, ratio), _ in models.groupby(["method", "ratio"], sort=False):
            if method in ("unpruned", reference) or is_variant(method):
                continue
            ref = ((models["method"] == reference) & np.isclose(models["ratio"], ratio)).to_numpy()
            own = ((models["method"] == method) & np.isclose(models["ratio"], ratio)).to_numpy()
            if not ref.any():
                continue
            diff = paired.paired_difference(kind, data["values"][ref], data["values"][own], strata=data["strata"],
                                            counts=data["counts"], n_boot=n_boot, confidence=confidence)
            rows.append(difference_row(diff, measure=measure, method=method, ratio=ratio, reference=reference))
    return pd.DataFrame(rows)


def _is_primary(compared: pd.DataFrame, endpoint: Mapping[str, Any]) -> pd.Series:
    hit = ((compared["method"] == endpoint["method"]) & (compared["measure"] == endpoint["measure"])
           & np.isclose(compared["ratio"], endpoint["ratio"]))
    references = [endpoint["reference"]]
    if endpoint["reference"] == MATCHED_REFERENCE:
        references.append("random")  # a method that keeps each layer's quota: the uniform masks are matched
    for reference in references:
        chosen = hit & (compared["reference"] == reference)
        if chosen.any():
            return chosen
    return hit & False


def adjust(compared: pd.DataFrame, endpoint: Mapping[str, Any], *, alpha: float = ALPHA) -> pd.DataFrame:
    """``compared`` with ``role`` (``primary`` for the endpoint's row, ``secondary`` for every other),
    ``p_holm`` (Holm over the secondary rows; the primary's own p-value) and ``rejected`` (primary:
    its interval excludes 0; secondary: ``p_holm`` < ``alpha``)."""
    out = compared.reset_index(drop=True).copy()
    primary = _is_primary(out, endpoint).to_numpy()
    out["role"] = np.where(primary, "primary", "secondary")
    out["p_holm"] = out["p_value"].astype(float)
    out.loc[~primary, "p_holm"] = stats.holm(out.loc[~primary, "p_value"].to_numpy(float))
    out["rejected"] = np.where(primary, out["significant"], out["p_holm"] < alpha)
    return out


def _direction(kind: str, row) -> int:
    """+1: the method is better than the reference, -1: worse, 0: not distinguishable (after ``rejected``)."""
    if not row.rejected:
        return 0
    up = row.estimate > 0
    return (1 if up else -1) if kind == "acc" else (-1 if up else 1)


def method_verdicts(adjusted: pd.DataFrame, ratio: float, *, references: Sequence[str] = ("random", "caep")
                    ) -> pd.DataFrame:
    """Per method at ``ratio``: on which measures it is better, worse, or not distinguishable from
    each reference after the correction (:func:`adjust`). One row per method, a column per reference."""
    rows = adjusted[np.isclose(adjusted["ratio"], ratio) & ~adjusted["method"].map(is_variant)]
    out = {}
    for method, part in rows.groupby("method", sort=False):
        verdict = {}
        for reference in references:
            ref_rows = part[part["reference"] == reference]
            if reference == "random":  # CAEP's matched reference replaces the uniform one where it exists
                matched = part[part["reference"] == MATCHED_REFERENCE]
                ref_rows = pd.concat([ref_rows[~ref_rows["measure"].isin(matched["measure"])], matched])
            if ref_rows.empty:
                continue
            groups = {1: [], -1: [], 0: []}
            for row in ref_rows.itertuples():
                kind, label = measure_spec(row.measure)[:2]
                groups[_direction(kind, row)].append(label)
            verdict[f"vs {reference}"] = "; ".join(
                f"{word} on {', '.join(groups[key])}" for key, word in ((1, "better"), (-1, "worse"),
                                                                        (0, "no difference")) if groups[key])
        out[method] = verdict
    return pd.DataFrame.from_dict(out, orient="index")


def primary_sentence(adjusted: pd.DataFrame, endpoint: Mapping[str, Any], model: str) -> str:
    """The primary endpoint's result in one sentence."""
    row = adjusted[adjusted["role"] == "primary"]
    if row.empty:
        return f"The primary endpoint ({describe_primary(endpoint)}) was not measured in this run."
    r = row.iloc[0]
    kind = measure_spec(r.measure)[0]
    word = {1: "better than", -1: "worse than", 0: "not distinguishable from"}[_direction(kind, r)]
    unit = {"acc": " points", "ppl": " (relative change)", "bpb": " bits per byte"}[kind]
    against = "random masks with its own per-layer allocation" if r.reference == MATCHED_REFERENCE else "random masks"
    return (f"Primary endpoint (named before the run; {model}): at {r.ratio:.0%} pruned, {endpoint['method']} is "
            f"{word} {against} on {measure_spec(r.measure)[1]}: {format_value(kind, r.estimate, True)}{unit}, 95% "
            f"interval [{format_value(kind, r.low, True)}, {format_value(kind, r.high, True)}], {int(r.n_docs)} "
            "documents.")


def findings(adjusted: pd.DataFrame, placed: pd.DataFrame, ranks: pd.Series, endpoint: Mapping[str, Any], *,
             model: str, ratio: float) -> dict[str, str]:
    """The verdicts as sentences glued under ``finding_pruning_*`` for the introduction: the primary
    endpoint, who ranks first and last at ``ratio``, which methods beat random masks and CAEP after
    Holm's correction (and which CAEP loses to), and CAEP's percentile among random masks."""
    out = {"finding_pruning_primary": primary_sentence(adjusted, endpoint, model)}
    n_secondary = int((adjusted["role"] == "secondary").sum())
    pct = f"{ratio:.0%}"
    ranks = ranks.sort_values(kind="stable")
    order = [m for m in ranks.index if not is_variant(m)]
    if order:
        caep_rank = f"; CAEP {ranks['caep']:.1f}" if "caep" in ranks.index and order[0] != "caep" else ""
        random_rank = f", random masks {ranks['random']:.1f}" if "random" in ranks.index else ""
        out["finding_pruning_winner"] = (
            f"At {pct} pruned, the best mean rank over the measures is {order[0]}'s ({ranks[order[0]]:.1f}; 1 = best "
            f"on every measure){caep_rank}{random_rank}; last: {order[-1]} ({ranks[order[-1]]:.1f}).")
    verdicts = method_verdicts(adjusted, ratio)
    beat_random = [m for m in verdicts.index if "better" in str(verdicts.get("vs random", {}).get(m, ""))]
    lose_random = [m for m in verdicts.index if "worse" in str(verdicts.get("vs random", {}).get(m, ""))]
    caep_losses = [m for m in verdicts.index if "better" in str(verdicts.get("vs caep", {}).get(m, ""))]
    caep_wins = [m for m in verdicts.index if "worse" in str(verdicts.get("vs caep", {}).get(m, ""))]

    def names(items):
        return ", ".join(items) if items else "none"

    out["finding_pruning_methods"] = (
        f"After Holm's correction over the page's {n_secondary} secondary comparisons, at {pct} pruned: better "
        f"than random masks on at least one measure: {names(beat_random)}; worse than random masks on at least "
        f"one: {names(lose_random)}; better than CAEP on at least one measure: {names(caep_losses)}; worse than "
        f"CAEP on at least one: {names(caep_wins)}.")
    caep_rows = placed[(placed["method"] == "caep") & np.isclose(placed["ratio"], ratio)] if len(placed) else placed
    if len(caep_rows):
        parts = []
        for r in caep_rows.itertuples():
            label = measure_spec(r.measure)[1]
            where = "uniform random masks" if r.distribution == "uniform" else "random masks of its own allocation"
            parts.append(f"{label}: better than {r.percentile * r.n_masks / 100:g} of {r.n_masks} {where}")
        out["finding_pruning_reference"] = f"CAEP at {pct} pruned, placed among random masks: " + "; ".join(parts) + "."
    else:
        out["finding_pruning_reference"] = "CAEP was not placed among random masks in this run."
    return out
