"""What stage 1 reports about the routing it captured (the paper's expert activation collection,
section 3, and its Fig 2), as tables and numbers.

:func:`capture` runs the model over the MMLU-Pro prompts into the routing store and checks it;
:func:`describe_inputs`, :func:`store_summary`, :func:`usage_summary`, :func:`coactivation_summary`
and :func:`token_control` return what the page shows with a dict of the values it glues into its
text, after checking what must hold (every prompt stored, each layer's co-selection diagonal sums
to top-k, the control counts the same co-selections as Fig 2).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe_utils.capture.routing import capture_routing
from moe_utils.capture.store import RoutingStore
from moe_utils.common.markup import code_span
from moe_utils.patterns import expert_matrix as xm
from moe_utils.patterns import token_null as tn

#: How the page formats the tables of :func:`coactivation_summary` and :func:`token_control`.
PAIRS_FORMAT = {"p_together": "{:.3f}", "p_a": "{:.3f}", "p_b": "{:.3f}", "lift": "{:.2f}"}
NULL_PAIRS_FORMAT = {"observed": "{:.0f}", "expected_plain": "{:.0f}", "expected_token": "{:.0f}",
                     "lift_plain": "{:.2f}", "lift_token": "{:.2f}", "token_share": "{:.0%}"}


def describe_inputs(model_name: str, lm, labels, *, categories, n_per_category: int, seed: int) -> tuple[str, dict]:
    """The page's line on the model and prompts (Markdown, the name escaped) and the values it glues:
    ``model_name``, ``n_questions``, ``n_categories``."""
    n_params = sum(p.numel() for p in lm.parameters()) / 1e6
    text = (f"**Model:** {code_span(model_name)} ({lm.config.model_type}, {n_params:.1f}M parameters). "
            f"**Data:** {len(labels)} MMLU-Pro test questions, {n_per_category} per category from "
            f"{', '.join(categories)}, sampled with seed {seed}.")
    return text, {"model_name": model_name, "n_questions": len(labels), "n_categories": len(set(labels))}


def capture(lm, tokenizer, texts, labels, out_dir, *, categories, n_per_category: int, seed: int, data_dir=None,
            batch_size: int = 8, max_length: int = 512, record_probs: bool = True) -> tuple[RoutingStore, dict]:
    """The routing store of ``texts`` (:func:`moe_utils.capture.routing.capture_routing`, replacing a
    store of other inputs), recording which MMLU-Pro sample it holds, with its :func:`store_summary`
    (which checks it)."""
    store = capture_routing(
        lm, tokenizer, texts, out_dir=out_dir, labels=labels, batch_size=batch_size, max_length=max_length,
        record_probs=record_probs, overwrite=True,
        data_spec={"dataset": "TIGER-Lab/MMLU-Pro", "split": "test", "categories": list(categories),
                   "n_per_category": n_per_category, "seed": seed, "source": data_dir or "env/Hub"})
    return store, store_summary(store, len(texts))


def store_summary(store: RoutingStore, n_prompts: int) -> dict:
    """Tokens, MoE layers, experts, top-k and rows of X (layers x experts) of ``store``; RuntimeError
    when it does not hold ``n_prompts`` prompts or names an expert the layers do not have."""
    if store.n_samples != n_prompts:
        raise RuntimeError(f"the store holds {store.n_samples} prompts, not {n_prompts}: capture again with "
                           "overwrite=True")
    if np.asarray(store.topk_indices).max() >= store.n_experts:
        raise RuntimeError(f"the store names an expert beyond the {store.n_experts} of each layer")
    return {"n_tokens": store.n_tokens, "n_layers": store.n_layers, "n_experts": store.n_experts,
            "top_k": store.top_k, "n_rows": store.n_layers * store.n_experts}


def usage_summary(store: RoutingStore) -> tuple[np.ndarray, dict]:
    """Each layer's share of routed slots per expert (:func:`moe_utils.patterns.expert_matrix.expert_usage`)
    and the least and most used expert's share (%)."""
    usage = xm.expert_usage(store)
    return usage, {"min_usage_pct": float(usage.min() * 100), "max_usage_pct": float(usage.max() * 100)}


