"""moe_utils.common.stats against independent truth: scipy's Wilson interval, lm-eval's perplexity
aggregation, brute-force permutation counts, and the null distribution of the diagonal test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from moe_utils.common import stats


# ------------------------------------------------------------------------------- Wilson
@pytest.mark.parametrize("k, n", [(0, 20), (3, 20), (10, 20), (20, 20), (1, 1), (57, 400)])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_wilson_matches_scipy(k, n, confidence):
    low, high = stats.wilson_interval(k, n, confidence)
    ref = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert low == pytest.approx(ref.low, abs=1e-12)
    assert high == pytest.approx(ref.high, abs=1e-12)


def test_wilson_closed_form_and_vectorised():
    # 5 of 10 at 95%: centre 0.5, half-width z sqrt(0.025 + z^2/400) / (1 + z^2/10)
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10)
    low, high = stats.wilson_interval(np.array([5, 0]), np.array([10, 0]))
    assert low[0] == pytest.approx(0.5 - half) and high[0] == pytest.approx(0.5 + half)
    assert np.isnan(low[1]) and np.isnan(high[1])
    low, high = stats.wilson_interval(np.array([0, 7]), np.array([7, 7]))
    assert low[0] == 0.0 and high[1] == 1.0  # exactly: an interval must contain the observed proportion
    with pytest.raises(ValueError, match="successes"):
        stats.wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        stats.wilson_interval(1, 10, confidence=95)


# ------------------------------------------------------------------------------ bootstrap
def test_bootstrap_of_a_mean_matches_the_normal_interval():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    ci = stats.bootstrap_interval(lambda idx: x[idx[0]].mean(), len(x), n_boot=2000, random_state=0)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert ci.estimate == pytest.approx(x.mean())
    assert ci.low == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert ci.high == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)


def test_bootstrap_is_paired_stratified_and_seeded():
    a = np.random.default_rng(2).normal(size=50)
    b = np.random.default_rng(3).normal(size=30)
    # the same documents under two "models" that differ by a constant: a paired difference has no spread
    paired = stats.bootstrap_interval(lambda idx: (a[idx[0]] + 1).mean() - a[idx[0]].mean(), 50, random_state=0)
    assert paired.low == pytest.approx(1.0) and paired.high == pytest.approx(1.0)
    # stratified: each group keeps its own size in every replicate
    seen = []
    stats.bootstrap_interval(lambda idx: seen.append([len(i) for i in idx]) or 0.0, [50, 30], n_boot=5)
    assert all(s == [50, 30] for s in seen)
    one = stats.bootstrap_interval(lambda idx: a[idx[0]].mean() - b[idx[1]].mean(), [50, 30], random_state=7)
    two = stats.bootstrap_interval(lambda idx: a[idx[0]].mean() - b[idx[1]].mean(), [50, 30], random_state=7)
    assert one == two and one.low < one.estimate < one.high
    with pytest.raises(ValueError, match="at least one document"):
        stats.bootstrap_interval(lambda idx: 0.0, [3, 0])


def test_pooled_perplexity_matches_lm_eval_aggregation():
    from lm_eval.api.metrics import weighted_perplexity

    rng = np.random.default_rng(0)
    ll, counts = -rng.uniform(10, 300, size=25), rng.integers(5, 120, size=25)
    assert stats.pooled_perplexity(ll, counts) == pytest.approx(weighted_perplexity(list(zip(ll, counts))))
    with pytest.raises(ValueError, match="no units"):
        stats.pooled_perplexity([0.0], [0])


def test_relative_change_by_hand():
    assert stats.relative_change(12.0, 10.0) == pytest.approx(0.2)
    assert stats.relative_change(0.3, 0.4) == pytest.approx(-0.25)
    out = stats.relative_change([1.0, 2.0], [0.0, 4.0])
    assert np.isnan(out[0]) and out[1] == pytest.approx(-0.5)


# -------------------------------------------------------------------------- diagonal test
def _brute_force_p(m, lower_is_better):
    """Count permutations with a loop over itertools, written independently of the module."""
    k = len(m)
    observed = sum(m[i][i] for i in range(k))
    at_least_as_good = 0
    total = 0
    for perm in itertools.permutations(range(k)):
        value = sum(m[i][perm[i]] for i in range(k))
        good = value <= observed + 1e-9 if lower_is_better else value >= observed - 1e-9
        at_least_as_good += good
        total += 1
    return at_least_as_good / total


def _additive(k, rng):
    return rng.normal(size=(k, 1)) * 3 + rng.normal(size=(1, k)) * 3


def test_planted_diagonal_is_found_despite_row_and_column_effects():
    rng = np.random.default_rng(0)
    m = _additive(5, rng) + 0.05 * rng.normal(size=(5, 5)) - 1.0 * np.eye(5)  # diagonal lower = better
    result = stats.diagonal_permutation_test(m, lower_is_better=True)
    assert result.exact and result.n_permutations == 120
    assert result.p_value == pytest.approx(1 / 120)
    assert result.advantage == pytest.approx(0.8, abs=0.1)  # 1 - 1/k of the planted 1.0
    # the same matrix read with the other direction: the diagonal is the worst
    assert stats.diagonal_permutation_test(m, lower_is_better=False).p_value == pytest.approx(1.0)
    # best-in-column counts raw cells: row effects can hide the diagonal, column effects cannot
    columns_only = rng.normal(size=(1, 5)) * 3 + 0.05 * rng.normal(size=(5, 5)) - np.eye(5)
    assert stats.diagonal_permutation_test(columns_only, lower_is_better=True).n_best_columns == 5


def test_additive_matrix_has_no_diagonal_effect():
    m = _additive(5, np.random.default_rng(1))
    result = stats.diagonal_permutation_test(m, lower_is_better=True)
    assert result.advantage == pytest.approx(0.0, abs=1e-12)
    assert result.p_value == pytest.approx(1.0)  # every permutation ties


def test_shuffled_planted_matrix_is_not_significant():
    rng = np.random.default_rng(2)
    m = 0.05 * rng.normal(size=(5, 5)) - np.eye(5)
    shuffled = m[:, [1, 2, 3, 4, 0]]  # the planted cells are off the diagonal now
    result = stats.diagonal_permutation_test(shuffled, lower_is_better=True)
    assert result.p_value > 0.5 and result.n_best_columns == 0


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_exact_p_matches_brute_force(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        m = rng.integers(0, 4, size=(k, k)).astype(float)  # many ties
        for lower in (True, False):
            got = stats.diagonal_permutation_test(m, lower_is_better=lower).p_value
            assert got == pytest.approx(_brute_force_p(m.tolist(), lower))


def test_p_values_are_calibrated_under_the_null():
    rng = np.random.default_rng(3)
    ps = np.array([stats.diagonal_permutation_test(rng.normal(size=(5, 5)), lower_is_better=True).p_value
                   for _ in range(400)])
    assert 0.02 <= np.mean(ps <= 0.05) <= 0.09  # nominal 0.05 (discrete: multiples of 1/120)
    assert 0.40 <= np.mean(ps <= 0.5) <= 0.60


def test_sampled_permutations_for_many_domains():
    rng = np.random.default_rng(4)
    m = rng.normal(size=(10, 10)) + 3 * np.eye(10)
    result = stats.diagonal_permutation_test(m, lower_is_better=False, random_state=0)
    assert not result.exact and result.n_permutations == 10_000
    assert result.p_value == pytest.approx(1 / 10_001)
    with pytest.raises(ValueError, match="square"):
        stats.diagonal_permutation_test(np.ones((2, 3)), lower_is_better=True)
    with pytest.raises(ValueError, match="NaN"):
        stats.diagonal_permutation_test(np.array([[1.0, np.nan], [0.0, 1.0]]), lower_is_better=True)


# ------------------------------------------------------------------------------ seeds
def test_seed_spread():
    frame = pd.DataFrame({"method": ["random"] * 3 + ["caep"], "seed": [0, 1, 2, 0], "ppl": [10.0, 12.0, 14.0, 9.0]})
    out = stats.seed_spread(frame, "ppl", "method").set_index("method")
    assert out.loc["random", "mean"] == pytest.approx(12.0)
    assert out.loc["random", "std"] == pytest.approx(2.0)
    assert (out.loc["random", "min"], out.loc["random", "max"], out.loc["random", "n_seeds"]) == (10.0, 14.0, 3)
    assert np.isnan(out.loc["caep", "std"])
    with pytest.raises(ValueError, match="not in the frame"):
        stats.seed_spread(frame, "acc", "method")


def test_vectorized_bootstrap_and_batched_helpers():
    rng = np.random.default_rng(5)
    ll, counts = -rng.uniform(10, 300, size=60), rng.integers(5, 120, size=60).astype(float)
    loop = stats.bootstrap_interval(lambda idx: stats.pooled_perplexity(ll[idx[0]], counts[idx[0]]), 60,
                                    n_boot=3000, random_state=0)
    vec = stats.bootstrap_interval(lambda idx: stats.pooled_perplexity(ll[idx[0]], counts[idx[0]]), 60,
                                   n_boot=3000, random_state=0, vectorized=True)
    assert vec.estimate == pytest.approx(stats.pooled_perplexity(ll, counts)) == loop.estimate
    width = loop.high - loop.low
    assert vec.low == pytest.approx(loop.low, abs=0.1 * width) and vec.high == pytest.approx(loop.high, abs=0.1 * width)
    batch = stats.pooled_perplexity(np.stack([ll, ll * 2]), np.stack([counts, counts]))
    assert batch.shape == (2,) and batch[1] == pytest.approx(stats.pooled_perplexity(ll, counts) ** 2)
    mats = rng.normal(size=(4, 3, 3))
    stacked = stats.diagonal_advantage(mats, lower_is_better=True)
    assert stacked.shape == (4,)
    assert stacked[2] == pytest.approx(stats.diagonal_advantage(mats[2], lower_is_better=True))


# ------------------------------------------------------------------------ diagonal power
def test_diagonal_power_is_the_level_without_effect_and_grows_with_it():
    """Without a planted advantage the exact test rejects at its level (6 of 120 permutations at
    most 5%: 0.05); the power rises with the advantage and reaches 1 when noise is negligible."""
    rng = np.random.default_rng(0)
    k = 5
    matrix = rng.normal(size=(k, 1)) + rng.normal(size=(1, k)) + 0.01 * rng.normal(size=(k, k))
    power = stats.diagonal_power(matrix, 0.1, [0.0, 0.05, 0.1, 0.2, 0.5], lower_is_better=True, n_sim=4000)
    assert power["power"].iloc[0] == pytest.approx(0.05, abs=0.015)
    assert np.all(np.diff(power["power"]) >= -0.02) and power["power"].iloc[-1] > 0.99
    assert stats.detectable_advantage(power) in (0.1, 0.2)
    sharp = stats.diagonal_power(matrix, 1e-9, [0.01], lower_is_better=False, n_sim=50)
    assert sharp["power"].iloc[0] == 1.0


def test_diagonal_power_agrees_with_the_test_itself():
    """The vectorised exact test inside diagonal_power gives the p-values of diagonal_permutation_test."""
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(4, 4))
    power = stats.diagonal_power(matrix, 0.5, [0.3], lower_is_better=False, n_sim=300, random_state=3)
    additive = matrix.mean(1, keepdims=True) + matrix.mean(0, keepdims=True) - matrix.mean()
    sims = additive + 0.3 * np.eye(4) + np.random.default_rng(3).normal(size=(300, 4, 4)) * 0.5
    expected = np.mean([stats.diagonal_permutation_test(x, lower_is_better=False).p_value <= 0.05 for x in sims])
    assert power["power"].iloc[0] == pytest.approx(expected)
