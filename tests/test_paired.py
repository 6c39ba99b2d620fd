"""Tests of moe_utils.evaluation.paired: the paired bootstrap against exact enumeration, the MDE against simulation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moe_utils.evaluation import paired


def test_bootstrap_se_matches_exact_enumeration_of_resamples():
    """With 4 documents there are 4^4 equally likely resamples: their exact standard deviation of the
    mean paired difference is what the bootstrap's SE must approach."""
    a = np.array([1, 0, 1, 0], float)
    b = np.array([1, 1, 0, 1], float)
    d = b - a
    exact = np.array([d[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])
    got = paired.paired_difference("acc", a, b, n_boot=40_000, random_state=1)
    assert got.estimate == pytest.approx(0.25)
    assert got.se == pytest.approx(exact.std(), rel=0.02)
    assert got.low == pytest.approx(np.quantile(exact, 0.025), abs=1e-9)
    assert got.high == pytest.approx(np.quantile(exact, 0.975), abs=1e-9)


def test_macro_accuracy_over_strata_and_stratified_se():
    """Two strata of different sizes: the estimate is the unweighted mean of the two strata's
    differences; the SE is that of the mean of two independent stratum means (analytic)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 300).astype(float)
    b = a.copy()
    flip = rng.random(300) < 0.3
    b[flip] = 1 - b[flip]
    strata = np.array(["x"] * 100 + ["y"] * 200)
    got = paired.paired_difference("acc", a, b, strata=strata, n_boot=20_000, random_state=2)
    d = b - a
    assert got.estimate == pytest.approx((d[:100].mean() + d[100:].mean()) / 2)
    analytic = 0.5 * np.sqrt(d[:100].var() / 100 + d[100:].var() / 200)
    assert got.se == pytest.approx(analytic, rel=0.05)


def test_perplexity_ratio_is_pooled_word_perplexity():
    ll_a = np.array([-100.0, -50.0, -30.0])
    ll_b = np.array([-110.0, -60.0, -30.0])
    words = np.array([40.0, 20.0, 10.0])
    got = paired.paired_difference("ppl", ll_a, ll_b, counts=words, n_boot=200)
    assert got.estimate == pytest.approx(np.exp(200 / 70) / np.exp(180 / 70) - 1)


def test_seeds_average_and_widen_the_interval():
    """B given as 3 seeds that disagree (one better, one equal, one worse than A): the estimate
    is the mean over seeds; resampling the seeds widens the interval compared with the per-document
    mean over seeds taken as one model."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 400).astype(float)
    touched = rng.random(400) < 0.4
    seeds = np.stack([np.where(touched, 1.0, a), a, np.where(touched, 0.0, a)])
    got = paired.paired_difference("acc", a, seeds, n_boot=4000, random_state=0)
    assert got.estimate == pytest.approx((seeds - a).mean())
    one = paired.paired_difference("acc", a, seeds.mean(axis=0), n_boot=4000, random_state=0)
    assert one.estimate == pytest.approx(got.estimate)
    assert got.se > 2 * one.se


def test_mde_has_the_stated_power_in_simulation():
    """Plant a true paired accuracy difference equal to the MDE computed on one sample; a z-test at 5%
    on fresh samples of the same size must reject about 80% of the time."""
    rng = np.random.default_rng(4)
    n, discord = 2000, 0.3
    def sample(delta):  # paired 0/1 outcomes: discordant pairs favour B with probability (1 + delta/discord)/2
        a = rng.integers(0, 2, n).astype(float)
        b = a.copy()
        flip = rng.random(n) < discord
        up = rng.random(n) < 0.5 + delta / (2 * discord)
        b[flip] = np.where(up[flip], 1.0, 0.0)
        a[flip] = 1 - b[flip]
        return a, b
    first = paired.paired_difference("acc", *sample(0.0), n_boot=2000, random_state=5)
    delta = first.mde
    rejections = []
    for _ in range(400):
        a, b = sample(delta)
        d = b - a
        rejections.append(abs(d.mean()) / (d.std(ddof=1) / np.sqrt(n)) > 1.959964)
    assert np.mean(rejections) == pytest.approx(0.8, abs=0.07)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same documents"):
        paired.paired_difference("acc", np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="counts"):
        paired.paired_difference("ppl", np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="kind"):
        paired.paired_difference("bleu", np.zeros(3), np.zeros(3))
