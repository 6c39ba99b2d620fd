"""Stage 4's glue, kept out of its notebook: what the stage loads and checks, the calibration set,
the table of CAEP's steps (the paper's Algorithm 1, section 4), the ablation's masks, the
artifact, and the findings sentences the book cites."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe_utils.compression import ablation as abl
from moe_utils.compression import caep as caep_module
from moe_utils.compression import calibration, pruning
from moe_utils.evaluation import pruning_eval
from moe_utils.evaluation.data import load_prompts
from moe_utils.common.artifacts import sha256_file
from moe_utils.compression.caep import PruningBudget
from moe_utils.compression import reference, registry, sensitivity, verdicts
from moe_utils.compression.evaluate import evaluate_compressions
from moe_utils.patterns.hsdl import HSDL
from moe_utils.common.markup import code_span
from moe_utils.models.loading import load_model, moe_layers
from moe_utils.capture.routing import model_identity
from moe_utils.stages import glue_values, model_caveat, stage_paths
from moe_utils.capture.store import RoutingStore
from moe_utils.patterns.expert_matrix import expert_matrix

#: The methods stage 4's page describes (its introduction and section 4): a profile that leaves one
#: out is told so on the page (:func:`describe`).
DESCRIBED = ("caep", "caep_layer", "frequency", "router_weight", "ean", "reap", "output", "hc_smoe", "m_smoe", "random")

#: How the page names each calibration source.
CALIBRATION_SOURCES = {"capture": "the stage-1 prompts (the texts CAEP's dictionary was fitted on)",
                       "mmlu": "MMLU test questions", "wikitext": "WikiText-2 train"}


# ------------------------------------------------------------------------------- set-up
@dataclass
class Setup:
    """What the stage works on: the stage-1 store, the stage-2 dictionary, the model and its layout."""

    model_name: str
    store_dir: Path
    hsdl_dir: Path
    store: RoutingStore
    hsdl: HSDL
    lm: Any
    tokenizer: Any
    layers: list
    budget: PruningBudget
    methods: list[str]
    skipped: dict[str, str]

    @property
    def layer_sizes(self) -> list[int]:
        return list(self.budget.layer_sizes)

    @property
    def top_k(self) -> int:
        return max(layer.top_k for layer in self.layers)

    @property
    def guard(self) -> int:
        return self.budget.min_per_layer

    @property
    def n_experts(self) -> int:
        return self.budget.n_experts


def load_setup(model: str, artifacts_dir, methods: Sequence[str] | None, *, min_per_layer: int | None = None,
               device=None, dtype=None, trust_remote_code: bool = False) -> Setup:
    """Open stage 1's store and stage 2's dictionary, load the model, and check they belong together.
    ``methods``: registered names, None for all (:func:`moe_utils.compression.registry.names`). The
    guard is the model's top-k unless ``min_per_layer`` is given; methods a group-limited router
    cannot use are skipped (:func:`moe_utils.compression.pruning.unsupported_methods`)."""
    methods = list(registry.names() if methods is None else methods)
    registry.check_methods(methods)
    paths = stage_paths(artifacts_dir)
    store_dir, hsdl_dir = paths.store, paths.hsdl
    store, hsdl = RoutingStore.open(store_dir), HSDL.load(hsdl_dir)
    if store.manifest["model"]["name"] != model:
        raise ValueError(f"stage 1 captured {store.manifest['model']['name']!r}, not {model!r}: re-run 01_capture")
    lm, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    layers = moe_layers(lm)
    budget = PruningBudget.for_model(lm, layers, min_per_layer=min_per_layer)
    if not hsdl.dictionaries_[0].shape[0] == budget.n_experts == store.n_layers * store.n_experts:
        raise ValueError("the stage-2 dictionary does not match the model's experts: re-run 02_hsdl")
    skipped = pruning.unsupported_methods(methods, budget)
    return Setup(model, store_dir, hsdl_dir, store, hsdl, lm, tokenizer, layers, budget,
                 [m for m in methods if m not in skipped], skipped)


def describe(setup: Setup, level: int) -> str:
    """Markdown: the model, the dictionary, what the numbers of this model can mean, and skipped methods."""
    note = model_caveat(setup.model_name, "It is above chance on BLiMP's minimal pairs and its perplexities move "
                        "when experts are pruned.") or ""
    glue_values(guard=setup.guard)
    lines = [f"**Model:** {code_span(setup.model_name)} ({setup.lm.config.model_type}, {len(setup.layer_sizes)} MoE "
             f"layers of {setup.layer_sizes[0]} routed experts, top-{setup.top_k}). **Dictionary:** level "
             f"{level} of stage 2's HSDL model, {setup.hsdl.dictionaries_[level - 1].shape[1]} atoms. {note}"]
    lines += [f"**Skipped for this model:** `{method}` {why}." for method, why in setup.skipped.items()]
    lines.append(not_run(setup.methods, setup.skipped))
    return "\n\n".join(lines)


def not_run(methods: Sequence[str], skipped: Mapping[str, str]) -> str:
    """One sentence: the methods this run compares, and those the page describes that it does not run."""
    ran = [m for m in methods if m not in skipped]
    missing = [m for m in DESCRIBED if m not in ran and m not in skipped]
    text = f"**Methods run:** {', '.join(ran)}."
    if missing:
        text += (f" **Described on this page but not run by this profile** (its `pruning_methods`): "
                 f"{', '.join(missing)}; no result below is theirs.")
    return text


# -------------------------------------------------------------------------- calibration
def calibrate(setup: Setup, spec: dict, *, categories: Sequence[str], n_per_category: int, seed: int,
              max_length: int, batch_size: int, output_tokens: int, cache_dir, data_dir=None,
              calibration_dir=None) -> tuple[calibration.ExpertStats, int]:
    """The calibration pass on the set ``spec`` names (:func:`moe_utils.compression.calibration.resolve_calibration`):
    the stage-1 prompts (``capture``, at the capture's ``max_length``) or packed windows of MMLU /
    WikiText-2 train. On the stage-1 prompts themselves the pass must count exactly the routing the
    store recorded. Returns ``(stats, number of texts)``."""
    tok = setup.tokenizer
    if spec["source"] == "capture":
        prompts, _, _ = load_prompts(categories, n_per_category=n_per_category, seed=seed, data_dir=data_dir)
        texts = calibration.calibration_texts(tok, "capture", n_samples=spec["n_samples"], prompts=prompts, seed=seed)
        length = max_length
    else:
        texts = calibration.calibration_texts(tok, spec["source"], n_samples=spec["n_samples"],
                                              n_tokens=spec["n_tokens"], seed=seed, data_dir=calibration_dir)
        length = spec["n_tokens"]
    stats = calibration.calibrate(setup.lm, tok, texts, batch_size=batch_size, max_length=length,
                                  keep_hidden=registry.keep_hidden(setup.methods, output_tokens), cache_dir=cache_dir)
    top_ks = np.array([layer.top_k for layer in setup.layers])
    np.testing.assert_array_equal(stats.counts.sum(axis=1), stats.n_tokens * top_ks)
    store = setup.store
    if spec["source"] == "capture" and len(texts) == store.n_samples:
        captured = np.stack([np.bincount(np.asarray(store.topk_indices[:, j]).ravel(), minlength=store.n_experts)
                             for j in range(store.n_layers)])
        np.testing.assert_array_equal(stats.counts, captured)
    return stats, len(texts)


def score_correlations(D, R, stats: calibration.ExpertStats) -> pd.DataFrame:
    """Spearman correlation over experts of CAEP's contribution and the calibration scores."""
    scores = pd.DataFrame({"caep contribution": caep_module.contribution_scores(D, R),
                           **{name: stats.score(name) for name in calibration.SCORES}})
    return scores.corr(method="spearman")


# --------------------------------------------------------------------------------- CAEP
def caep_steps(D, R, ratios: Sequence[float], *, threshold_ratio: float, budget: PruningBudget) -> pd.DataFrame:
    """One row per ratio: the target, what Algorithm 1 kept and how many atoms it removed, the
    experts kept per layer before and after the guard, and what the guard changed."""
    rows = []
    for ratio in ratios:
        result = caep_module.caep(D, R, threshold_ratio, ratio, budget=budget)
        kept = budget.kept_per_layer(result.keep)
        if (kept < budget.min_per_layer).any():
            raise AssertionError(f"CAEP at {ratio}: a layer keeps fewer than {budget.min_per_layer} experts")
        rows.append({"ratio": f"{ratio:.0%}", "target kept": int(np.floor(result.target)),
                     "kept by Algorithm 1": int(result.algorithm_keep.sum()),
                     "atoms removed": f"{len(result.atoms_removed)} of {D.shape[1]}",
                     "per layer, Algorithm 1": " ".join(map(str, budget.kept_per_layer(result.algorithm_keep))),
                     "per layer, guarded": " ".join(map(str, kept)),
                     "guard": "no change" if not result.guard.changed else
                     f"restored {len(result.guard.restored)}, dropped {len(result.guard.dropped)}",
                     "restored for the router's groups": len(result.rounded)})
    steps = pd.DataFrame(rows)
    if not budget.restricted:  # only group-limited routers restrict the counts
        steps = steps.drop(columns="restored for the router's groups")
    return steps


def check_masks(masks: Sequence[pruning.PruningMask], setup: Setup) -> None:
    """Every compression keeps at least the guard per layer, every method its registry entry declares
    exact keeps exactly its layer quota, and every merge's groups are well formed
    (:func:`moe_utils.compression.registry.check_built`)."""
    registry.check_built(masks, setup.budget)


def ablation_variants(setup: Setup, ratio: float, settings: Mapping[str, Any] | None, *, threshold_ratio: float,
                      level: int, seed: int, cache_dir, wikitext_dir=None) -> pd.DataFrame:
    """The ablation's CAEP masks at ``ratio`` (:func:`moe_utils.compression.ablation.caep_variants`); ``settings``
    (None: no ablation) gives ``k1`` and ``sizes`` to try and the WikiText-2 calibration text as
    ``samples`` windows of ``tokens`` tokens, whose routing is captured and refitted."""
    if not settings:
        return pd.DataFrame(columns=["factor", "setting", "mask"])
    texts = calibration.calibration_texts(setup.tokenizer, "wikitext", n_samples=settings["samples"],
                                          n_tokens=settings["tokens"], seed=seed, data_dir=wikitext_dir)
    wiki_X = abl.routing_matrix(setup.lm, setup.tokenizer, texts, cache_dir=cache_dir, max_length=settings["tokens"])
    return abl.caep_variants(
        setup.hsdl, _stage1_matrix(setup), ratio, budget=setup.budget, threshold_ratio=threshold_ratio, level=level,
        k1_values=settings["k1"], size_values=settings["sizes"], other_X=("WikiText-2 train", wiki_X),
        cache_dir=cache_dir)


def caep_refits(setup: Setup, ratio: float, settings: Mapping[str, Any] | None, *, threshold_ratio: float,
                level: int, cache_dir) -> pd.DataFrame:
    """CAEP's mask at ``ratio`` from dictionaries refitted on resampled stage-1 questions and with other
    HSDL seeds (:func:`moe_utils.compression.sensitivity.caep_refits`); ``settings`` (None: none)
    gives ``seeds`` and ``resamples``."""
    if not settings:
        return pd.DataFrame(columns=["input", "setting", "mask"])
    return sensitivity.caep_refits(
        setup.hsdl, _stage1_matrix(setup), setup.store.tokens["sample_id"].to_numpy(), ratio, budget=setup.budget,
        threshold_ratio=threshold_ratio, level=level, seeds=settings.get("seeds", (1, 2)),
        n_resamples=settings.get("resamples", 2), cache_dir=cache_dir)


def evaluate(setup: Setup, masks: Sequence[pruning.PruningMask], runs: Sequence[Mapping[str, Any]],
             extra: Sequence[pruning.PruningMask], extra_runs: Sequence[Mapping[str, Any]], *, cache_dir,
             **settings: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every mask of ``masks`` on every run of ``runs``, and the ``extra`` masks (the random-mask
    reference distributions and CAEP's refits) on ``extra_runs`` only (the reference tasks, on the
    same documents), through the one evaluator of stages 4 and 5
    (:func:`moe_utils.compression.evaluate.evaluate_compressions`: masks scored together in shared
    passes, every document cached per compressed model); results and per-document rows of both
    concatenated."""
    results, samples = evaluate_compressions(setup.lm, setup.tokenizer, masks, runs, cache_dir=cache_dir, **settings)
    if not extra or not extra_runs:
        return results, samples
    more, more_samples = evaluate_compressions(setup.lm, setup.tokenizer, extra, extra_runs, cache_dir=cache_dir,
                                               **settings)
    return pd.concat([results, more], ignore_index=True), pd.concat([samples, more_samples], ignore_index=True)


def reference_measures(samples: pd.DataFrame, masks: Sequence[pruning.PruningMask]) -> list[str]:
    """The measures (:func:`moe_utils.evaluation.pruning_eval.available_measures`) the reference ``masks`` were
    scored on, read off their per-document rows."""
    keys = {(m.method, float(m.ratio), -1 if m.seed is None else int(m.seed)) for m in masks}
    seeds = samples["seed"].astype("Int64").fillna(-1).astype(int)
    mine = [k in keys for k in zip(samples["method"], samples["ratio"].astype(float), seeds)]
    return pruning_eval.available_measures(samples[mine]) if any(mine) else []


def reference_tasks(tasks: Sequence[str], chosen: Sequence[str] | None) -> list[str]:
    """The tasks the reference distributions are scored on: ``chosen`` (None: all of ``tasks``);
    ValueError for a task the stage does not evaluate (its documents would differ)."""
    chosen = list(tasks if chosen is None else chosen)
    unknown = [t for t in chosen if t not in tasks]
    if unknown:
        raise ValueError(f"reference_tasks {unknown} are not among eval_tasks {list(tasks)}: the reference masks "
                         "must be scored on the same documents as the methods")
    return chosen


def _stage1_matrix(setup: Setup):
    return expert_matrix(setup.store)


def merging_cost(results: pd.DataFrame) -> dict[str, Any]:
    """What the merging methods added to the evaluations: their models, and their evaluation seconds
    against all models' (each harness run counted once; a cached run counts the seconds it took)."""
    runs = results.drop_duplicates(["method", "ratio", "seed", "seconds"])
    merged = runs["method"].isin(registry.names("merge"))
    return {"merge_models": int(results.loc[results["method"].isin(registry.names("merge")),
                                            ["method", "ratio"]].drop_duplicates().shape[0]),
            "merge_eval_seconds": float(runs.loc[merged, "seconds"].sum()),
            "all_eval_seconds": float(runs["seconds"].sum())}


# ------------------------------------------------------------------------------ artifact
def save_artifact(out_dir, setup: Setup, masks, results: pd.DataFrame, stats: calibration.ExpertStats,
                  parameters: Mapping[str, Any]) -> None:
    """Write the stage's artifact (:func:`moe_utils.compression.pruning.save_pruning`: the unpruned and every
    method's masks, their results without the ablation's variants, calibration sums) and read it back."""
    inputs = {name: sha256_file(path / "manifest.json")
              for name, path in (("store", setup.store_dir), ("hsdl", setup.hsdl_dir))}
    every = [pruning.unpruned_mask(setup.n_experts), *masks]
    results = results[~results["method"].map(abl.is_variant)]
    pruning.save_pruning(out_dir, every, results, stats=stats, extra={
        "model": model_identity(setup.lm, setup.layers) | {"layer_sizes": setup.layer_sizes, "top_k": setup.top_k},
        "inputs": {"store": str(setup.store_dir), "store_manifest_sha256": inputs["store"],
                   "hsdl": str(setup.hsdl_dir), "hsdl_manifest_sha256": inputs["hsdl"]},
        "parameters": dict(parameters) | {"methods": setup.methods, "skipped_methods": setup.skipped,
                                          "min_per_layer": setup.guard}})
    reloaded, _, _ = pruning.load_pruning(out_dir)
    if [m.digest for m in reloaded] != [m.digest for m in every]:
        raise AssertionError(f"the masks read back from {out_dir} differ from those written")


# ------------------------------------------------------------------------ reference, verdicts
def allocation_table(distribution: Mapping[tuple[str, float], str], references: Sequence[pruning.PruningMask],
                     budget: PruningBudget) -> pd.DataFrame:
    """One row per reference distribution and ratio: its masks, the experts each layer keeps, and
    the methods it is the matched reference of (:func:`moe_utils.compression.reference.allocations`)."""
    rows = {}
    for m in references:
        row = rows.setdefault((m.method, m.ratio), {"distribution": m.method, "ratio": f"{m.ratio:.0%}", "masks": 0,
                                                    "kept per layer": " ".join(map(str, budget.kept_per_layer(m.keep)))})
        row["masks"] += 1
    for (name, ratio), row in rows.items():
        row["matched reference of"] = ", ".join(
            meth for (meth, r), dist in distribution.items() if dist == name and np.isclose(r, ratio)
            and meth not in ("unpruned", "random")) or "-"
    return pd.DataFrame(list(rows.values()))


def placement_table(placed: pd.DataFrame) -> pd.DataFrame:
    """:func:`moe_utils.compression.reference.placement` as the page shows it: per measure, ratio,
    method and distribution, the method's score, the masks' mean and range, the percentile and the
    difference from the masks' mean with its interval."""
    if placed.empty:
        return pd.DataFrame()
    out = []
    for r in placed.itertuples():
        kind, label = pruning_eval.measure_spec(r.measure)[:2]
        f = pruning_eval.format_value
        out.append({"measure": label, "ratio": f"{r.ratio:.0%}", "method": r.method, "random masks": r.distribution,
                    "masks": r.n_masks, "method's score": f(kind, r.score),
                    "masks: mean [min, max]": f"{f(kind, r.reference_mean)} [{f(kind, r.reference_min)}, "
                                              f"{f(kind, r.reference_max)}]",
                    "percentile": f"{r.percentile:.0f}",
                    "minus the masks' mean": f"{f(kind, r.estimate, True)} [{f(kind, r.low, True)}, "
                                             f"{f(kind, r.high, True)}]"})
    return pd.DataFrame(out)


def all_comparisons(samples: pd.DataFrame, measures: Sequence[str], placed: pd.DataFrame,
                    endpoint: Mapping[str, Any], methods: Sequence[str], *, n_boot: int) -> pd.DataFrame:
    """Every comparison of the page, adjusted (:func:`moe_utils.compression.verdicts.adjust`): each
    model against the unpruned model and random masks (:func:`moe_utils.evaluation.pruning_eval.comparisons`),
    CAEP against random masks of its own allocation (``placed``), every method against CAEP."""
    parts = [pruning_eval.comparisons(samples, measures, n_boot=n_boot)]
    if len(placed):
        parts.append(reference.matched_comparisons(placed))
    if "caep" in methods:
        parts.append(verdicts.versus_method(samples, measures, "caep", n_boot=n_boot))
    return verdicts.adjust(pd.concat(parts, ignore_index=True), endpoint)


def verdict_table(compared: pd.DataFrame, ratios: Sequence[float]) -> pd.DataFrame:
    """:func:`moe_utils.compression.verdicts.method_verdicts` at every ratio, one row per method and ratio."""
    frames = [verdicts.method_verdicts(compared, r).assign(ratio=f"{r:.0%}") for r in ratios]
    table = pd.concat(frames)
    table.index.name = "method"
    return table.reset_index().set_index(["ratio", "method"]).fillna("")


# ------------------------------------------------------------------------------ findings
def rank_table(curves: pd.DataFrame, ratios: Sequence[float]) -> pd.DataFrame:
    """Mean rank of each method over the measures at each ratio (1 = best on every measure)."""
    return pd.DataFrame({f"{r:.0%}": pruning.method_ranks(curves, r) for r in ratios})


def findings(model: str, scores: pd.DataFrame, compared: pd.DataFrame, ablation_rows: pd.DataFrame,
             measures: Sequence[str], ratio: float) -> dict[str, str]:
    """The stage's findings as sentences with their numbers, glued under ``finding_pruning_*`` for
    the book's introduction: BLiMP unpruned and at ``ratio``, CAEP against random masks, the
    minimum detectable differences, and what the ablation shows."""
    out = {"finding_pruning_blimp": "BLiMP was not evaluated in this run."}
    where = f"on the {model} model"
    pct = f"{ratio:.0%}"
    cmp = compared[np.isclose(compared["ratio"], ratio)]

    def diff(method, measure, reference):
        hit = cmp[(cmp["method"] == method) & (cmp["measure"] == measure) & (cmp["reference"] == reference)]
        if hit.empty:
            return None
        r = hit.iloc[0]
        kind = pruning_eval.measure_spec(measure)[0]
        unit = " points" if kind == "acc" else ""
        return (f"{pruning_eval.format_value(kind, r.estimate, True)}{unit} "
                f"[{pruning_eval.format_value(kind, r.low, True)}, {pruning_eval.format_value(kind, r.high, True)}]")

    if "blimp" in measures:
        b = scores[scores["measure"] == "blimp"].set_index(["method", "ratio"])
        unpruned = b.loc[("unpruned", 0.0)]
        parts = [f"{name} {b.loc[(m, ratio), 'estimate'] * 100:.1f}%"
                 for m, name in (("caep", "CAEP"), ("random", "random masks")) if (m, ratio) in b.index]
        out["finding_pruning_blimp"] = (
            f"BLiMP accuracy {where} ({unpruned.n_docs} minimal pairs, macro average over paradigms; chance 50%): "
            f"{unpruned.estimate * 100:.1f}% unpruned (95% interval {unpruned.low * 100:.1f} to "
            f"{unpruned.high * 100:.1f}); with {pct} of the experts pruned: " + ", ".join(parts) + ".")
    sentences = []
    for measure in measures:
        text = diff("caep", measure, "random")
        if text is not None:
            sentences.append(f"{pruning_eval.measure_spec(measure)[1]} {text}")
    out["finding_pruning_verdict"] = verdict_vs_random(cmp, measures, pct)
    out["finding_pruning_vs_random"] = (f"CAEP minus random masks at {pct} pruned, paired on the same documents "
                                        "(95% intervals; perplexity as a relative change): "
                                        + "; ".join(sentences) + ".")
    mde = []
    for measure in measures:
        part = compared[(compared["measure"] == measure) & (compared["reference"] == "random")
                        & ~compared["method"].map(abl.is_variant)]
        if not part.empty:
            kind, label = pruning_eval.measure_spec(measure)[:2]
            unit, scale = {"acc": (" points", 100), "ppl": ("%", 100), "bpb": (" bits per byte", 1)}[kind]
            mde.append(f"{label} {part['mde'].median() * scale:.2g}{unit}")
    out["finding_pruning_mde"] = ("Smallest differences from random masks these samples detect (80% power, 5% "
                                  "two-sided, median over methods and ratios): " + ", ".join(mde) + ".")
    out["finding_pruning_ablation"] = ablation_verdict(ablation_rows, cmp, measures)
    return out


def verdict_vs_random(compared: pd.DataFrame, measures: Sequence[str], pct: str) -> str:
    """One plain sentence: on which measures CAEP is better than random masks at the same ratio, on
    which worse, and on which they cannot be told apart (rows of ``compared`` with
    ``reference == "random"`` at one ratio): by Holm's correction where ``compared`` carries it
    (:func:`moe_utils.compression.verdicts.adjust`), else by the paired interval."""
    groups = {"better": [], "worse": [], "level": []}
    for measure in measures:
        hit = compared[(compared["method"] == "caep") & (compared["measure"] == measure)
                       & (compared["reference"] == "random")]
        if hit.empty:
            continue
        r = hit.iloc[0]
        kind, label = pruning_eval.measure_spec(measure)[:2]
        differs = pruning_eval.star(r) == "*"
        good = differs and ((r.estimate > 0) == (kind == "acc"))
        groups["better" if good else "worse" if differs else "level"].append(label)
    if not any(groups.values()):
        return "CAEP was not compared with random masks in this run."
    adjusted = "rejected" in compared.columns
    if not groups["better"] and not groups["worse"]:
        return (f"At {pct} pruned, CAEP cannot be told apart from random masks on any measure"
                + (" after Holm's correction." if adjusted else "."))
    parts = [f"{word} random masks on {', '.join(names)}" for word, names in
             (("better than", groups["better"]), ("worse than", groups["worse"]),
              ("not distinguishable from", groups["level"])) if names]
    return (f"At {pct} pruned, CAEP is " + "; ".join(parts)
            + (" (secondary comparisons, Holm-corrected)." if adjusted else "."))


def ablation_verdict(ablation_rows: pd.DataFrame, compared: pd.DataFrame, measures: Sequence[str]) -> str:
    """The ablation in one sentence per measure: the reference CAEP minus random masks, and the
    single change of its settings that moves it furthest in the good direction, with intervals;
    then how many variants are better or worse than random on each measure."""
    if ablation_rows.empty or not measures:
        return "The ablation was not run."
    reference = ablation_rows["mask"].iloc[0].method
    names = {m.method: f"{f}: {s}" for f, s, m in ablation_rows.itertuples(index=False)}
    names["caep_layer"] = "scope: per layer"
    f = pruning_eval.format_value
    sentences, n_better = [], 0
    for measure in measures:
        kind, label = pruning_eval.measure_spec(measure)[:2]
        part = compared[(compared["measure"] == measure) & (compared["reference"] == "random")
                        & compared["method"].isin(list(names))].copy()
        if part.empty:
            continue
        part["good"] = part["estimate"] if kind == "acc" else -part["estimate"]
        better = (part["low"] > 0) if kind == "acc" else (part["high"] < 0)
        worse = (part["high"] < 0) if kind == "acc" else (part["low"] > 0)
        ref = part[part["method"] == reference].iloc[0]
        best = part[part["method"] != reference].sort_values("good", ascending=False).iloc[0]
        unit = " points" if kind == "acc" else ""
        n_better += int(better[part["method"] != reference].sum())
        sentences.append(
            f"{label}: reference CAEP {f(kind, ref.estimate, True)}{unit} [{f(kind, ref.low, True)}, "
            f"{f(kind, ref.high, True)}], best single change '{names[best.method]}' "
            f"{f(kind, best.estimate, True)}{unit} "
            f"[{f(kind, best.low, True)}, {f(kind, best.high, True)}] ({int(better.sum())} of {len(part)} variants "
            f"better than random, {int(worse.sum())} worse)")
    opening = ("Some single changes of CAEP's settings make it better than random masks on a measure." if n_better
               else "No single change of CAEP's settings makes it better than random masks on any measure.")
    return (f"{opening} CAEP's variants minus random masks at the same ratio (paired, 95% intervals; perplexity as "
            "a relative change, lower is better): " + "; ".join(sentences) + ".")


def ablation_table(variants: pd.DataFrame, compared: pd.DataFrame, measures: Sequence[str]) -> pd.DataFrame:
    """Each variant's paired difference from random masks at its ratio, per measure (estimate,
    interval), and the experts it prunes; ``per layer`` is read from the ``caep_layer`` rows."""
    methods = [m.method for m in variants["mask"]]
    rows = list(zip(variants["factor"], variants["setting"], methods))
    rows.append(("scope", "per layer (each layer keeps its share)", "caep_layer"))
    ratio = variants["mask"].iloc[0].ratio
    out = []
    for factor, setting, method in rows:
        row = {"factor": factor, "setting": setting}
        for measure in measures:
            kind, label = pruning_eval.measure_spec(measure)[:2]
            fmt = pruning_eval.format_value
            hit = compared[(compared["method"] == method) & (compared["reference"] == "random")
                           & np.isclose(compared["ratio"], ratio) & (compared["measure"] == measure)]
            if hit.empty:
                continue
            r = hit.iloc[0]
            row[f"{label}: vs random"] = (f"{fmt(kind, r.estimate, True)} [{fmt(kind, r.low, True)}, "
                                          f"{fmt(kind, r.high, True)}]{pruning_eval.star(r)}")
        out.append(row)
    return pd.DataFrame(out)
