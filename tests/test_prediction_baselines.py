"""Stage 6's token-id and naive Bayes predictors against small cases computed by hand, scikit-learn's
BernoulliNB and routing planted in an earlier layer."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.naive_bayes import BernoulliNB

from moe_utils.prediction import routing_prediction as rp


def test_token_rankings_by_hand():
    # 2 layers of 4 experts, top-2; layer 1 of the fitting tokens: type 5 chose {2,3}, {2,1}, {2,3};
    # type 7 chose {0,1}. Layer 1's usage: expert 2: 3, 3: 2, 1: 2, 0: 1 (ties: lower index first)
    layer1 = np.array([[2, 3], [2, 1], [2, 3], [0, 1]])
    fit = np.stack([np.zeros_like(layer1), layer1], axis=1)
    ranked = rp.token_rankings(fit, [5, 5, 5, 7], [5, 7, 9], 4, horizon=1, n_ranked=4)
    assert ranked[:, 0].tolist() == [[-1] * 4] * 3  # nothing predicts the first layer
    assert ranked[0, 1].tolist() == [2, 3, 1, 0]  # type 5: 2 (3 times), 3 (2), then 1 and 0 by usage
    assert ranked[1, 1].tolist() == [1, 0, 2, 3]  # type 7: 0 and 1 once each, 1 used more; then usage
    assert ranked[2, 1].tolist() == [2, 1, 3, 0]  # unseen type 9: usage prior
    with pytest.raises(ValueError, match="fit_token_ids"):
        rp.token_rankings(fit, [5, 5], [5], 4, horizon=1, n_ranked=2)


def test_naive_bayes_scores_by_hand():
    # 2 layers of 2 experts, top-1; fitting tokens (layer 0, layer 1): (0,0), (0,0), (1,1), (0,1)
    fit = np.array([[0, 0], [0, 0], [1, 1], [0, 1]])[:, :, None]
    scores = rp.naive_bayes_scores(fit, np.array([[[0], [0]]]), 2, n_observed=1, target=1)
    # n(b=0) = n(b=1) = 2; p(e0@L0 | b0) = (2+1)/(2+2), p(e1@L0 | b0) = (0+1)/4; p(. | b1) = 2/4 each
    by_hand = [np.log(0.5) + np.log(3 / 4) + np.log(1 - 1 / 4), np.log(0.5) + np.log(2 / 4) + np.log(1 - 2 / 4)]
    assert scores[0] == pytest.approx(by_hand)


def test_naive_bayes_scores_match_sklearn_bernoulli_nb():
    rng = np.random.default_rng(0)
    n_experts, n_layers, k = 6, 4, 2
    draw = lambda n: np.stack([np.stack([rng.choice(n_experts - 1, k, replace=False) for _ in range(n_layers)])
                               for _ in range(n)])  # expert 5 is never chosen: it must score -inf
    fit, test = draw(300), draw(40)
    n_observed, target = 2, 3
    scores = rp.naive_bayes_scores(fit, test, n_experts, n_observed, target)
    features = rp._one_hot(fit[:, :n_observed], n_experts)
    x = np.repeat(features, k, axis=0)  # one sample per (token, chosen expert at the target layer)
    y = fit[:, target].ravel()
    model = BernoulliNB(alpha=1.0, force_alpha=True).fit(x, y)
    joint = model.predict_joint_log_proba(rp._one_hot(test[:, :n_observed], n_experts))
    assert np.allclose(scores[:, model.classes_], joint)
    assert np.isneginf(scores[:, 5]).all()


def test_bayes_reads_every_layer_up_to_l_and_affinity_only_layer_l():
    """Layer 2's expert copies layer 0's, layer 1 is noise: naive Bayes over layers <= 1 predicts
    layer 2 exactly, first-order affinity from layer 1 alone does not."""
    rng = np.random.default_rng(1)

    def draw(n):
        first = rng.integers(0, 8, n)
        return np.stack([first, rng.integers(0, 8, n), first], axis=1)[:, :, None]

    fit, test = draw(2000), draw(300)
    bayes = rp.bayes_rankings(fit, test, 8, horizon=1, n_ranked=1)
    affinity = rp.affinity_rankings(fit, test, 8, horizon=1, n_ranked=1)
    assert rp.hit_counts(bayes, test, 1)[:, 2].mean() == 1.0
    assert rp.hit_counts(affinity, test, 1)[:, 2].mean() < 0.3


def test_joint_counts_match_counting_token_by_token(monkeypatch):
    """Every pairwise statistic of the predictors is a block of joint_counts: checked against an
    exhaustive loop over tokens and their pairs of chosen experts, with the tokens counted in blocks
    (bounded memory) and from a store's narrow index dtype."""
    monkeypatch.setattr(rp, "JOINT_BLOCK", 50)
    rng = np.random.default_rng(2)
    n_experts, n_layers, k = 5, 3, 2
    fit = np.stack([np.stack([rng.choice(n_experts, k, replace=False) for _ in range(n_layers)]) for _ in range(120)])
    exhaustive = np.zeros((n_layers * n_experts,) * 2, dtype=np.int64)
    for token in fit:
        rows = [layer * n_experts + e for layer in range(n_layers) for e in token[layer]]
        for a in rows:
            for b in rows:
                exhaustive[a, b] += 1
    joint = rp.joint_counts(fit.astype(np.uint8), n_experts)
    assert joint.dtype == np.int64
    np.testing.assert_array_equal(joint, exhaustive)
    # affinity from the counts = the conditional frequency counted directly
    source, target = 0, 2
    direct = np.zeros((n_experts, n_experts))
    for token in fit:
        for a in token[source]:
            direct[a, token[target]] += 1
    chosen = np.bincount(fit[:, source].ravel(), minlength=n_experts)
    np.testing.assert_allclose(rp.affinity(fit, n_experts, source, target, joint=joint), direct / chosen[:, None])
