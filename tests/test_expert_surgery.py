"""Keep-masks applied to models: masking is exact, removal matches it, checkpoints round-trip.

Independent truths: routing recomputed here from the original router weights with each
architecture's rule written out by hand (or transformers' own ``sparsemixer`` on full-width masked
logits); the masked model's logits against the physically smaller model's; parameter counts against
the sizes of the removed tensors; the original model's logits after the context exits.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_utils.models.expert_surgery import (
    PruningError, experts_per_layer, load_pruned, masked_experts, normalize_keep, remove_experts, save_pruned,
)
from moe_utils.models.loading import moe_layers
from moe_utils.capture.routing import record_routing
from tests.conftest import ARCHITECTURES, TEXTS

TOL = 1e-5


def uneven_keep(model) -> list[list[int]]:
    """Different counts per layer, valid for every architecture (DeepSeek-V3's 2 groups: 6 and 4).

    Layer 1 keeps experts unevenly over DeepSeek-V3's original groups, so its groups are re-formed."""
    choices = [[0, 2, 3, 5, 6, 7], [1, 2, 3, 6], [0, 1, 2, 4, 5, 7]]
    return choices[: len(moe_layers(model))]


def even_keep(model) -> list[list[int]]:
    """The same count (4) in every layer, two per original DeepSeek-V3 group."""
    choices = [[0, 3, 5, 6], [1, 2, 4, 7], [2, 3, 6, 7]]
    return choices[: len(moe_layers(model))]


def logits(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc).logits
    return out[enc["attention_mask"].bool()]  # real tokens only


# --------------------------------------------------------------------------- masking
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_masked_routing_never_selects_pruned_and_model_is_restored(random_models, arch):
    model, tok = random_models[arch]
    keep = uneven_keep(model)
    before = logits(model, tok)
    with record_routing(model) as outer:
        with masked_experts(model, keep), record_routing(model) as inner:
            masked = logits(model, tok)
        for recorder in (outer, inner):  # hooks registered before and after the mask see the same
            for layer_keep, out in zip(keep, recorder.pop()):
                assert np.isin(out.indices.numpy(), layer_keep).all()
                pruned = np.setdiff1d(np.arange(out.logits.shape[-1]), layer_keep)
                assert torch.isneginf(out.logits[:, pruned]).all()
    assert (masked - before).abs().max() > 1e-4  # the mask changed something
    assert torch.equal(logits(model, tok), before)
    assert all("forward" not in layer.router.__dict__ for layer in moe_layers(model))


def test_mask_is_restored_after_an_exception(random_models):
    model, tok = random_models["mixtral"]
    before = logits(model, tok)
    with pytest.raises(RuntimeError, match="inside"):
        with masked_experts(model, uneven_keep(model)):
            raise RuntimeError("inside")
    assert torch.equal(logits(model, tok), before)


def test_output_router_logits_are_masked(random_models):
    model, tok = random_models["olmoe"]
    keep = uneven_keep(model)
    enc = tok(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad(), masked_experts(model, keep):
        out = model(**enc, output_router_logits=True)
    for layer_keep, router_logits in zip(keep, out.router_logits):
        pruned = np.setdiff1d(np.arange(router_logits.shape[-1]), layer_keep)
        assert torch.isneginf(router_logits[:, pruned]).all()
        assert torch.isfinite(router_logits[:, layer_keep]).all()


def _reference_routing(arch: str, router, hidden: torch.Tensor, kept: np.ndarray):
    """Routing among ``kept`` experts recomputed from the router's full weights, rule by rule."""
    kept_t = torch.as_tensor(kept)
    weight = router.weight.detach()
    logits = F.linear(hidden.float(), weight.float(), getattr(router, "bias", None))
    k = router.top_k
    masked = torch.full_like(logits, float("-inf"))
    masked[:, kept_t] = logits[:, kept_t]
    if arch in ("granitemoe", "gpt_oss"):  # top-k on logits, softmax over the k
        values, index = masked.topk(k, dim=-1)
        return index, torch.softmax(values, dim=-1)
    if arch == "phimoe":
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        weights, index = sparsemixer(masked, jitter_eps=router.router_jitter_noise, training=False, top_k=k)
        return index, weights
    if arch == "deepseek_v3":  # sigmoid + bias, groups of consecutive kept experts, top-k
        scores = torch.sigmoid(logits[:, kept_t])
        choice = scores + router.e_score_correction_bias[kept_t]
        n_group, per = router.num_group, len(kept) // router.num_group
        group_scores = choice.view(-1, n_group, per).topk(2, dim=-1).values.sum(-1)
        top_groups = group_scores.topk(router.topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(per, dim=1), float("-inf"))
        local = choice.topk(k, dim=-1).indices
        weights = scores.gather(1, local)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) if router.norm_topk_prob else weights
        return kept_t[local], weights * router.routed_scaling_factor
    probs = torch.softmax(masked, dim=-1)  # softmax over the kept experts, then top-k
    values, index = probs.topk(k, dim=-1)
    if arch == "mixtral" or getattr(router, "norm_topk_prob", False):
        values = values / values.sum(-1, keepdim=True)
    return index, values * getattr(router, "routed_scaling_factor", 1.0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_masked_router_follows_the_architecture_rule(random_models, arch):
    model = copy.deepcopy(random_models[arch][0])
    for layer in moe_layers(model):  # make DeepSeek-V3's correction bias matter
        if hasattr(layer.router, "e_score_correction_bias"):
            layer.router.e_score_correction_bias.copy_(torch.randn(layer.num_experts) * 0.3)
    keep = uneven_keep(model)
    hidden = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked_experts(model, keep):
        for layer, kept in zip(moe_layers(model), keep):
            _, weights, index = layer.router(hidden)
            ref_index, ref_weights = _reference_routing(arch, layer.router, hidden, np.asarray(kept))
            order, ref_order = index.sort(-1), ref_index.sort(-1)
            assert torch.equal(order.values, ref_order.values)
            got = weights.float().gather(1, order.indices)
            want = ref_weights.float().gather(1, ref_order.indices)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- removal
def routed_expert_params(model) -> list[int]:
    """Parameters per routed expert in each MoE layer: expert tensors and router rows (and biases)."""
    per_layer = []
    for layer in moe_layers(model):
        tensors = [*layer.experts.parameters(recurse=False), *layer.router.parameters(recurse=False)]
        per_layer.append(sum(t.numel() // t.shape[0] for t in tensors))
    return per_layer


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_removed_equals_masked_and_survives_save_and_reload(random_models, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    original, tok = random_models[arch]
    for name, keep in (("even", even_keep(original)), ("uneven", uneven_keep(original))):
        with masked_experts(original, keep):
            masked = logits(original, tok)
        n_before, per_expert = sum(p.numel() for p in original.parameters()), routed_expert_params(original)
        removed = remove_experts(copy.deepcopy(original), keep)
        assert experts_per_layer(removed) == [len(k) for k in keep]
        pruned = [layer.num_experts - len(k) for layer, k in zip(moe_layers(original), keep)]
        assert sum(p.numel() for p in removed.parameters()) == n_before - int(np.dot(pruned, per_expert))
        assert (logits(removed, tok) - masked).abs().max() <= TOL
        if name == "even":  # one count: plain save_pretrained / from_pretrained
            removed.save_pretrained(tmp_path / name)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        else:
            save_pruned(removed, tmp_path / name)
            reloaded = load_pruned(tmp_path / name)
            for kwargs in ({}, {"ignore_mismatched_sizes": True}):
                with pytest.raises(ValueError, match="load_pruned"):
                    AutoModelForCausalLM.from_pretrained(tmp_path / name, **kwargs)
            with pytest.raises(Exception):  # the model class's own loader fails too
                type(original).from_pretrained(tmp_path / name, ignore_mismatched_sizes=True)
        assert experts_per_layer(reloaded) == [len(k) for k in keep]
        assert (logits(reloaded, tok) - masked).abs().max() <= TOL


def test_save_pruned_of_an_even_model_is_a_plain_checkpoint(random_models, tmp_path):
    model, tok = random_models["olmoe"]
    removed = remove_experts(copy.deepcopy(model), even_keep(model))
    save_pruned(removed, tmp_path / "m", tokenizer=tok)
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()
    assert torch.equal(logits(load_pruned(tmp_path / "m"), tok), logits(removed, tok))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pruned(removed, tmp_path / "m")


def test_flat_mask_in_x_order(random_models):
    model, _ = random_models["olmoe"]
    keep = even_keep(model)
    n_layers, n_experts = len(keep), moe_layers(model)[0].num_experts
    mask = np.zeros(n_layers * n_experts, dtype=bool)
    for j, kept in enumerate(keep):
        mask[j * n_experts + np.asarray(kept)] = True
    for form in (mask, torch.as_tensor(mask), mask.tolist()):
        assert [k.tolist() for k in normalize_keep(model, form)] == keep


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("keep, message", [
    (np.ones(23, dtype=bool), "N_e = 3 MoE layers x 8 experts = 24"),
    (np.ones(24, dtype=int), "must be boolean"),
    ([[0, 1], [0, 1]], "3 MoE layers"),
    ([[0, 1], [0], [0, 1]], "fewer than the 2"),
    ([[0, 1], [], [0, 1]], "keep no expert"),
    ([[0, 1], [0, 8], [0, 1]], r"in \[0, 8\)"),
    ([[0, 1], [1, 1], [0, 1]], "repeated"),
])
def test_impossible_requests_are_clear_errors(random_models, keep, message):
    model, _ = random_models["olmoe"]
    with pytest.raises(PruningError, match=message):
        normalize_keep(model, keep)
    with pytest.raises(PruningError, match=message), masked_experts(model, keep):
        pass


@pytest.mark.parametrize("layer_keep, message", [
    ([0, 1, 2, 4, 5], "not divisible by n_group = 2"),
    ([0, 4], "leaves 1 per group"),
])
def test_group_routing_counts_are_checked(random_models, layer_keep, message):
    model, _ = random_models["deepseek_v3"]
    with pytest.raises(PruningError, match=message) as err:
        remove_experts(copy.deepcopy(model), [layer_keep, [0, 1, 2, 3]])
    assert "[4, 6, 8]" in str(err.value)  # the counts that work


def test_remote_code_deepseek_moe_layout(tmp_path):
    """DeepSeek-MoE-16B's layout (the paper's pruning model): a gate returning (idx, weight, aux), no
    logits, and a ModuleList of experts (rebuilt in tests/test_models.py: its code needs the Hub)."""
    from moe_utils.models.tiny_configs import byte_tokenizer
    from tests.test_models import DeepseekForCausalLM, deepseek_config

    torch.manual_seed(0)
    model, tok = DeepseekForCausalLM(deepseek_config()).eval(), byte_tokenizer()
    keep = [[0, 2, 5], [1, 2, 3, 4]]
    before = logits(model, tok)
    with masked_experts(model, keep), record_routing(model) as recorder:
        masked = logits(model, tok)
        selected = [out.indices.numpy() for out in recorder.pop()]
    assert all(np.isin(s, k).all() for s, k in zip(selected, keep))
    assert torch.equal(logits(model, tok), before)
    removed = remove_experts(copy.deepcopy(model), keep)
    assert [len(layer.experts) for layer in moe_layers(removed)] == [3, 4]
    assert experts_per_layer(removed) == [3, 4]
    assert removed.config.moe_experts_per_layer == [3, 4]
    assert (logits(removed, tok) - masked).abs().max() <= TOL


def test_regrouping_of_group_routed_layers_is_announced(random_models, caplog):
    model, _ = random_models["deepseek_v3"]
    with caplog.at_level("WARNING", logger="moe_utils.models.expert_surgery"), masked_experts(model, even_keep(model)):
        pass
    assert not caplog.records  # two kept per original group: the groups stay
    with caplog.at_level("WARNING", logger="moe_utils.models.expert_surgery"), masked_experts(model, uneven_keep(model)):
        pass
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["MoE layer 1"]


def test_allowed_counts_are_exactly_what_masking_accepts(random_models):
    """allowed_counts lists the counts masked_experts accepts, for a group-limited router and not."""
    from moe_utils.models.expert_surgery import allowed_counts

    model, _ = random_models["deepseek_v3"]
    allowed = allowed_counts(model)
    assert allowed == [[4, 6, 8]] * len(moe_layers(model))
    n_experts = moe_layers(model)[0].num_experts
    for count in range(2, n_experts + 1):
        keep = [list(range(count)), list(range(n_experts))]
        if count in allowed[0]:
            with masked_experts(model, keep):
                pass
        else:
            with pytest.raises(PruningError), masked_experts(model, keep):
                pass
    assert allowed_counts(random_models["olmoe"][0]) == [None] * len(moe_layers(random_models["olmoe"][0]))
