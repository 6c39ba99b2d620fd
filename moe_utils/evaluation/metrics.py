"""Which way each reported metric points: the one place that says whether lower is better.

The study reports accuracies (``acc``, ``acc_norm``: higher is better) and perplexities
(``word_perplexity``, ``byte_perplexity``, and ``bits_per_byte``, the log of the byte perplexity:
lower is better). Ranking methods (:func:`moe_utils.compression.pruning.method_ranks`,
:func:`moe_utils.compression.domains.rank_methods`), signing relative changes so that positive means better
(:mod:`moe_utils.compression.domains`), the diagonal test of the paper's Fig 9 and the colour maps of
:mod:`moe_utils.common.plotting` all ask :func:`lower_is_better`.
"""

from __future__ import annotations


def lower_is_better(metric: str) -> bool:
    """True for perplexities and bits per byte; False for accuracies and any other score."""
    return "perplexity" in metric or metric == "bits_per_byte"


def is_accuracy(metric: str) -> bool:
    """Whether ``metric`` is an accuracy (``acc``, ``acc_norm``): the columns a table averages."""
    return metric.startswith("acc")


def better_sign(metric: str) -> float:
    """+1 where higher is better, -1 where lower is: multiplied into a change, positive is better."""
    return -1.0 if lower_is_better(metric) else 1.0
