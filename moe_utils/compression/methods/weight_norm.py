"""Weight-norm pruning, the worked example of book/reproducing.md ("Adding a compression method"):
each layer keeps its quota of experts with the largest weights, measured as the Euclidean norm of
all of an expert's own parameters (:func:`moe_utils.compression.merging.expert_tensors`). It needs
the model only, no calibration data; a data-free reference point for the calibration baselines."""

from __future__ import annotations

import numpy as np
import torch

from moe_utils.compression.caep import layerwise_mask
from moe_utils.compression.merging import expert_tensors
from moe_utils.compression.registry import Method
from moe_utils.compression.value import Compression
from moe_utils.models.loading import moe_layers


def weight_norms(model) -> np.ndarray:
    """(N_e,) each routed expert's weight norm, in X's layer-major order."""
    norms = []
    with torch.no_grad():
        for layer in moe_layers(model):
            squares = sum(t.detach().double().pow(2).reshape(layer.num_experts, -1).sum(1)
                          for t in expert_tensors(layer).values())
            norms.append(squares.sqrt().cpu().numpy())
    return np.concatenate(norms)


def _weight_norm(inputs, ratios):
    scores = weight_norms(inputs.model)
    return [Compression("weight_norm", r, layerwise_mask(scores, inputs.budget, r), note=inputs.quota_note(r))
            for r in ratios]


METHODS = (Method("weight_norm", "prune", _weight_norm, needs=frozenset({"model"}), order=50,
                  summary="experts with the largest weight norm kept (the worked example)"),)
