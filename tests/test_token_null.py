"""The token-identity null model against stores whose answer is known (moe_utils.patterns.token_null)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moe_utils.patterns import token_null as tn
from moe_utils.capture.store import RoutingStore

N_LAYERS, N_EXPERTS, TOP_K, N_TYPES = 4, 8, 2, 30
PLANTED = ((1, 3), (2, 5))  # (layer, expert) pair switched on together by the context


def make_store(indices: np.ndarray, token_ids: np.ndarray, sample_ids: np.ndarray) -> RoutingStore:
    """An in-memory store of the given routing (weights 1/k, positions counted within each sample)."""
    tokens = pd.DataFrame({"sample_id": sample_ids, "token_id": token_ids})
    tokens["position"] = tokens.groupby("sample_id").cumcount()
    tokens["token"], tokens["label"] = tokens["token_id"].astype(str), None
    weights = np.full(indices.shape, 1.0 / indices.shape[2], dtype=np.float32)
    manifest = {"model": {"name": "synthetic", "n_layers": indices.shape[1], "n_experts": N_EXPERTS,
                          "top_k": indices.shape[2]}}
    return RoutingStore(Path("synthetic"), manifest, indices.astype(np.uint8), weights, None, tokens)


def synthetic_store(*, planted: bool, n_questions: int = 120, per_question: int = 150, seed: int = 0) -> RoutingStore:
    """Routing drawn independently per layer given the token type; with ``planted``, a context flag
    (a third of the tokens, independent of the token) forces the pair :data:`PLANTED` on."""
    rng = np.random.default_rng(seed)
    n = n_questions * per_question
    popularity = 1.0 / np.arange(1, N_TYPES + 1)
    token_ids = rng.choice(N_TYPES, size=n, p=popularity / popularity.sum())
    preference = rng.dirichlet(np.full(N_EXPERTS, 0.5), size=(N_TYPES, N_LAYERS))  # p(expert | type, layer)
    gumbel = np.log(preference[token_ids]) + rng.gumbel(size=(n, N_LAYERS, N_EXPERTS))
    indices = np.argsort(-gumbel, axis=2)[:, :, :TOP_K]  # k distinct experts per layer, given the type only
    if planted:
        context = rng.random(n) < 1 / 3
        for layer, expert in PLANTED:
            first = indices[context, layer, 0]
            clash = indices[context, layer, 1] == expert
            indices[context, layer, 1] = np.where(clash, first, indices[context, layer, 1])
            indices[context, layer, 0] = expert
    return make_store(indices, token_ids, np.repeat(np.arange(n_questions), per_question))


@pytest.fixture(scope="module")
def token_only():
    return synthetic_store(planted=False)


@pytest.fixture(scope="module")
def planted():
    return synthetic_store(planted=True, seed=1)


def _row(layer: int, expert: int) -> int:
    return layer * N_EXPERTS + expert


def test_counts_against_brute_force():
    store = synthetic_store(planted=True, n_questions=6, per_question=25, seed=3)
    co = tn.coselection(store, seed=5)
    n_e = N_LAYERS * N_EXPERTS
    rows = [{_row(layer, e) for layer in range(N_LAYERS) for e in store.topk_indices[t, layer]}
            for t in range(store.n_tokens)]
    layer = np.arange(n_e) // N_EXPERTS
    cross = layer[:, None] != layer[None, :]
    observed = np.zeros((n_e, n_e))
    for selected in rows:
        for a in selected:
            for b in selected:
                observed[a, b] += 1
    counts = np.diag(observed).copy()
    np.testing.assert_allclose(co.observed, np.where(cross, observed, 0))
    np.testing.assert_allclose(co.plain, np.where(cross, np.outer(counts, counts) / store.n_tokens, 0))
    # Given the token: each half's per-type frequencies applied to the other half's tokens, one by one.
    in_a = tn.question_halves(store.tokens["sample_id"].to_numpy(), seed=5)
    types = store.tokens["token_id"].to_numpy()
    expected = np.zeros((n_e, n_e))
    for fit in (in_a, ~in_a):
        marginal = np.zeros(n_e)
        for t in np.nonzero(fit)[0]:
            marginal[list(rows[t])] += 1 / fit.sum()
        for t in np.nonzero(~fit)[0]:
            peers = np.nonzero(fit & (types == types[t]))[0]
            p = np.zeros(n_e)
            for u in peers:
                p[list(rows[u])] += 1 / len(peers)
            if not len(peers):
                p = marginal
            expected += np.outer(p, p)
    np.testing.assert_allclose(co.given_token, np.where(cross, expected, 0), rtol=1e-10, atol=1e-10)
    assert np.isnan(co.lift()[0, 1]) and np.isfinite(co.lift()[0, N_EXPERTS])


def test_bootstrap_replicates_are_the_weighted_coselection():
    store = synthetic_store(planted=True, n_questions=12, per_question=40, seed=4)
    result = tn.explained_share_interval(store, n_boot=5, seed=2, level=0.5)
    co = tn.coselection(store, seed=2)
    pairs = tn.excess_pairs(co)
    rng = np.random.default_rng(3)
    shares = [tn.explained_share(tn.coselection(store, seed=2, question_weights=rng.dirichlet(np.ones(12)) * 12),
                                 pairs)["share"] for _ in range(5)]
    assert result["share_low"] == pytest.approx(np.percentile(shares, 25))
    assert result["share_high"] == pytest.approx(np.percentile(shares, 75))
    assert result["share"] == pytest.approx(tn.explained_share(co)["share"])


def test_token_only_routing_is_explained(token_only):
    result = tn.explained_share_interval(token_only, n_boot=30, seed=0)
    assert result["excess"] > 0
    assert 0.95 < result["share"] < 1.05
    assert result["share_low"] < 1.0 < result["share_high"] + 0.02
    co = tn.coselection(token_only)
    top = tn.pair_table(co, n=15)
    assert (top["lift_plain"].max() > 1.3)  # the token makes layers fire together ...
    assert np.all(np.abs(top["lift_token"] - 1) < 0.1)  # ... and explains it: no context collaboration


def test_planted_context_pair_is_detected(planted):
    co = tn.coselection(planted)
    a, b = (_row(*PLANTED[0]), _row(*PLANTED[1]))
    assert co.lift(given_token=True)[a, b] > 1.3
    table = tn.pair_table(co, n=N_LAYERS * N_EXPERTS * N_LAYERS * N_EXPERTS)
    row = table[(table.expert_a == f"L{PLANTED[0][0]}E{PLANTED[0][1]}")
                & (table.expert_b == f"L{PLANTED[1][0]}E{PLANTED[1][1]}")].iloc[0]
    assert row["token_share"] < 0.5 and row["lift_token"] > 1.3
    result = tn.explained_share_interval(planted, n_boot=30)
    assert result["share_high"] < 0.97  # the aggregate share is significantly below 100%
    assert result["share"] < tn.explained_share(tn.coselection(synthetic_store(planted=False, seed=1)))["share"] - 0.05


def test_surrogate_keeps_each_layers_routing_given_the_token(planted):
    surrogate = tn.surrogate_store(planted, seed=4)
    types = planted.tokens["token_id"].to_numpy()
    changed = False
    for layer in range(N_LAYERS):
        for k in range(TOP_K):
            before = pd.crosstab(types, np.asarray(planted.topk_indices[:, layer, k]))
            after = pd.crosstab(types, surrogate.topk_indices[:, layer, k])
            pd.testing.assert_frame_equal(before, after)
        changed |= bool(np.any(surrogate.topk_indices[:, layer] != planted.topk_indices[:, layer]))
    assert changed
    np.testing.assert_array_equal(np.sort(surrogate.topk_weights, axis=0), np.sort(planted.topk_weights, axis=0))
    again = tn.surrogate_store(planted, seed=4)
    np.testing.assert_array_equal(again.topk_indices, surrogate.topk_indices)


def test_surrogate_destroys_the_planted_coupling(planted):
    a, b = (_row(*PLANTED[0]), _row(*PLANTED[1]))
    real = tn.coselection(planted).lift(given_token=True)[a, b]
    fake = tn.coselection(tn.surrogate_store(planted, seed=0)).lift(given_token=True)[a, b]
    assert real > 1.3 and abs(fake - 1) < 0.1
    share = tn.explained_share(tn.coselection(tn.surrogate_store(planted, seed=0)))["share"]
    assert share > 0.95


def test_position_strata_keep_routing_per_token_and_position(planted):
    strata = tn.token_position_strata(planted)
    surrogate = tn.surrogate_store(planted, seed=2, strata=strata)
    for layer in range(N_LAYERS):
        before = pd.crosstab(strata, np.asarray(planted.topk_indices[:, layer, 0]))
        pd.testing.assert_frame_equal(before, pd.crosstab(strata, surrogate.topk_indices[:, layer, 0]))


def test_position_null_explains_routing_that_depends_on_the_position():
    store = synthetic_store(planted=False, seed=2)
    early = (store.tokens["position"].to_numpy() % 8) < 2  # a quarter of the positions, whatever the token
    indices = np.array(store.topk_indices)
    for layer, expert in PLANTED:
        clash = indices[early, layer, 1] == expert
        indices[early, layer, 1] = np.where(clash, indices[early, layer, 0], indices[early, layer, 1])
        indices[early, layer, 0] = expert
    store = make_store(indices, store.tokens["token_id"].to_numpy(), store.tokens["sample_id"].to_numpy())
    strata = store.tokens["token_id"].to_numpy() * 2 + early
    by_token = tn.explained_share(tn.coselection(store))["share"]
    by_token_and_position = tn.explained_share(tn.coselection(store, strata=strata))["share"]
    assert by_token < 0.95 and by_token_and_position > 0.97
    bins = tn.token_position_strata(store)
    pairs = set(zip(store.tokens["token_id"], np.floor(np.log2(store.tokens["position"] + 1)).astype(int)))
    assert len(np.unique(bins)) == len(pairs) > N_TYPES  # one stratum per (token, log2 position bin)


def test_no_excess_gives_no_share():
    n = 40
    indices = np.broadcast_to(np.arange(TOP_K), (n, N_LAYERS, TOP_K)).copy()  # every token routed alike
    store = make_store(indices, np.arange(n) % 3, np.arange(n) // 10)
    result = tn.explained_share(tn.coselection(store))
    assert result["n_pairs"] == 0 and np.isnan(result["share"]) and result["excess"] == 0


def test_bad_input():
    store = synthetic_store(planted=False, n_questions=1, per_question=10)
    with pytest.raises(ValueError, match="two questions"):
        tn.coselection(store)
    with pytest.raises(ValueError, match="one key per token"):
        tn.surrogate_store(store, strata=np.zeros(3))


def test_against_places_a_value_on_its_null_range():
    assert [tn.against(v, 1.0, 2.0) for v in (0.5, 1.0, 1.5, 2.0, 2.5)] == ["below", "within", "within", "within",
                                                                            "above"]


def test_finding_follows_the_interval(token_only):
    result = tn.explained_share_interval(token_only, n_boot=30, seed=0)
    sentence = tn.finding(result)
    assert sentence.startswith("Token identity explains most of the cross-layer co-activation")
    assert f"{result['share'] * 100:.0f}% [{result['share_low'] * 100:.0f}, {result['share_high'] * 100:.0f}]" in sentence
    low = {"share": 0.3, "share_low": 0.2, "share_high": 0.4, "remaining": 0.7, "remaining_low": 0.6,
           "remaining_high": 0.8}
    assert tn.finding(low).startswith("Token identity explains less than half")
    assert "70% [60, 80] depends on the context" in tn.finding(low)
    straddling = {**low, "share": 0.5, "share_low": 0.45, "share_high": 0.55}
    assert tn.finding(straddling).startswith("Token identity explains about half")


def test_linearized_replicates_match_the_exact_ones():
    """The delta-method replicates (what stores of more than 500 questions use) against exact
    replicates of the same Dirichlet draws, at 600 questions: the share at unit weights is the point
    estimate, single replicates agree to within 30% of the exact interval's width and the interval's ends
    to within 8% (the error the docstring states)."""
    n_questions, per_question = 600, 20
    store = synthetic_store(planted=True, n_questions=n_questions, per_question=per_question, seed=5)
    exact = tn.explained_share_interval(store, n_boot=100, seed=1, level=0.9, linearized=False)
    linear = tn.explained_share_interval(store, n_boot=100, seed=1, level=0.9)
    assert (exact["replicates"], linear["replicates"]) == ("exact", "linearized")
    shared: dict = {}
    co = tn.coselection(store, seed=1, shared=shared)
    pairs = tn.excess_pairs(co)
    groups = tn._groups(store, 1, None, shared)
    observed = groups.pair_counts(pairs)
    share, gradient = tn._share_gradient(groups, pairs.astype(np.float32), observed)
    assert share == pytest.approx(exact["share"], rel=1e-6)
    rng = np.random.default_rng(7)
    width = exact["share_high"] - exact["share_low"]
    assert width > 0
    for _ in range(10):
        weights = rng.dirichlet(np.ones(n_questions)) * n_questions
        plain, given = tn._pair_sums(groups, weights, pairs.astype(np.float32),
                                     np.vstack([p for _, p in tn._times_mask(groups.counts, pairs.astype(np.float32))]))
        truth = (given - plain) / (weights @ observed - plain)
        assert share + gradient @ (weights - 1) == pytest.approx(truth, abs=0.3 * width)
    for key in ("share_low", "share_high"):
        assert linear[key] == pytest.approx(exact[key], abs=0.08 * width)


@pytest.mark.parametrize("linearized", [False, True])
def test_shared_computations_give_exactly_the_unshared_results(linearized):
    """Stage 1's three calls (by token, by token and position, the co-selection) with what they have
    in common computed once: the same values as separate calls, and the common parts computed once."""
    store = synthetic_store(planted=True, n_questions=14, per_question=30, seed=3)
    strata = tn.token_position_strata(store)
    shared: dict = {}
    calls = [dict(seed=2), dict(seed=2, strata=strata), dict(seed=4)]
    together = [tn.explained_share_interval(store, n_boot=30, linearized=linearized, shared=shared, **c)
                for c in calls]
    alone = [tn.explained_share_interval(store, n_boot=30, linearized=linearized, **c) for c in calls]
    assert together == alone
    for c in calls:
        a, b = tn.coselection(store, shared=shared, **c), tn.coselection(store, **c)
        for field in ("observed", "plain", "given_token"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert len(shared["groups"]) == 3 and len(shared["unit"]) == 3 and len(shared["question_sums"]) == 1
    assert tn.coselection(store, seed=2, shared=shared) is tn.coselection(store, seed=2, shared=shared)
