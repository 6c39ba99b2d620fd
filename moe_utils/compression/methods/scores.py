"""The calibration baselines that score each expert from one calibration pass and prune the
lowest-scoring share of every layer (:meth:`moe_utils.compression.calibration.ExpertStats.score`): selection
frequency and mean routing weight (SEER-MoE's hard and soft counts), the expert activation norm
(EAN) and REAP."""

from __future__ import annotations

from functools import partial

from moe_utils.compression.caep import layerwise_mask
from moe_utils.compression.registry import Method
from moe_utils.compression.value import Compression


def _by_score(name, inputs, ratios):
    scores = inputs.stats.score(name)
    return [Compression(name, r, layerwise_mask(scores, inputs.budget, r), note=inputs.quota_note(r)) for r in ratios]


_SUMMARIES = {"frequency": "share of tokens routed to the expert (SEER-MoE)",
              "router_weight": "mean routing weight over all tokens (SEER-MoE, soft)",
              "ean": "mean norm of the expert's output on its tokens (EAN)",
              "reap": "mean routing weight x output norm on its tokens (REAP)"}

METHODS = tuple(Method(name, "prune", partial(_by_score, name), needs=frozenset({"stats"}), order=30 + i,
                       summary=summary) for i, (name, summary) in enumerate(_SUMMARIES.items()))
