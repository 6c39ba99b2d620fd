"""Evaluation: the lm-evaluation-harness runs (:mod:`.harness`, task files under ``tasks/``), the
data (:mod:`.data` for MMLU-Pro, :mod:`.wikitext`, :mod:`.blimp`, checked by :mod:`.data_checks`),
per-document scores of masked models (:mod:`.pruning_eval`), paired comparisons (:mod:`.paired`)
and which way each metric points (:mod:`.metrics`)."""

from moe_utils.moved import forwarding

# the old module moe_utils.evaluation's names, for code written against it (moe_utils.moved)
__getattr__ = forwarding(__name__)
