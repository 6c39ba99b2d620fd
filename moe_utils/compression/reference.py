"""The random-mask reference distribution of stage 4: where every method falls among random masks.

A pruning method is worth something only if it beats choosing experts at random; how far random
masks spread is therefore the yardstick of every comparison (the paper's Table 1, section 4, has no
random control). Two distributions, each of ``n_masks`` masks per ratio:

``random``          uniform per layer: every layer keeps its quota (:meth:`moe_utils.compression.caep.PruningBudget.quota`),
                    drawn uniformly (:func:`moe_utils.compression.caep.random_mask`; the registry's ``random``
                    method with seeds 0 .. n_masks - 1);
``random [<method> allocation]``  matched: every layer keeps exactly as many experts as the method
                    kept there (:func:`matched_random_mask`). A global method (CAEP) moves experts
                    between layers; against uniform masks the choice of experts is confounded with
                    how many each layer keeps, against matched masks only the choice differs. For a
                    method that keeps each layer's quota the matched distribution *is* the uniform
                    one (the same masks, seed by seed), so only allocations that differ get their own.

:func:`placement` gives each method's percentile among the masks and its paired difference from the
distribution's mean, resampling the masks *and* the documents (:func:`moe_utils.evaluation.paired.paired_difference`),
so that which masks happened to be drawn is part of the uncertainty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from moe_utils.evaluation import paired
from moe_utils.compression.caep import PruningBudget, random_mask
from moe_utils.evaluation.pruning_eval import measure_spec, measure_values, model_values
from moe_utils.compression.value import Compression

#: The name of the uniform distribution: the registry's random method.
UNIFORM = "random"
#: Matched distributions are named ``random [caep allocation]``.
MATCHED_PREFIX = "random ["
#: How comparisons name the matched reference of a method (:func:`matched_comparisons`).
MATCHED_REFERENCE = "random, same allocation"


def matched_name(method: str) -> str:
    return f"{MATCHED_PREFIX}{method} allocation]"


def is_matched(method: str) -> bool:
    """Whether ``method`` names a matched random distribution (not a method of Table 1)."""
    return method.startswith(MATCHED_PREFIX)


def matched_random_mask(budget: PruningBudget, counts: Sequence[int], seed: int) -> np.ndarray:
    """A random keep-mask that keeps exactly ``counts[l]`` experts of layer ``l``, each layer's
    choice uniform among its subsets of that size. Drawn as :func:`moe_utils.compression.caep.random_mask` draws
    (one uniform score per expert, the highest kept), so that with ``counts`` = the quota it gives
    the same mask for the same seed."""
    counts = np.asarray(counts, dtype=int)
    sizes = np.asarray(budget.layer_sizes)
    if counts.shape != sizes.shape or (counts < 0).any() or (counts > sizes).any():
        raise ValueError(f"counts {counts.tolist()} must give 0..size experts for each of the layers {sizes.tolist()}")
    scores = np.random.default_rng(seed).random(budget.n_experts)
    bounds = budget.bounds()
    keep = np.zeros(budget.n_experts, dtype=bool)
    for layer, n_keep in enumerate(counts):
        rows = np.arange(bounds[layer], bounds[layer + 1])
        best_first = rows[np.lexsort((-rows, -scores[rows]))]
        keep[best_first[:n_keep]] = True
    return keep


def reference_masks(compressions: Sequence[Compression], budget: PruningBudget, ratios: Sequence[float], *,
                    n_masks: int, skip_seeds: Sequence[int] = ()) -> list[Compression]:
    """The masks of both distributions at every ratio: uniform random masks with seeds
    ``0 .. n_masks - 1`` except ``skip_seeds`` (the random masks the stage evaluates anyway), and,
    for each method of ``compressions`` whose per-layer counts differ from the quota at its ratio,
    ``n_masks`` masks with exactly its counts (one distribution per distinct allocation, named after
    the first method that has it)."""
    if n_masks < 2:
        raise ValueError(f"a reference distribution needs at least 2 masks, got {n_masks}")
    out = [Compression(UNIFORM, r, random_mask(budget, r, seed), seed=seed)
           for r in ratios for seed in range(n_masks) if seed not in set(skip_seeds)]
    seen: set[tuple] = set()
    for c in compressions:
        if c.method == UNIFORM or c.ratio not in ratios:
            continue
        counts = budget.kept_per_layer(c.keep)
        key = (c.ratio, tuple(counts.tolist()))
        if np.array_equal(counts, budget.quota(c.ratio)) or key in seen:
            continue
        seen.add(key)
        out += [Compression(matched_name(c.method), c.ratio, matched_random_mask(budget, counts, seed), seed=seed)
                for seed in range(n_masks)]
    return out


def allocations(compressions: Sequence[Compression], budget: PruningBudget) -> dict[tuple[str, float], str]:
    """``{(method, ratio): distribution}``: the matched distribution of each method at each ratio,
    the uniform one where the method keeps the quota."""
    out: dict[tuple[str, float], str] = {}
    named: dict[tuple, str] = {}
    for c in compressions:
        counts = budget.kept_per_layer(c.keep)
        if c.ratio == 0 or np.array_equal(counts, budget.quota(c.ratio)):
            out[(c.method, c.ratio)] = UNIFORM
        else:
            out[(c.method, c.ratio)] = named.setdefault((c.ratio, tuple(counts.tolist())), matched_name(c.method))
    return out


def _better(kind: str, value: float, references: np.ndarray) -> float:
    """Share of ``references`` that ``value`` beats (ties count half), in the measure's direction."""
    sign = 1.0 if kind == "acc" else -1.0
    return float(np.mean(np.sign(sign * (value - references)) * 0.5 + 0.5))


