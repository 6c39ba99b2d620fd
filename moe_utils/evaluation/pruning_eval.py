"""Stage 4's evaluation kept per document, and the paper's Table 1 with paired intervals.

Every compressed model is evaluated through lm-evaluation-harness on the same documents, and every
document's result is kept, cached per (compressed model, run, settings, model, code), by
:func:`moe_utils.compression.evaluate.evaluate_compressions` (stage 5 uses the same evaluator).
From those, three *measures* of a model (the columns of the paper's Table 1, section 4, on tasks
the embedded model can do):

``blimp``     BLiMP accuracy, macro-averaged over its 67 paradigms (higher is better);
``wikitext``  WikiText-2 test word perplexity, pooled over the articles (lower is better);
``mmlu_pro``  bits per byte of MMLU-Pro question text, pooled over the categories: the text the
              stage-1 calibration set is made of, in the unit stage 5 reports it in (lower is better);
``mmlu_pro_mc``  MMLU-Pro multiple-choice accuracy, macro-averaged over categories (real models'
              profiles; the embedded model sits at chance on it).

:func:`model_scores` gives each model's measures with bootstrap intervals, :func:`comparisons`
every method's paired difference from the unpruned model and from random masks at the same ratio
(:func:`moe_utils.evaluation.paired.paired_difference`: same pairs and articles; random's seeds resampled
too) with the minimum detectable difference at these sample sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from moe_utils.evaluation import blimp
from moe_utils.evaluation import harness as evaluation
from moe_utils.evaluation import paired
from moe_utils.compression.ablation import is_variant

#: measure -> (statistic kind, label, which tasks' documents, count column for perplexities)
MEASURES = {
    "blimp": ("acc", "BLiMP accuracy", lambda task: blimp.paradigm_of(task) is not None, None),
    "wikitext": ("ppl", "WikiText-2 word perplexity", lambda task: task == evaluation.WIKITEXT_TASK, "n_words"),
    "mmlu_pro": ("bpb", "MMLU-Pro question bits per byte",
                 lambda task: task.startswith(evaluation.PPL_GROUP + "_"), "n_bytes"),
    "mmlu_pro_mc": ("acc", "MMLU-Pro accuracy", lambda task: task.startswith(evaluation.MC_GROUP + "_"), None),
}
MODEL_KEYS = ["method", "ratio", "seed"]
#: A measure named ``task:<name>``: the accuracy of one other multiple-choice task (a stock task of
#: a real model's profile, e.g. ``arc_challenge``), scored per question.
TASK_PREFIX = "task:"


def measure_spec(measure: str) -> tuple:
    """``(kind, label, selects, count column)`` of a measure of :data:`MEASURES` or ``task:<name>``."""
    if measure.startswith(TASK_PREFIX):
        name = measure[len(TASK_PREFIX):]
        return "acc", f"{name} accuracy", lambda task: task == name, None
    return MEASURES[measure]


# --------------------------------------------------------------------------------- measures
def measure_values(samples: pd.DataFrame, measure: str, blimp_dir=None) -> dict:
    """The documents of one measure, aligned over models: ``{"models": frame of method, ratio, seed,
    "values": (n_models, n_docs), "counts": (n_docs,) or None, "strata": (n_docs,) or None}``.
    Raises ValueError if the models were not evaluated on the same documents."""
    kind, label, selects, count = measure_spec(measure)
    rows = samples[samples["task"].map(selects)]
    if rows.empty:
        raise ValueError(f"no documents of {label} were evaluated")
    column = "correct" if kind == "acc" else "loglikelihood"
    keyed = rows.assign(seed=rows["seed"].astype("Int64").fillna(-1))  # -1: a deterministic method
    if keyed.duplicated(["task", "doc_id", *MODEL_KEYS]).any():
        raise ValueError(f"a model was evaluated twice on the same documents of {label}")
    table = keyed.set_index(["task", "doc_id", *MODEL_KEYS])[column].unstack(MODEL_KEYS)
    if table.isna().any().any():
        raise ValueError(f"the models were evaluated on different documents of {label}: use the same limits")
    docs = table.index.to_frame(index=False)
    out = {"models": table.columns.to_frame(index=False), "values": table.to_numpy().T, "counts": None, "strata": None}
    if kind == "acc":
        out["strata"] = docs["task"].to_numpy()
    else:
        first = rows.drop_duplicates(["task", "doc_id"]).set_index(["task", "doc_id"])[count]
        out["counts"] = first.reindex(table.index).to_numpy(float)
    return out


def _model_rows(data: dict, method: str, ratio: float) -> np.ndarray:
    models = data["models"]
    chosen = (models["method"] == method) & np.isclose(models["ratio"], ratio)
    if not chosen.any():
        raise ValueError(f"no model {method!r} at ratio {ratio} was evaluated")
    return data["values"][chosen.to_numpy()]


def model_scores(samples: pd.DataFrame, measures: Sequence[str], *, n_boot: int = 1000,
                 confidence: float = 0.95) -> pd.DataFrame:
    """Each model's measures (random: mean over seeds) with a bootstrap interval over documents
    (and seeds): one row per measure, method and ratio (``estimate, low, high, n_docs, n_seeds``)."""
    rows = []
    for measure in measures:
        kind = measure_spec(measure)[0]
        data = measure_values(samples, measure)
        for (method, ratio), _ in data["models"].groupby(["method", "ratio"], sort=False):
            values = _model_rows(data, method, ratio)
            # the score's interval is the paired interval against a constant reference
            zero = np.zeros(values.shape[1])
            diff = paired.paired_difference(kind, zero, values, strata=data["strata"], counts=data["counts"],
                                            n_boot=n_boot, confidence=confidence)
            shift = 1.0 if kind == "ppl" else 0.0  # perplexity: ppl / exp(0) - 1
            rows.append({"measure": measure, "method": method, "ratio": ratio, "estimate": diff.estimate + shift,
                         "low": diff.low + shift, "high": diff.high + shift, "n_docs": values.shape[1],
                         "n_seeds": values.shape[0]})
    return pd.DataFrame(rows)


def comparisons(samples: pd.DataFrame, measures: Sequence[str], *, references: Sequence[str] = ("unpruned", "random"),
                n_boot: int = 1000, confidence: float = 0.95, power: float = 0.8) -> pd.DataFrame:
    """Every pruned model's paired difference from each reference model at the same ratio
    (``unpruned``: at ratio 0), per measure: accuracy B - A, perplexity B / A - 1, with interval,
    standard error, minimum detectable difference and whether the interval excludes 0."""
    rows = []
    for measure in measures:
        kind = measure_spec(measure)[0]
        data = measure_values(samples, measure)
        pruned = data["models"][data["models"]["method"] != "unpruned"].drop_duplicates(["method", "ratio"])
        for method, ratio in pruned[["method", "ratio"]].itertuples(index=False):
            for reference in references:
                if reference == method:
                    continue
                ref_ratio = 0.0 if reference == "unpruned" else ratio
                diff = paired.paired_difference(kind, _model_rows(data, reference, ref_ratio),
                                                _model_rows(data, method, ratio), strata=data["strata"],
                                                counts=data["counts"], n_boot=n_boot, confidence=confidence,
                                                power=power)
                rows.append(difference_row(diff, measure=measure, method=method, ratio=ratio, reference=reference))
    return pd.DataFrame(rows)


def difference_row(diff: paired.PairedDifference, **ident: Any) -> dict:
    """One row of :func:`comparisons`: ``ident`` (measure, method, ratio, reference), then the
    difference's estimate, interval, standard error, MDE, p-value and whether the interval excludes 0."""
    return ident | {"estimate": diff.estimate, "low": diff.low, "high": diff.high, "se": diff.se, "mde": diff.mde,
                    "p_value": diff.p_value, "significant": diff.significant, "n_docs": diff.n_docs}


