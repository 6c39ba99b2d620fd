"""Domain-specific pruning: fit on one MMLU-Pro domain, evaluate on every domain (the paper's Fig 9).

Tang et al. (2025, section 5, Fig 9) prune 50% of Phi-3.5-MoE's experts with CAEP fitted on one
domain's activations and evaluate the pruned model on every domain; the heatmap of
``(acc_pruned - acc_orig) / acc_orig`` (target domain x evaluated domain) should be best on its
diagonal. This module provides the pieces:

* CAEP fitted on one domain (:func:`domain_factors`): the dictionary D_1 stays the one fitted on
  all domains, the codes are those of the domain's columns of X only, so ``e = D_1 @ R_sum``
  weighs each collaboration pattern by how much *this* domain uses it (optionally, HSDL refitted
  on the domain alone); the calibration baselines of :mod:`moe_utils.compression.calibration` calibrated on the
  domain's texts only; all of them as keep-masks (:func:`domain_masks`); which baseline stage 4
  found strongest (:func:`strongest_baseline`);
* (the evaluation itself, every question's score cached per compressed model, is stage 4's:
  :func:`moe_utils.compression.evaluate.evaluate_compressions`);
* the domain x domain relative-change matrix with paired bootstrap intervals
  (:func:`relative_change_table`) and the diagonal test (:func:`diagonal_summary`, using
  :func:`moe_utils.common.stats.diagonal_permutation_test`).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe_utils.common import stats
from moe_utils.common.cache import KeyedCache
from moe_utils.compression.caep import PruningBudget
from moe_utils.compression import registry
from moe_utils.evaluation.harness import MC_GROUP, PPL_GROUP, category_slug, resolve_category
from moe_utils.evaluation.metrics import better_sign, lower_is_better
from moe_utils.capture.store import RoutingStore
from moe_utils.compression.calibration import calibrate
from moe_utils.compression.pruning import (
    PruningMask, hsdl_factors, label_columns, primary_metric, pruning_masks,
)
from moe_utils.evaluation.data import load_mmlu_pro, select_questions

log = logging.getLogger(__name__)

#: Metrics the domain tables understand: pooled perplexities of ``mmlu_pro_ppl_*`` and the
#: accuracy of ``mmlu_pro_mc_*`` (which way each points: :func:`moe_utils.evaluation.metrics.lower_is_better`).
PPL_METRICS = ("byte_perplexity", "word_perplexity", "bits_per_byte")
METRICS = (*PPL_METRICS, "acc")


# --------------------------------------------------------------------------- domain pruning
#: Stage-4 methods that can stand as the domain-specific baseline: those fitted on calibration data
#: (random masks ignore the domain; caep_layer is CAEP itself).
BASELINES = registry.calibrated("prune")


def check_alignment(hsdl, store: RoutingStore) -> str:
    """Check that ``hsdl`` (loaded with ``HSDL.load``) was fitted on this store's X; return its
    granularity. Raises ValueError, saying to re-run stage 2, when its codes cannot index the store."""
    manifest = getattr(hsdl, "manifest_", {})
    granularity = manifest.get("x_spec", {}).get("granularity", "token")
    n_columns = store.n_tokens if granularity == "token" else store.n_samples
    fitted_on = manifest.get("store", {}).get("fingerprint")
    if hsdl.codes_[0].shape[1] != n_columns or (fitted_on is not None and fitted_on != store.manifest.get("fingerprint")):
        raise ValueError(f"the HSDL model's codes ({hsdl.codes_[0].shape[1]} columns) were fitted on another capture "
                         f"than the store at {store.path} ({n_columns} {granularity} columns): re-run stage 2 "
                         "(02_hsdl) on this store")
    if hsdl.dictionaries_[0].shape[0] != store.n_layers * store.n_experts:
        raise ValueError(f"the HSDL dictionary has {hsdl.dictionaries_[0].shape[0]} rows but the store has "
                         f"{store.n_layers * store.n_experts} experts: re-run stage 2 on this store")
    return granularity


def domain_factors(hsdl, store: RoutingStore, domain: str, *, level: int = 1, refit: bool = False, X=None):
    """(D, R) for CAEP fitted on one domain (the paper's Fig 9 setting).

    By default D is the dictionary D_level fitted on all domains and R its codes on the domain's
    columns only (:func:`moe_utils.compression.pruning.hsdl_factors`), so ``e = D @ R_sum`` weighs every
    collaboration pattern by how much *this* domain uses it. With ``refit``, a fresh HSDL with the
    same parameters is fitted on the domain's columns of ``X`` alone (slower; D changes too).
    """
    from sklearn.base import clone

    granularity = check_alignment(hsdl, store)
    columns = label_columns(store, domain, granularity)
    if not refit:
        return hsdl_factors(hsdl, level=level, columns=columns)
    if X is None:
        raise ValueError("refit=True needs X, the expert matrix the HSDL model was fitted on")
    own = clone(hsdl).fit(X[:, np.flatnonzero(columns)])
    return hsdl_factors(own, level=level)


def domain_masks(hsdl, store: RoutingStore, domains: Sequence[str], *, ratio: float, methods: Sequence[str],
                 budget: PruningBudget, threshold_ratio: float, calibration: Mapping[str, Sequence[str]] | None = None,
                 model=None, tokenizer=None, level: int = 1, refit: bool = False, X=None, seeds: Sequence[int] = (0,),
                 calibrate_kwargs: Mapping[str, Any] | None = None) -> dict[tuple[str, str], Any]:
    """Every method's keep-mask fitted on each domain alone: ``{(method, domain): PruningMask}``.

    CAEP uses :func:`domain_factors`; the calibration baselines (:data:`BASELINES`) a calibration
    pass of ``model`` over ``calibration[domain]``, that domain's texts only
    (:func:`moe_utils.compression.calibration.calibrate`); masks come from :func:`moe_utils.compression.pruning.pruning_masks`
    with the same ``budget`` (experts per layer, guard, the counts group-limited routers allow) and
    threshold as stage 4.
    """
    needs_stats = [m for m in methods if registry.needs_stats([m])]
    if needs_stats and (model is None or calibration is None):
        raise ValueError(f"methods {needs_stats} need model, tokenizer and calibration texts per domain")
    out = {}
    for domain in domains:
        stats_ = None
        if needs_stats:
            texts = calibration.get(domain) or []
            if not texts:
                raise ValueError(f"no calibration texts for domain {domain!r}")
            stats_ = calibrate(model, tokenizer, texts, keep_hidden=registry.keep_hidden(methods, registry.HIDDEN_TOKENS),
                               progress=False, **dict(calibrate_kwargs or {}))
        dictionary = (domain_factors(hsdl, store, domain, level=level, refit=refit, X=X)
                      if {"caep", "caep_layer"} & set(methods) else None)
        for mask in pruning_masks([ratio], budget=budget, methods=methods, stats=stats_, dictionary=dictionary,
                                  threshold_ratio=threshold_ratio, seeds=seeds, model=model, progress=False):
            out[(mask.method, domain)] = mask
    return out


def rank_methods(results: pd.DataFrame, ratio: float, *, task_prefix: str | None = None,
                 methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Stage 4's methods at ``ratio``, best first, by their mean relative change from the unpruned model.

    For every task (those starting with ``task_prefix`` when given and present) the primary metric
    (:func:`moe_utils.compression.pruning.primary_metric`) is compared with the unpruned model's as a relative
    change, signed so that larger is better (accuracy up, perplexity down), and averaged over tasks
    and seeds. Columns: ``method, score, n_tasks, n_seeds``; empty when nothing matches.
    """
    frame = results
    if task_prefix is not None and frame["task"].str.startswith(task_prefix).any():
        frame = frame[frame["task"].str.startswith(task_prefix)]
    chosen = {task: primary_metric(task, group["metric"]) for task, group in frame.groupby("task")}
    frame = frame[frame["metric"] == frame["task"].map(chosen)]
    base = frame[frame["method"] == "unpruned"].groupby("task")["value"].mean()
    rows = frame[(frame["method"] != "unpruned") & np.isclose(frame["ratio"], ratio)]
    if methods is not None:
        rows = rows[rows["method"].isin(methods)]
    if rows.empty or base.empty:
        return pd.DataFrame(columns=["method", "score", "n_tasks", "n_seeds"])
    change = stats.relative_change(rows["value"].to_numpy(), rows["task"].map(base).to_numpy())
    rows = rows.assign(score=change * rows["metric"].map(better_sign).to_numpy(), seed=rows["seed"].fillna(-1))
    grouped = rows.groupby("method")
    ranking = pd.DataFrame({"score": grouped["score"].mean(), "n_tasks": grouped["task"].nunique(),
                            "n_seeds": grouped["seed"].nunique()})
    return ranking.sort_values("score", ascending=False).reset_index()


def strongest_baseline(results: pd.DataFrame | None, ratio: float, *,
                       task_prefix: str | None = None) -> tuple[str, str]:
    """``(method, reason)``: the calibration baseline (:data:`BASELINES`) that :func:`rank_methods`
    puts first at ``ratio``; ``"frequency"`` when stage 4 has no results (``None``) or evaluated
    no baseline at that ratio."""
    if results is None:
        return "frequency", "stage 4 has no results: frequency, the simplest baseline"
    ranking = rank_methods(results, ratio, task_prefix=task_prefix, methods=BASELINES)
    if ranking.empty:
        return "frequency", f"stage 4 evaluated no baseline at ratio {ratio:g}: frequency, the simplest baseline"
    return str(ranking["method"].iloc[0]), f"the strongest baseline of stage 4 at ratio {ratio:g}"


def category_breakdown(results: pd.DataFrame, *, task_prefix: str = PPL_GROUP) -> pd.DataFrame:
    """Stage 4's per-category results: for each method, ratio and MMLU-Pro category task, the
    primary metric and its relative change from the unpruned model, over seeds (mean, min, max).

    Columns: ``method, ratio, category, metric, value, change, change_min, change_max, n_seeds, n``.
    """
    frame = results[results["task"].str.startswith(task_prefix + "_")]
    if frame.empty:
        raise ValueError(f"stage 4's results have no {task_prefix}_<category> tasks")
    chosen = {task: primary_metric(task, group["metric"]) for task, group in frame.groupby("task")}
    frame = frame[frame["metric"] == frame["task"].map(chosen)]
    base = frame[frame["method"] == "unpruned"].groupby("task")["value"].mean()
    frame = frame[frame["method"] != "unpruned"].assign(
        category=lambda f: f["task"].str[len(task_prefix) + 1:].map(resolve_category),
        change=lambda f: stats.relative_change(f["value"].to_numpy(), f["task"].map(base).to_numpy()))
    grouped = frame.groupby(["method", "ratio", "category", "metric"], sort=False)
    out = grouped.agg(value=("value", "mean"), change=("change", "mean"), change_min=("change", "min"),
                      change_max=("change", "max"), n_seeds=("change", "size"), n=("n", "first"))
    return out.reset_index()


def chance_accuracy(question_ids, data_dir: str | os.PathLike | None = None) -> float:
    """Expected accuracy of uniform guessing on these MMLU-Pro test questions: mean of 1 / options."""
    questions = load_mmlu_pro("test", data_dir).set_index("question_id")
    options = questions.loc[list(question_ids), "options"].map(len)
    return float((1.0 / options).mean())


def cached_masks(cache_dir: str | os.PathLike, key: Mapping[str, Any],
                 compute: Callable[[], dict[tuple[str, str], Any]]) -> tuple[dict[tuple[str, str], Any], bool]:
    """``compute()`` (e.g. :func:`domain_masks`) once per ``key`` (a JSON-able mapping of everything
    the masks depend on), kept as a verified entry of a :class:`moe_utils.common.cache.KeyedCache`:
    the keep-masks in ``masks.npz``, methods, domains and notes in its manifest.
    Returns ``({(method, domain): PruningMask}, from_cache)``."""
    def encode(masks):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, keep=np.array([m.keep for m in masks.values()], dtype=bool))
        return {"masks.npz": buffer.getvalue()}, {"masks": [
            {"method": m, "domain": d, "ratio": k.ratio, "seed": k.seed, "note": k.note} for (m, d), k in masks.items()]}

    def decode(folder: Path, manifest: dict):
        with np.load(folder / "masks.npz") as arrays:
            keeps = arrays["keep"]
        return {(e["method"], e["domain"]): PruningMask(e["method"], e["ratio"], keep, seed=e["seed"], note=e["note"])
                for e, keep in zip(manifest["masks"], keeps)}

    return KeyedCache(cache_dir, "masks").get_or_compute(dict(key), compute, encode, decode)


