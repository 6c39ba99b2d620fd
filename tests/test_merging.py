"""Expert merging (moe_utils.compression.merging, HC-SMoE and M-SMoE) against independent truth:
singleton groups are pruning, identical (or permuted-identical) experts merge into themselves, the
merged model saved with fewer experts reloads to the same logits, and the methods' groups."""

from __future__ import annotations

import copy

import numpy as np
import torch

from moe_utils.compression import caep, pruning
from moe_utils.compression import merging, registry
from moe_utils.compression.methods.hc_smoe import clusters
from moe_utils.compression.methods.m_smoe import dominant_groups
from moe_utils.compression.value import Compression
from moe_utils.models.expert_surgery import experts_per_layer, load_pruned, masked_experts, save_pruned
from moe_utils.models.loading import moe_layers

from .conftest import TEXTS


def logits(model, tok):
    enc = tok(TEXTS[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def half_keep(model):
    layers = moe_layers(model)
    keep = np.zeros(sum(layer.num_experts for layer in layers), dtype=bool)
    size = layers[0].num_experts
    for layer in layers:
        keep[layer.index * size + np.arange(0, size, 2)] = True
    return keep, size, len(layers)


def test_singleton_groups_are_pruning(olmoe):
    model, tok = olmoe
    keep, size, n_layers = half_keep(model)
    groups = [[[int(k)] for k in np.arange(0, size, 2)] for _ in range(n_layers)]
    merge = Compression("m", 0.5, keep, groups=groups, weights=np.ones(len(keep)), align=True)
    with masked_experts(model, keep):
        expected = logits(model, tok)
    with merging.applied(model, merge):
        got = logits(model, tok)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_identical_and_permuted_experts_merge_into_themselves(olmoe):
    """Experts 1 and 3 made copies of 0 and 2 (expert 3 with its neurons permuted: the same function):
    merging {0, 1} and {2, 3} leaves 0 and 2 exactly as they were, so the merged model equals
    pruning 1 and 3; without alignment the permuted copy blurs expert 2."""
    model, tok = olmoe
    model = copy.deepcopy(model)
    layer = moe_layers(model)[0]
    tensors = merging.expert_tensors(layer)
    layout = merging.neuron_layout(layer, model.config)
    perm = torch.randperm(layer.experts.intermediate_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, t in tensors.items():
            t.data[1] = t.data[0]
            t.data[3] = merging.permute_neurons(t.data[2], *layout[name], perm)
    original = {name: t.detach().clone() for name, t in tensors.items()}
    size = layer.num_experts
    keep = np.ones(len(moe_layers(model)) * size, dtype=bool)
    keep[[1, 3]] = False
    groups = [[[0, 1], [2, 3], *([e] for e in range(4, size))]] + [[[e] for e in range(size)]
                                                                    for _ in moe_layers(model)[1:]]
    weights = np.random.default_rng(0).random(len(keep)) + 0.1
    aligned = Compression("m_smoe", 0.1, keep, groups=groups, weights=weights, align=True)
    slices = merging.merged_slices(model, aligned)[0]
    for name in tensors:
        torch.testing.assert_close(slices[name][0], original[name][0])
        torch.testing.assert_close(slices[name][2], original[name][2], rtol=1e-6, atol=1e-6)
    with masked_experts(model, keep):
        expected = logits(model, tok)
    with merging.applied(model, aligned):
        torch.testing.assert_close(logits(model, tok), expected, rtol=1e-5, atol=1e-5)
    for name, t in tensors.items():  # restored on exit
        torch.testing.assert_close(t.detach(), original[name], rtol=0, atol=0)
    plain = merging.merged_slices(model, Compression("hc_smoe", 0.1, keep, groups=groups, weights=weights))[0]
    assert not torch.allclose(plain["down_proj"][2], original["down_proj"][2])


def test_merged_model_saves_with_fewer_experts_and_reloads_to_the_same_logits(olmoe, olmoe_stats, tmp_path):
    model, tok = olmoe
    budget = caep.PruningBudget.for_model(model)
    for merge in pruning.pruning_masks([0.5], budget=budget, methods=["hc_smoe", "m_smoe"], stats=olmoe_stats,
                                       model=model, progress=False):
        with merging.applied(model, merge):
            expected = logits(model, tok)
        small = merging.compress(copy.deepcopy(model), merge)
        assert experts_per_layer(small) == budget.quota(0.5).tolist()
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
        torch.testing.assert_close(logits(small, tok), expected, rtol=1e-5, atol=1e-5)
        reloaded = load_pruned(save_pruned(small, tmp_path / merge.method))
        torch.testing.assert_close(logits(reloaded, tok), expected, rtol=1e-5, atol=1e-5)


def test_methods_keep_the_quota_and_merge_every_expert(olmoe, olmoe_stats):
    model, _ = olmoe
    budget = caep.PruningBudget.for_model(model)
    merges = pruning.pruning_masks([0.25, 0.5], budget=budget, methods=["hc_smoe", "m_smoe"], stats=olmoe_stats,
                                   model=model, progress=False)
    registry.check_built(merges, budget)
    for merge in merges:
        for layer_groups, size in zip(merge.groups, budget.layer_sizes):
            assert sorted(i for g in layer_groups for i in g) == list(range(size))
    m_smoe = next(m for m in merges if m.method == "m_smoe" and m.ratio == 0.5)
    counts = olmoe_stats.counts[0]
    leaders = [g[0] for g in m_smoe.groups[0]]
    assert counts[leaders].min() >= np.delete(counts, leaders).max()  # the dominant experts are the most used


def test_clusters_and_dominant_groups_recover_planted_structure():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat(np.arange(3), 3)
    features = centres[truth] + rng.normal(scale=0.1, size=(9, 2))
    usage = np.array([1, 5, 2, 7, 1, 1, 0, 0, 3])
    found = clusters(features, 3, usage)
    assert sorted(sorted(g) for g in found) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert {g[0] for g in found} == {1, 3, 8}  # each led by its most used member
    base = rng.normal(size=(50, 2))
    logits = np.column_stack([base[:, 0], base[:, 1], base[:, 0] * 2 + 0.01 * rng.normal(size=50),
                              base[:, 1] * 3 + 0.01 * rng.normal(size=50)])
    assert dominant_groups(logits, 2, np.array([9, 8, 1, 1])) == [[0, 2], [1, 3]]


def test_merging_cost_counts_each_run_once():
    import pandas as pd

    from moe_utils.stages.pruning import merging_cost

    rows = [("unpruned", 0.0, None, "blimp", 10.0), ("unpruned", 0.0, None, "wiki", 4.0),
            ("hc_smoe", 0.5, None, "blimp", 12.0), ("m_smoe", 0.5, None, "blimp", 11.0),
            ("random", 0.5, 0, "blimp", 9.0), ("random", 0.5, 1, "blimp", 9.0)]
    frame = pd.DataFrame(rows, columns=["method", "ratio", "seed", "task", "seconds"])
    frame = pd.concat([frame, frame.assign(metric="other")])  # two metric rows per run
    assert merging_cost(frame) == {"merge_models": 2, "merge_eval_seconds": 23.0, "all_eval_seconds": 55.0}
