"""Stage 5 assembled: the paper's Fig 9 experiment from stored artifacts to findings and an artifact.

The pieces of the experiment live in :mod:`moe_utils.compression.domains` (domain masks, per-question
evaluation, relative changes, the diagonal test); this module puts them together the way stage 5
runs them, so that the page only narrates:

1. :func:`domain_metric` picks what the heatmaps measure (accuracy, as the paper does, or the
   bits per byte of the question text for the small models, whose accuracy sits at chance: the
   MMLU-Pro measure stage 4 reports too);
2. :func:`fit_masks` (calibrated on :func:`calibration_texts`) chooses the baseline, checks that
   the stage-1 store holds this profile's questions, fits every domain's masks (cached under a key of everything they depend on,
   including the code) and CAEP fitted on all domains (Tang et al. 2025, section 5, Fig 9);
3. :func:`evaluate_grid` evaluates the unpruned model and every mask on every domain's questions,
   leaving out the questions the pruning was fitted on (:func:`calibration_questions`);
4. :func:`diagonal_results`, :func:`cells_table`, :func:`accuracy_summary` and
   :func:`stage4_breakdown` give the figures' numbers (:func:`heatmap_figure` draws Fig 9); :func:`findings` and
   :func:`paper_comparison` the headline values and the comparison with the paper;
5. :func:`save_results` / :func:`load_results` write and read the stage's checksummed artifact.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from moe_utils.compression import caep, domains, pruning
from moe_utils.common import plotting, stats
from moe_utils.common.artifacts import ArtifactMissing, read_artifact, write_artifact
from moe_utils.evaluation.data import load_prompts
from moe_utils.evaluation.harness import MC_GROUP, PPL_GROUP, category_slug
from moe_utils.evaluation.metrics import lower_is_better
from moe_utils.common.markup import code_span
from moe_utils.compression.pruning import PruningMask
from moe_utils.capture.routing import model_identity
from moe_utils.capture.store import RoutingStore
from moe_utils.models.loading import is_small_model, load_model, moe_layers
from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.patterns.hsdl import HSDL
from moe_utils.compression.evaluate import evaluate_compressions

FORMAT = "moe-domain-results/1"
METRIC_LABELS = {"byte_perplexity": "byte perplexity", "word_perplexity": "word perplexity",
                 "bits_per_byte": "bits per byte", "acc": "accuracy"}
#: The artifact's files: the keep-masks (one column per mask), the heatmap cells and the
#: domain-versus-general comparison.
RESULT_FILES = ("masks.csv", "cells.csv", "versus_general.csv")
SMALL_MODEL_CAVEAT = (
    "It cannot answer MMLU-Pro questions (its multiple-choice accuracy sits near chance, section 4), so the "
    "heatmaps use the **bits per byte of each category's question text** (per byte, so that tokenisation does not "
    "matter; the MMLU-Pro measure of stage 4 too), which moves measurably when experts are pruned. A real model's profile uses accuracy, as the "
    "paper does.")


def domain_metric(model: str, metric: str | None = None) -> tuple[str, str]:
    """``(metric, label)`` of the heatmaps: ``metric`` when set, else bits per byte for the
    embedded and random models and accuracy (the paper's) for real checkpoints."""
    metric = metric or ("bits_per_byte" if is_small_model(model) else "acc")
    if metric not in METRIC_LABELS:
        raise ValueError(f"domain_metric must be one of {sorted(METRIC_LABELS)}, got {metric!r}")
    return metric, METRIC_LABELS[metric]


@dataclass
class Inputs:
    """What stage 5 reads: stage 1's store, stage 2's HSDL, the model with its MoE layers, identity
    and pruning budget, and stage 4's results (None where stage 4 has not run)."""

    store: Any
    hsdl: Any
    lm: Any
    tokenizer: Any
    budget: caep.PruningBudget
    model_id: dict
    stage4: pd.DataFrame | None


def open_inputs(paths, model: str, domain_names: Sequence[str], *, min_per_layer: int | None = None,
                **load_kwargs) -> Inputs:
    """Open and check the earlier stages' artifacts (``paths``: :class:`moe_utils.stages.StagePaths`)
    and load ``model`` (``load_kwargs``: device, dtype, trust_remote_code); the budget is stage 4's
    (guard: top-k unless ``min_per_layer``)."""
    store, hsdl = RoutingStore.open(paths.store), HSDL.load(paths.hsdl)
    check_inputs(store, domain_names, model)
    lm, tokenizer = load_model(model, **load_kwargs)
    layers = moe_layers(lm)
    return Inputs(store, hsdl, lm, tokenizer, caep.PruningBudget.for_model(lm, layers, min_per_layer=min_per_layer),
                  model_identity(lm, layers), load_stage4(paths.pruning))


def describe_inputs(inputs: Inputs, model: str, domain_names: Sequence[str], *, n_per_category: int,
                    ratio: float) -> str:
    """The page's one-paragraph account (Markdown) of the model, the data the pruning is fitted on,
    the share pruned and whether stage 4's results were found."""
    store = inputs.store
    tokens = store.tokens["label"].value_counts().reindex(list(domain_names))
    return (f"**Model:** {code_span(model)} ({store.n_layers} MoE layers x {store.n_experts} experts, top-{store.top_k}). "
            f"**Pruning fitted on:** the {n_per_category} MMLU-Pro test questions per domain captured in stage 1 "
            f"({', '.join(f'{d}: {n} tokens' for d, n in tokens.items())}). "
            f"**Pruned:** {ratio:.0%} of the {store.n_layers * store.n_experts} routed experts. **Stage 4 results:** "
            f"{'found' if inputs.stage4 is not None else 'missing (run 04_pruning): its sections are skipped'}.")


def load_stage4(path: str | os.PathLike) -> pd.DataFrame | None:
    """Stage 4's verified results table, or None where stage 4 has not run."""
    try:
        return pruning.load_pruning(path)[1]
    except ArtifactMissing:
        return None


def check_inputs(store, domain_names: Sequence[str], model: str) -> None:
    """The stage-1 store must hold tokens of every domain and come from ``model``: ValueError saying
    to re-run stage 1 otherwise."""
    missing = sorted(set(domain_names) - set(store.tokens["label"]))
    if missing:
        raise ValueError(f"stage 1 captured no tokens of {missing}: capture the same categories (re-run 01_capture)")
    if store.manifest["model"]["name"] != model:
        raise ValueError(f"stage 1 captured {store.manifest['model']['name']!r}, not {model!r}: re-run 01_capture")


# --------------------------------------------------------------------------------- masks
@dataclass
class DomainMasks:
    """Every mask of the experiment and what the page says about them.

    Attributes:
        masks: ``{(method, fitted on): PruningMask}``: CAEP and ``baseline`` per domain, and
            ``("caep", "all domains")``.
        baseline, baseline_reason: the calibration baseline and why it was chosen.
        overview: one row per mask (method, fitted on, experts kept, note).
        jaccard: overlap of the experts pruned by the domains' CAEP masks.
        kept: experts each layer keeps under each domain's CAEP mask.
        values: the numbers the page glues.
        from_cache: whether the domain masks were read from the cache.
        settings: what they were fitted with, as the stage's artifact records it.
    """

    masks: dict[tuple[str, str], PruningMask]
    baseline: str
    baseline_reason: str
    overview: pd.DataFrame
    jaccard: pd.DataFrame
    kept: pd.DataFrame
    values: dict = field(default_factory=dict)
    from_cache: bool = False
    settings: dict = field(default_factory=dict)


def calibration_texts(store, domain_names: Sequence[str], *, n_per_category: int, seed: int,
                      data_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Each domain's calibration prompts: this profile's MMLU-Pro sample (the questions of stage 1's
    store, checked by :func:`domain_calibration`)."""
    texts, labels, _ = load_prompts(domain_names, n_per_category=n_per_category, seed=seed, data_dir=data_dir)
    return domain_calibration(store, texts, labels, domain_names)


def calibration_questions(store, data_dir: str | os.PathLike | None = None) -> set[int]:
    """The ``question_id`` of every question of stage 1's store, which the evaluation leaves out
    (:func:`moe_utils.compression.domains.captured_questions`)."""
    return {int(i) for i in domains.captured_questions(store, data_dir)["question_id"]}


def domain_calibration(store, texts: Sequence[str], labels: Sequence[str],
                       domain_names: Sequence[str]) -> dict[str, list[str]]:
    """Each domain's prompts, after checking that they are the store's samples in order."""
    per_sample = store.tokens.groupby("sample_id")["label"].first().tolist()
    if per_sample != list(labels):
        raise ValueError("the stage-1 store holds other questions than this profile's: re-run stage 1")
    return {d: [t for t, label in zip(texts, labels) if label == d] for d in domain_names}


def fit_masks(inputs: Inputs, domain_names: Sequence[str], *, calibration_texts: Mapping[str, Sequence[str]],
              ratio: float, threshold_ratio: float, level: int, metric: str, baseline: str | None = None,
              refit: bool = False, calibrate_kwargs: Mapping[str, Any], cache_dir: str | os.PathLike) -> DomainMasks:
    """CAEP and the strongest calibration baseline of stage 4 (or ``baseline``), each fitted on
    every domain alone (:func:`moe_utils.compression.domains.domain_masks`, cached under everything they depend
    on, the code included), and CAEP fitted on all domains; every mask keeps at least the budget's
    minimum per layer."""
    hsdl, store, budget, stage4 = inputs.hsdl, inputs.store, inputs.budget, inputs.stage4

    if baseline is not None:
        reason = "set by the profile"
    else:
        baseline, reason = domains.strongest_baseline(stage4, ratio, task_prefix=PPL_GROUP if metric != "acc" else MC_GROUP)
    methods = ["caep", baseline]
    granularity = domains.check_alignment(hsdl, store)
    X = expert_matrix(store, granularity, hsdl.manifest_["x_spec"]["value"]) if refit else None
    key = {"store": store.manifest["fingerprint"], "hsdl": hsdl.manifest_["files"], "model": inputs.model_id,
           "domains": list(domain_names), "ratio": ratio, "threshold": threshold_ratio, "level": level,
           "methods": methods, "min_per_layer": budget.min_per_layer, "refit": refit,
           "calibration": dict(calibration_texts), "calibrate": dict(calibrate_kwargs)}
    masks, cached = domains.cached_masks(cache_dir, key, lambda: domains.domain_masks(
        hsdl, store, domain_names, ratio=ratio, methods=methods, budget=budget, threshold_ratio=threshold_ratio,
        calibration=calibration_texts, model=inputs.lm, tokenizer=inputs.tokenizer, level=level, refit=refit, X=X,
        calibrate_kwargs=calibrate_kwargs))
    general = caep.caep(*pruning.hsdl_factors(hsdl, level=level), threshold_ratio, ratio, budget=budget)
    masks[("caep", "all domains")] = PruningMask("caep", ratio, general.keep, note=general.note)
    for (method, fitted_on), mask in masks.items():
        if budget.kept_per_layer(mask.keep).min() < budget.min_per_layer:
            raise RuntimeError(f"{method} fitted on {fitted_on} keeps fewer than {budget.min_per_layer} experts in a layer")
    overview = pd.DataFrame([{"method": m, "fitted on": d, "experts kept": int(k.keep.sum()), "note": k.note}
                             for (m, d), k in masks.items()])
    caep_masks = [PruningMask(d, ratio, masks[("caep", d)].keep) for d in domain_names]
    jaccard = pruning.mask_overlap(caep_masks)
    kept = pd.DataFrame([budget.kept_per_layer(m.keep) for m in caep_masks], index=list(domain_names))
    baseline_jaccard = pruning.mask_overlap([PruningMask(d, ratio, masks[(baseline, d)].keep) for d in domain_names])
    caep_kept = overview.loc[(overview["method"] == "caep") & (overview["fitted on"] != "all domains"), "experts kept"]
    values = {"baseline": baseline, "baseline_reason": reason, "caep_kept_min": int(caep_kept.min()),
              "caep_kept_max": int(caep_kept.max()), "target_kept": int(np.floor((1 - ratio) * budget.n_experts)),
              "jaccard_mean": _off_diagonal_mean(jaccard), "baseline_jaccard_mean": _off_diagonal_mean(baseline_jaccard)}
    settings = {"categories": list(domain_names), "ratio": ratio, "threshold_ratio": threshold_ratio,
                "caep_level": level, "min_per_layer": budget.min_per_layer, "baseline": baseline,
                "refit_hsdl": refit, "metric": metric}
    return DomainMasks(masks, baseline, reason, overview, jaccard, kept, values, cached, settings)


def _off_diagonal_mean(matrix: pd.DataFrame) -> float:
    values = matrix.to_numpy()[~np.eye(len(matrix), dtype=bool)]
    return float(values.mean()) if values.size else float("nan")


# ---------------------------------------------------------------------------- evaluation
@dataclass
class EvaluationGrid:
    """Every evaluation of the experiment: ``docs[(method, fitted on, family)]`` holds the
    per-question scores (calibration questions left out) of the perplexity (``"ppl"``) or
    multiple-choice (``"mc"``) family; ``log`` one row per evaluation; ``primary`` the family of
    the heatmaps; ``values`` the numbers the page glues; ``settings`` the question limits and shots,
    as the stage's artifact records them."""

    docs: dict[tuple[str, str, str], pd.DataFrame]
    log: pd.DataFrame
    primary: str
    values: dict
    settings: dict = field(default_factory=dict)


def evaluate_grid(inputs: Inputs, masks: Mapping[tuple[str, str], PruningMask], domain_names: Sequence[str], *,
                  metric: str, held_out: set, ppl_limit: int, mc_limit: int, mc_fewshot: int | None,
                  settings: Mapping[str, Any], cache_dir: str | os.PathLike, threads: int | None = None) -> EvaluationGrid:
    """Evaluate the unpruned model on both families, every mask on the heatmaps' family and the
    domains' CAEP masks on the other (stage 4's evaluator,
    :func:`moe_utils.compression.evaluate.evaluate_compressions`: cached per compressed model, the
    masks of one family scored together), each on every domain's questions, leaving out the
    ``held_out`` question ids (those the pruning was fitted on). ValueError when a domain has no
    question left."""
    families = {"ppl": ([f"{PPL_GROUP}_{category_slug(d)}" for d in domain_names], ppl_limit, None),
                "mc": ([f"{MC_GROUP}_{category_slug(d)}" for d in domain_names], mc_limit, mc_fewshot)}
    primary = "mc" if metric == "acc" else "ppl"
    secondary = "ppl" if primary == "mc" else "mc"
    n_e = len(next(iter(masks.values())).keep)
    unpruned = pruning.unpruned_mask(n_e)
    jobs = {primary: [("unpruned", "-", unpruned), *((m, d, mask) for (m, d), mask in masks.items())],
            secondary: [("unpruned", "-", unpruned), *(("caep", d, masks[("caep", d)]) for d in domain_names)]}
    docs, log = {}, []
    for family in (primary, secondary):  # the second metric: CAEP only
        tasks, limit, fewshot = families[family]
        tick = time.perf_counter()
        results, documents = evaluate_compressions(
            inputs.lm, inputs.tokenizer, [c for *_, c in jobs[family]], [{"tasks": tasks, "limit": limit}],
            cache_dir=cache_dir, model_id=inputs.model_id, threads=threads, progress=False, num_fewshot=fewshot,
            **settings)
        seconds = time.perf_counter() - tick
        for position, (method, fitted_on, compression) in enumerate(jobs[family]):
            frame = documents[documents["digest"] == compression.digest].drop_duplicates(["task", "doc_id"])
            own = results[results["digest"] == compression.digest]
            docs[(method, fitted_on, family)] = frame[~frame["question_id"].isin(held_out)]
            log.append({"method": method, "fitted on": fitted_on, "tasks": family, "questions per domain": limit,
                        "questions left out": len(frame) - len(docs[(method, fitted_on, family)]),
                        "seconds": float(own["seconds"].iloc[0]) if not own["cached"].all() else 0.0,
                        "cached": bool(own["cached"].all())})
        log[-1]["family seconds"] = seconds
    log = pd.DataFrame(log)
    first = docs[("unpruned", "-", primary)]
    n_primary = first.groupby("task").size().reindex(families[primary][0], fill_value=0)
    if not n_primary.min() > 0:
        raise ValueError("every evaluated question of some domain was a calibration question: raise the limit")
    values = {"n_left_out": int(log.loc[0, "questions left out"]), "n_eval_models": int((log["tasks"] == primary).sum()),
              "n_questions_min": int(n_primary.min()), "n_questions_max": int(n_primary.max()),
              "eval_seconds": float(log["family seconds"].sum()), "n_cached": int(log["cached"].sum())}
    return EvaluationGrid(docs, log.drop(columns="family seconds"), primary, values,
                          {"ppl_limit": ppl_limit, "mc_limit": mc_limit, "mc_fewshot": mc_fewshot})


# ------------------------------------------------------------------------------ analysis
def diagonal_results(grid: EvaluationGrid, methods: Sequence[str], domain_names: Sequence[str], *, metric: str,
                     confidence: float, n_boot: int, seed: int) -> tuple[dict, dict]:
    """Per method, ``(table, test, advantage)``: the Fig 9 cells with paired intervals, the
    permutation test of the diagonal and its advantage's interval (:mod:`moe_utils.compression.domains`); and
    the values the page glues, suffixed ``_caep`` and ``_baseline`` (the second method)."""
    original = grid.docs[("unpruned", "-", grid.primary)]
    results, values = {}, {}
    for method, name in zip(methods, ("caep", "baseline")):
        pruned = {d: grid.docs[(method, d, grid.primary)] for d in domain_names}
        table = domains.relative_change_table(original, pruned, metric, domain_names, confidence=confidence,
                                              n_boot=n_boot, random_state=seed)
        test, advantage = domains.diagonal_summary(original, pruned, metric, domain_names, confidence=confidence,
                                                   n_boot=n_boot, random_state=seed)
        if not (np.isclose(np.diag(domains.change_matrix(table, domain_names)).mean(), test.diagonal_mean)
                and np.isclose(advantage.estimate, test.advantage) and test.exact == (len(domain_names) <= 8)
                and (test.p_value >= 1 / math.factorial(len(domain_names)) - 1e-12 or not test.exact)):
            raise RuntimeError(f"the diagonal test of {method} disagrees with its own table")
        results[method] = (table, test, advantage)
        values |= {f"p_{name}": test.p_value, f"n_perm_{name}": test.n_permutations,
                   f"best_cols_{name}": test.n_best_columns, f"adv_{name}": advantage.estimate * 100,
                   f"adv_low_{name}": advantage.low * 100, f"adv_high_{name}": advantage.high * 100,
                   f"diag_{name}": test.diagonal_mean * 100,
                   f"offdiag_{name}": float(table.loc[table["target"] != table["evaluated"], "change"].mean() * 100)
                   if len(domain_names) > 1 else float("nan")}
    return results, values


def heatmaps(results: Mapping[str, tuple], domain_names: Sequence[str]) -> tuple[dict, dict]:
    """``(matrices, subtitles)`` for :func:`moe_utils.common.plotting.domain_change_heatmaps`: each method's
    target x evaluated matrix and its diagonal test in words."""
    def title(method: str) -> str:
        return "CAEP" if method == "caep" else method

    matrices = {title(m): domains.change_matrix(table, domain_names) for m, (table, _, _) in results.items()}
    subtitles = {title(m): f"diagonal p = {test.p_value:.3f}, best in {test.n_best_columns}/{len(domain_names)} columns"
                 for m, (_, test, _) in results.items()}
    return matrices, subtitles


def heatmap_figure(results: Mapping[str, tuple], domain_names: Sequence[str], *, metric: str, metric_label: str,
                   ratio: float, model: str):
    """The paper's Fig 9 on this run (:func:`moe_utils.common.plotting.domain_change_heatmaps` of
    :func:`heatmaps`), red where the metric got worse."""
    matrices, subtitles = heatmaps(results, domain_names)
    return plotting.domain_change_heatmaps(
        matrices, label=metric_label, lower_is_better=lower_is_better(metric), subtitles=subtitles,
        title=f"Pruned {ratio:.0%} for one domain, evaluated on every domain ({model})")


def versus_general(grid: EvaluationGrid, domain_names: Sequence[str], *, metric: str, confidence: float, n_boot: int,
                   seed: int) -> tuple[pd.DataFrame, dict]:
    """:func:`moe_utils.compression.domains.versus_general` of the grid's CAEP masks (each domain's against the
    one fitted on all domains), with the mean gain (points) and the domains whose interval lies above 0."""
    docs = grid.docs
    table = domains.versus_general(
        docs[("unpruned", "-", grid.primary)], {d: docs[("caep", d, grid.primary)] for d in domain_names},
        docs[("caep", "all domains", grid.primary)], metric, domain_names, confidence=confidence, n_boot=n_boot,
        random_state=seed)
    return table, {"gain_mean": float(table["gain"].mean() * 100), "gain_positive": int((table["low"] > 0).sum())}


def cells_table(results: Mapping[str, tuple], domain_names: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every heatmap cell of every method (long) and as ``change [low, high]`` in % (method x target
    rows, evaluated domains as columns)."""
    cells = pd.concat([table.assign(method="CAEP" if method == "caep" else method)
                       for method, (table, _, _) in results.items()], ignore_index=True)
    cells["change (%)"] = [f"{c * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"
                           for c, lo, hi in zip(cells["change"], cells["low"], cells["high"])]
    return cells, cells.pivot(index=["method", "target"], columns="evaluated", values="change (%)")[list(domain_names)]


def accuracy_summary(grid: EvaluationGrid, domain_names: Sequence[str], *, confidence: float,
                     data_dir: str | os.PathLike | None) -> tuple[pd.DataFrame, float, dict]:
    """Multiple-choice accuracy per domain with Wilson intervals, for the unpruned model and CAEP
    fitted on each domain; uniform guessing's accuracy; the unpruned model's pooled accuracy (%)."""
    models = {"unpruned": grid.docs[("unpruned", "-", "mc")]}
    models.update({f"CAEP for {d}": grid.docs[("caep", d, "mc")] for d in domain_names})
    accuracies = pd.concat([domains.category_scores(frame, "acc", domain_names, confidence=confidence).assign(model=name)
                            for name, frame in models.items()], ignore_index=True)
    chance = domains.chance_accuracy(models["unpruned"]["question_id"].unique(), data_dir)
    pooled = models["unpruned"]["correct"]
    low, high = (float(v) for v in stats.wilson_interval(pooled.sum(), len(pooled), confidence))
    values = {"acc_unpruned": float(pooled.mean() * 100), "acc_unpruned_low": low * 100,
              "acc_unpruned_high": high * 100, "acc_n": int(len(pooled)), "acc_chance": chance * 100}
    return accuracies, chance, values


#: What the page shows in place of :func:`stage4_breakdown`'s cells when stage 4 has not run.
STAGE4_MISSING = "**Stage 4's results are missing: run `04_pruning` first.**"
BREAKDOWN_COLUMNS = ["method", "ratio", "category", "change", "change_min", "change_max", "n_seeds"]


def stage4_breakdown(stage4: pd.DataFrame | None, domain_names: Sequence[str], *,
                     metric: str) -> tuple[pd.DataFrame, pd.DataFrame | None, str, dict]:
    """Stage 4's general pruning per MMLU-Pro category (:func:`moe_utils.compression.domains.category_breakdown`):
    ``(breakdown, cells, label, values)`` with the cells as ``change (min..max over seeds)`` per
    method and ratio, the metric's label, and which category breaks first and last at the lowest
    ratio. Without stage 4: an empty breakdown, no cells and "n/a" values."""
    if stage4 is None:
        values = dict.fromkeys(("first_to_break", "stage4_metric", "last_to_break"), "n/a (stage 4 missing)")
        return pd.DataFrame(columns=BREAKDOWN_COLUMNS), None, "-", values | {"first_ratio_pct": float("nan")}
    breakdown = domains.category_breakdown(stage4, task_prefix=MC_GROUP if metric == "acc" else PPL_GROUP)
    label = breakdown["metric"].iloc[0].replace("_", " ")
    order = domains.breaking_order(breakdown)
    first_ratio = order.index[0]
    values = {"first_to_break": order.loc[first_ratio].idxmax(), "first_ratio_pct": float(first_ratio * 100),
              "stage4_metric": label, "last_to_break": order.loc[first_ratio].idxmin()}
    breakdown["cell"] = [f"{c:+.1%}" + (f" ({lo:+.1%}..{hi:+.1%})" if n > 1 else "") for c, lo, hi, n in zip(
        breakdown["change"], breakdown["change_min"], breakdown["change_max"], breakdown["n_seeds"])]
    cells = breakdown.pivot(index=["method", "ratio"], columns="category", values="cell")[
        [c for c in domain_names if c in set(breakdown["category"])]]
    return breakdown, cells, label, values


def diagonal_power(results: Mapping[str, tuple], domain_names: Sequence[str], confidence: float,
                   metric: str, seed: int, *, n_sizes: int = 21) -> tuple[pd.DataFrame, float]:
    """Power of CAEP's diagonal test at this run's sample sizes (:func:`moe_utils.common.stats.diagonal_power`):
    advantages from 0 to four times the largest cell's standard error planted into CAEP's matrix, with
    each cell's noise read off its bootstrap interval (:func:`moe_utils.compression.domains.cell_errors`),
    the better direction that of ``metric``. Returns the power curve and the smallest advantage detected
    with 80% power (relative change)."""
    table = results["caep"][0]
    cell_se = domains.cell_errors(table, domain_names, confidence)
    power = stats.diagonal_power(domains.change_matrix(table, domain_names), cell_se,
                                 np.linspace(0, 4 * float(cell_se.to_numpy().max()), n_sizes),
                                 lower_is_better=lower_is_better(metric), random_state=seed)
    return power, float(stats.detectable_advantage(power))


def versus_general_style(versus: pd.DataFrame):
    """:func:`versus_general`'s table as the page shows it: relative changes in percent, escaped."""
    return versus.style.format({c: "{:+.1%}" for c in ("specific", "general", "gain", "low", "high")},
                               escape="html").hide(axis="index")


# ------------------------------------------------------------------------------ findings
def findings(model: str, domain_names: Sequence[str], *, n_per_category: int, ratio: float, metric_label: str,
             grid: EvaluationGrid, masks: DomainMasks, results: Mapping[str, tuple], versus: pd.DataFrame,
             accuracy: Mapping[str, float], first_to_break: str | None, confidence: float,
             detectable: float) -> dict:
    """The headline numbers of the run under stable names (``finding_*``), each saying which model
    and data produced it, for the book's introduction; ``detectable``: the smallest diagonal
    advantage the test detects with 80% power (:func:`diagonal_power`)."""
    _, caep_test, caep_adv = results["caep"]
    _, base_test, base_adv = results[masks.baseline]
    n = grid.values
    data_text = (f"MMLU-Pro test, {len(domain_names)} domains ({', '.join(domain_names)}); pruning fitted on "
                 f"{n_per_category} questions per domain, scores on {n['n_questions_min']}-{n['n_questions_max']} "
                 f"other questions per domain")
    better = caep_test.p_value < 0.05 and caep_adv.low > 0
    return {
        "finding_model": model,
        "finding_data": data_text,
        "finding_metric": metric_label,
        "finding_ratio_pct": float(ratio * 100),
        "finding_diagonal_p_caep": float(caep_test.p_value),
        "finding_diagonal_best_columns_caep": int(caep_test.n_best_columns),
        "finding_diagonal_advantage_caep": float(caep_adv.estimate * 100),
        "finding_diagonal_advantage_low_caep": float(caep_adv.low * 100),
        "finding_diagonal_advantage_high_caep": float(caep_adv.high * 100),
        "finding_baseline": masks.baseline,
        "finding_diagonal_p_baseline": float(base_test.p_value),
        "finding_diagonal_advantage_baseline": float(base_adv.estimate * 100),
        "finding_domain_vs_general_gain": float(versus["gain"].mean() * 100),
        "finding_domain_vs_general": versus_general_sentence(versus, model, metric_label),
        "finding_mask_jaccard": masks.values["jaccard_mean"],
        "finding_mc_accuracy": accuracy["acc_unpruned"],
        "finding_mc_chance": accuracy["acc_chance"],
        "finding_first_to_break": first_to_break if first_to_break is not None else "n/a",
        "finding_diagonal_mde_caep": detectable * 100,
        "finding_diagonal_verdict": (
            f"On {model}, the diagonal of CAEP's domain x domain matrix is "
            + ("better than" if better else "not distinguishable from")
            + f" permuted domain labels (p = {caep_test.p_value:.3f}; advantage {caep_adv.estimate * 100:+.2f} points, "
            f"{confidence:.0%} interval [{caep_adv.low * 100:+.2f}, {caep_adv.high * 100:+.2f}]); at these sample "
            f"sizes the test detects a planted diagonal advantage with 80% power only from {detectable * 100:.1f} "
            "points on"),
    }


def versus_general_sentence(versus: pd.DataFrame, model: str, metric_label: str) -> str:
    """Domain-specific CAEP against CAEP fitted on all domains, in plain words: in how many domains
    it spares its own domain more or less, and where the paired interval excludes no difference
    (``versus``: :func:`versus_general`, gain > 0: the domain-specific pruning is better)."""
    if versus.empty:
        return "Domain-specific CAEP was not compared with general CAEP in this run."
    n = len(versus)
    better, worse = versus.loc[versus["low"] > 0, "domain"].tolist(), versus.loc[versus["high"] < 0, "domain"].tolist()
    ahead = int((versus["gain"] > 0).sum())
    verdict = ("better than" if better and not worse else "worse than" if worse and not better else
               "mixed against" if better and worse else "not distinguishable from")
    return (f"On {model}, CAEP fitted on one domain is {verdict} CAEP fitted on all domains for that domain's own "
            f"questions ({metric_label}): it spares its own domain more in {ahead} of {n} domains (mean gain "
            f"{versus['gain'].mean() * 100:+.2f} points of relative change); the 95% interval lies above zero in "
            f"{len(better)} ({', '.join(better) or 'none'}) and below zero in {len(worse)} "
            f"({', '.join(worse) or 'none'}).")


def paper_comparison(found: Mapping[str, Any], results: Mapping[str, tuple], stage4: pd.DataFrame | None, store,
                     domain_names: Sequence[str], *, metric: str) -> pd.DataFrame:
    """The paper's reported figures (Fig 9, Table 1 at 25% and 75%, model and data) next to this run's."""
    _, caep_test, caep_adv = results["caep"]
    _, base_test, _ = results[found["finding_baseline"]]
    general = {}
    for ratio in (0.25, 0.75):
        versus = (domains.caep_versus_best_baseline(stage4, ratio, task_prefix=PPL_GROUP if metric != "acc" else MC_GROUP)
                  if stage4 is not None else None)
        general[ratio] = ("not evaluated by stage 4" if versus is None else
                          f"mean relative change over {versus['n_tasks']} MMLU-Pro categories (+ is better): CAEP "
                          f"{versus['caep']:+.1%}, best baseline ({versus['baseline']}) {versus['baseline_score']:+.1%}")
    return pd.DataFrame([
        {"claim": "Pruning fitted on a domain hurts that domain least (Fig 9)",
         "the paper reports": "yes, read off a heatmap (Phi-3.5-MoE, CAEP, 50% pruned, 5 domains, relative "
                              "accuracy change); no test or interval",
         "this run measured": f"CAEP: diagonal best in {caep_test.n_best_columns}/{len(domain_names)} columns, "
                              f"permutation p = {caep_test.p_value:.3f}, advantage {caep_adv.estimate * 100:+.2f} "
                              f"points [{caep_adv.low * 100:+.2f}, {caep_adv.high * 100:+.2f}]; "
                              f"{found['finding_baseline']}: p = {base_test.p_value:.3f}"},
        {"claim": "CAEP beats the best baseline at 25% pruning (Table 1)",
         "the paper reports": "average zero-shot accuracy .612 vs .587 for SEER-MoE and GEM (+2.5 points; "
                              "DeepSeek-MoE-16B); Phi-3.5-MoE: .652 vs .636 (GEM)",
         "this run measured": general[0.25]},
        {"claim": "... and at 75% pruning",
         "the paper reports": "average accuracy .398 vs .387 (GEM) and .363 (SEER-MoE)",
         "this run measured": general[0.75]},
        {"claim": "Model and data",
         "the paper reports": "Phi-3.5-MoE (32 layers x 16 experts, top-2) and DeepSeek-MoE-16B; 2,812 MMLU-Pro "
                              "questions of 5 domains; calibration 128 MMLU samples x 2,048 tokens",
         "this run measured": f"{found['finding_model']} ({store.n_layers} x {store.n_experts}, top-{store.top_k}); "
                              f"{found['finding_data']}"},
    ])


# ------------------------------------------------------------------------------ artifact
def save_results(paths, inputs: Inputs, fitted: DomainMasks, grid: EvaluationGrid, cells: pd.DataFrame,
                 versus: pd.DataFrame, found: Mapping[str, Any], *, analysis: Mapping[str, Any]) -> dict:
    """Write the stage's artifact to ``paths.results`` (:func:`moe_utils.common.artifacts.write_artifact`):
    ``masks.csv`` (one 0/1 column ``method:fitted on`` per mask of ``fitted``), ``cells.csv``,
    ``versus_general.csv`` and a checksummed manifest naming the inputs and holding the parameters
    (those the masks and the grid were made with, and the ``analysis``'s: bootstrap, confidence, seed)
    and the findings ``found``. The evaluation and mask caches in the same folder are left alone."""
    masks = fitted.masks
    names = [f"{m}:{d}" for (m, d) in masks]
    keeps = pd.DataFrame(np.array([k.keep for k in masks.values()]).T.astype(int), columns=names)
    files = {"masks.csv": keeps.to_csv(index=False).encode(), "cells.csv": cells.to_csv(index=False).encode(),
             "versus_general.csv": versus.to_csv(index=False).encode()}
    return write_artifact(paths.results, files, {
        "format": FORMAT, "model": inputs.store.manifest["model"]["name"], "store": str(paths.store),
        "hsdl": str(paths.hsdl), "stage4": str(paths.pruning) if inputs.stage4 is not None else None,
        "parameters": {**fitted.settings, **grid.settings, **analysis}, "findings": dict(found)})


def load_results(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], pd.DataFrame, pd.DataFrame, dict]:
    """Read :func:`save_results`' artifact, verified: ``(keep-masks by name, cells, versus_general,
    manifest)``."""
    path = Path(path)
    manifest = read_artifact(path, what="stage-5 artifact", fix="re-run stage 05_mmlu_pro_results", format=FORMAT,
                             required=RESULT_FILES)
    keeps = pd.read_csv(path / "masks.csv")
    return ({name: keeps[name].to_numpy().astype(bool) for name in keeps.columns},
            pd.read_csv(path / "cells.csv"), pd.read_csv(path / "versus_general.csv"), manifest)
