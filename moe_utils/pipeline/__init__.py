"""The pipeline: profiles checked against the notebooks' parameters, the stages run with papermill,
the run state and the status page, and the book built (:mod:`.runner`, ``python -m moe_utils.pipeline``)."""

from moe_utils.moved import forwarding

# the old module moe_utils.pipeline's names, for code written against it (moe_utils.moved)
__getattr__ = forwarding(__name__)
