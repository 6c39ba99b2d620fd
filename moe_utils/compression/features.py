"""What the merging methods measure on calibration data, per MoE layer, from the block inputs a
calibration pass kept (:attr:`moe_utils.compression.calibration.ExpertStats.hidden`): every expert's mean
output (HC-SMoE), the router's logits (M-SMoE), and the experts' usage as merging weights."""

from __future__ import annotations

import numpy as np
import torch

from moe_utils.compression.calibration import block_output, expert_outputs
from moe_utils.models.loading import MoELayer


def mean_expert_outputs(layer: MoELayer, hidden: torch.Tensor) -> np.ndarray:
    """(E, H): each expert's output f_e(x), unweighted, averaged over every calibration token x
    (each expert applied to all tokens, not only those routed to it)."""
    weight = next(layer.experts.parameters())
    states = hidden.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        return np.stack([expert_outputs(layer, states, torch.full((len(states),), e, device=weight.device))
                         .double().mean(0).cpu().numpy() for e in range(layer.num_experts)])


def router_logits(layer: MoELayer, hidden: torch.Tensor) -> np.ndarray:
    """(n, E): the router's logits on the calibration tokens, read from its own output while the
    MoE block runs on them; a router whose output holds no logits gives its routing weights (0 for
    the experts a token does not choose)."""
    seen = []
    handle = layer.router.register_forward_hook(lambda _m, _a, output: seen.append(output))
    weight = next(layer.block.parameters())
    try:
        with torch.no_grad():
            block_output(layer.block, hidden.to(device=weight.device, dtype=weight.dtype))
    finally:
        handle.remove()
    routed = layer.architecture.read_router_output(seen[0])
    if routed.logits is not None:
        return routed.logits.reshape(-1, routed.logits.shape[-1])[:, :layer.num_experts].double().cpu().numpy()
    dense = torch.zeros(routed.indices.shape[0], layer.num_experts, dtype=torch.float64)
    dense.scatter_(1, routed.indices.cpu().long(), routed.weights.cpu().double())
    return dense.numpy()


def usage_weights(counts: np.ndarray, groups: list[list[list[int]]], bounds: np.ndarray) -> np.ndarray:
    """(N_e,) merging weights: each expert's calibration usage (tokens routed to it); the members of a
    group that no calibration token used share it equally."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.concatenate([counts[layer, : bounds[layer + 1] - bounds[layer]] for layer in range(len(groups))])
    for layer, layer_groups in enumerate(groups):
        for group in layer_groups:
            rows = bounds[layer] + np.asarray(group)
            if weights[rows].sum() <= 0:
                weights[rows] = 1.0
    return weights


def keep_of(groups: list[list[list[int]]], bounds: np.ndarray) -> np.ndarray:
    """(N_e,) bool: the experts that lead a group (their router rows are kept)."""
    keep = np.zeros(int(bounds[-1]), dtype=bool)
    for layer, layer_groups in enumerate(groups):
        keep[[bounds[layer] + g[0] for g in layer_groups]] = True
    return keep
