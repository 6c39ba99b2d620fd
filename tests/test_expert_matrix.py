"""The expert activation matrix X and co-activation, against brute-force computations on a store."""

from __future__ import annotations

import numpy as np
import pytest

from moe_utils.patterns import expert_matrix as xm
from moe_utils.capture.routing import capture_routing

from .conftest import TEXTS


@pytest.fixture(scope="module")
def store(olmoe, tmp_path_factory):
    model, tok = olmoe
    labels = ["math", "law", "code", "bio", "physics", "q", "math"]
    return capture_routing(model, tok, TEXTS, out_dir=tmp_path_factory.mktemp("x") / "s", labels=labels,
                           record_probs=True, progress=False)


def _dense_weights(store) -> np.ndarray:
    """Brute force: X[layer * E + expert, token] = routing weight, by explicit loops."""
    n_tok, n_layers, k = store.topk_indices.shape
    dense = np.zeros((n_layers * store.n_experts, n_tok), dtype=np.float32)
    for t in range(n_tok):
        for layer in range(n_layers):
            for slot in range(k):
                dense[layer * store.n_experts + store.topk_indices[t, layer, slot], t] += store.topk_weights[t, layer, slot]
    return dense


def test_token_weight_matrix_matches_brute_force(store):
    x = xm.expert_matrix(store, "token", "weight")
    assert x.shape == (store.n_layers * store.n_experts, store.n_tokens)
    np.testing.assert_allclose(x.toarray(), _dense_weights(store), rtol=1e-6)


def test_binary_columns_sum_to_layers_times_k(store):
    x = xm.expert_matrix(store, "token", "binary")
    np.testing.assert_array_equal(np.asarray(x.sum(axis=0)).ravel(), store.n_layers * store.top_k)
    assert set(np.unique(x.data)) == {1.0}


def test_sample_columns_sum_their_tokens(store):
    dense = _dense_weights(store)
    x = xm.expert_matrix(store, "sample", "weight").toarray()
    assert x.shape[1] == len(TEXTS)
    for sample in range(len(TEXTS)):
        np.testing.assert_allclose(x[:, sample], dense[:, store.tokens.sample_id.to_numpy() == sample].sum(axis=1),
                                   rtol=1e-5)


def test_prob_matrix_needs_probs(store, olmoe, tmp_path):
    x = xm.expert_matrix(store, "token", "prob").toarray()
    np.testing.assert_allclose(x.reshape(store.n_layers, store.n_experts, -1).sum(axis=1), 1.0, atol=1e-2)
    model, tok = olmoe
    plain = capture_routing(model, tok, TEXTS[:2], out_dir=tmp_path / "p", progress=False)
    with pytest.raises(ValueError, match="record_probs=True"):
        xm.expert_matrix(plain, "token", "prob")
    with pytest.raises(ValueError, match="granularity"):
        xm.expert_matrix(plain, "sentence")


def test_coactivation_against_counting(store):
    co = xm.coactivation(store)
    n_e = store.n_layers * store.n_experts
    selected = np.zeros((store.n_tokens, n_e), dtype=bool)
    for layer in range(store.n_layers):
        for slot in range(store.top_k):
            selected[np.arange(store.n_tokens), layer * store.n_experts + store.topk_indices[:, layer, slot]] = True
    a, b = 3, store.n_experts + 5  # one pair across layers 0 and 1
    assert co[a, b] == pytest.approx(np.mean(selected[:, a] & selected[:, b]))
    np.testing.assert_allclose(co, co.T)
    np.testing.assert_allclose(np.diag(co), selected.mean(axis=0))
    np.testing.assert_allclose(xm.expert_usage(store).sum(axis=1), 1.0)


def test_top_cross_layer_pairs(store):
    pairs = xm.top_cross_layer_pairs(store, n=5)
    assert len(pairs) == 5 and pairs.p_together.is_monotonic_decreasing
    layer_of = lambda label: int(label[1:].split("E")[0])  # noqa: E731
    assert all(layer_of(a) != layer_of(b) for a, b in zip(pairs.expert_a, pairs.expert_b))
    np.testing.assert_allclose(pairs.lift, pairs.p_together / (pairs.p_a * pairs.p_b))


def test_label_profiles(store):
    profiles = xm.label_profiles(store)
    assert list(profiles.index) == ["math", "law", "code", "bio", "physics", "q"]
    np.testing.assert_allclose(profiles.to_numpy().reshape(len(profiles), store.n_layers, -1).sum(axis=2),
                               store.top_k, rtol=1e-5)
