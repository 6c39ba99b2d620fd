"""Routing prediction: each predictor against hand-computed cases, HSDL's masked inference against a
planted dictionary, the hidden-state predictor against the models' own routing, and the stage."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moe_utils.prediction import routing_prediction as rp
from moe_utils.prediction.hidden_prediction import (
    capture_with_hidden_predictions, decoder_layer_of, pre_moe_norm, router_ranking,
)
from moe_utils.models.loading import moe_layers

from .conftest import TEXTS

# ------------------------------------------------------------------ routing-only predictors
# Fitting tokens of a 2-layer, 3-expert, top-1 model: layer 0 -> layer 1 transitions 0->1, 0->1, 0->2, 1->0.
FIT = np.array([[[0], [1]], [[0], [1]], [[0], [2]], [[1], [0]]])


def test_usage_prior_ranks_layer_usage_with_ties_to_the_lower_index():
    ranked = rp.prior_rankings(FIT, n_tokens=2, n_experts=3, horizon=1, n_ranked=3)
    assert (ranked[:, 0] == -1).all()  # nothing to predict layer 0 from
    # layer 1 usage: expert 0 once, 1 twice, 2 once -> 1, then 0 and 2 tied -> lower index first
    assert ranked[:, 1].tolist() == [[1, 0, 2], [1, 0, 2]]


def test_first_order_affinity_by_hand():
    np.testing.assert_allclose(rp.affinity(FIT, 3, 0, 1), [[0, 2 / 3, 1 / 3], [1, 0, 0], [0, 0, 0]])
    held_out = np.array([[[0], [0]], [[1], [0]], [[2], [0]]])
    ranked = rp.affinity_rankings(FIT, held_out, 3, horizon=1, n_ranked=3)[:, 1]
    assert ranked[0].tolist() == [1, 2, 0]  # after expert 0: P = (0, 2/3, 1/3)
    assert ranked[1].tolist() == [0, 1, 2]  # after expert 1: P = (1, 0, 0); then the prior (1 before 2)
    assert ranked[2].tolist() == [1, 0, 2]  # expert 2 was never seen at layer 0: the prior alone


def test_affinity_averages_over_the_tokens_experts():
    # top-2 at layer 0: {0, 1} -> layer 1 {2, 3} twice; {0, 2} -> {1, 2} once
    fit = np.array([[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[0, 2], [1, 2]]])
    conditional = rp.affinity(fit, 4, 0, 1)
    np.testing.assert_allclose(conditional[0], [0, 1 / 3, 1, 2 / 3])  # expert 0 chosen 3 times
    np.testing.assert_allclose(conditional[1], [0, 0, 1, 1])
    held_out = np.array([[[0, 2], [0, 1]]])
    # mean of rows 0 and 2: (0, 2/3, 1, 1/3)
    assert rp.affinity_rankings(fit, held_out, 4, 1, 4)[0, 1].tolist() == [2, 1, 3, 0]


def test_oracle_puts_the_true_experts_first_in_routing_order():
    truth = np.array([[[0, 1], [2, 0]]])
    ranked = rp.oracle_rankings(truth, FIT.repeat(2, axis=2), 3, horizon=1, n_ranked=3)
    assert ranked[0, 1].tolist() == [2, 0, 1]
    assert rp.hit_counts(ranked, truth, 2)[0, 1] == 2


def test_hit_counts_and_the_summary_by_hand():
    truth = np.array([[[0, 1], [2, 3]], [[0, 1], [0, 1]]])
    ranked = np.array([[[-1, -1, -1], [3, 0, 2]], [[-1, -1, -1], [2, 3, 1]]])
    assert rp.hit_counts(ranked, truth, 2)[:, 1].tolist() == [1, 0]
    assert rp.hit_counts(ranked, truth, 3)[:, 1].tolist() == [2, 1]
    hits = {"p": {2: rp.hit_counts(ranked, truth, 2), 3: rp.hit_counts(ranked, truth, 3)}}
    table = rp.recall_summary(hits, np.array([0, 1]), np.array([1]), k=2, n_boot=200).set_index("m")
    assert table.loc[2, "recall"] == pytest.approx(1 / 4) and table.loc[2, "precision"] == pytest.approx(1 / 4)
    assert table.loc[3, "recall"] == pytest.approx(3 / 4) and table.loc[3, "precision"] == pytest.approx(3 / 6)
    assert table.loc[3, "recall_low"] <= 3 / 4 <= table.loc[3, "recall_high"]


def test_ratio_interval_resamples_prompts_not_tokens():
    # two prompts: one of 3 tokens all right, one of 1 token wrong; per-token mean 0.75
    interval = rp.ratio_interval(np.array([1, 1, 1, 0]), np.array([7, 7, 7, 9]), 1.0, n_boot=500)
    assert interval.estimate == pytest.approx(0.75)
    assert interval.low == pytest.approx(0.0) and interval.high == pytest.approx(1.0)  # a prompt is all or nothing


# ------------------------------------------------------------------ HSDL masked inference
def _planted():
    """3 layers x 4 experts; atoms A = L0E0 L1E1 L2E2, B = L0E3 L1E2 L2E0, C = L0E1 L1E3 L2E1."""
    dictionary = np.zeros((12, 3))
    for atom, experts in enumerate([(0, 1, 2), (3, 2, 0), (1, 3, 1)]):
        for layer, expert in enumerate(experts):
            dictionary[layer * 4 + expert, atom] = 1.0
    return dictionary


def test_masked_codes_recover_the_planted_atom_from_the_first_layer_only():
    dictionary = _planted()
    x = dictionary[:, [1]].T.copy()  # a token that follows atom B
    codes = rp.masked_codes(dictionary, x, n_observed=4, penalty=0.5)
    np.testing.assert_allclose(codes[0], [0, 1, 0], atol=0.05)
    x_changed = x.copy()
    x_changed[0, 4:] = dictionary[4:, 0]  # later layers now look like atom A: they must not matter
    np.testing.assert_allclose(rp.masked_codes(dictionary, x_changed, 4, 0.5), codes, atol=1e-6)


def test_hsdl_predicts_the_planted_atoms_later_experts():
    dictionary = _planted()
    hsdl = SimpleNamespace(dictionaries_=[dictionary], x_scale_=1.0, lambda_hier=500.0, lambda_rec=1000.0)
    x = dictionary.copy()  # three tokens, one per atom: columns of X
    fit = np.array([[[0], [1], [2]]])
    ranked = rp.hsdl_rankings(hsdl, x, fit, 3, 4, [1, 2], 1)
    # atoms A, B, C: layer 1 experts 1, 2, 3 (from layer 0); layer 2 experts 2, 0, 1 (from layer 0 or 0-1)
    assert ranked[1][:, 1, 0].tolist() == [1, 2, 3]
    assert ranked[1][:, 2, 0].tolist() == [2, 0, 1]
    assert ranked[2][:, 2, 0].tolist() == [2, 0, 1]
    assert (ranked[2][:, :2] == -1).all()


def test_hsdl_rankings_in_chunks_equal_one_fit_of_every_token():
    """Each token's code is its own problem: fitting the held-out tokens in chunks (bounded memory)
    gives the rankings of one fit over all of them."""
    rng = np.random.default_rng(3)
    dictionary = (rng.random((12, 5)) < 0.4).astype(np.float32)
    hsdl = SimpleNamespace(dictionaries_=[dictionary], x_scale_=0.5, lambda_hier=500.0, lambda_rec=1000.0)
    x = dictionary @ (rng.random((5, 23)) * (rng.random((5, 23)) < 0.5)) * 0.5
    fit = rng.integers(0, 4, (50, 3, 1))
    whole = rp.hsdl_rankings(hsdl, x, fit, 3, 4, [1, 2], 4, n_steps=30, chunk=100)
    for chunk in (1, 7):
        parts = rp.hsdl_rankings(hsdl, x, fit, 3, 4, [1, 2], 4, n_steps=30, chunk=chunk)
        for h in (1, 2):
            np.testing.assert_array_equal(parts[h], whole[h])
    with pytest.raises(ValueError, match="chunk"):
        rp.hsdl_rankings(hsdl, x, fit, 3, 4, [1], 4, chunk=0)


# ------------------------------------------------------------------ hidden-state predictor
@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe", "mixtral", "deepseek_v3", "phimoe", "gpt_oss"])
def test_the_router_given_its_exact_input_reproduces_the_captured_top_k(random_models, arch):
    """Fed the input its router saw (and, through the pre-MoE norm that :func:`pre_moe_norm` finds,
    the residual stream entering that norm), :func:`router_ranking` returns the captured top-k."""
    model, tokenizer = random_models[arch]
    layers = moe_layers(model)
    seen: dict[str, list[torch.Tensor]] = {"router": [], "norm": [], "chosen": []}
    norms = [pre_moe_norm(decoder_layer_of(model, layer.block)) for layer in layers]
    assert all(norm is not None for norm in norms)
    handles = [layers[-1].router.register_forward_pre_hook(lambda _m, args: seen["router"].append(args[0])),
               layers[-1].router.register_forward_hook(
                   lambda _m, _i, out: seen["chosen"].append(layers[-1].architecture.read_router_output(out).indices)),
               norms[-1].register_forward_pre_hook(lambda _m, args: seen["norm"].append(args[0]))]
    try:
        with torch.no_grad():
            enc = tokenizer(TEXTS[:3], return_tensors="pt", padding=True)
            model(**enc, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    chosen, hidden_size = seen["chosen"][0], model.config.hidden_size
    k = chosen.shape[1]
    with torch.no_grad():
        from_input = router_ranking(layers[-1], seen["router"][0], 2 * k)
        from_stream = router_ranking(layers[-1], norms[-1](seen["norm"][0]).reshape(-1, hidden_size), k)
    assert torch.equal(from_input[:, :k], chosen)
    assert torch.equal(from_stream, chosen)
    assert all(len(set(row)) == 2 * k for row in from_input.tolist())


def test_ranking_beyond_the_top_k_follows_the_router_logits(olmoe):
    model, _ = olmoe
    layer = moe_layers(model)[0]
    hidden = torch.randn(5, model.config.hidden_size)
    with torch.no_grad():
        ranked = router_ranking(layer, hidden, layer.num_experts)
        output = layer.architecture.read_router_output(layer.router.forward(hidden))
    assert torch.equal(ranked[:, :layer.top_k], output.indices)
    rest = output.logits.gather(1, ranked[:, layer.top_k:])
    assert (rest[:, :-1] >= rest[:, 1:]).all()
    assert all(sorted(row) == list(range(layer.num_experts)) for row in ranked.tolist())


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe", "deepseek_v3"])
def test_capture_ranks_with_the_next_router_on_the_state_leaving_the_layer(random_models, arch, tmp_path):
    """The probe's rankings equal the next router applied, through its pre-MoE norm, to the output of
    the decoder layer holding the source MoE layer as ``output_hidden_states`` reports it (an
    independent path), for every real token of a padded batch (DeepSeek-V3: a dense first layer, so
    MoE and decoder layer numbers differ)."""
    model, tokenizer = random_models[arch]
    layers = moe_layers(model)
    held = capture_with_hidden_predictions(model, tokenizer, TEXTS[:4], out_dir=tmp_path / "store",
                                           horizons=(1, 2), batch_size=4)
    k = layers[0].top_k
    assert held.hidden[1].shape == (held.store.n_tokens, len(layers), 2 * k)
    assert (held.hidden[1][:, 0] == -1).all() and (held.hidden[2][:, :2] == -1).all()
    enc = tokenizer(TEXTS[:4], return_tensors="pt", padding=True)
    mask = enc["attention_mask"].reshape(-1).bool()
    with torch.no_grad():
        states = model(**enc, use_cache=False, output_hidden_states=True).hidden_states
        for h in (1, 2):
            for target in range(h, len(layers)):
                source_out = states[layers[target - h].layer_index + 1].reshape(-1, states[0].shape[-1])[mask]
                norm = pre_moe_norm(decoder_layer_of(model, layers[target].block))
                expected = router_ranking(layers[target], norm(source_out), 2 * k).numpy()
                np.testing.assert_array_equal(held.hidden[h][:, target], expected)
    exact = held.hidden[1][:, 1:, :k]
    assert (exact == np.asarray(held.store.topk_indices)[:, 1:]).mean() < 1  # an approximation, not the truth


def test_bad_horizons_are_refused(olmoe, tmp_path):
    model, tokenizer = olmoe
    with pytest.raises(ValueError, match="horizons must be positive"):
        capture_with_hidden_predictions(model, tokenizer, TEXTS[:1], out_dir=tmp_path / "s", horizons=(0,))


# ------------------------------------------------------------------ the stage
@pytest.mark.slow
def test_stage_runs_on_the_smoke_profile(tmp_path, monkeypatch):
    """Stages 1, 2 and 6 through papermill on the smoke profile: the held-out questions are not stage
    1's, and the results name every predictor, with the oracle at recall 1."""
    from moe_utils.pipeline import runner as pipeline
    from moe_utils.capture.store import RoutingStore

    from .conftest import SHARED_DATA

    if not (SHARED_DATA / "mmlu_pro").is_dir():
        pytest.skip("needs the local MMLU-Pro copy")
    monkeypatch.setenv("MOE_MMLU_PRO_DIR", str(SHARED_DATA / "mmlu_pro"))
    artifacts = tmp_path / "artifacts"
    status = pipeline.run(pipeline.PROFILES / "smoke.yaml", {"artifacts_dir": str(artifacts)},
                          only=["01_capture", "02_hsdl", "06_routing_prediction"], executed=tmp_path / "executed")
    assert [s["stage"] for s in status["stages"] if not s.get("skipped")] == [
        "01_capture", "02_hsdl", "06_routing_prediction"]
    results = json.loads((artifacts / "06_routing_prediction" / "results.json").read_text())
    recall = {(row["predictor"], row["m"]): row["recall"] for row in results["recall"]}
    assert {name for name, _ in recall} == {"usage prior", "token id", "first-order affinity",
                                            "naive Bayes (layers <= l)", "HSDL (layers <= l)",
                                            "hidden state (next router)", "oracle"}
    assert recall[("oracle", 2)] == 1.0
    fitted = RoutingStore.open(artifacts / "01_capture" / "store")
    held_out = RoutingStore.open(artifacts / "06_routing_prediction" / "heldout_store")
    assert held_out.n_tokens == results["n_test_tokens"]
    assert held_out.manifest["fingerprint"]["texts"] != fitted.manifest["fingerprint"]["texts"]