def captured_questions(store: RoutingStore, data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """The MMLU-Pro questions the store was captured on (``question_id``, ``category``), rebuilt
    from its data spec, so that an evaluation can leave them out. Empty (with a warning) when the
    spec does not say how they were drawn."""
    spec = store.manifest.get("data", {})
    if not {"categories", "n_per_category", "seed"} <= set(spec):
        log.warning("the store's data spec %s does not say which questions it holds: none excluded", spec)
        return pd.DataFrame({"question_id": pd.Series(dtype=int), "category": pd.Series(dtype=str)})
    chosen = select_questions(load_mmlu_pro(spec.get("split", "test"), data_dir), spec["categories"],
                              spec["n_per_category"], spec["seed"])
    return chosen[["question_id", "category"]].reset_index(drop=True)


# ------------------------------------------------------------------------------- analysis
def category_task(category: str, metric: str) -> str:
    """The per-category MMLU-Pro task whose documents give ``metric`` (accuracy: multiple choice;
    a perplexity: the question text)."""
    return f"{MC_GROUP if metric == 'acc' else PPL_GROUP}_{category_slug(category)}"


def _arrays(docs: pd.DataFrame, category: str, metric: str) -> tuple[np.ndarray, ...]:
    """Per question of ``category`` (documents of :func:`moe_utils.compression.evaluate.evaluate_compressions`):
    question ids and the values ``metric`` is computed from."""
    task = category_task(category, metric)
    part = docs[docs["task"] == task].sort_values("doc_id")
    if part.empty:
        raise ValueError(f"no documents of {task} were evaluated")
    if metric == "acc":
        return part["question_id"].to_numpy(), part["correct"].to_numpy(float)
    counts = {"byte_perplexity": "n_bytes", "bits_per_byte": "n_bytes", "word_perplexity": "n_words"}[metric]
    return part["question_id"].to_numpy(), part["loglikelihood"].to_numpy(float), part[counts].to_numpy(float)


def _paired(reference: pd.DataFrame, other: pd.DataFrame, category: str, metric: str, who: str):
    """Per-question arrays of ``metric`` on ``category`` for two models, checked to be the same questions."""
    qid, *ref = _arrays(reference, category, metric)
    qid_other, *values = _arrays(other, category, metric)
    if not np.array_equal(qid, qid_other):
        raise ValueError(f"{who} was evaluated on other {category} questions than the unpruned model: use the same "
                         "limit and data for both")
    return tuple(ref), tuple(values)


def _metric(metric: str, values: tuple[np.ndarray, ...], idx: np.ndarray | None = None):
    """``metric`` of the questions ``idx`` (all if None); a 2-D ``idx`` gives one value per row."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    take = (lambda a: a) if idx is None else (lambda a: a[idx])
    if metric == "acc":
        return take(values[0]).mean(axis=-1)
    ppl = stats.pooled_perplexity(take(values[0]), take(values[1]))
    return np.log2(ppl) if metric == "bits_per_byte" else ppl


def _change(metric: str, new, orig, idx=None):
    return stats.relative_change(_metric(metric, new, idx), _metric(metric, orig, idx))


def category_scores(docs: pd.DataFrame, metric: str, categories: Sequence[str], *, confidence: float = 0.95,
                    n_boot: int = 1000, random_state=0) -> pd.DataFrame:
    """Per category: ``value`` of ``metric`` with its interval (Wilson for accuracy, a bootstrap
    over questions for perplexities) and ``n`` questions."""
    rows = []
    for category in categories:
        qid, *values = _arrays(docs, category, metric)
        value = float(_metric(metric, tuple(values)))
        if metric == "acc":
            low, high = stats.wilson_interval(values[0].sum(), len(qid), confidence)
        else:
            ci = stats.bootstrap_interval(lambda idx: _metric(metric, tuple(values), idx[0]), len(qid), n_boot=n_boot,
                                          confidence=confidence, random_state=random_state, vectorized=True)
            low, high = ci.low, ci.high
        rows.append({"category": category, "value": value, "low": float(low), "high": float(high), "n": len(qid)})
    return pd.DataFrame(rows)


def relative_change_table(original: pd.DataFrame, pruned: Mapping[str, pd.DataFrame], metric: str,
                          categories: Sequence[str], *, confidence: float = 0.95, n_boot: int = 1000,
                          random_state=0) -> pd.DataFrame:
    """The Fig 9 cells: for every pruned model (``pruned[target]``, the domain it was fitted on)
    and every evaluated category, ``change = (pruned - original) / original`` of ``metric`` on the
    same questions, with a paired bootstrap interval over those questions.

    Columns: ``target, evaluated, original, pruned, change, low, high, n``.
    """
    rows = []
    for category in categories:
        for target, docs in pruned.items():
            orig, new = _paired(original, docs, category, metric, f"the model pruned for {target!r}")
            ci = stats.bootstrap_interval(lambda idx: _change(metric, new, orig, idx[0]), len(orig[0]), n_boot=n_boot,
                                          confidence=confidence, random_state=random_state, vectorized=True)
            rows.append({"target": target, "evaluated": category, "original": float(_metric(metric, orig)),
                         "pruned": float(_metric(metric, new)), "change": ci.estimate, "low": ci.low,
                         "high": ci.high, "n": len(orig[0])})
    return pd.DataFrame(rows)


def change_matrix(table: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """The ``target x evaluated`` matrix of relative changes of :func:`relative_change_table`, rows
    and columns in ``order``."""
    return table.pivot(index="target", columns="evaluated", values="change").loc[list(order), list(order)]


def cell_errors(table: pd.DataFrame, order: Sequence[str], confidence: float = 0.95) -> pd.DataFrame:
    """Standard error of every cell of :func:`change_matrix`, read off its bootstrap interval as
    (high - low) / (2 z) (normal approximation), rows and columns in ``order``: the per-question
    noise that :func:`moe_utils.common.stats.diagonal_power` simulates."""
    from scipy.special import ndtri

    z = ndtri(0.5 + confidence / 2)
    width = table.assign(se=(table["high"] - table["low"]) / (2 * z))
    return width.pivot(index="target", columns="evaluated", values="se").loc[list(order), list(order)]


def diagonal_summary(original: pd.DataFrame, pruned: Mapping[str, pd.DataFrame], metric: str,
                     order: Sequence[str], *, confidence: float = 0.95, n_boot: int = 1000,
                     random_state=0) -> tuple[stats.DiagonalTest, stats.Interval]:
    """Is pruning for a domain least harmful to that domain? The permutation test over domain
    labels of the relative-change matrix (:func:`moe_utils.common.stats.diagonal_permutation_test`) and
    a bootstrap interval of the diagonal's advantage (:func:`moe_utils.common.stats.diagonal_advantage`;
    questions resampled within each evaluated category, the same draw for every model: paired)."""
    order = list(order)
    if sorted(pruned) != sorted(order):
        raise ValueError(f"the diagonal needs one pruned model per domain: got {sorted(pruned)}, domains {order}")
    lower = lower_is_better(metric)
    pairs = [[_paired(original, pruned[t], c, metric, f"the model pruned for {t!r}") for c in order] for t in order]
    zero = [c for c, (orig, _) in zip(order, pairs[0]) if _metric(metric, orig) == 0]
    if zero:
        raise ValueError(f"the unpruned model's {metric} is 0 on {zero}: no relative change exists; evaluate more "
                         "questions, or use a perplexity (domain_metric = 'byte_perplexity')")

    def matrices(idx):  # (..., k, k): rows = pruned for, columns = evaluated
        return np.stack([np.stack([_change(metric, new, orig, idx[j]) for j, (orig, new) in enumerate(row)], axis=-1)
                         for row in pairs], axis=-2)

    sizes = [len(orig[0]) for orig, _ in pairs[0]]
    test = stats.diagonal_permutation_test(matrices([np.arange(s) for s in sizes]), lower_is_better=lower)

    def advantage(idx):  # NaN (dropped) for a draw where some original score is 0
        m = matrices(idx)
        finite = np.isfinite(m).all(axis=(-2, -1))
        return np.where(finite, stats.diagonal_advantage(np.nan_to_num(m), lower_is_better=lower), np.nan)

    interval = stats.bootstrap_interval(advantage, sizes, n_boot=n_boot, confidence=confidence,
                                        random_state=random_state, vectorized=True)
    return test, interval


def versus_general(original: pd.DataFrame, pruned: Mapping[str, pd.DataFrame], general: pd.DataFrame, metric: str,
                   order: Sequence[str], *, confidence: float = 0.95, n_boot: int = 1000,
                   random_state=0) -> pd.DataFrame:
    """Does fitting the pruning on a domain beat fitting it on all domains, for that domain?

    For each domain d: the relative change of ``metric`` on d under the pruning fitted on d
    (``pruned[d]``) and under the one fitted on all domains (``general``), and their difference,
    signed so that positive means the domain-specific pruning is better, with a paired bootstrap
    interval over d's questions. Columns: ``domain, specific, general, gain, low, high, n``.
    """
    sign = better_sign(metric)
    rows = []
    for domain in order:
        orig, own = _paired(original, pruned[domain], domain, metric, f"the model pruned for {domain!r}")
        _, gen = _paired(original, general, domain, metric, "the generally pruned model")
        ci = stats.bootstrap_interval(
            lambda idx: sign * (_change(metric, own, orig, idx[0]) - _change(metric, gen, orig, idx[0])),
            len(orig[0]), n_boot=n_boot, confidence=confidence, random_state=random_state, vectorized=True)
        rows.append({"domain": domain, "specific": float(_change(metric, own, orig)),
                     "general": float(_change(metric, gen, orig)), "gain": ci.estimate, "low": ci.low,
                     "high": ci.high, "n": len(orig[0])})
    return pd.DataFrame(rows)


def breaking_order(breakdown: pd.DataFrame) -> pd.DataFrame:
    """Damage per ratio (rows) and category (columns) from :func:`category_breakdown`: the relative
    change signed so that positive is worse (perplexity up, accuracy down), averaged over methods;
    the largest entry of a row is the category that breaks first at that ratio."""
    damage = breakdown.assign(damage=-breakdown["change"] * breakdown["metric"].map(better_sign))
    return damage.groupby(["ratio", "category"])["damage"].mean().unstack().sort_index()


def caep_versus_best_baseline(results: pd.DataFrame, ratio: float, *,
                              task_prefix: str | None = None) -> dict[str, Any] | None:
    """Stage 4's CAEP against its best calibration baseline at ``ratio`` (scores of
    :func:`rank_methods`: mean relative change, larger is better): ``{"caep", "baseline",
    "baseline_score", "n_tasks"}``, or None when stage 4 lacks CAEP or every baseline there."""
    ranking = rank_methods(results, ratio, task_prefix=task_prefix).set_index("method")
    baselines = ranking[ranking.index.isin(BASELINES)]
    if "caep" not in ranking.index or baselines.empty:
        return None
    return {"caep": float(ranking.loc["caep", "score"]), "baseline": str(baselines.index[0]),
            "baseline_score": float(baselines["score"].iloc[0]), "n_tasks": int(ranking.loc["caep", "n_tasks"])}
