"""How much CAEP's mask depends on its inputs: the dictionary refitted on resampled calibration sets
and with other HSDL seeds.

CAEP (the paper's Algorithm 1, section 4) reads every expert's contribution off one HSDL fit of one
routing matrix X. Both are random: the calibration questions are a sample, and HSDL's fit depends
on its seed (initial atoms, batch order). :func:`caep_refits` refits the dictionary with stage 2's
settings on ``n_resamples`` bootstrap resamples of the questions (all tokens of a question drawn
together, with replacement) and with each seed of ``seeds``, and runs CAEP on each refit at the
same ratio and threshold; :func:`mask_movement` says how far each refit's mask is from the stage's
(Jaccard overlap of the pruned experts, experts that change side). The stage then scores the refit
masks like every other mask, so that the spread of their scores can be set beside the differences
between methods. Refits are cached by :func:`moe_utils.compression.ablation.refit`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.base import clone

from moe_utils.compression.ablation import VARIANT_PREFIX, refit
from moe_utils.compression.caep import PruningBudget, caep
from moe_utils.compression.value import Compression
from moe_utils.compression.pruning import hsdl_factors

#: Refit masks are named like the ablation's variants (``caep [HSDL seed 1]``), so Table 1 leaves them out.
REFIT_PREFIX = VARIANT_PREFIX


def resampled_columns(column_questions, seed: int) -> np.ndarray:
    """Column indices of a bootstrap resample of the questions: as many questions as there are, drawn
    with replacement, each bringing all its columns (a question drawn twice brings them twice)."""
    questions = np.asarray(column_questions)
    unique = np.unique(questions)
    drawn = np.random.default_rng(seed).choice(unique, size=len(unique), replace=True)
    by_question = {q: np.flatnonzero(questions == q) for q in unique}
    return np.concatenate([by_question[q] for q in drawn])


def caep_refits(hsdl, X, column_questions, ratio: float, *, budget: PruningBudget, threshold_ratio: float,
                level: int = 1, seeds: Sequence[int] = (1, 2), n_resamples: int = 2,
                cache_dir: str | os.PathLike) -> pd.DataFrame:
    """CAEP's mask at ``ratio`` from dictionaries refitted with stage 2's settings: one per HSDL seed
    of ``seeds`` (on the same X) and one per bootstrap resample of the questions (the stage's seed);
    one row per refit with ``input`` (``HSDL seed`` or ``calibration resample``), ``setting`` and
    ``mask`` (a :class:`~moe_utils.compression.value.Compression`)."""
    X = sp.csc_matrix(X)
    levels = hsdl.get_params()["levels"]
    base_seed = hsdl.get_params()["random_state"]
    rows = []

    def mask(fitted, label):
        result = caep(*hsdl_factors(fitted, level=level), threshold_ratio, ratio, budget=budget)
        return Compression(f"{REFIT_PREFIX}{label}]", ratio, result.keep, note=result.note)

    for seed in seeds:
        if base_seed is not None and seed == int(base_seed):
            continue
        fitted = refit(X, clone(hsdl).set_params(random_state=int(seed)), levels, cache_dir)
        rows.append(("HSDL seed", f"seed {seed}", mask(fitted, f"HSDL seed {seed}")))
    for i in range(n_resamples):
        columns = resampled_columns(column_questions, seed=i)
        fitted = refit(X[:, columns], hsdl, levels, cache_dir)
        rows.append(("calibration resample", f"resample {i + 1}", mask(fitted, f"calibration resample {i + 1}")))
    return pd.DataFrame(rows, columns=["input", "setting", "mask"])


def jaccard_pruned(a, b) -> float:
    """Jaccard overlap of the experts two keep-masks prune (1: the same experts; 1 when neither prunes)."""
    pa, pb = ~np.asarray(a, dtype=bool), ~np.asarray(b, dtype=bool)
    union = (pa | pb).sum()
    return float((pa & pb).sum() / union) if union else 1.0


def mask_movement(refits: pd.DataFrame, reference: Compression, budget: PruningBudget) -> pd.DataFrame:
    """Per refit: the Jaccard overlap of its pruned experts with ``reference``'s (the stage's CAEP;
    column ``Jaccard of pruned experts``),
    how many experts change side, and its experts kept per layer next to the reference's."""
    rows = []
    for source, setting, c in refits.itertuples(index=False):
        rows.append({"input": source, "setting": setting, "method": c.method,
                     "Jaccard of pruned experts": jaccard_pruned(c.keep, reference.keep),
                     "experts that change side": int((c.keep != reference.keep).sum()),
                     "pruned": f"{c.pruned_share:.0%}",
                     "kept per layer": " ".join(map(str, budget.kept_per_layer(c.keep))),
                     "stage's CAEP per layer": " ".join(map(str, budget.kept_per_layer(reference.keep)))})
    return pd.DataFrame(rows)


def score_spread(scores: pd.DataFrame, refits: pd.DataFrame, reference: str, ratio: float) -> pd.DataFrame:
    """Per measure: the stage's CAEP score and the refits' scores (min, max) at ``ratio``, from
    :func:`moe_utils.compression.reference.mask_scores` (``method, ratio, measure, value``)."""
    names = [c.method for c in refits["mask"]]
    at = scores[np.isclose(scores["ratio"], ratio)]
    rows = []
    for measure, part in at.groupby("measure", sort=False):
        own = part.loc[part["method"] == reference, "value"]
        moved = part.loc[part["method"].isin(names), "value"]
        if own.empty or moved.empty:
            continue
        rows.append({"measure": measure, "stage's CAEP": float(own.iloc[0]), "refits: min": float(moved.min()),
                     "refits: max": float(moved.max()), "refits": len(moved)})
    return pd.DataFrame(rows)
