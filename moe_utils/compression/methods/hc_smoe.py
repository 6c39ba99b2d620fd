"""HC-SMoE (Chen et al., 2025, "Retraining-free merging of sparse MoE via hierarchical clustering"):
per layer, the experts are clustered by their outputs on calibration data and each cluster is
merged into one expert.

Each expert's feature is its output averaged over every calibration token
(:func:`moe_utils.compression.features.mean_expert_outputs`); hierarchical clustering with average
linkage on the Euclidean distances between these features is cut at exactly the layer's quota of
clusters (:meth:`moe_utils.compression.caep.PruningBudget.quota`); a cluster's members are averaged weighted by
their usage on the calibration tokens (frequency-weighted merging). The cluster's most used expert
(lowest index on ties) keeps its router row; the others' rows are dropped, so tokens reach the
merged expert through that row (:mod:`moe_utils.compression.merging`)."""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage

from moe_utils.compression.features import keep_of, mean_expert_outputs, usage_weights
from moe_utils.compression.registry import Method
from moe_utils.compression.value import Compression
from moe_utils.models.loading import moe_layers


def clusters(features: np.ndarray, n_clusters: int, usage: np.ndarray) -> list[list[int]]:
    """Average-linkage clusters of the rows of ``features``, exactly ``n_clusters`` of them, each
    led by its most used row (``usage``), sorted by leader; members after the leader in index order."""
    labels = (np.arange(len(features)) if n_clusters >= len(features)
              else cut_tree(linkage(features, method="average", metric="euclidean"), n_clusters=n_clusters).ravel())
    groups = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        lead = int(members[np.argmax(usage[members])])  # argmax: the first (lowest index) on ties
        groups.append([lead, *(int(m) for m in members if m != lead)])
    return sorted(groups)


def _hc_smoe(inputs, ratios):
    layers = moe_layers(inputs.model)
    features = [mean_expert_outputs(layer, h) for layer, h in zip(layers, inputs.stats.hidden)]
    bounds = inputs.budget.bounds()
    out = []
    for ratio in ratios:
        quota = inputs.budget.quota(ratio)
        groups = [clusters(f, int(q), inputs.stats.counts[i, : len(f)])
                  for i, (f, q) in enumerate(zip(features, quota))]
        out.append(Compression("hc_smoe", ratio, keep_of(groups, bounds), note=inputs.quota_note(ratio), groups=groups,
                               weights=usage_weights(inputs.stats.counts, groups, bounds)))
    return out


METHODS = (Method("hc_smoe", "merge", _hc_smoe, needs=frozenset({"stats", "hidden", "model"}), order=60,
                  summary="HC-SMoE: experts clustered by their mean outputs, usage-weighted merging"),)
