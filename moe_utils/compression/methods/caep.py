"""CAEP (the paper's Algorithm 1, section 4) and its per-layer form, as registry entries.

``caep``: the global algorithm with the guard (:func:`moe_utils.compression.caep.caep`); it does not keep each
layer's quota exactly (dropping one atom can take several experts below the threshold at once).
``caep_layer``: the same contributions e = D R_sum, pruned layer by layer to the quota."""

from __future__ import annotations

from moe_utils.compression.caep import caep, contribution_scores, layerwise_mask
from moe_utils.compression.registry import Method
from moe_utils.compression.value import Compression


def _caep(inputs, ratios):
    out = []
    for ratio in ratios:
        result = caep(*inputs.dictionary, inputs.threshold_ratio, ratio, budget=inputs.budget)
        out.append(Compression("caep", ratio, result.keep, note=result.note))
    return out


def _caep_layer(inputs, ratios):
    scores = contribution_scores(*inputs.dictionary)
    return [Compression("caep_layer", r, layerwise_mask(scores, inputs.budget, r), note=inputs.quota_note(r))
            for r in ratios]


METHODS = (
    Method("caep", "prune", _caep, needs=frozenset({"dictionary"}), exact=False, order=10,
           summary="CAEP, the paper's Algorithm 1: global, with a guard of top-k experts per layer"),
    Method("caep_layer", "prune", _caep_layer, needs=frozenset({"dictionary"}), order=20,
           summary="CAEP's contributions, pruned layer by layer"),
)
