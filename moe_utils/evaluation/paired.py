"""Paired comparisons of pruned models: bootstrap intervals of differences and what they can detect.

Every pruned model of the study is scored on the same BLiMP pairs and WikiText-2 articles, so a
difference between two models is estimated from per-document differences (paired), which is far
more precise than comparing two separately noisy scores. :func:`paired_difference` resamples the
documents (within BLiMP paradigms: stratified) *and*, for a method with several random seeds, the
seeds, with the same document indices for both models; it returns the percentile interval of the
difference, its bootstrap standard error and the minimum detectable difference (MDE) at that
sample size: the true difference a two-sided test at level ``1 - confidence`` would detect with
probability ``power`` (normal approximation: (z_{1-alpha/2} + z_power) x SE, :func:`mde`).

Two statistics (the paper's Table 1 columns, section 4, on the embedded model's tasks):

``acc``  BLiMP macro accuracy (mean over paradigms) of model B minus model A, in accuracy units.
``ppl``  pooled word perplexity of B over A, minus 1 (a relative change: 0.10 = 10% worse).
``bpb``  pooled bits per byte of B minus A (``counts``: the bytes of each document), the one
         measure of MMLU-Pro question text every page reports.

Each difference also carries a two-sided p-value (:attr:`PairedDifference.p_value`: the estimate
over its bootstrap standard error, normal approximation) for the multiplicity correction of the
secondary comparisons (:func:`moe_utils.common.stats.holm`); the percentile bootstrap cannot give p-values
small enough for a family of dozens of comparisons with a thousand replicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from moe_utils.common.stats import check_confidence

KINDS = ("acc", "ppl", "bpb")


@dataclass(frozen=True)
class PairedDifference:
    """B minus A (``acc``, ``bpb``) or B over A minus 1 (``ppl``) with its interval, standard error and MDE."""

    kind: str
    estimate: float
    low: float
    high: float
    se: float
    mde: float
    n_docs: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return bool(self.low > 0 or self.high < 0)

    @property
    def p_value(self) -> float:
        """Two-sided p-value of "no difference": 2 (1 - Phi(|estimate| / se)); 1 when se is 0 and the
        estimate is 0, 0 when se is 0 and it is not."""
        return wald_p_value(self.estimate, self.se)


def wald_p_value(estimate, se) -> float:
    """Two-sided normal-approximation p-value of ``estimate`` with standard error ``se``."""
    if se <= 0:
        return 1.0 if estimate == 0 else 0.0
    return float(2 * ndtr(-abs(estimate) / se))


def mde(se, *, confidence: float = 0.95, power: float = 0.8):
    """Minimum detectable difference of a two-sided test at level ``1 - confidence`` with
    probability ``power``, for an estimate with standard error ``se``: (z_{1-alpha/2} + z_power) se."""
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    check_confidence(confidence)
    return (ndtri(0.5 + confidence / 2) + ndtri(power)) * np.asarray(se, dtype=float)


def _as_seeds(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[None, :] if v.ndim == 1 else v


def paired_difference(kind: str, a, b, *, strata=None, counts=None, n_boot: int = 1000, confidence: float = 0.95,
                      power: float = 0.8, random_state=0) -> PairedDifference:
    """Paired bootstrap of a difference between model A (the reference) and model B on the same documents.

    Args:
        kind: ``"acc"`` (``a``, ``b``: per-document correctness 0/1), ``"ppl"`` (``a``, ``b``:
            per-document log-likelihoods in nats, ``counts``: the words of each document) or ``"bpb"``
            (the same with ``counts`` the bytes of each document).
        a, b: shape (n_docs,) for one model, or (n_seeds, n_docs) for random masks of several seeds
            (the model's score is then the mean over seeds: of accuracies, of log-perplexities);
            seeds are resampled with the documents.
        strata: per-document group labels (BLiMP paradigms) for ``acc``: the statistic is the mean
            over strata of each stratum's accuracy (macro average), and documents are resampled
            within strata. None: one stratum.
        n_boot, confidence, power, random_state: bootstrap replicates, interval coverage, the power
            of the MDE, the seed.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    a, b = _as_seeds(a), _as_seeds(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"A and B were scored on {a.shape[1]} and {b.shape[1]} documents: a paired comparison "
                         "needs the same documents")
    n = a.shape[1]
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    rng = np.random.default_rng(random_state)
    if kind == "acc":
        labels = np.zeros(n, dtype=int) if strata is None else pd.factorize(np.asarray(strata))[0]
        groups = [np.flatnonzero(labels == g) for g in range(labels.max() + 1)]
    else:
        if counts is None:
            raise ValueError(f"kind {kind!r} needs counts (the words or bytes of each document)")
        counts = np.asarray(counts, dtype=float)
        if counts.shape != (n,):
            raise ValueError(f"counts has shape {counts.shape}, expected ({n},)")
        groups = [np.arange(n)]

    def score(values, seed_rows, idx):
        """Macro score of one model: seed_rows (R, S') drawn seeds, idx per group (R, n_g) documents."""
        per_group = []
        for docs, i in zip(groups, idx):
            chosen = docs[i]                                      # (R, n_g)
            v = values[seed_rows[:, :, None], chosen[:, None, :]]  # (R, S', n_g)
            if kind == "acc":
                per_group.append(v.mean(axis=2))                  # accuracy of the group, per seed
            else:                                                 # log perplexity per word or byte, per seed
                per_group.append(-v.sum(axis=2) / counts[chosen].sum(axis=1)[:, None])
        return np.mean(per_group, axis=0).mean(axis=1)            # macro over groups, mean over seeds

    def difference(seeds_a, seeds_b, idx):
        sa, sb = score(a, seeds_a, idx), score(b, seeds_b, idx)
        if kind == "acc":
            return sb - sa
        return np.expm1(sb - sa) if kind == "ppl" else (sb - sa) / np.log(2)

    everything = [np.arange(len(g))[None, :] for g in groups]
    estimate = float(difference(np.arange(a.shape[0])[None, :], np.arange(b.shape[0])[None, :], everything)[0])
    replicates = difference(rng.integers(0, a.shape[0], size=(n_boot, a.shape[0])),
                            rng.integers(0, b.shape[0], size=(n_boot, b.shape[0])),
                            [rng.integers(0, len(g), size=(n_boot, len(g))) for g in groups])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    se = float(np.std(replicates, ddof=1))
    return PairedDifference(kind, estimate, float(low), float(high), se,
                            float(mde(se, confidence=confidence, power=power)), n)