def model_values(data: dict, kind: str) -> np.ndarray:
    """Each model's score of one measure (:func:`measure_values`): macro accuracy over the strata,
    pooled perplexity, or pooled bits per byte; one value per row of ``data["models"]``."""
    if kind == "acc":
        strata = pd.factorize(data["strata"])[0]
        return np.stack([data["values"][:, strata == g].mean(axis=1) for g in range(strata.max() + 1)]).mean(0)
    nats = -data["values"].sum(axis=1) / data["counts"].sum()
    return np.exp(nats) if kind == "ppl" else nats / np.log(2)


# ----------------------------------------------------------------------------------- tables
def format_value(kind: str, value: float, relative: bool = False) -> str:
    if kind == "bpb":
        return f"{value:+.3f}" if relative else f"{value:.3f}"
    if relative:
        return f"{value * 100:+.1f}" if kind == "acc" else f"{value:+.0%}"
    return f"{value * 100:.1f}" if kind == "acc" else f"{value:.4g}"


def star(row) -> str:
    """``*`` where a comparison counts as a difference: the primary endpoint where its interval
    excludes 0, a secondary comparison where its Holm-adjusted p-value is below 0.05
    (:func:`moe_utils.compression.verdicts.adjust`); before adjustment, where the interval excludes 0."""
    if "rejected" in row and not pd.isna(row["rejected"]):
        return "*" if row["rejected"] else ""
    return "*" if row["low"] > 0 or row["high"] < 0 else ""


