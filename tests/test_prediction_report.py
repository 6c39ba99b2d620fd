"""Stage 6's verdict sentences follow the intervals they are given."""

from __future__ import annotations

from moe_utils.stages import routing_prediction as prediction_report
from moe_utils.common.stats import Interval


def _interval(estimate, low, high):
    return Interval(estimate, low, high, 0.95)


RECALL = {key: _interval(v, v - 0.01, v + 0.01) for key, v in
          {"token": 0.64, "bayes": 0.48, "hsdl": 0.40, "affinity": 0.37, "hidden": 0.83}.items()}
LOADS = {"lru": 0.73, "hsdl": 1.32, "token": 1.11, "hidden": 0.90}
HITS = {"lru": 0.635, "hsdl": 0.724, "token": 0.853, "hidden": 0.930}


def test_hsdl_below_its_controls():
    versus = {"affinity": _interval(0.02, 0.01, 0.03), "bayes": _interval(-0.08, -0.086, -0.075),
              "token": _interval(-0.25, -0.26, -0.24)}
    found = prediction_report.findings("embedded", 8252, RECALL, versus, LOADS, HITS, 8, 16)
    assert found["finding_prediction"].startswith(
        "HSDL's patterns predict the next layer's experts worse than naive Bayes over the same layers and worse "
        "than the token's identity alone.")
    assert "token id 64.0% [63.0, 65.0]" in found["finding_prediction"]
    assert "HSDL minus affinity +2.0 points [+1.0, +3.0]" in found["finding_prediction"]
    assert found["finding_prefetch"].startswith("Prefetching by HSDL buys cache hits with extra expert loads.")
    assert "LRU alone hits 63.5% at 0.73 loads" in found["finding_prefetch"]


def test_hsdl_above_or_level_with_its_controls():
    versus = {"affinity": _interval(0.02, 0.01, 0.03), "bayes": _interval(0.01, -0.01, 0.03),
              "token": _interval(0.05, 0.02, 0.08)}
    found = prediction_report.findings("embedded", 10, RECALL, versus, {**LOADS, "hsdl": 0.70}, HITS, 8, 16)
    assert found["finding_prediction"].startswith(
        "HSDL's patterns predict the next layer's experts neither better nor worse than naive Bayes over the "
        "same layers and better than the token's identity alone.")
    assert found["finding_prefetch"].startswith("Prefetching by HSDL raises cache hits without extra expert loads.")
