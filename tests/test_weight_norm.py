"""The worked example of book/reproducing.md: the weight-norm method, registered by its module
alone, keeps in every layer exactly the experts whose fused weights have the largest norms,
computed here straight from the OLMoE's own parameters."""

from __future__ import annotations

import numpy as np
import torch

from moe_utils.compression import caep, pruning
from moe_utils.compression import registry


def test_weight_norm_keeps_the_heaviest_experts_of_each_layer(olmoe):
    model, _ = olmoe
    assert "weight_norm" in pruning.METHODS and registry.get("weight_norm").needs == {"model"}
    budget = caep.PruningBudget.for_model(model)
    masks = pruning.pruning_masks([0.25, 0.5], budget=budget, methods=["weight_norm"], model=model, progress=False)
    registry.check_built(masks, budget)
    for mask in masks:
        for i, decoder_layer in enumerate(model.model.layers):
            experts = decoder_layer.mlp.experts
            norms = torch.sqrt(experts.gate_up_proj.detach().double().pow(2).sum((1, 2))
                               + experts.down_proj.detach().double().pow(2).sum((1, 2))).numpy()
            quota = budget.quota(mask.ratio)[i]
            kept = np.flatnonzero(mask.keep[i * len(norms):(i + 1) * len(norms)])
            assert set(kept) == set(np.argsort(-norms)[:quota]), (mask.ratio, i)
