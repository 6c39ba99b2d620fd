"""Predicting a token's experts in later MoE layers from its routing so far, and scoring predictions.

If experts collaborate across layers (Tang et al. 2025, sections 3 and 5: HSDL atoms span several
layers), a token's experts in layers <= l should tell which experts it needs at layer l+h. That is
what an inference system that keeps experts off the accelerator needs to prefetch them. Every
predictor here returns *rankings*: an array ``(n_tokens, n_layers, n_ranked)`` of expert indices,
indexed by the **target** layer t (the layer predicted), best first; rows of targets t < h (nothing
to predict from) are -1. The predictors that read the routing alone:

* :func:`prior_rankings`: layer t's most used experts on the fitting tokens, the same for every token;
* :func:`affinity_rankings`: first-order affinity. With ``S`` the token's experts at layer t-h, expert
  b of layer t scores ``mean_{a in S} P(b at t | a at t-h)``, the conditional frequencies counted on the
  fitting tokens (pairwise co-activation between two layers; ExFlow's inter-layer affinity);
* :func:`token_rankings`: token identity, each token type's most frequent experts at layer t on the
  fitting tokens (the control for the token itself: in a small vocabulary the token largely fixes
  its experts);
* :func:`bayes_rankings`: pairwise statistics of every layer <= t-h (Bernoulli naive Bayes), the
  information HSDL reads, without its patterns;
* :func:`hsdl_rankings`: the token's HSDL level-1 code inferred from its routing in layers <= t-h
  only (:func:`masked_codes`: the rows of the later layers are left out of the fit), and layer t's
  experts read from ``D_1 r``;
* :func:`oracle_rankings`: the true top-k (the ceiling).

The hidden-state predictor, which needs the model, is :mod:`moe_utils.prediction.hidden_prediction`. Ties in a
score are broken by the prior (the more used expert first), then by the lower index, so every
ranking is deterministic. :func:`hit_counts` and :func:`recall_summary` score rankings as recall@m
(|top-m ∩ true top-k| / k) and precision@m (the same / m), with intervals from a bootstrap over
prompts (tokens of one prompt are not independent).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from moe_utils.common.stats import Interval, bootstrap_interval
from moe_utils.patterns.cooccurrence import Cooccurrence

#: held-out tokens whose HSDL codes (every prefix of layers) are fitted together (:func:`hsdl_rankings`):
#: bounds the dense solver's (tokens x atoms) codes and the sparse solver's per-token arrays
HSDL_CHUNK = 128
#: the most entries of one sparse system of masked codes (whole tokens, so one token's more at most):
#: bounds its memory whatever the dictionary. At DeepSeek-MoE-16B's shape (N_e = 1728, a 40-step
#: fit: ~38 entries per atom) 128 tokens held ~12.7 million entries, ~0.45 GB at their peak
SYSTEM_ENTRIES = 2 ** 24
#: fitting tokens whose pairs :func:`joint_counts` counts at once: bounds its memory (at DeepSeek-MoE-16B's
#: shape, 162 experts a token, a block's sparse matrices hold about 0.3 GB)
JOINT_BLOCK = 131072
#: Adam's initial step of the masked codes (:func:`masked_codes`), in HSDL's normalised units
CODE_LEARNING_RATE = 0.05
#: relative margin under the penalty of :func:`masked_codes`'s screening: it covers float32 rounding
#: of the gradient's sum (at most N_e terms), so a screened code's gradient is > 0 as computed
SCREEN_MARGIN = 1e-3
#: the sparse solver's cost per entry of its system over the dense solver's per multiply-add of its
#: products (:func:`masked_codes`; 100 steps, the sparse build included), measured on one thread of a
#: shared machine: 0.5 us against 34 ns at Phi-3.5-MoE's shape, 0.95 us against 18 ns at
#: DeepSeek-MoE-16B's. The sparse solver is chosen unless its entries times this exceed the dense
#: multiply-adds
DENSE_COST_RATIO = 16


def _check_topk(topk: np.ndarray, n_experts: int, name: str) -> np.ndarray:
    """``topk`` as an integer array (a store's narrow index dtype is kept: no copy of the fitting tokens)."""
    topk = np.asarray(topk)
    if topk.dtype.kind not in "iu":
        topk = topk.astype(np.int64)
    if topk.ndim != 3:
        raise ValueError(f"{name} must be (n_tokens, n_layers, k) expert indices, got shape {topk.shape}")
    if topk.size and (topk.min() < 0 or topk.max() >= n_experts):
        raise ValueError(f"{name} holds expert indices outside [0, {n_experts})")
    return topk


def _empty(n_tokens: int, n_layers: int, n_ranked: int) -> np.ndarray:
    return np.full((n_tokens, n_layers, n_ranked), -1, dtype=np.int64)


def usage_counts(topk: np.ndarray, n_experts: int) -> np.ndarray:
    """(n_layers, E): how many tokens chose each expert, per layer."""
    topk = _check_topk(topk, n_experts, "topk")
    n_layers = topk.shape[1]
    offsets = (np.arange(n_layers, dtype=np.int64) * n_experts)[None, :, None]
    counts = np.zeros(n_layers * n_experts, np.int64)
    for block in np.array_split(topk, max(1, len(topk) // 65536)):  # bounded int64 temporaries
        counts += np.bincount((block + offsets).ravel(), minlength=n_layers * n_experts)
    return counts.reshape(n_layers, n_experts)


def rank_scores(scores: np.ndarray, prior: np.ndarray, n_ranked: int) -> np.ndarray:
    """(N, n_ranked) experts by decreasing score; ties by decreasing ``prior``, then lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    n, n_experts = scores.shape
    keys = (np.broadcast_to(np.arange(n_experts), (n, n_experts)),
            np.broadcast_to(-np.asarray(prior, dtype=np.float64), (n, n_experts)), -scores)
    return np.lexsort(keys, axis=-1)[:, :n_ranked]


def prior_rankings(fit_topk: np.ndarray, n_tokens: int, n_experts: int, horizon: int, n_ranked: int) -> np.ndarray:
    """Usage prior: every token gets layer t's most used experts (on the fitting tokens)."""
    counts = usage_counts(fit_topk, n_experts)
    out = _empty(n_tokens, counts.shape[0], n_ranked)
    for target in range(horizon, counts.shape[0]):
        out[:, target] = rank_scores(np.zeros((1, n_experts)), counts[target], n_ranked)[0]
    return out


def joint_counts(fit_topk: np.ndarray, n_experts: int) -> np.ndarray:
    """(n_layers * E, n_layers * E) int64: fitting tokens choosing both expert a and expert b (row and
    column ``layer * E + expert``; the diagonal: each expert's own count). Every pairwise statistic
    of the predictors is a block of it; it is counted once, exactly, by blocked Gram products
    (:meth:`moe_utils.patterns.cooccurrence.Cooccurrence.pair_counts`) summed over blocks of
    :data:`JOINT_BLOCK` fitting tokens, never holding a dense tokens x experts matrix, nor a sparse
    one of all the fitting tokens."""
    fit_topk = _check_topk(fit_topk, n_experts, "fit_topk")
    n, n_layers, k = fit_topk.shape
    offsets = (np.arange(n_layers, dtype=np.int32) * n_experts)[None, :, None]
    joint = np.zeros((n_layers * n_experts, n_layers * n_experts), np.int64)
    for block in np.array_split(fit_topk, max(1, -(-n // JOINT_BLOCK))):
        rows = (block.astype(np.int32) + offsets).reshape(len(block), n_layers * k)
        selected = sp.csr_matrix((np.ones(rows.size, np.float32), rows.ravel(),
                                  np.arange(0, rows.size + 1, n_layers * k)), shape=(len(block), n_layers * n_experts))
        selected.sum_duplicates()
        joint += Cooccurrence(selected.T, max_columns=None).pair_counts()
    return joint


def _block(joint: np.ndarray, n_experts: int, rows: slice | int, target: int) -> np.ndarray:
    """Rows ``rows`` (a layer, or a slice of layers) of ``joint`` against layer ``target``'s experts."""
    rows = slice(rows, rows + 1) if isinstance(rows, (int, np.integer)) else rows
    return joint[rows.start * n_experts:rows.stop * n_experts, target * n_experts:(target + 1) * n_experts]


def affinity(fit_topk: np.ndarray, n_experts: int, source: int, target: int, *,
             joint: np.ndarray | None = None) -> np.ndarray:
    """(E, E) ``P(b chosen at target | a chosen at source)`` on the fitting tokens; rows of experts
    never chosen at ``source`` are 0. ``joint``: :func:`joint_counts` of ``fit_topk``, if already counted."""
    joint = joint_counts(fit_topk, n_experts) if joint is None else joint
    both = _block(joint, n_experts, source, target).astype(np.float64)
    chosen = np.diagonal(_block(joint, n_experts, source, source)).astype(np.float64)
    return np.divide(both, chosen[:, None], out=np.zeros_like(both), where=chosen[:, None] > 0)


def affinity_rankings(fit_topk: np.ndarray, topk: np.ndarray, n_experts: int, horizon: int,
                      n_ranked: int, *, joint: np.ndarray | None = None) -> np.ndarray:
    """First-order affinity: expert b of layer t scores the mean over the token's experts a at layer
    t-h of ``P(b at t | a at t-h)`` (:func:`affinity`; ``joint`` as there)."""
    topk = _check_topk(topk, n_experts, "topk")
    prior = usage_counts(fit_topk, n_experts)
    joint = joint_counts(fit_topk, n_experts) if joint is None else joint
    out = _empty(topk.shape[0], topk.shape[1], n_ranked)
    for target in range(horizon, topk.shape[1]):
        conditional = affinity(fit_topk, n_experts, target - horizon, target, joint=joint)
        scores = conditional[topk[:, target - horizon]].mean(axis=1)  # (N, E)
        out[:, target] = rank_scores(scores, prior[target], n_ranked)
    return out


def token_rankings(fit_topk: np.ndarray, fit_token_ids, token_ids, n_experts: int, horizon: int,
                   n_ranked: int) -> np.ndarray:
    """Token identity: expert b of layer t scores how often the token's type (its id) chose b at
    layer t on the fitting tokens; a type never seen there gets the prior's order. Known before any
    layer runs, so the same for every horizon (rows t < h stay -1, as for every predictor)."""
    fit_topk = _check_topk(fit_topk, n_experts, "fit_topk")
    fit_token_ids, token_ids = np.asarray(fit_token_ids), np.asarray(token_ids)
    if len(fit_token_ids) != len(fit_topk):
        raise ValueError(f"fit_token_ids has {len(fit_token_ids)} entries for {len(fit_topk)} fitting tokens")
    prior = usage_counts(fit_topk, n_experts)
    types, fit_type = np.unique(fit_token_ids, return_inverse=True)
    where = np.clip(np.searchsorted(types, token_ids), 0, len(types) - 1)
    seen = types[where] == token_ids
    k = fit_topk.shape[2]
    out = _empty(len(token_ids), fit_topk.shape[1], n_ranked)
    for target in range(horizon, fit_topk.shape[1]):
        cell = np.repeat(fit_type, k) * n_experts + fit_topk[:, target].ravel()
        counts = np.bincount(cell, minlength=len(types) * n_experts).reshape(len(types), n_experts).astype(float)
        out[:, target] = rank_scores(np.where(seen[:, None], counts[where], 0.0), prior[target], n_ranked)
    return out


def _one_hot(topk: np.ndarray, n_experts: int) -> np.ndarray:
    """(N, n_layers * E) 0/1: expert e of layer s chosen, column s * E + e."""
    n, n_layers, _ = topk.shape
    out = np.zeros((n, n_layers * n_experts))
    np.put_along_axis(out, (topk + (np.arange(n_layers) * n_experts)[None, :, None]).reshape(n, -1), 1.0, axis=1)
    return out


def naive_bayes_scores(fit_topk: np.ndarray, topk: np.ndarray, n_experts: int, n_observed: int, target: int, *,
                       alpha: float = 1.0, joint: np.ndarray | None = None) -> np.ndarray:
    """(N, E) Bernoulli naive Bayes scores of layer ``target``'s experts from the experts chosen in
    the first ``n_observed`` layers: ``log P(b) + sum_f [x_f log p_fb + (1 - x_f) log(1 - p_fb)]`` over
    the features f (expert e of layer s < n_observed chosen), with ``P(b)`` the share of layer
    ``target``'s choices that go to b and ``p_fb = (n(f, b) + alpha) / (n(b) + 2 alpha)``, counted on
    the fitting tokens (scikit-learn's ``BernoulliNB`` with one sample per chosen expert). Experts
    never chosen at ``target`` score -inf. The counts are blocks of ``joint`` (:func:`joint_counts`,
    counted here when not given)."""
    topk = _check_topk(topk, n_experts, "topk")
    joint = joint_counts(fit_topk, n_experts) if joint is None else joint
    n_b = np.diagonal(_block(joint, n_experts, target, target)).astype(np.float64)
    p = (_block(joint, n_experts, slice(0, n_observed), target) + alpha) / (n_b + 2 * alpha)  # (F, E)
    log_p, log_not = np.log(p), np.log1p(-p)
    with np.errstate(divide="ignore"):
        log_prior = np.log(n_b / n_b.sum())
    scores = log_prior + _one_hot(topk[:, :n_observed], n_experts) @ (log_p - log_not) + log_not.sum(axis=0)
    return np.where(n_b > 0, scores, -np.inf)


def bayes_rankings(fit_topk: np.ndarray, topk: np.ndarray, n_experts: int, horizon: int, n_ranked: int, *,
                   alpha: float = 1.0, joint: np.ndarray | None = None) -> np.ndarray:
    """Pairwise statistics of every layer <= t-h, the information HSDL reads: layer t's experts
    ranked by :func:`naive_bayes_scores` from the token's experts in layers 0 .. t-h (``joint`` as there)."""
    topk = _check_topk(topk, n_experts, "topk")
    prior = usage_counts(fit_topk, n_experts)
    joint = joint_counts(fit_topk, n_experts) if joint is None else joint
    out = _empty(topk.shape[0], topk.shape[1], n_ranked)
    for target in range(horizon, topk.shape[1]):
        scores = naive_bayes_scores(fit_topk, topk, n_experts, target - horizon + 1, target, alpha=alpha,
                                    joint=joint)
        out[:, target] = rank_scores(scores, prior[target], n_ranked)
    return out


def _check_dictionary(dictionary, penalty: float) -> np.ndarray:
    """HSDL's D_1 as float32, with what :func:`masked_codes` relies on: finite, non-negative entries
    (HSDL's lie in [0, 1]) and a non-negative usage penalty."""
    dictionary = np.asarray(dictionary, dtype=np.float32)
    if dictionary.ndim != 2:
        raise ValueError(f"the dictionary must be an (N_e, p) array like HSDL's D_1, got shape {dictionary.shape}")
    if not np.isfinite(dictionary).all() or (dictionary < 0).any():
        raise ValueError("the dictionary must be finite and non-negative, like HSDL's D_1 (entries in [0, 1]): "
                         "pass a fitted model's dictionaries_[0]")
    if not np.isfinite(penalty) or penalty < 0:
        raise ValueError(f"the code penalty (HSDL's lambda_hier / lambda_rec) must be finite and >= 0, got {penalty}")
    return dictionary


def _check_columns(x, n_rows: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_rows:
        raise ValueError(f"x must hold one token per row over the dictionary's {n_rows} rows, got shape {x.shape}")
    if not np.isfinite(x).all() or (x < 0).any():
        raise ValueError("x must be finite and non-negative: routing weights or selections, as HSDL was fitted on")
    return x


def _kept_atoms(observed: sp.csc_matrix, x_observed: np.ndarray, penalty: float) -> sp.csr_matrix:
    """(N, p) 0/1 CSR (token-major, atoms in order): the codes that can leave 0 (:func:`masked_codes`),
    those whose atom's observed entries on the token's rows sum to at least the penalty."""
    chosen = sp.csr_matrix(x_observed > 0, dtype=np.float32)
    reach = (chosen @ observed).tocsr()
    reach.data[reach.data < penalty * (1 - SCREEN_MARGIN)] = 0.0  # these codes stay at 0
    reach.eliminate_zeros()
    reach.sort_indices()
    reach.data[:] = 1.0
    return reach


def _masked_problems(observed: list[sp.csc_matrix], kept: list[sp.csr_matrix],
                     x: np.ndarray) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
    """Every row of ``x`` (N, N_e) masked to each prefix of rows (``observed``: the dictionary's rows of
    each prefix, CSC with sorted indices; ``kept``: :func:`_kept_atoms` there), as one sparse system
    (see :func:`masked_codes`): a variable for each (token, prefix, atom) code that can leave 0, and an
    equation for each (token, prefix, row) that one of them touches (the residuals of the other rows
    are constants). Returns ``(system, target, keys)``: the dictionary's entries (equations x
    variables, CSC: each variable's column holds its atom's observed entries), the equations'
    entries of x, and the (token, prefix index, atom) of each variable, (3, n_variables)."""
    equations, values, sizes, targets, keys = [], [], [], [], []
    n_equations = 0
    for index, (dictionary, codes) in enumerate(zip(observed, kept)):
        n_observed = dictionary.shape[0]
        token = np.repeat(np.arange(len(x)), np.diff(codes.indptr))
        atom = codes.indices.astype(np.int64)
        touched = (codes @ (dictionary > 0).astype(np.float32).T).toarray() > 0  # (N, n_observed) rows in use
        number = np.cumsum(touched.ravel()) - 1 + n_equations  # equation of each touched (token, row)
        size = np.diff(dictionary.indptr)[atom]  # each variable's entries in the observed rows
        entry = np.repeat(dictionary.indptr[atom] - np.cumsum(size) + size, size) + np.arange(size.sum())
        equations.append(number[np.repeat(token * n_observed, size) + dictionary.indices[entry]])
        values.append(dictionary.data[entry])
        sizes.append(size)
        targets.append(x[:, :n_observed][touched])
        keys.append(np.stack([token, np.full_like(token, index), atom]))
        n_equations = number[-1] + 1 if len(number) else n_equations
    sizes = np.concatenate(sizes)
    system = sp.csc_matrix((np.concatenate(values), np.concatenate(equations), np.concatenate([[0], np.cumsum(sizes)])),
                           shape=(n_equations, len(sizes)), dtype=np.float32)
    return system, np.concatenate(targets), np.concatenate(keys, axis=1)


def _adam_schedule(r: torch.Tensor, gradient, n_steps: int, learning_rate: float) -> None:
    """:func:`masked_codes`'s projected Adam on ``r`` in place: ``gradient(r, delta)`` sets ``r.grad`` for
    the Huber width ``delta`` (falling from 0.5 to 0.01); the rate falls from ``learning_rate`` tenfold;
    each step is projected on r >= 0."""
    optimiser = torch.optim.Adam([r], lr=learning_rate)
    for step in range(n_steps):  # Adam on the stage's threads (moe_utils.common.threads)
        gradient(r, 0.5 * (0.02 ** (step / max(1, n_steps - 1))))
        optimiser.step()
        for group in optimiser.param_groups:
            group["lr"] = learning_rate * (0.1 ** (step / max(1, n_steps - 1)))
        with torch.no_grad():
            r.clamp_(min=0.0)


def _sparse_solve(system: sp.csc_matrix, target: np.ndarray, penalty: float, n_steps: int,
                  learning_rate: float) -> np.ndarray:
    """``argmin_{r >= 0} sum huber(target - system r) + penalty * sum(r)`` with the gradient written out,
    ``penalty - system^T huber'(target - system r)`` (``huber'``: the residual over the width, clipped
    to [-1, 1]). Every variable's Adam step reads only its own gradient, so the stacked problems are
    solved as if one at a time."""
    transposed = system.T  # CSR, no copy

    def gradient(r, delta):
        slope = system @ r.numpy()
        np.subtract(target, slope, out=slope)
        slope /= np.float32(delta)
        np.clip(slope, -1.0, 1.0, out=slope)
        grad = transposed @ slope
        r.grad = torch.from_numpy(np.subtract(np.float32(penalty), grad, out=grad))

    r = torch.zeros(system.shape[1])
    _adam_schedule(r, gradient, n_steps, learning_rate)
    return r.numpy()


def _dense_solve(observed: np.ndarray, target: np.ndarray, penalty: float, n_steps: int,
                 learning_rate: float) -> np.ndarray:
    """(N, p) codes of the columns ``target`` (N, n_observed) on the dense ``observed`` rows of D: every
    atom with an observed entry a variable, every observed row a residual, the gradient by autograd."""
    d_obs, target = torch.as_tensor(observed), torch.as_tensor(target)
    live = (d_obs > 0).any(0)
    codes = torch.zeros(len(target), d_obs.shape[1])
    if not bool(live.any()) or len(target) == 0:
        return codes.numpy()
    d_live = d_obs[:, live]

    def gradient(r, delta):
        resid = (target - r @ d_live.T).abs()
        fit = torch.where(resid < delta, resid.pow(2) / (2 * delta), resid - delta / 2).sum(1)
        r.grad = None
        (fit + penalty * r.sum(1)).sum().backward()

    r = torch.zeros(len(target), d_live.shape[1], requires_grad=True)
    _adam_schedule(r, gradient, n_steps, learning_rate)
    codes[:, live] = r.detach()
    return codes.numpy()


def _prefix_codes(dictionary: sp.csc_matrix, x: np.ndarray, prefixes, penalty: float, n_steps: int,
                  learning_rate: float) -> list[sp.csr_matrix]:
    """:func:`masked_codes` of the rows of ``x`` for each length in ``prefixes``, fitted together: a list
    of (N, p) CSR codes, one per prefix. As sparse systems of the codes that can move, each of at most
    :data:`SYSTEM_ENTRIES` entries (whole tokens: memory stays bounded), unless the entries times
    :data:`DENSE_COST_RATIO` exceed the dense products' multiply-adds (a dense dictionary): then
    prefix by prefix, densely."""
    shape = (len(x), dictionary.shape[1])
    if not prefixes or not len(x):
        return [sp.csr_matrix(shape, dtype=np.float32) for _ in prefixes]
    observed = [dictionary[:n_observed].tocsc() for n_observed in prefixes]
    for part in observed:
        part.sort_indices()
    kept = [_kept_atoms(part, x[:, :part.shape[0]], penalty) for part in observed]
    entries = sum(codes @ np.diff(part.indptr) for part, codes in zip(observed, kept))  # (N,) per token
    dense = len(x) * sum(part.shape[0] * np.count_nonzero(np.diff(part.indptr)) for part in observed)
    if entries.sum() * DENSE_COST_RATIO > dense:
        return [sp.csr_matrix(_dense_solve(part.toarray(), x[:, :part.shape[0]], penalty, n_steps, learning_rate))
                for part in observed]
    group = np.cumsum(entries) // SYSTEM_ENTRIES  # consecutive tokens: SYSTEM_ENTRIES, or one token more
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    tokens, prefix_of, atoms, codes = [], [], [], []
    for first, last in zip(starts, [*starts[1:], len(x)]):
        system, target, (token, prefix, atom) = _masked_problems(observed, [k[first:last] for k in kept],
                                                                 x[first:last])
        codes.append(_sparse_solve(system, target, penalty, n_steps, learning_rate))
        tokens.append(token + first)
        prefix_of.append(prefix)
        atoms.append(atom)
    tokens, prefix_of, atoms, codes = (np.concatenate(a) for a in (tokens, prefix_of, atoms, codes))
    return [sp.csr_matrix((codes[prefix_of == index], (tokens[prefix_of == index], atoms[prefix_of == index])),
                          shape=shape) for index in range(len(prefixes))]


def masked_codes(dictionary: np.ndarray, x: np.ndarray, n_observed: int, penalty: float, *, n_steps: int = 100,
                 learning_rate: float = CODE_LEARNING_RATE) -> np.ndarray:
    """Non-negative codes ``r`` (N, p) of the columns ``x`` (N, N_e) that fit only their first
    ``n_observed`` rows: ``min_{r >= 0} ||x_obs - D_obs r||_1 + penalty * ||r||_1`` per column, HSDL's
    level-1 objective of one column (Tang et al. 2025, section 3: reconstruction and usage terms,
    divided by lambda_rec; the L_inf term belongs to the dictionary, which is fixed here) with the
    later rows masked out.

    Solved by projected Adam on the Huber-smoothed L1 (the width falling from 0.5 to 0.01), from
    r = 0. Only the codes that can leave 0 are fitted: D, x and r are non-negative, so on a row
    where the column is 0 the residual is <= 0 and the Huber slope is <= 0, and on any row it is
    <= 1. Atom j's gradient, ``penalty - sum_i D_ij slope_i``, is therefore at least ``penalty -
    sum_{i: x_i > 0} D_ij``; where that sum (over the observed rows) is below the penalty (by
    :data:`SCREEN_MARGIN`, for rounding), every Adam step moves the code down and the projection
    holds it at 0, exactly as in a fit of all atoms. The other codes are the variables, and the
    observed rows they touch the residuals (the others are constants), solved for all columns at
    once as one sparse system with the gradient written out; the cost follows the entries of the
    few atoms each token can use, not N_e x p. Where the dictionary is too dense for that to pay
    (:data:`DENSE_COST_RATIO`), every atom with an observed entry is fitted densely, by autograd.
    """
    dictionary = _check_dictionary(dictionary, penalty)
    x = _check_columns(x, dictionary.shape[0])
    if not 0 <= n_observed <= dictionary.shape[0]:
        raise ValueError(f"n_observed must be in [0, {dictionary.shape[0]}] rows, got {n_observed}")
    [codes] = _prefix_codes(sp.csc_matrix(dictionary), x, [n_observed], penalty, n_steps, learning_rate)
    return codes.toarray()


def hsdl_rankings(hsdl, x: sp.spmatrix | np.ndarray, fit_topk: np.ndarray, n_layers: int, n_experts: int,
                  horizons, n_ranked: int, *, n_steps: int = 100, chunk: int = HSDL_CHUNK) -> dict[int, np.ndarray]:
    """HSDL, for each horizon h: the code of every token from its X rows of layers <= t-h
    (:func:`masked_codes` with HSDL's ``lambda_hier / lambda_rec``, in HSDL's normalised units), and
    layer t's experts ranked by ``D_1 r`` (ties: the prior). One fit per observed prefix serves
    every horizon.

    ``x`` is the held-out expert matrix (N_e, n_tokens) of the kind HSDL was fitted on
    (:func:`moe_utils.patterns.expert_matrix.expert_matrix` with the same ``value``). Each token's
    code for each prefix is its own problem (the solver's steps are per entry), so the problems of
    ``chunk`` tokens (:data:`HSDL_CHUNK`) and all their prefixes are fitted together as one sparse
    system: memory is bounded by the chunk, and the codes are those of one fit.
    """
    penalty = hsdl.lambda_hier / hsdl.lambda_rec
    dictionary = _check_dictionary(hsdl.dictionaries_[0], penalty)
    if dictionary.shape[0] != n_layers * n_experts:
        raise ValueError(f"the HSDL dictionary has {dictionary.shape[0]} rows, not {n_layers} x {n_experts}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    x = sp.csc_matrix(x, dtype=np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != dictionary.shape[0]:
        raise ValueError(f"x has shape {x.shape}, not the dictionary's {dictionary.shape[0]} rows: pass X (N_e, n_tokens)")
    entries = x.data if sp.issparse(x) else x
    if not np.isfinite(entries).all() or (entries < 0).any():
        raise ValueError("x must be finite and non-negative: routing weights or selections, as HSDL was fitted on")
    prior = usage_counts(fit_topk, n_experts)
    sparse = sp.csc_matrix(dictionary)
    prefixes = [(source + 1) * n_experts for source in range(n_layers - min(horizons))]
    n_tokens = x.shape[1]
    out = {h: _empty(n_tokens, n_layers, n_ranked) for h in horizons}
    for start in range(0, n_tokens, chunk):
        part = x[:, start:start + chunk]
        columns = (part.T.toarray() if sp.issparse(part) else part.T) / np.float32(hsdl.x_scale_)  # (chunk, N_e)
        for source, codes in enumerate(_prefix_codes(sparse, columns, prefixes, penalty, n_steps, CODE_LEARNING_RATE)):
            for h in horizons:
                target = source + h
                if target < n_layers:
                    scores = codes @ dictionary[target * n_experts:(target + 1) * n_experts].T  # (chunk, E)
                    out[h][start:start + chunk, target] = rank_scores(scores, prior[target], n_ranked)
    return out


def oracle_rankings(topk: np.ndarray, fit_topk: np.ndarray, n_experts: int, horizon: int,
                    n_ranked: int) -> np.ndarray:
    """The true top-k of layer t first, then the prior's order: recall@k is 1 by construction."""
    topk = _check_topk(topk, n_experts, "topk")
    prior = usage_counts(fit_topk, n_experts)
    out = _empty(topk.shape[0], topk.shape[1], n_ranked)
    for target in range(horizon, topk.shape[1]):
        scores = np.zeros((len(topk), n_experts))
        np.put_along_axis(scores, topk[:, target], np.arange(topk.shape[2], 0, -1, dtype=float)[None], axis=1)
        out[:, target] = rank_scores(scores, prior[target], n_ranked)
    return out


def hit_counts(rankings: np.ndarray, topk: np.ndarray, m: int) -> np.ndarray:
    """(n_tokens, n_layers): how many of the top ``m`` ranked experts are in the true top-k (0 where
    the ranking is -1, i.e. no prediction)."""
    rankings, topk = np.asarray(rankings), np.asarray(topk)
    if rankings.shape[:2] != topk.shape[:2] or rankings.shape[2] < m:
        raise ValueError(f"rankings {rankings.shape} do not match truth {topk.shape} with m = {m}")
    head = rankings[:, :, :m]
    return (head[:, :, :, None] == topk[:, :, None, :]).any(axis=3).sum(axis=2)


def _per_prompt(values: np.ndarray, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, prompt = np.unique(sample_ids, return_inverse=True)
    return np.bincount(prompt, weights=values), np.bincount(prompt)


def ratio_interval(values: np.ndarray, sample_ids: np.ndarray, scale: float, *, confidence: float = 0.95,
                   n_boot: int = 1000, random_state=0) -> Interval:
    """``sum(values) / (n_tokens * scale)`` over tokens, with a percentile bootstrap interval that
    resamples whole prompts (:func:`moe_utils.common.stats.bootstrap_interval`)."""
    sums, counts = _per_prompt(np.asarray(values, dtype=float), np.asarray(sample_ids))

    def statistic(index):
        return sums[index[0]].sum(axis=-1) / (counts[index[0]].sum(axis=-1) * scale)

    return bootstrap_interval(statistic, len(sums), n_boot=n_boot, confidence=confidence,
                              random_state=random_state, vectorized=True)


def paired_difference(hits_a: np.ndarray, hits_b: np.ndarray, sample_ids: np.ndarray, layers: np.ndarray, k: int, *,
                      confidence: float = 0.95, n_boot: int = 1000) -> Interval:
    """Recall of predictor a minus that of predictor b (:func:`hit_counts` of each at the same m) over
    the tokens and target ``layers``, on the same tokens, with an interval resampling prompts."""
    gain = (np.asarray(hits_a) - np.asarray(hits_b))[:, layers].sum(axis=1)
    return ratio_interval(gain, sample_ids, k * len(layers), confidence=confidence, n_boot=n_boot)


def verdict(difference: Interval) -> str:
    """"better than", "worse than" or "not distinguishable from", by the sign of the interval."""
    return "better than" if difference.low > 0 else "worse than" if difference.high < 0 else "not distinguishable from"


def recall_summary(hits: dict[str, dict[int, np.ndarray]], sample_ids: np.ndarray, layers: np.ndarray, k: int,
                   *, confidence: float = 0.95, n_boot: int = 1000) -> pd.DataFrame:
    """One row per (predictor, m): recall@m and precision@m over the tokens and the target
    ``layers``, each with its interval. ``hits[predictor][m]`` is :func:`hit_counts` at m."""
    rows = []
    for name, by_m in hits.items():
        for m, counts in by_m.items():
            per_token = counts[:, layers].sum(axis=1)
            recall = ratio_interval(per_token, sample_ids, k * len(layers), confidence=confidence, n_boot=n_boot)
            factor = k / m  # precision@m = recall@m * k / m on the same hits
            rows.append({"predictor": name, "m": m, "recall": recall.estimate, "recall_low": recall.low,
                         "recall_high": recall.high, "precision": recall.estimate * factor,
                         "precision_low": recall.low * factor, "precision_high": recall.high * factor})
    return pd.DataFrame(rows)


def recall_by_layer(hits: dict[str, np.ndarray], sample_ids: np.ndarray, layers: np.ndarray, k: int, *,
                    confidence: float = 0.95, n_boot: int = 1000) -> pd.DataFrame:
    """Recall@k per predictor and target layer, with intervals (prompts resampled)."""
    rows = []
    for name, counts in hits.items():
        for layer in layers:
            value = ratio_interval(counts[:, layer], sample_ids, k, confidence=confidence, n_boot=n_boot)
            rows.append({"predictor": name, "layer": int(layer), "recall": value.estimate, "low": value.low,
                         "high": value.high})
    return pd.DataFrame(rows)


#: The predictors the stage compares, in the order its tables and figures show them, and the short
#: names its glued values use.
PREDICTORS = ("usage prior", "token id", "first-order affinity", "naive Bayes (layers <= l)", "HSDL (layers <= l)",
              "hidden state (next router)", "oracle")
KEYS = dict(zip(("prior", "token", "affinity", "bayes", "hsdl", "hidden", "oracle"), PREDICTORS))


def all_rankings(fit_topk: np.ndarray, topk: np.ndarray, n_experts: int, horizons, n_ranked: int, *, hsdl, x,
                 hidden: dict[int, np.ndarray], fit_token_ids, token_ids,
                 n_steps: int = 100) -> dict[int, dict[str, np.ndarray]]:
    """Every predictor of :data:`PREDICTORS` for every horizon: ``{h: {name: rankings}}``; ``hidden``
    holds the hidden-state predictor's rankings (:mod:`moe_utils.prediction.hidden_prediction`), the token ids
    those of the fitting and the scored tokens."""
    n_layers = np.asarray(topk).shape[1]
    from_hsdl = hsdl_rankings(hsdl, x, fit_topk, n_layers, n_experts, horizons, n_ranked, n_steps=n_steps)
    joint = joint_counts(fit_topk, n_experts)
    return {h: dict(zip(PREDICTORS, (
        prior_rankings(fit_topk, len(topk), n_experts, h, n_ranked),
        token_rankings(fit_topk, fit_token_ids, token_ids, n_experts, h, n_ranked),
        affinity_rankings(fit_topk, topk, n_experts, h, n_ranked, joint=joint),
        bayes_rankings(fit_topk, topk, n_experts, h, n_ranked, joint=joint), from_hsdl[h], hidden[h][:, :, :n_ranked],
        oracle_rankings(topk, fit_topk, n_experts, h, n_ranked)))) for h in horizons}
