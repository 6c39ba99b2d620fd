"""Holm's step-down adjustment (moe_utils.common.stats.holm) against a hand-worked case and statsmodels,
and the p-values of paired differences (moe_utils.evaluation.paired) it is applied to."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from moe_utils.evaluation import paired
from moe_utils.common.stats import holm


def test_holm_hand_worked():
    """m = 4, p = (0.01, 0.04, 0.03, 0.005). Sorted: 0.005, 0.01, 0.03, 0.04, times 4, 3, 2, 1:
    0.02, 0.03, 0.06, 0.04; running maximum: 0.02, 0.03, 0.06, 0.06; back in the input order."""
    got = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(got, [0.03, 0.06, 0.06, 0.02])
    # at alpha 0.05 Holm rejects the two smallest; Bonferroni (x4) would reject only 0.005 and 0.01
    assert (got < 0.05).tolist() == [True, False, False, True]


def test_holm_caps_at_one_keeps_nan_out_and_refuses_bad_input():
    got = holm([0.5, np.nan, 0.9])
    assert np.isnan(got[1])
    np.testing.assert_allclose(got[[0, 2]], [1.0, 1.0])  # 0.5 x 2 = 1.0; 0.9 x 1 -> max(1.0, 0.9)
    assert holm([]).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.2])


def test_holm_matches_statsmodels():
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = rng.random(rng.integers(1, 40)) ** 3
        reject, adjusted, _, _ = multipletests(p, alpha=0.05, method="holm")
        np.testing.assert_allclose(holm(p), adjusted, rtol=1e-12)
        assert ((holm(p) <= 0.05) == reject).all()


def test_paired_p_value_is_the_normal_approximation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 400).astype(float)
    b = np.where(rng.random(400) < 0.2, 1 - a, a)
    diff = paired.paired_difference("acc", a, b, n_boot=2000, random_state=1)
    assert diff.p_value == pytest.approx(2 * norm.sf(abs(diff.estimate) / diff.se))
    assert paired.wald_p_value(0.0, 0.0) == 1.0 and paired.wald_p_value(0.1, 0.0) == 0.0


def test_bits_per_byte_difference_is_hand_computed():
    """bpb: pooled nats over bytes, in bits; B minus A."""
    ll_a, ll_b = np.array([-10.0, -30.0]), np.array([-12.0, -33.0])
    n_bytes = np.array([20.0, 50.0])
    diff = paired.paired_difference("bpb", ll_a, ll_b, counts=n_bytes, n_boot=200)
    expected = (45 / 70 - 40 / 70) / np.log(2)
    assert diff.estimate == pytest.approx(expected)
    assert diff.low <= diff.estimate <= diff.high
