"""Domain enrichment of atoms with questions as the unit and holding the token fixed, on planted
truth: per-token atom assignments drawn with known probabilities, scored by
:func:`moe_utils.patterns.annotation.enrichment` (token, question and token-type units), and the
Mantel-Haenszel sums against scipy's hypergeometric moments and a case computed by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moe_utils.patterns import annotation as an
from moe_utils.patterns.stratified import cmh_enrichment

CATEGORIES = ("law", "math", "physics", "psychology")


def questions(rng, lengths, p_atom, *, token_ids=None):
    """Tokens of questions (one per entry of ``lengths``, categories in turn), each assigned to atom 0
    with probability ``p_atom(question, category, token_id)``, else to atom 1 or 2 at random."""
    rows = []
    for question, length in enumerate(lengths):
        category = CATEGORIES[question % len(CATEGORIES)]
        ids = token_ids(question, category, length) if token_ids else rng.integers(0, 50, length)
        for token_id in ids:
            atom = 0 if rng.random() < p_atom(question, category, token_id) else int(rng.integers(1, 3))
            rows.append({"sample_id": question, "label": category, "token_id": int(token_id), "atom": atom})
    return pd.DataFrame(rows)


def q_values(tokens, unit):
    table = an.enrichment(tokens["atom"], tokens["label"], 3, sample_ids=tokens["sample_id"],
                          strata=tokens["token_id"], unit=unit)
    return table.set_index(["atom", "category"])["q"]


def test_question_level_enrichment_is_detected():
    """Atom 0 explains 40% of every math question's tokens and 10% elsewhere: every test finds
    (atom 0, math), and atom 0 in no other category."""
    rng = np.random.default_rng(0)
    tokens = questions(rng, rng.integers(20, 60, 60), lambda q, c, t: 0.4 if c == "math" else 0.1)
    for unit in ("token", "sample", "token_type"):
        q = q_values(tokens, unit)
        assert q[(0, "math")] < 0.01, unit
        assert (q.loc[0].drop("math") > 0.01).all(), unit


def test_a_few_long_questions_fool_the_token_test_but_not_the_question_test():
    """Atom 0 explains 10% of every question's tokens, except two long math questions where it
    explains 60%: over tokens math looks enriched; over questions, 2 of 15 math questions are not."""
    rng = np.random.default_rng(1)
    lengths = np.full(60, 30)
    lengths[[1, 5]] = 400  # questions 1 and 5 are math (categories in turn)
    tokens = questions(rng, lengths, lambda q, c, t: 0.6 if q in (1, 5) else 0.1)
    assert q_values(tokens, "token")[(0, "math")] < 1e-6
    assert q_values(tokens, "sample")[(0, "math")] > 0.05


def test_token_identity_explains_an_enrichment_that_holding_the_token_removes():
    """Atom 0 takes the tokens 0-9 (70% of math tokens, 10% elsewhere) and nothing else: math is
    enriched over tokens and over questions, not among occurrences of the same token."""
    rng = np.random.default_rng(2)

    def token_ids(question, category, length):
        share = 0.7 if category == "math" else 0.1
        return np.where(rng.random(length) < share, rng.integers(0, 10, length), rng.integers(10, 50, length))

    tokens = questions(rng, rng.integers(20, 60, 60), lambda q, c, t: 0.9 if t < 10 else 0.0, token_ids=token_ids)
    assert q_values(tokens, "token")[(0, "math")] < 1e-6
    assert q_values(tokens, "sample")[(0, "math")] < 0.01
    assert q_values(tokens, "token_type")[(0, "math")] > 0.05


def test_context_enrichment_within_token_types_is_detected():
    """The same tokens everywhere, but in math questions atom 0 takes 45% of them (15% elsewhere)."""
    rng = np.random.default_rng(3)
    tokens = questions(rng, rng.integers(20, 60, 60), lambda q, c, t: 0.45 if c == "math" else 0.15)
    q = q_values(tokens, "token_type")
    assert q[(0, "math")] < 1e-6
    assert (q.loc[0].drop("math") > 0.01).all()


def test_mantel_haenszel_sums_by_hand_and_against_hypergeometric_moments():
    # stratum 7: 6 occurrences, 3 in atom 0 and all 3 of them math; stratum 8: 4 occurrences, 2 in
    # atom 0, 2 math, 1 both; stratum 9: seen once (no information: its variance is 0)
    rows = ([(7, 0, "math")] * 3 + [(7, 1, "law")] * 3 + [(8, 0, "math"), (8, 1, "math"), (8, 0, "law"),
                                                              (8, 1, "law"), (9, 0, "math")])
    strata, atoms, labels = map(np.array, zip(*rows))
    table = cmh_enrichment(atoms, labels, strata, 2).set_index(["atom", "category"])
    row = table.loc[(0, "math")]
    expected, variance = 3 * 3 / 6 + 2 * 2 / 4 + 1.0, 3 * 3 * 3 * 3 / (36 * 5) + 2 * 2 * 2 * 2 / (16 * 3)
    assert row["observed"] == 5
    assert row["expected"] == pytest.approx(expected)
    assert row["variance"] == pytest.approx(variance)
    assert row["p"] == pytest.approx(stats.norm.sf((5 - expected - 0.5) / np.sqrt(variance)))
    assert row["lift"] == pytest.approx(5 / expected)
    # strata 7 and 8: E and V are the hypergeometric mean and variance of their 2 x 2 tables
    # (population, atom's occurrences, category's occurrences); stratum 9 adds 1 and 0
    moments = [stats.hypergeom(6, 3, 3), stats.hypergeom(4, 2, 2)]
    assert row["expected"] == pytest.approx(sum(m.mean() for m in moments) + 1)
    assert row["variance"] == pytest.approx(sum(m.var() for m in moments))
    # atom 1 in law: the mirror image, same statistic
    assert table.loc[(1, "law"), "p"] == pytest.approx(row["p"])


def test_token_type_unit_needs_strata_and_labels():
    with pytest.raises(ValueError, match="strata"):
        an.enrichment([0, 1], ["a", "b"], 2, unit="token_type")
    with pytest.raises(ValueError, match="label"):
        cmh_enrichment([0, 1], ["a", None], [1, 1], 2)