def coactivation_summary(store: RoutingStore, n: int = 10) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """The paper's Fig 2: the co-activation matrix, its ``n`` strongest cross-layer pairs and the top
    pair's name, probability and lift. RuntimeError when a layer's diagonal does not sum to top-k
    (every token selects k experts per layer)."""
    co = xm.coactivation(store)
    per_layer = np.diag(co).reshape(store.n_layers, -1).sum(axis=1)
    if not np.allclose(per_layer, store.top_k, rtol=1e-6):
        raise RuntimeError(f"co-activation diagonals sum to {per_layer} per layer, not top-k = {store.top_k}")
    pairs = xm.top_cross_layer_pairs(store, co, n=n)
    return co, pairs, {"top_pair": f"{pairs.expert_a[0]} with {pairs.expert_b[0]}",
                       "top_pair_p": float(pairs.p_together[0]), "top_pair_lift": float(pairs.lift[0])}


#: How the page names the bootstrap's replicates (:func:`moe_utils.patterns.token_null.explained_share_interval`).
REPLICATES = {"exact": "each computed exactly",
              "linearized": (f"each a first-order (delta-method) expansion, as for every store of more than "
                             f"{tn.LINEAR_ABOVE_QUESTIONS} questions; tested against exact replicates")}


def token_control(store: RoutingStore, co: np.ndarray, *, n_boot: int, seed: int = 0, n: int = 10):
    """The token-identity control of Fig 2 (:mod:`moe_utils.patterns.token_null`): ``(coselection,
    pairs, values)`` with the cross-fitted co-selection, its ``n`` most frequent cross-layer pairs and
    every value the page glues: the shares (%) of the excess that the token, and the token with its
    position, explain, with Bayesian-bootstrap intervals over ``n_boot`` replicates, the lifts and
    ``finding_token_null``. RuntimeError when its observed counts are not those of ``co``."""
    shared: dict = {}  # the selection, observed counts and excess pairs' sums, computed once for the three
    null = tn.explained_share_interval(store, n_boot=n_boot, seed=seed, shared=shared)
    position = tn.explained_share_interval(store, n_boot=n_boot, seed=seed,
                                           strata=tn.token_position_strata(store), shared=shared)
    coselection = tn.coselection(store, seed=seed, shared=shared)
    cross = coselection.cross_layer
    if not np.allclose(coselection.observed[cross], co[cross] * store.n_tokens, rtol=1e-6):
        raise RuntimeError("the control's co-selection counts differ from the co-activation matrix")
    pairs = tn.pair_table(coselection, n=n)
    values = {
        "null_bootstrap": n_boot, "null_replicates": REPLICATES[null["replicates"]], "token_share": null["share"] * 100, "token_share_low": null["share_low"] * 100,
        "token_share_high": null["share_high"] * 100, "context_share": null["remaining"] * 100,
        "context_share_low": null["remaining_low"] * 100, "context_share_high": null["remaining_high"] * 100,
        "position_share": position["share"] * 100, "position_share_low": position["share_low"] * 100,
        "position_share_high": position["share_high"] * 100, "n_excess_pairs": null["n_pairs"],
        "position_vs_token": tn.against(position["share"], null["share_low"], null["share_high"]),
        "excess_lift_plain": null["lift_plain"], "excess_lift_token": null["lift_token"],
        **{f"top10_{column}_{end}": float(getattr(pairs[column], end)())
           for column in ("lift_plain", "lift_token") for end in ("min", "max")},
        "null_top_pair": f"{pairs.expert_a[0]} with {pairs.expert_b[0]}",
        "top_pair_lift_token": float(pairs["lift_token"][0]), "top_pair_observed": int(pairs["observed"][0]),
        "top_pair_expected_plain": float(pairs["expected_plain"][0]),
        "top_pair_expected_token": float(pairs["expected_token"][0]), "finding_token_null": tn.finding(null)}
    return coselection, pairs, values


def lift_maps(coselection) -> dict[str, np.ndarray]:
    """The two forms of Fig 2's map that the control compares, as log2 lift: over independent layers,
    and over independent layers given the token id."""
    return {"plain (independent layers)": coselection.lift(),
            "given the token (independent layers given the token id)": coselection.lift(given_token=True)}
