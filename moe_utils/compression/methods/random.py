"""Random masks: each layer keeps its quota of experts drawn uniformly with each seed
(:func:`moe_utils.compression.caep.random_mask`), the control every method is compared with."""

from __future__ import annotations

from moe_utils.compression.caep import random_mask
from moe_utils.compression.registry import Method
from moe_utils.compression.value import Compression


def _random(inputs, ratios):
    return [Compression("random", r, random_mask(inputs.budget, r, seed), seed=seed, note=inputs.quota_note(r))
            for r in ratios for seed in inputs.seeds]


METHODS = (Method("random", "prune", _random, seeded=True, order=90, summary="uniformly random masks, one per seed"),)
