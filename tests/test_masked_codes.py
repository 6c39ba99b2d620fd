"""HSDL's masked codes (stage 6): the sparse solver of :func:`moe_utils.prediction.routing_prediction.masked_codes`
against the dense computation it replaces (every atom a variable, every observed row a residual, the
gradient by autograd), on random dictionaries and on a real small HSDL fit; the stacked system against
brute-force counting; and clear errors for bad input."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from moe_utils.patterns.hsdl import HSDL
from moe_utils.prediction import routing_prediction as rp

#: the two solvers run the same float32 steps in another order of summation; Adam's normalised steps
#: can carry that rounding to ~2e-4 on a code near 0 (measured), far below a code's scale (~1)
CODE_TOLERANCE = 2e-3


def dense_masked_codes(dictionary, x, n_observed, penalty, n_steps=100, learning_rate=0.05):
    """The dense reference: projected Adam on ``r @ D_live.T`` over every live atom and observed row,
    the gradient by autograd (the computation before the sparse solver)."""
    d_obs = torch.as_tensor(np.asarray(dictionary)[:n_observed], dtype=torch.float32)
    target = torch.as_tensor(np.asarray(x)[:, :n_observed], dtype=torch.float32)
    live = (d_obs > 0).any(0)
    codes = torch.zeros(len(target), d_obs.shape[1])
    if not bool(live.any()) or len(target) == 0:
        return codes.numpy()
    d_live = d_obs[:, live]
    r = torch.zeros(len(target), d_live.shape[1], requires_grad=True)
    optimiser = torch.optim.Adam([r], lr=learning_rate)
    for step in range(n_steps):
        delta = 0.5 * (0.02 ** (step / max(1, n_steps - 1)))
        resid = (target - r @ d_live.T).abs()
        fit = torch.where(resid < delta, resid.pow(2) / (2 * delta), resid - delta / 2).sum(1)
        loss = (fit + penalty * r.sum(1)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        for group in optimiser.param_groups:
            group["lr"] = learning_rate * (0.1 ** (step / max(1, n_steps - 1)))
        with torch.no_grad():
            r.clamp_(min=0.0)
    codes[:, live] = r.detach()
    return codes.numpy()


def dense_hsdl_scores(hsdl, x, n_layers, n_experts, horizon):
    """{target layer: (n_tokens, E) scores D_1 r} with the dense reference codes of layers <= t - h."""
    dictionary = np.asarray(hsdl.dictionaries_[0])
    columns = np.asarray(x).T / hsdl.x_scale_
    out = {}
    for target in range(horizon, n_layers):
        codes = dense_masked_codes(dictionary, columns, (target - horizon + 1) * n_experts,
                                   hsdl.lambda_hier / hsdl.lambda_rec)
        out[target] = codes @ dictionary[target * n_experts:(target + 1) * n_experts].T
    return out


def stacked_system(dictionary, x, prefixes, penalty):
    """The sparse system of :func:`rp._masked_problems` for these prefixes of rows."""
    observed = [sp.csc_matrix(dictionary[:n_observed]) for n_observed in prefixes]
    for part in observed:
        part.sort_indices()
    kept = [rp._kept_atoms(part, x[:, :part.shape[0]], penalty) for part in observed]
    return rp._masked_problems(observed, kept, x)


def random_problem(seed, n_rows=60, n_atoms=40, density=0.1, x_density=0.15):
    rng = np.random.default_rng(seed)
    dictionary = ((rng.random((n_rows, n_atoms)) < density) * rng.random((n_rows, n_atoms))).astype(np.float32)
    dictionary[:, 0] = 0.0  # an atom with no entry
    x = ((rng.random((25, n_rows)) < x_density) * rng.random((25, n_rows)) * 2).astype(np.float32)
    x[0] = 0.0  # a token with no expert
    return dictionary, x


def routing_matrix(n_layers, n_experts, k, n_tokens, seed):
    """X (N_e, n_tokens) of tokens of 6 planted types that choose alike in every layer, top-k with
    softmax weights: the kind of matrix HSDL is fitted on."""
    rng = np.random.default_rng(seed)
    preference = rng.dirichlet(np.full(n_experts, 0.1), size=(6, n_layers))
    kind = rng.integers(0, 6, n_tokens)
    scores = np.log(preference[kind] + 1e-9) + rng.gumbel(size=(n_tokens, n_layers, n_experts))
    top = np.argsort(-scores, axis=2)[..., :k]
    weights = np.exp(np.take_along_axis(scores, top, axis=2))
    weights /= weights.sum(axis=2, keepdims=True)
    rows = top + (np.arange(n_layers) * n_experts)[None, :, None]
    x = sp.csr_matrix((weights.ravel(), (rows.ravel(), np.repeat(np.arange(n_tokens), n_layers * k))),
                      shape=(n_layers * n_experts, n_tokens), dtype=np.float32)
    return x, top


@pytest.mark.parametrize("solver, ratio", [("sparse", 0.0), ("dense", 1e12)])
@pytest.mark.parametrize("seed, density", [(0, 0.1), (1, 0.03), (2, 0.3), (3, 1.0)])
def test_both_solvers_equal_the_dense_computation(monkeypatch, seed, density, solver, ratio):
    monkeypatch.setattr(rp, "DENSE_COST_RATIO", ratio)  # 0: always the sparse system; 1e12: always dense
    dictionary, x = random_problem(seed, density=density)
    for n_observed, penalty in ((0, 0.5), (7, 0.5), (30, 0.5), (60, 0.5), (30, 0.05), (30, 0.0)):
        fast = rp.masked_codes(dictionary, x, n_observed, penalty)
        reference = dense_masked_codes(dictionary, x, n_observed, penalty)
        np.testing.assert_allclose(fast, reference, atol=CODE_TOLERANCE, rtol=0)
        assert (fast > 0).sum() > 0 or n_observed == 0
        assert (fast[0] == 0).all() and (fast[:, 0] == 0).all()  # no expert, no entry: nothing to code


def test_the_solver_follows_the_dictionarys_density(monkeypatch):
    """At the default cost ratio a dictionary of a few entries per atom goes to the sparse system, a
    dense one to the dense products."""
    used = []
    for name in ("_sparse_solve", "_dense_solve"):
        solve = getattr(rp, name)
        monkeypatch.setattr(rp, name, lambda *args, _solve=solve, _name=name: used.append(_name) or _solve(*args))
    rng = np.random.default_rng(8)
    x = ((rng.random((20, 400)) < 0.05) * rng.random((20, 400))).astype(np.float32)
    sparse = (rng.random((400, 400)) < 0.01).astype(np.float32)
    rp.masked_codes(sparse, x, 400, 0.5)
    rp.masked_codes(np.full((400, 400), 0.3, np.float32), x, 400, 0.5)
    assert used == ["_sparse_solve", "_dense_solve"]


def test_stacked_prefixes_equal_each_prefix_alone_exactly(monkeypatch):
    """Every code's Adam step reads only its own gradient: fitting all prefixes of all tokens as one
    system gives exactly the codes of one prefix at a time."""
    monkeypatch.setattr(rp, "DENSE_COST_RATIO", 0.0)  # the sparse system, whatever the size
    dictionary, x = random_problem(4)
    prefixes = [12, 30, 45, 60]
    stacked = rp._prefix_codes(sp.csc_matrix(dictionary), x, prefixes, 0.5, 100, rp.CODE_LEARNING_RATE)
    assert len({codes.nnz for codes in stacked}) > 1
    for n_observed, codes in zip(prefixes, stacked):
        np.testing.assert_array_equal(codes.toarray(), rp.masked_codes(dictionary, x, n_observed, 0.5))
    monkeypatch.setattr(rp, "SYSTEM_ENTRIES", 300)  # systems of a few tokens each: memory bounded, same codes
    split = rp._prefix_codes(sp.csc_matrix(dictionary), x, prefixes, 0.5, 100, rp.CODE_LEARNING_RATE)
    for whole, part in zip(stacked, split):
        np.testing.assert_array_equal(part.toarray(), whole.toarray())


def test_the_stacked_system_holds_exactly_the_codes_that_can_move():
    """By brute force: a token's variables are the atoms whose observed entries on the token's rows
    sum to at least the penalty (the others' gradient stays > 0); its equations the observed rows of
    those atoms, each holding the token's entry of x."""
    dictionary, x = random_problem(5, density=0.08)
    n_observed, penalty = 33, 0.5
    system, target, (token, prefix, atom) = stacked_system(dictionary, x, [n_observed], penalty)
    assert (prefix == 0).all()
    d_obs, x_obs = dictionary[:n_observed], x[:, :n_observed] > 0
    reach = {(t, j): sum(float(d_obs[i, j]) for i in range(n_observed) if x_obs[t, i])
             for t in range(len(x)) for j in range(dictionary.shape[1])}
    expected = {key for key, value in reach.items() if value >= penalty}
    assert 0 < len(expected) < sum(value > 0 for value in reach.values())  # the screening drops some overlaps
    assert set(zip(token.tolist(), atom.tolist())) == expected and len(token) == len(expected)
    touched = {t: d_obs[:, [j for (u, j) in expected if u == t]].any(1) for t in range(len(x))}
    assert system.shape == (sum(rows.sum() for rows in touched.values()), len(expected))
    for v in range(len(token)):  # each variable's column holds its atom's observed entries
        column = system[:, v].toarray().ravel()
        np.testing.assert_array_equal(np.sort(column[column > 0]), np.sort(d_obs[:, atom[v]][d_obs[:, atom[v]] > 0]))
    assert target.sum() == pytest.approx(sum(x[t, :n_observed][touched[t]].sum() for t in range(len(x))), rel=1e-5)


def test_screened_codes_stay_at_zero_in_the_dense_fit():
    """The screening's claim on the dense computation itself: every atom it leaves out codes 0 there."""
    dictionary, x = random_problem(7, density=0.2)
    n_observed, penalty = 40, 0.5
    _, _, (token, _, atom) = stacked_system(dictionary, x, [n_observed], penalty)
    kept = np.zeros((len(x), dictionary.shape[1]), bool)
    kept[token, atom] = True
    reference = dense_masked_codes(dictionary, x, n_observed, penalty)
    assert (reference[~kept] == 0).all()
    assert (reference[kept] > 0).mean() > 0.2  # and the kept ones are coded


@pytest.fixture(scope="module")
def fitted_hsdl():
    """A real HSDL fit (3 layers x 8 experts, top-2, 24 level-1 atoms) and held-out routing."""
    x_fit, top_fit = routing_matrix(3, 8, 2, 1500, seed=0)
    hsdl = HSDL(levels=[1.0], n_steps=300, batch_size=256, layout=(3, 8), random_state=0, device="cpu").fit(x_fit)
    x_test, _ = routing_matrix(3, 8, 2, 60, seed=1)
    return hsdl, top_fit, x_test


def test_hsdl_rankings_equal_the_dense_computation_on_a_fitted_hsdl(monkeypatch, fitted_hsdl):
    monkeypatch.setattr(rp, "DENSE_COST_RATIO", 0.0)  # the sparse system, whatever the size
    hsdl, top_fit, x_test = fitted_hsdl
    assert 0 < (hsdl.dictionaries_[0] > 0).mean() < 1  # a sparse dictionary, as HSDL fits
    n_layers, n_experts, n_ranked = 3, 8, 4
    ranked = rp.hsdl_rankings(hsdl, x_test, top_fit, n_layers, n_experts, [1, 2], n_ranked, chunk=25)
    prior = rp.usage_counts(top_fit, n_experts)
    compared = 0
    for h in (1, 2):
        assert (ranked[h][:, :h] == -1).all()
        for target, scores in dense_hsdl_scores(hsdl, x_test.toarray(), n_layers, n_experts, h).items():
            expected = rp.rank_scores(scores, prior[target], n_ranked)
            # compare where the reference's ranked scores are well separated (no near-tie to round over;
            # experts no coded atom holds score exactly 0 in both and go by the prior)
            ordered = np.take_along_axis(scores, rp.rank_scores(scores, prior[target], n_ranked + 1), axis=1)
            separated = ((np.abs(np.diff(ordered, axis=1)) > 1e-2) | (ordered[:, 1:] == 0)).all(axis=1)
            np.testing.assert_array_equal(ranked[h][separated, target], expected[separated])
            compared += separated.sum()
    assert compared >= 60  # most token-layer rows are compared
    assert (rp.hsdl_rankings(hsdl, x_test, top_fit, n_layers, n_experts, [3], n_ranked)[3] == -1).all()  # no prefix


def test_fitted_hsdl_codes_equal_the_dense_computation(monkeypatch, fitted_hsdl):
    monkeypatch.setattr(rp, "DENSE_COST_RATIO", 0.0)
    hsdl, _, x_test = fitted_hsdl
    columns = x_test.T.toarray() / hsdl.x_scale_
    penalty = hsdl.lambda_hier / hsdl.lambda_rec
    for n_observed in (8, 16, 24):
        fast = rp.masked_codes(hsdl.dictionaries_[0], columns, n_observed, penalty)
        np.testing.assert_allclose(fast, dense_masked_codes(hsdl.dictionaries_[0], columns, n_observed, penalty),
                                   atol=CODE_TOLERANCE, rtol=0)
        assert (fast > 0.1).any(axis=1).mean() > 0.8  # tokens are coded, not left at 0


def test_bad_input_is_refused_before_any_fitting():
    dictionary, x = random_problem(6)
    negative = dictionary.copy()
    negative[3, 3] = -0.1
    with pytest.raises(ValueError, match="non-negative"):
        rp.masked_codes(negative, x, 10, 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        rp.masked_codes(np.where(dictionary > 0, np.nan, 0.0), x, 10, 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        rp.masked_codes(dictionary, -x, 10, 0.5)
    with pytest.raises(ValueError, match="one token per row"):
        rp.masked_codes(dictionary, x.T, 10, 0.5)
    with pytest.raises(ValueError, match="n_observed"):
        rp.masked_codes(dictionary, x, 61, 0.5)
    with pytest.raises(ValueError, match="penalty"):
        rp.masked_codes(dictionary, x, 10, -1.0)
    hsdl = SimpleNamespace(dictionaries_=[dictionary[:48]], x_scale_=1.0, lambda_hier=500.0, lambda_rec=1000.0)
    fit = np.zeros((5, 3, 1), dtype=np.int64)
    with pytest.raises(ValueError, match="rows"):
        rp.hsdl_rankings(hsdl, sp.csr_matrix(x[:, :40]), fit, 3, 16, [1], 2)  # X transposed: 25 x 40
    with pytest.raises(ValueError, match="non-negative"):
        rp.hsdl_rankings(hsdl, -sp.csr_matrix(x[:, :48].T), fit, 3, 16, [1], 2)