def table1(scores: pd.DataFrame, compared: pd.DataFrame, ratio: float, *, shares: Mapping[str, float] | None = None,
           measures: Sequence[str] | None = None) -> pd.DataFrame:
    """The paper's Table 1 at one ratio with intervals: the unpruned row first, then each method;
    per measure its value [95% interval], and its paired difference from each reference of
    ``compared`` (the unpruned model, random masks, random masks with the method's own allocation)
    [interval] (accuracy: points; perplexity: relative change; bits per byte: difference); ``*``:
    :func:`star`. ``shares``: the share of experts each method actually pruned. The ablation's
    variants (:func:`moe_utils.compression.ablation.is_variant`) are left out."""
    measures = list(dict.fromkeys(scores["measure"])) if measures is None else list(measures)
    chosen = scores[(np.isclose(scores["ratio"], ratio) | (scores["method"] == "unpruned"))
                    & ~scores["method"].map(is_variant)]
    order = list(dict.fromkeys(["unpruned", *chosen["method"]]))
    table = pd.DataFrame(index=order)
    if shares is not None:
        table["pruned"] = [f"{shares.get(m, 0.0):.0%}" for m in order]
    for measure in measures:
        kind, label = measure_spec(measure)[:2]
        unit = " (%)" if kind == "acc" else ""
        part = chosen[chosen["measure"] == measure].set_index("method")
        table[label + unit] = [f"{format_value(kind, r.estimate)} [{format_value(kind, r.low)}, {format_value(kind, r.high)}]"
                               for r in part.reindex(order).itertuples()]
        for reference in dict.fromkeys(compared["reference"]):
            diffs = compared[(compared["measure"] == measure) & np.isclose(compared["ratio"], ratio)
                             & (compared["reference"] == reference)].set_index("method")
            if diffs.empty:
                continue
            table[f"{label}: vs {reference}"] = [
                "" if m not in diffs.index else
                f"{format_value(kind, diffs.at[m, 'estimate'], True)} [{format_value(kind, diffs.at[m, 'low'], True)}, "
                f"{format_value(kind, diffs.at[m, 'high'], True)}]{star(diffs.loc[m])}"
                for m in order]
    table.index.name = None
    return table


