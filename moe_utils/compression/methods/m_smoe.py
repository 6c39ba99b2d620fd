"""M-SMoE (Li et al., 2024, "Merge, then compress: demystify efficient SMoE with hints from its
routing policy"): per layer, the most used experts are kept as dominant, every other expert joins
the dominant expert whose router logits it resembles most, and each group is merged with its
members' neurons aligned.

The dominant experts are the layer's quota (:meth:`moe_utils.compression.caep.PruningBudget.quota`) of most
used experts on the calibration tokens (lowest index on ties). (The paper spreads the dominant
experts over the layers by their usage across the whole model; here every layer keeps the same
count as the other per-layer baselines, so that all methods compare at the same per-layer budget.) An expert's feature is its column of
router logits over the calibration tokens (:func:`moe_utils.compression.features.router_logits`);
each non-dominant expert joins the dominant one of highest cosine similarity. Before the
usage-weighted average, each member's intermediate neurons are permuted to match the dominant
expert's (:func:`moe_utils.compression.merging.neuron_permutation`). The dominant expert keeps its
router row; the others' rows are dropped, so tokens reach the merged expert through that row
(:mod:`moe_utils.compression.merging`)."""

from __future__ import annotations

import numpy as np

from moe_utils.compression.features import keep_of, router_logits, usage_weights
from moe_utils.compression.registry import Method
from moe_utils.compression.value import Compression
from moe_utils.models.loading import moe_layers


def dominant_groups(logits: np.ndarray, n_dominant: int, usage: np.ndarray) -> list[list[int]]:
    """Groups led by the ``n_dominant`` most used experts; each other expert (column of ``logits``)
    joins the dominant one whose column has the highest cosine similarity to its own."""
    order = np.argsort(-usage, kind="stable")
    dominant = np.sort(order[:n_dominant])
    columns = logits / np.maximum(np.linalg.norm(logits, axis=0, keepdims=True), 1e-12)
    similarity = columns.T @ columns[:, dominant]  # (E, n_dominant)
    groups = {int(d): [int(d)] for d in dominant}
    for expert in sorted(set(range(logits.shape[1])) - set(dominant.tolist())):
        groups[int(dominant[np.argmax(similarity[expert])])].append(expert)
    return [groups[int(d)] for d in dominant]


def _m_smoe(inputs, ratios):
    layers = moe_layers(inputs.model)
    logits = [router_logits(layer, h) for layer, h in zip(layers, inputs.stats.hidden)]
    bounds = inputs.budget.bounds()
    out = []
    for ratio in ratios:
        quota = inputs.budget.quota(ratio)
        groups = [dominant_groups(l, int(q), inputs.stats.counts[i, : l.shape[1]])
                  for i, (l, q) in enumerate(zip(logits, quota))]
        out.append(Compression("m_smoe", ratio, keep_of(groups, bounds), note=inputs.quota_note(ratio), groups=groups,
                               weights=usage_weights(inputs.stats.counts, groups, bounds), align=True))
    return out


METHODS = (Method("m_smoe", "merge", _m_smoe, needs=frozenset({"stats", "hidden", "model"}), order=70,
                  summary="M-SMoE: dominant experts by usage, others grouped by router logits, aligned merging"),)
