"""The output-based method (the NAEE / GEM family): per layer, remove one at a time the expert whose
removal changes the layer's output least on the calibration tokens
(:func:`moe_utils.compression.calibration.output_removal_order`); one greedy order serves every ratio."""

from __future__ import annotations

import numpy as np

from moe_utils.compression.calibration import output_removal_order
from moe_utils.compression.registry import Method
from moe_utils.compression.value import Compression


def _output(inputs, ratios):
    budget = inputs.budget
    sizes, bounds = list(budget.layer_sizes), budget.bounds()
    quotas = {r: budget.quota(r) for r in inputs.ratios or ratios}
    n_remove = [size - min(int(q[i]) for q in quotas.values()) for i, size in enumerate(sizes)]
    orders = output_removal_order(inputs.model, inputs.stats.hidden, n_remove, cache_dir=inputs.cache_dir,
                                  progress=inputs.progress)
    out = []
    for ratio in ratios:
        keep = np.ones(budget.n_experts, dtype=bool)
        for layer, order in enumerate(orders):
            keep[bounds[layer] + np.asarray(order[: sizes[layer] - quotas[ratio][layer]], dtype=int)] = False
        out.append(Compression("output", ratio, keep, note=inputs.quota_note(ratio)))
    return out


METHODS = (Method("output", "prune", _output, needs=frozenset({"stats", "hidden", "model"}), one_at_a_time=True,
                  order=40, summary="greedy removal of the expert that changes the layer's output least"),)