#: The differences the default samples should detect: 1 BLiMP point, 10% of a perplexity, and in
#: bits per byte the same 10% of the byte perplexity (log2 1.1).
MDE_TARGETS = {"acc": 0.01, "ppl": 0.10, "bpb": float(np.log2(1.1))}


def detectable(compared: pd.DataFrame, targets: Mapping[str, float] = MDE_TARGETS) -> pd.DataFrame:
    """The minimum detectable differences (80% power, 5% two-sided) of the page's comparisons, per
    measure and reference: median and range over the methods and ratios, the documents used, and
    how many documents the median would need to reach ``targets`` (the MDE falls as 1/sqrt(n))."""
    rows = []
    compared = compared[~compared["method"].map(is_variant)]
    for (measure, reference), part in compared.groupby(["measure", "reference"], sort=False):
        kind, label = measure_spec(measure)[:2]
        unit, scale = {"acc": (" points", 100), "ppl": ("%", 100), "bpb": (" bits per byte", 1)}[kind]
        n, median = int(part["n_docs"].iloc[0]), float(part["mde"].median())
        rows.append({"measure": label, "against": reference, "documents": n,
                     "MDE (median)": f"{median * scale:.2g}{unit}",
                     "MDE (range)": f"{part['mde'].min() * scale:.2g} to {part['mde'].max() * scale:.2g}{unit}",
                     "target MDE": f"{targets[kind] * scale:.2g}{unit}",
                     "documents for the target": int(np.ceil(n * (median / targets[kind]) ** 2))})
    return pd.DataFrame(rows)


def curve_summary(samples: pd.DataFrame, measures: Sequence[str],
                  shares: Mapping[tuple, float] | None = None) -> pd.DataFrame:
    """The measures as one row per method, ratio and measure (task = the measure's label, metric,
    mean and standard deviation over seeds, n_seeds), for the Fig 8 curves and ranks;
    without the ablation's variants."""
    samples = samples[~samples["method"].map(is_variant)]
    rows = []
    for measure in measures:
        kind, label = measure_spec(measure)[:2]
        data = measure_values(samples, measure)
        frame = data["models"].assign(value=model_values(data, kind))
        metric = {"acc": "acc", "ppl": "word_perplexity", "bpb": "bits_per_byte"}[kind]
        for (method, ratio), part in frame.groupby(["method", "ratio"], sort=False):
            rows.append({"method": method, "ratio": ratio, "task": label, "metric": metric, "mean": part["value"].mean(),
                         "std": part["value"].std(ddof=1) if len(part) > 1 else 0.0, "n_seeds": len(part),
                         "pruned_share": (shares or {}).get((method, ratio), ratio)})
    return pd.DataFrame(rows)


def available_measures(samples: pd.DataFrame) -> list[str]:
    """The measures of :data:`MEASURES` whose documents were evaluated, in that order, then one
    ``task:<name>`` accuracy per other task scored by correctness (a real model's stock tasks)."""
    tasks = samples["task"].unique()
    known = [m for m, (_, _, selects, _) in MEASURES.items() if any(selects(t) for t in tasks)]
    covered = {t for t in tasks if any(MEASURES[m][2](t) for m in MEASURES)}
    scored = samples.dropna(subset=["correct"])["task"].unique()
    return known + [TASK_PREFIX + t for t in tasks if t not in covered and t in set(scored)]


def sample_sizes(samples: pd.DataFrame, measures: Sequence[str]) -> pd.DataFrame:
    """Per measure: the tasks and documents every model was scored on."""
    first = samples.drop_duplicates(["task", "doc_id"])
    rows = []
    for measure in measures:
        label, selects = measure_spec(measure)[1], measure_spec(measure)[2]
        part = first[first["task"].map(selects)]
        rows.append({"measure": label, "tasks": part["task"].nunique(), "documents": len(part)})
    return pd.DataFrame(rows).set_index("measure")
