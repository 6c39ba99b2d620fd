"""How sure is the paper's Fig 7? Domain cosine similarities with questions resampled, and the
similarity of a domain with itself as the reference.

Tang et al. 2025 (section 5, Fig 7) compare MMLU-Pro domains by the cosine similarity of their
expert-selection frequency distributions (:func:`moe_utils.patterns.annotation.domain_profiles`) and read
off which domains are close. With a few dozen questions per domain the ranking of the pairs can
be noise. This module measures how much, with questions as the unit (the tokens of a question
share its topic and words):

* :func:`similarity_bootstrap`: each domain's questions resampled with replacement (stratified, the
  same draw for every pair), a percentile interval for every pair's cosine, and the share of the
  resamples in which each pair is the closest;
* :func:`split_half`: each domain's questions split at random into two halves, the cosine of the
  two halves (within-domain) and, at the same sample size, of halves of different domains: two
  domains whose cross-domain cosine reaches the within-domain one, in a good share of the splits,
  are as alike as one domain with itself, and their closeness says nothing about the domains.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.common.stats import check_confidence
from moe_utils.capture.store import RoutingStore


def question_selections(store: RoutingStore) -> tuple[np.ndarray, np.ndarray]:
    """(questions, N_e) expert selections of each question's tokens, in sorted ``sample_id`` order,
    and each question's category."""
    if store.tokens["label"].isna().any():
        raise ValueError("some tokens have no label: domain similarity needs the category of every token "
                         "(capture with labels=)")
    counts = expert_matrix(store, "sample", "binary", dtype=np.float64).T.toarray()
    labels = store.tokens.groupby("sample_id", sort=True)["label"].first().to_numpy()
    return counts, labels


def _cosines(profiles: np.ndarray) -> np.ndarray:
    """(..., C, N_e) selection counts -> (..., C, C) cosine similarity of the rows."""
    norms = np.linalg.norm(profiles, axis=-1, keepdims=True)
    unit = np.divide(profiles, norms, out=np.zeros_like(profiles), where=norms > 0)
    return unit @ np.swapaxes(unit, -1, -2)


def _groups(labels) -> tuple[list[str], list[np.ndarray]]:
    labels = np.asarray(labels, dtype=object)
    categories = sorted(pd.unique(labels))
    groups = [np.nonzero(labels == c)[0] for c in categories]
    if len(categories) < 2:
        raise ValueError("domain similarity needs at least two categories")
    return categories, groups


def _pair_index(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def similarity_bootstrap(counts: np.ndarray, labels, *, n_boot: int = 1000, confidence: float = 0.95,
                         random_state=0) -> pd.DataFrame:
    """Every pair of domains: ``cosine`` of their selection distributions (cosine is scale-free, so
    counts need no normalising), its percentile interval (``low``, ``high``) over ``n_boot``
    resamples of each domain's questions, and ``closest_share`` / ``farthest_share``: how often
    the pair is the most / least similar one among the resamples. Sorted most similar first."""
    check_confidence(confidence)
    counts = np.asarray(counts, dtype=np.float64)
    categories, groups = _groups(labels)
    rng = np.random.default_rng(random_state)
    point = _cosines(np.stack([counts[g].sum(axis=0) for g in groups]))
    resampled = np.stack([counts[rng.choice(g, size=(n_boot, len(g)))].sum(axis=1) for g in groups], axis=1)
    a, b = _pair_index(len(categories))
    boot = _cosines(resampled)[:, a, b]  # (n_boot, pairs)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha], axis=0)
    n_pairs = len(a)
    closest = np.bincount(boot.argmax(axis=1), minlength=n_pairs) / n_boot
    farthest = np.bincount(boot.argmin(axis=1), minlength=n_pairs) / n_boot
    frame = pd.DataFrame({"a": np.asarray(categories, dtype=object)[a], "b": np.asarray(categories, dtype=object)[b],
                          "cosine": point[a, b], "low": low, "high": high, "closest_share": closest,
                          "farthest_share": farthest})
    return frame.sort_values(["cosine", "a", "b"], ascending=[False, True, True], kind="stable").reset_index(drop=True)


def split_half(counts: np.ndarray, labels, *, n_splits: int = 1000, confidence: float = 0.95,
               random_state=0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random halves of each domain's questions (``n_splits`` times; an odd question out is left
    out so that both halves have the same size): per domain the cosine of its two halves
    (``within``, mean and the central ``confidence`` range over the splits), and per pair of domains
    the cosine of their first halves (``cross``, the same sample size) with ``below_within``, the
    share of splits in which it is lower than both domains' split-half cosines of the same split.
    Domains need two questions."""
    check_confidence(confidence)
    counts = np.asarray(counts, dtype=np.float64)
    categories, groups = _groups(labels)
    if min(len(g) for g in groups) < 2:
        raise ValueError("a split-half reference needs at least two questions in every category")
    rng = np.random.default_rng(random_state)
    first, second = [], []
    for g in groups:
        order = rng.permuted(np.broadcast_to(g, (n_splits, len(g))), axis=1)
        half = len(g) // 2
        first.append(counts[order[:, :half]].sum(axis=1))
        second.append(counts[order[:, half:2 * half]].sum(axis=1))
    first, second = np.stack(first, axis=1), np.stack(second, axis=1)  # (n_splits, C, N_e)
    norms = np.linalg.norm(first, axis=-1) * np.linalg.norm(second, axis=-1)
    within = np.divide((first * second).sum(axis=-1), norms, out=np.zeros(norms.shape), where=norms > 0)
    a, b = _pair_index(len(categories))
    cross = _cosines(first)[:, a, b]
    below = (cross < np.minimum(within[:, a], within[:, b])).mean(axis=0)
    alpha = (1 - confidence) / 2

    def summary(values):
        low, high = np.quantile(values, [alpha, 1 - alpha], axis=0)
        return {"cosine": values.mean(axis=0), "low": low, "high": high}

    names = np.asarray(categories, dtype=object)
    within_frame = pd.DataFrame({"domain": names, **summary(within)})
    cross_frame = pd.DataFrame({"a": names[a], "b": names[b], **summary(cross), "below_within": below})
    return within_frame, cross_frame


def closeness_values(pairs: pd.DataFrame, within: pd.DataFrame, cross: pd.DataFrame, *,
                     confidence: float = 0.95) -> dict:
    """The numbers a page glues: the closest pair's cosine with its interval and the share of
    resamples in which it is closest (%); at half size, its cosine beside the lower of its two
    domains' split-half cosines and the share of splits (%) in which it stays below both; and a
    verdict: the pair is told apart from a domain's likeness with itself only when it stays below
    in at least ``confidence`` of the splits."""
    top = pairs.iloc[0]
    half = cross.set_index(["a", "b"]).loc[(top["a"], top["b"])]
    own = within.set_index("domain").loc[[top["a"], top["b"]]].sort_values("cosine").iloc[0]
    below = float(half["below_within"])
    verdict = ("both domains are more alike to themselves than to each other" if below >= confidence else
               "the two domains are not more different from each other than each is from itself")
    return {"closest_low": float(top["low"]), "closest_high": float(top["high"]),
            "closest_share": float(top["closest_share"] * 100), "closest_half_cos": float(half["cosine"]),
            "within_pair_domain": str(own.name), "within_pair_cos": float(own["cosine"]),
            "within_pair_low": float(own["low"]), "within_pair_high": float(own["high"]),
            "below_within_share": below * 100, "within_verdict": verdict}
