"""The calibration pass and the output-based method (moe_utils.compression.calibration): statistics against the
routing store and hand-written matmuls with the fused expert weights, the output-based search
against physical expert removal, the caches and the calibration texts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moe_utils.compression import calibration
from moe_utils.models.expert_surgery import remove_experts
from moe_utils.models.loading import moe_layers
from moe_utils.capture.routing import capture_routing, record_routing

from .conftest import ARCHITECTURES, SHARED_DATA, TEXTS


# ------------------------------------------------------------------------- calibration
def test_frequency_equals_the_routing_store(olmoe, olmoe_stats, tmp_path):
    model, tok = olmoe
    store = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", batch_size=3, max_length=64, progress=False)
    counts = np.stack([np.bincount(np.asarray(store.topk_indices[:, layer]).ravel(), minlength=store.n_experts)
                       for layer in range(store.n_layers)])
    np.testing.assert_array_equal(olmoe_stats.counts, counts)
    assert olmoe_stats.n_tokens == store.n_tokens
    np.testing.assert_allclose(olmoe_stats.score("frequency"), counts.ravel() / store.n_tokens)
    weights = np.zeros_like(counts, dtype=float)
    for layer in range(store.n_layers):
        np.add.at(weights[layer], np.asarray(store.topk_indices[:, layer]).ravel(),
                  np.asarray(store.topk_weights[:, layer]).ravel())
    np.testing.assert_allclose(olmoe_stats.weight_sum, weights, rtol=1e-5)


def _olmoe_expert(experts, e, x):
    """An OLMoE expert by hand: down(silu(gate x) * up x), gate = first half of gate_up_proj."""
    gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ experts.down_proj[e].T


def test_expert_output_is_the_fused_weights_matmul(olmoe):
    model, _ = olmoe
    layer = moe_layers(model)[1]
    x = torch.randn(10, model.config.hidden_size)
    index = torch.arange(10) % layer.num_experts
    with torch.no_grad():
        out = calibration.expert_outputs(layer, x, index)
        expected = torch.stack([_olmoe_expert(layer.experts, int(e), x[i]) for i, e in enumerate(index)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_ean_and_reap_by_hand(olmoe, olmoe_stats):
    """Block inputs from a hook of our own, choices from record_routing, outputs by hand."""
    model, tok = olmoe
    layers = moe_layers(model)
    inputs = {}
    hooks = [layer.block.register_forward_pre_hook(
        lambda _m, args, i=layer.index: inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for layer in layers]
    norm, weighted = np.zeros(olmoe_stats.counts.shape), np.zeros(olmoe_stats.counts.shape)
    try:
        with torch.no_grad(), record_routing(model) as recorder:
            for start in range(0, len(TEXTS), 3):
                enc = tok(TEXTS[start:start + 3], return_tensors="pt", padding=True, truncation=True, max_length=64)
                model(**enc, use_cache=False)
                real = enc["attention_mask"].reshape(-1).bool()
                for layer, routed in zip(layers, recorder.pop()):
                    states = inputs[layer.index].pop()
                    for t in np.flatnonzero(real.numpy()):
                        for slot in range(layer.top_k):
                            e, w = int(routed.indices[t, slot]), float(routed.weights[t, slot])
                            size = float(_olmoe_expert(layer.experts, e, states[t]).norm())
                            norm[layer.index, e] += size
                            weighted[layer.index, e] += w * size
    finally:
        for hook in hooks:
            hook.remove()
    np.testing.assert_allclose(olmoe_stats.norm_sum, norm, rtol=1e-4)
    np.testing.assert_allclose(olmoe_stats.weighted_norm_sum, weighted, rtol=1e-4)
    routed = np.maximum(olmoe_stats.counts, 1).ravel()
    np.testing.assert_allclose(olmoe_stats.score("reap"), weighted.ravel() / routed, rtol=1e-4)
    assert all(len(h) == 64 for h in olmoe_stats.hidden)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_calibration_runs_on_every_architecture(random_models, arch):
    model, tok = random_models[arch]
    stats = calibration.calibrate(model, tok, TEXTS[:3], batch_size=3, max_length=32, progress=False)
    layers = moe_layers(model)
    np.testing.assert_array_equal(stats.counts.sum(axis=1), [stats.n_tokens * layer.top_k for layer in layers])
    routed = stats.counts > 0
    assert (stats.norm_sum[routed] > 0).all() and np.isfinite(stats.score("reap")).all()
    assert (stats.score("ean")[~routed.ravel()] == 0).all()


def test_calibration_and_output_search_are_cached(olmoe, olmoe_stats, tmp_path):
    model, tok = olmoe
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        first = calibration.calibrate(model, tok, TEXTS, batch_size=3, max_length=64, keep_hidden=64,
                                  cache_dir=tmp_path, progress=False)
        n_calls = len(calls)
        again = calibration.calibrate(model, tok, TEXTS, batch_size=3, max_length=64, keep_hidden=64,
                                  cache_dir=tmp_path, progress=False)
        assert len(calls) == n_calls > 0  # read back, not recomputed
        calibration.calibrate(model, tok, TEXTS, batch_size=3, max_length=32, cache_dir=tmp_path, progress=False)
        assert len(calls) > n_calls  # other settings: computed
    finally:
        hook.remove()
    for name in ("counts", "weight_sum", "norm_sum", "weighted_norm_sum"):
        np.testing.assert_array_equal(getattr(again, name), getattr(olmoe_stats, name))
    assert all(torch.equal(a, b) for a, b in zip(again.hidden, first.hidden))
    orders = calibration.output_removal_order(model, again.hidden, [1, 1, 1], cache_dir=tmp_path, progress=False)
    assert calibration.output_removal_order(model, again.hidden, [1, 1, 1], cache_dir=tmp_path, progress=False) == orders
    assert len(list(tmp_path.glob("output-*/orders.json"))) == 1


# ------------------------------------------------------------------------ output-based
def test_output_search_first_choice_matches_physical_removal(olmoe, olmoe_stats):
    """The first expert the greedy search removes changes the block output least, measured on
    copies of the model with each candidate physically removed (another code path than masking)."""
    model, _ = olmoe
    orders = calibration.output_removal_order(model, olmoe_stats.hidden, [3, 3, 3], progress=False)
    assert all(len(set(order)) == 3 for order in orders)
    layer = moe_layers(model)[0]
    states = olmoe_stats.hidden[0][None]
    with torch.no_grad():
        reference = layer.block(states)
        changes = []
        for candidate in range(layer.num_experts):
            keep = np.ones(len(moe_layers(model)) * layer.num_experts, dtype=bool)
            keep[candidate] = False
            removed = remove_experts(copy.deepcopy(model), keep)
            changes.append(float((moe_layers(removed)[0].block(states) - reference).pow(2).sum()))
    assert orders[0][0] == int(np.argmin(changes))


# --------------------------------------------------------------------------- calibration data
def test_calibration_sets(olmoe):
    _, tok = olmoe
    assert calibration.resolve_calibration("embedded") == {"source": "capture", "n_samples": None, "n_tokens": None}
    assert calibration.resolve_calibration("allenai/OLMoE-1B-7B-0924") == {"source": "mmlu", "n_samples": 128,
                                                                        "n_tokens": 2048}
    prompts = [f"p{i}" for i in range(10)]
    subset = calibration.calibration_texts(tok, "capture", n_samples=4, prompts=prompts, seed=1)
    assert len(subset) == 4 and set(subset) <= set(prompts) and subset == sorted(subset, key=prompts.index)
    if not (SHARED_DATA / "mmlu").is_dir():
        pytest.skip("no local MMLU copy")
    texts = calibration.calibration_texts(tok, "mmlu", n_samples=3, n_tokens=100, data_dir=SHARED_DATA / "mmlu")
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert len(texts) == 3 and all(abs(n - 100) <= 5 for n in lengths) and "Answer:" in "".join(texts)
