"""Uncertainty for the study's comparisons: binomial and bootstrap intervals, the diagonal test.

The paper (Tang et al. 2025, section 5, Fig 9) reports single numbers: an accuracy per pruned
model and a domain x domain heatmap whose diagonal "should be best". This module supplies what a
reader needs to believe such numbers:

* :func:`wilson_interval`: the Wilson score interval of a binomial proportion (an accuracy over
  n questions);
* :func:`bootstrap_interval`: percentile bootstrap of any statistic of one or several groups of
  documents, resampled within each group with the same indices for every quantity measured on
  that group (paired: an original and a pruned model scored on the same questions);
* :func:`pooled_perplexity` and :func:`relative_change`: the quantities the heatmaps show;
* :func:`diagonal_permutation_test`: is the diagonal of a square matrix (target domain x evaluated
  domain) better than chance? The statistic is the diagonal's mean; the null distribution permutes
  the domain labels of the columns. Every permutation uses each row and each column exactly once,
  so additive row effects (one pruning hurts everything) and column effects (one domain is fragile
  under any pruning) cancel: only the interaction "pruned for d, evaluated on d" is tested;
* :func:`seed_spread`: mean, standard deviation and range of a quantity over random seeds;
* :func:`holm`: Holm's step-down adjustment of a family of p-values (the secondary comparisons of
  stage 4, whose one primary endpoint is tested alone).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import ndtri

#: Enumerate all k! permutations up to this k; sample permutations above it.
EXACT_MAX_K = 8


# ------------------------------------------------------------------------------- binomial
def wilson_interval(successes, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval ``(low, high)`` of the proportion ``successes / n`` (vectorised).

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at 0 or n
    successes, which matters for the small model's accuracies near chance. NaN where ``n == 0``.
    """
    check_confidence(confidence)
    k = np.asarray(successes, dtype=float)
    n = np.asarray(n, dtype=float)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError(f"successes must lie in [0, n]; got successes={successes!r}, n={n!r}")
    z = ndtri(0.5 + confidence / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = np.where(k == 0, 0.0, np.clip(centre - half, 0, 1))  # exact ends: rounding must not exclude 0 or 1
    high = np.where(k == n, 1.0, np.clip(centre + half, 0, 1))
    return np.where(n > 0, low, np.nan), np.where(n > 0, high, np.nan)


# ------------------------------------------------------------------------------ bootstrap
@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval (``low``, ``high``) at ``confidence``."""

    estimate: float
    low: float
    high: float
    confidence: float

    def __str__(self) -> str:
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}]"


def bootstrap_interval(statistic: Callable[[list[np.ndarray]], Any], sizes: Sequence[int] | int, *,
                       n_boot: int = 1000, confidence: float = 0.95, random_state=None,
                       vectorized: bool = False) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over documents resampled within groups.

    Args:
        statistic: called with one index array per group (``len(sizes)`` arrays, the documents
            drawn from each group); returns a number. It is first called with the identity
            indices: that value is the point estimate. Everything measured on the same documents
            (an original and a pruned model) must be indexed with the same array: paired.
        sizes: number of documents in each group (an int for a single group). Groups are resampled
            independently (stratified), each with replacement to its own size.
        n_boot: bootstrap replicates.
        confidence: coverage of the two-sided percentile interval.
        random_state: seed or ``numpy.random.Generator``.
        vectorized: ``statistic`` takes index arrays of shape (replicates, group size), one row per
            replicate, and returns one value per row; all replicates are then drawn at once.
    """
    check_confidence(confidence)
    sizes = [int(sizes)] if np.isscalar(sizes) else [int(s) for s in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"every group needs at least one document; got sizes {sizes}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(random_state)
    if vectorized:
        estimate = float(np.asarray(statistic([np.arange(s)[None, :] for s in sizes])).reshape(-1)[0])
        replicates = np.asarray(statistic([rng.integers(0, s, size=(n_boot, s)) for s in sizes]), dtype=float)
    else:
        estimate = float(statistic([np.arange(s) for s in sizes]))
        replicates = np.array([statistic([rng.integers(0, s, size=s) for s in sizes]) for _ in range(n_boot)],
                              dtype=float)
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return Interval(estimate, math.nan, math.nan, confidence)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return Interval(estimate, float(low), float(high), confidence)


def pooled_perplexity(loglikelihoods, counts):
    """``exp(-sum(loglikelihood) / sum(count))``: the perplexity of a set of documents per unit
    counted (bytes: lm-eval's ``byte_perplexity``; words: ``word_perplexity``). Sums run over the
    last axis: a 2-D input gives one perplexity per row (e.g. per bootstrap replicate)."""
    ll = np.asarray(loglikelihoods, dtype=float)
    c = np.asarray(counts, dtype=float)
    if ll.shape != c.shape:
        raise ValueError(f"loglikelihoods {ll.shape} and counts {c.shape} must have the same shape")
    total = c.sum(axis=-1)
    if np.any(total <= 0):
        raise ValueError("the documents count no units (sum of counts <= 0): no perplexity")
    out = np.exp(-ll.sum(axis=-1) / total)
    return float(out) if out.ndim == 0 else out


def relative_change(new, old):
    """``(new - old) / old``, elementwise; NaN where ``old`` is 0 (no relative change exists)."""
    new, old = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(old != 0, (new - old) / old, np.nan)
    return out if out.ndim else float(out)


# ------------------------------------------------------------------------ diagonal test
@dataclass(frozen=True)
class DiagonalTest:
    """Result of :func:`diagonal_permutation_test`.

    Attributes:
        k: number of domains (the matrix is k x k).
        diagonal_mean: mean of the diagonal (the statistic).
        null_mean: mean of the statistic over all permutations (= sum of all entries / k^2).
        advantage: ``diagonal_mean - null_mean``, signed so that positive means the diagonal is
            better (lower when ``lower_is_better``).
        p_value: one-sided: the share of permutations whose statistic is at least as good as the
            diagonal's (the identity included), so never below 1 / k!.
        n_best_columns: columns (evaluated domains) whose diagonal entry is strictly the best of
            the column, as the heatmap shows it (descriptive: a pruning that is better for
            everything, a row effect, can win a column it was not fitted for).
        n_permutations: permutations compared; ``exact`` when all k! were enumerated.
        lower_is_better: the direction used.
    """

    k: int
    diagonal_mean: float
    null_mean: float
    advantage: float
    p_value: float
    n_best_columns: int
    n_permutations: int
    exact: bool
    lower_is_better: bool


def diagonal_advantage(matrix, *, lower_is_better: bool):
    """Mean diagonal minus the mean over all permutations (trace / k - total / k^2), positive when
    the diagonal is better; 0 for any matrix of additive row + column effects. A stack of matrices
    (..., k, k) gives one value per matrix."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"expected square (domains x domains) matrices, got shape {m.shape}")
    k = m.shape[-1]
    value = np.trace(m, axis1=-2, axis2=-1) / k - m.sum(axis=(-2, -1)) / k**2
    value = -value if lower_is_better else value
    return float(value) if np.ndim(value) == 0 else value


def diagonal_permutation_test(matrix, *, lower_is_better: bool, n_permutations: int | None = None,
                              random_state=None) -> DiagonalTest:
    """Is the diagonal of ``matrix`` (rows: the domain pruned for; columns: the domain evaluated, in
    the same order) better than the domain labels permuted? (The paper's Fig 9 claim.)

    The statistic is the mean of ``matrix[i, pi(i)]``; the null permutes the column labels. For
    k <= 8 all k! permutations are enumerated (exact p-value); otherwise ``n_permutations``
    (default 10,000) random ones are drawn and p = (1 + #{at least as good}) / (1 + n).
    """
    m = _square(matrix)
    k = m.shape[0]
    if k < 2:
        raise ValueError("a diagonal test needs at least 2 domains")
    sign = -1.0 if lower_is_better else 1.0
    observed = sign * np.trace(m) / k
    tol = 1e-12 * max(1.0, float(np.abs(m).max()))
    rows = np.arange(k)
    if k <= EXACT_MAX_K and n_permutations is None:
        perms = np.array(list(itertools.permutations(range(k))))
        stats = sign * m[rows, perms].mean(axis=1)
        p_value = float(np.mean(stats >= observed - tol))
        count, exact = len(perms), True
    else:
        rng = np.random.default_rng(random_state)
        count = int(n_permutations or 10_000)
        perms = np.array([rng.permutation(k) for _ in range(count)])
        stats = sign * m[rows, perms].mean(axis=1)
        p_value = float((1 + np.sum(stats >= observed - tol)) / (1 + count))
        exact = False
    better = m if not lower_is_better else -m
    best_columns = sum(int(better[j, j] > np.delete(better[:, j], j).max()) for j in range(k))
    return DiagonalTest(
        k=k, diagonal_mean=float(np.trace(m) / k), null_mean=float(m.sum() / k**2),
        advantage=diagonal_advantage(m, lower_is_better=lower_is_better), p_value=p_value,
        n_best_columns=best_columns, n_permutations=count, exact=exact, lower_is_better=lower_is_better,
    )


# ------------------------------------------------------------------------------ seeds
def seed_spread(frame: pd.DataFrame, value: str, by: Sequence[str] | str) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1; NaN for one seed), min, max and number of seeds of
    ``value`` for each group of ``by`` (one row per seed in ``frame``)."""
    missing = [c for c in [value, *([by] if isinstance(by, str) else by)] if c not in frame.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the frame (columns: {list(frame.columns)})")
    grouped = frame.groupby(by, sort=False)[value]
    return grouped.agg(mean="mean", std="std", min="min", max="max", n_seeds="count").reset_index()


# ------------------------------------------------------------------------------ helpers
def holm(p_values) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values of one family of tests: sort the m p-values
    ascending, multiply the i-th smallest (i from 0) by m - i, carry the running maximum forward and
    cap at 1. Rejecting where the adjusted value is at most alpha controls the family-wise error rate
    at alpha under any dependence between the tests. NaN p-values are left out of the family and
    stay NaN."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values must be one-dimensional, got shape {p.shape}")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    scaled = p[order] * (m - np.arange(m))
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


def check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def _square(matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square (domains x domains) matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("the matrix has NaN or infinite entries: every (target, evaluated) cell is needed")
    return m


# ------------------------------------------------------------------------ diagonal power
def diagonal_power(matrix, se, advantages: Sequence[float], *, lower_is_better: bool, n_sim: int = 1000,
                   alpha: float = 0.05, random_state=0) -> pd.DataFrame:
    """How often :func:`diagonal_permutation_test` detects a planted diagonal advantage.

    The measured ``matrix`` (rows: the domain pruned for; columns: the domain evaluated) is reduced
    to its additive part (row + column effects, no diagonal effect: the null), each cell gets
    normal noise with its measured standard error ``se`` (a matrix, e.g. from the cells'
    bootstrap intervals: the per-question variance), and the diagonal is moved by ``advantage``
    in the better direction. Returns ``advantage, power`` (share of ``n_sim`` simulated matrices
    with p <= ``alpha``). Cells are simulated independently: noise shared by a column (the same
    questions) is an additive column effect, which the test ignores.
    """
    m = _square(matrix)
    s = np.broadcast_to(np.asarray(se, dtype=float), m.shape)
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("se must be finite and >= 0 for every cell")
    additive = m.mean(axis=1, keepdims=True) + m.mean(axis=0, keepdims=True) - m.mean()
    k = m.shape[0]
    rng = np.random.default_rng(random_state)
    sign = -1.0 if lower_is_better else 1.0
    perms = np.array(list(itertools.permutations(range(k)))) if k <= EXACT_MAX_K else None
    rows = []
    for advantage in advantages:
        sims = additive + sign * float(advantage) * np.eye(k) + rng.normal(size=(n_sim, k, k)) * s
        if perms is not None:  # the exact test, vectorised over simulations
            stats_ = sign * sims[:, np.arange(k), perms].mean(axis=2)  # (n_sim, k!)
            observed = sign * np.trace(sims, axis1=1, axis2=2) / k
            p = (stats_ >= observed[:, None] - 1e-12).mean(axis=1)
        else:
            p = np.array([diagonal_permutation_test(x, lower_is_better=lower_is_better, n_permutations=999,
                                                    random_state=rng).p_value for x in sims])
        rows.append({"advantage": float(advantage), "power": float((p <= alpha).mean())})
    return pd.DataFrame(rows)


def detectable_advantage(power: pd.DataFrame, target: float = 0.8) -> float:
    """The smallest advantage of :func:`diagonal_power`'s grid detected with at least ``target``
    power (NaN when none is)."""
    hit = power[power["power"] >= target]
    return float(hit["advantage"].min()) if not hit.empty else math.nan
