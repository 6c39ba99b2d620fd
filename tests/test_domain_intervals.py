"""Fig 7 with intervals on planted truth: domains whose questions draw their experts from known
distributions, the point cosines against scikit-learn, and a routing store's question counts
against its token table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from moe_utils.patterns import domain_intervals as di
from moe_utils.capture.store import RoutingStore, write_store


def planted_counts(distributions: dict[str, np.ndarray], n_questions: int, tokens: int = 40, seed: int = 0):
    """Each question of domain d: ``tokens`` expert selections drawn from ``distributions[d]``."""
    rng = np.random.default_rng(seed)
    counts, labels = [], []
    for name, p in distributions.items():
        for _ in range(n_questions):
            counts.append(rng.multinomial(tokens, p))
            labels.append(name)
    return np.array(counts, dtype=float), np.array(labels, dtype=object)


def test_point_cosines_match_sklearn_and_intervals_cover_them():
    rng = np.random.default_rng(1)
    counts, labels = planted_counts({d: rng.dirichlet(np.ones(24)) for d in "abcd"}, 12)
    pairs = di.similarity_bootstrap(counts, labels, n_boot=300)
    profiles = np.stack([counts[labels == d].sum(axis=0) for d in "abcd"])
    truth = cosine_similarity(profiles)
    for row in pairs.itertuples():
        i, j = "abcd".index(row.a), "abcd".index(row.b)
        assert row.cosine == pytest.approx(truth[i, j])
        assert row.low <= row.cosine <= row.high
    assert len(pairs) == 6 and pairs["cosine"].is_monotonic_decreasing
    assert pairs["closest_share"].sum() == pytest.approx(1) and pairs["farthest_share"].sum() == pytest.approx(1)


def test_a_truly_closest_pair_is_closest_in_every_resample():
    base = np.random.default_rng(2).dirichlet(np.ones(24))
    other = np.random.default_rng(3).dirichlet(np.ones(24))
    counts, labels = planted_counts({"law": other, "math": base, "physics": 0.7 * base + 0.3 * other}, 40,
                                    tokens=200)
    pairs = di.similarity_bootstrap(counts, labels, n_boot=400)
    assert (pairs.loc[0, "a"], pairs.loc[0, "b"]) == ("math", "physics")
    assert pairs.loc[0, "closest_share"] > 0.99
    within, cross = di.split_half(counts, labels, n_splits=200)
    values = di.closeness_values(pairs, within, cross)
    assert values["within_verdict"].startswith("both domains are more alike")
    assert values["closest_half_cos"] < values["within_pair_cos"] and values["below_within_share"] > 95


def test_identical_domains_give_an_unstable_closest_pair_and_a_within_reference_as_high():
    same = np.random.default_rng(4).dirichlet(np.ones(24))
    counts, labels = planted_counts({d: same for d in ("law", "math", "physics")}, 10)
    pairs = di.similarity_bootstrap(counts, labels, n_boot=600)
    assert pairs.loc[0, "closest_share"] < 0.7  # one of three exchangeable pairs: about a third each
    within, cross = di.split_half(counts, labels, n_splits=400)
    assert abs(within["cosine"].mean() - cross["cosine"].mean()) < 0.03
    values = di.closeness_values(pairs, within, cross)
    assert values["within_verdict"].startswith("the two domains are not more different")
    assert values["below_within_share"] < 50  # below both of two exchangeable halves: about a third


def test_split_half_by_hand_with_two_questions_per_domain():
    # two questions per domain: every split puts one question in each half
    counts = np.array([[1, 0], [0, 1], [1, 1], [1, 1]], dtype=float)
    within, cross = di.split_half(counts, ["a", "a", "b", "b"], n_splits=50)
    assert within.set_index("domain").loc["a", "cosine"] == pytest.approx(0.0)
    assert within.set_index("domain").loc["b", "cosine"] == pytest.approx(1.0)
    assert cross.loc[0, "cosine"] == pytest.approx(np.sqrt(0.5))  # [1,0] or [0,1] against [1,1]
    assert cross.loc[0, "below_within"] == 0.0  # never below a's within-domain cosine of 0
    with pytest.raises(ValueError, match="two questions"):
        di.split_half(counts[:3], ["a", "a", "b"])


def test_question_selections_of_a_store(tmp_path):
    rng = np.random.default_rng(5)
    n_tokens, n_layers, n_experts = 30, 2, 4
    topk = np.stack([np.stack([rng.choice(n_experts, 2, replace=False) for _ in range(n_layers)])
                     for _ in range(n_tokens)]).astype(np.uint8)
    tokens = pd.DataFrame({"sample_id": np.repeat([3, 1, 2], 10), "position": np.tile(np.arange(10), 3),
                           "token_id": 0, "token": "x", "label": np.repeat(["b", "a", "b"], 10)})
    write_store(tmp_path / "s", {"model": {"name": "t", "n_experts": n_experts, "n_layers": n_layers, "top_k": 2}},
                {"topk_indices": topk, "topk_weights": np.full(topk.shape, 0.5, np.float32)}, tokens)
    counts, labels = di.question_selections(RoutingStore.open(tmp_path / "s"))
    assert list(labels) == ["a", "b", "b"]  # sample ids 1, 2, 3
    for row, sample in enumerate((1, 2, 3)):
        chosen = topk[tokens["sample_id"].to_numpy() == sample]
        for layer in range(n_layers):
            expected = np.bincount(chosen[:, layer].ravel(), minlength=n_experts)
            assert np.array_equal(counts[row, layer * n_experts:(layer + 1) * n_experts], expected)


def test_interval_figure_draws_estimates_outside_their_percentile_interval():
    import matplotlib

    matplotlib.use("Agg")
    from moe_utils.common import plotting

    pairs = pd.DataFrame({"a": ["x"], "b": ["y"], "cosine": [0.9], "low": [0.92], "high": [0.95],
                          "closest_share": [1.0], "cosine at half size": [0.88]})
    within = pd.DataFrame({"domain": ["x", "y"], "cosine": [0.97, 0.96], "low": [0.95, 0.97], "high": [0.99, 0.98]})
    figure = plotting.domain_similarity_intervals(pairs, within)
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels == ["x / y", "x (split half)", "y (split half)"]