def placement(samples: pd.DataFrame, measures: Sequence[str], distribution: dict[tuple[str, float], str], *,
              n_boot: int = 1000, confidence: float = 0.95) -> pd.DataFrame:
    """Every method of ``distribution`` ({(method, ratio): its reference distribution}, from
    :func:`allocations`) placed in its reference distribution and in the uniform one, per measure
    the distributions were scored on: the method's score, the distribution's mean, minimum and
    maximum, the method's percentile (share of the masks it beats, ties half) and its paired
    difference from the distribution's mean over masks and documents (interval, p-value).
    One row per measure, ratio, method and distribution (``uniform`` or ``matched``)."""
    rows = []
    for measure in measures:
        kind = measure_spec(measure)[0]
        data = measure_values(samples, measure)
        models, values = data["models"], data["values"]
        score = model_values(data, kind)
        for (method, ratio), own in distribution.items():
            if method in (UNIFORM, "unpruned") or is_matched(method):
                continue
            chosen = ((models["method"] == method) & np.isclose(models["ratio"], ratio)).to_numpy()
            if not chosen.any():
                continue
            for label, name in (("uniform", UNIFORM), ("matched", own)):
                if label == "matched" and name == UNIFORM:
                    continue
                ref = ((models["method"] == name) & np.isclose(models["ratio"], ratio)).to_numpy()
                if ref.sum() < 2:
                    continue
                diff = paired.paired_difference(kind, values[ref], values[chosen], strata=data["strata"],
                                                counts=data["counts"], n_boot=n_boot, confidence=confidence)
                rows.append({"measure": measure, "ratio": ratio, "method": method, "distribution": label,
                             "n_masks": int(ref.sum()), "score": float(score[chosen].mean()),
                             "reference_mean": float(score[ref].mean()), "reference_min": float(score[ref].min()),
                             "reference_max": float(score[ref].max()),
                             "percentile": 100 * _better(kind, float(score[chosen].mean()), score[ref]),
                             "estimate": diff.estimate, "low": diff.low, "high": diff.high, "se": diff.se,
                             "mde": diff.mde, "p_value": diff.p_value, "significant": diff.significant,
                             "n_docs": diff.n_docs})
    return pd.DataFrame(rows)


def matched_comparisons(placed: pd.DataFrame) -> pd.DataFrame:
    """The matched rows of :func:`placement` as rows of :func:`moe_utils.evaluation.pruning_eval.comparisons`
    (reference :data:`MATCHED_REFERENCE`), so that Table 1 and the multiplicity correction see them."""
    rows = placed[placed["distribution"] == "matched"]
    columns = ["measure", "method", "ratio", "estimate", "low", "high", "se", "mde", "p_value", "significant",
               "n_docs"]
    return rows[columns].assign(reference=MATCHED_REFERENCE)


def mask_scores(samples: pd.DataFrame, measures: Sequence[str]) -> pd.DataFrame:
    """Every model's score per measure (one row per measure, method, ratio and seed: ``value``), for
    the figure of the distributions."""
    frames = []
    for measure in measures:
        data = measure_values(samples, measure)
        frames.append(data["models"].assign(measure=measure, value=model_values(data, measure_spec(measure)[0])))
    return pd.concat(frames, ignore_index=True)
