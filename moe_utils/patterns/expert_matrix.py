"""The expert activation matrix X and expert co-activation (paper sections 2 and 5, Fig 2).

X stacks the routed experts of all MoE layers as rows (expert k of MoE layer j is row j * E + k,
``N_e = n_layers * E``) and has one column per token or per sample (``N_s``). The paper leaves the
entry ambiguous, so all three readings are offered:

* ``value="weight"``: the routing weight the model gave the expert (zero outside the top-k);
* ``value="binary"``: 1 if the expert was among the token's top-k (then each token column sums to
  ``n_layers * k``, as one draft of the paper states);
* ``value="prob"``: the full routing probability (needs a store captured with ``record_probs``).

At ``granularity="sample"`` a column sums its sample's token columns (the paper's
``v[i, j, k] = sum_t alpha(t, j, k)``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from moe_utils.capture.store import RoutingStore
from moe_utils.patterns.cooccurrence import Cooccurrence


def expert_label(row: int, n_experts: int) -> str:
    """``"L<layer>E<expert>"`` for a row of X."""
    return f"L{row // n_experts}E{row % n_experts}"


def expert_matrix(
    store: RoutingStore,
    granularity: Literal["token", "sample"] = "token",
    value: Literal["weight", "binary", "prob"] = "weight",
    dtype=np.float32,
) -> sp.csr_matrix:
    """The paper's X, shape (N_e, N_s), as a scipy sparse CSR matrix.

    Token columns follow the store's token order; sample columns follow sorted ``sample_id``
    (``np.unique(store.tokens.sample_id)``).
    """
    if granularity not in ("token", "sample"):
        raise ValueError(f"granularity must be 'token' or 'sample', got {granularity!r}")
    n_tok, n_layers, k = store.topk_indices.shape
    n_e = n_layers * store.n_experts
    if value == "prob":
        if store.probs is None:
            raise ValueError("this store has no routing probabilities: capture with record_probs=True")
        x_tokens = sp.csr_matrix(np.asarray(store.probs, dtype=dtype).reshape(n_tok, n_e).T)
    elif value in ("weight", "binary"):
        rows = (np.asarray(store.topk_indices, dtype=np.int64)
                + (np.arange(n_layers) * store.n_experts)[None, :, None])  # (n_tok, L, k)
        cols = np.broadcast_to(np.arange(n_tok)[:, None, None], rows.shape)
        data = (np.ones(rows.shape, dtype=dtype) if value == "binary"
                else np.asarray(store.topk_weights, dtype=dtype))
        x_tokens = sp.csr_matrix((data.ravel(), (rows.ravel(), cols.ravel())), shape=(n_e, n_tok))
    else:
        raise ValueError(f"value must be 'weight', 'binary' or 'prob', got {value!r}")
    if granularity == "token":
        return x_tokens
    _, sample_col = np.unique(store.tokens["sample_id"].to_numpy(), return_inverse=True)
    pooling = sp.csr_matrix(
        (np.ones(n_tok, dtype=dtype), (np.arange(n_tok), sample_col)), shape=(n_tok, sample_col.max() + 1)
    )
    return (x_tokens @ pooling).tocsr()


def coactivation(store: RoutingStore) -> np.ndarray:
    """P(experts a and b both selected for the same token), (N_e, N_e); the diagonal is P(a selected).

    The counts are the exact blocked Gram products of :class:`~moe_utils.patterns.cooccurrence.Cooccurrence`
    over every token (dense BLAS: a few times faster than a sparse product at 27 layers x top-6)."""
    counts = Cooccurrence(expert_matrix(store, "token", "binary"), max_columns=None).pair_counts()
    return counts / store.n_tokens


def top_cross_layer_pairs(store: RoutingStore, co: np.ndarray | None = None, n: int = 10) -> pd.DataFrame:
    """The strongest co-activated expert pairs from different layers, with their lift.

    ``lift = P(a, b) / (P(a) P(b))``: how much more often the pair fires together than if the two
    layers chose independently. Sorted by co-activation probability.
    """
    co = coactivation(store) if co is None else co
    n_experts = store.n_experts
    layer = np.arange(co.shape[0]) // n_experts
    a, b = np.triu_indices_from(co, k=1)
    cross = layer[a] != layer[b]
    a, b = a[cross], b[cross]
    p = np.diag(co)
    frame = pd.DataFrame({
        "expert_a": [expert_label(i, n_experts) for i in a],
        "expert_b": [expert_label(j, n_experts) for j in b],
        "p_together": co[a, b],
        "p_a": p[a],
        "p_b": p[b],
    })
    frame["lift"] = frame["p_together"] / (frame["p_a"] * frame["p_b"]).where(lambda s: s > 0)
    return frame.sort_values(["p_together", "lift"], ascending=False).head(n).reset_index(drop=True)


def expert_usage(store: RoutingStore) -> np.ndarray:
    """(n_layers, E): each expert's share of its layer's routed slots (rows sum to 1)."""
    n_layers, n_experts = store.n_layers, store.n_experts
    counts = np.zeros((n_layers, n_experts))
    for layer in range(n_layers):
        counts[layer] = np.bincount(np.asarray(store.topk_indices[:, layer, :]).ravel(), minlength=n_experts)
    return counts / counts.sum(axis=1, keepdims=True)


def label_profiles(store: RoutingStore) -> pd.DataFrame:
    """Per label (e.g. MMLU-Pro category): the share of its tokens that select each expert, (labels, N_e)."""
    if store.tokens["label"].isna().all():
        raise ValueError("this store has no labels: pass labels= to capture_routing")
    selected = expert_matrix(store, "token", "binary").T.tocsr()  # (n_tokens, N_e)
    labels = store.tokens["label"].to_numpy()
    rows = {}
    for label in pd.unique(labels):
        member = labels == label
        rows[label] = np.asarray(selected[member].mean(axis=0)).ravel()
    columns = [expert_label(i, store.n_experts) for i in range(store.n_layers * store.n_experts)]
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns)
