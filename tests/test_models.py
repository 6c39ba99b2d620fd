"""The MoE architecture registry: every supported architecture, dense models, custom adapters."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from moe_utils.models.loading import (
    REGISTRY, MoEArchitecture, load_model, moe_layers, read_index_weight_aux, register_architecture,
)
from moe_utils.capture.routing import capture_routing
from moe_utils.models.tiny_configs import random_model

from .conftest import ARCHITECTURES


def _expected_counts(config):
    n_experts = next(getattr(config, a) for a in ("num_experts", "num_local_experts", "n_routed_experts")
                     if isinstance(getattr(config, a, None), int))
    dense_first = getattr(config, "first_k_dense_replace", 0) or 0
    return config.num_hidden_layers - dense_first, n_experts, config.num_experts_per_tok


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_moe_layers_match_config(random_models, arch):
    model, _ = random_models[arch]
    layers = moe_layers(model)
    n_moe, n_experts, top_k = _expected_counts(model.config)
    assert len(layers) == n_moe
    assert [layer.index for layer in layers] == list(range(n_moe))
    for layer in layers:
        assert (layer.num_experts, layer.top_k) == (n_experts, top_k)
        assert layer.router.weight.shape[0] == n_experts  # the router scores every routed expert
        assert isinstance(layer.experts, nn.Module)


def test_deepseek_dense_first_layer_is_skipped(random_models):
    model, _ = random_models["deepseek_v3"]
    assert [layer.layer_index for layer in moe_layers(model)] == [1, 2]


def test_dense_model_gets_clear_error():
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(NotImplementedError, match=r"'llama'.*register_architecture"):
        moe_layers(dense)


def test_model_without_moe_blocks_gets_clear_error():
    model, _ = random_model("olmoe")
    for layer in model.model.layers:
        del layer.mlp.gate  # experts without a router: nothing discovery can read
    with pytest.raises(NotImplementedError, match="no MoE block found.*'olmoe'.*register an adapter"):
        moe_layers(model)


def test_register_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(MoEArchitecture(model_types=("deepseek",)))


def test_a_checkpoint_without_tokenizer_files_is_refused_before_any_work(tmp_path):
    model, tokenizer = random_model("olmoe")
    model.save_pretrained(tmp_path / "with")
    tokenizer.save_pretrained(tmp_path / "with")
    assert load_model(tmp_path / "with", device="cpu")[1]("hello world")["input_ids"]
    model.save_pretrained(tmp_path / "without")  # weights and config only
    with pytest.raises(ValueError, match="encodes 'hello world' to no tokens.*tokenizer files"):
        load_model(tmp_path / "without", device="cpu")


def test_unknown_random_architecture():
    with pytest.raises(ValueError, match="no transformers config for model type 'not_a_model'"):
        load_model("random:not_a_model")


# --- DeepSeek-MoE-16B's remote-code layout (model type "deepseek"), read by the registry's own adapter ---
# The checkpoint's modeling code cannot be fetched here (no Hub), so these modules rebuild its layout:
# a dense first layer (first_k_dense_replace), then DeepseekMoE blocks whose MoEGate returns
# (topk_idx, topk_weight, aux_loss) with an unsorted top-k, a ModuleList of routed experts, and
# always-on shared experts. The config carries the checkpoint's own field names.

def deepseek_config(**overrides):
    """A config with deepseek-moe-16b-base's field names, tiny by default."""
    fields = dict(model_type="deepseek", hidden_size=16, num_hidden_layers=3, first_k_dense_replace=1,
                  moe_layer_freq=1, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
                  norm_topk_prob=False, scoring_func="softmax", vocab_size=260)
    fields.update(overrides)
    return SimpleNamespace(**fields)


class DeepseekGate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k, self.n_routed_experts = config.num_experts_per_tok, config.n_routed_experts
        self.weight = nn.Parameter(torch.randn(config.n_routed_experts, config.hidden_size))
        self.last_selection = None

    def forward(self, hidden_states):  # (B, T, H) -> (N, k) indices, (N, k) weights, aux loss
        scores = torch.softmax(hidden_states.reshape(-1, hidden_states.shape[-1]) @ self.weight.T, dim=-1)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        # sorted=False leaves the order to the kernel (not by weight on GPUs): stand for that with the weakest first
        topk_weight, topk_idx = topk_weight.flip(-1), topk_idx.flip(-1)
        self.last_selection = (topk_idx, topk_weight)
        return topk_idx, topk_weight, None


class DeepseekMoEBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.gate = DeepseekGate(config)
        self.experts = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(config.n_routed_experts))
        self.shared_experts = nn.Linear(hidden, hidden)

    def forward(self, h):
        idx, weight, _ = self.gate(h)
        flat = h.reshape(-1, h.shape[-1])
        out = self.shared_experts(flat)
        for slot in range(idx.shape[1]):
            for e, expert in enumerate(self.experts):
                rows = idx[:, slot] == e
                out[rows] += weight[rows, slot, None] * expert(flat[rows])
        return h + out.reshape(h.shape)


class DeepseekLayer(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        moe = layer_index >= config.first_k_dense_replace and layer_index % config.moe_layer_freq == 0
        self.mlp = DeepseekMoEBlock(config) if moe else nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return self.mlp(h)


class DeepseekForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(DeepseekLayer(config, i) for i in range(config.num_hidden_layers))
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return SimpleNamespace(logits=self.head(h))


def test_deepseek_layout_is_read_by_the_registered_adapter():
    model = DeepseekForCausalLM(deepseek_config(num_hidden_layers=4, n_routed_experts=64, num_experts_per_tok=6))
    layers = moe_layers(model)
    assert REGISTRY["deepseek"] is layers[0].architecture
    assert [layer.layer_index for layer in layers] == [1, 2, 3]  # the dense first layer is skipped
    assert {(layer.num_experts, layer.top_k) for layer in layers} == {(64, 6)}
    assert all(layer.experts is model.model.layers[layer.layer_index].mlp.experts for layer in layers)


def test_deepseek_capture_records_the_gates_own_selection_sorted_by_weight(tmp_path):
    from moe_utils.models.tiny_configs import byte_tokenizer

    torch.manual_seed(0)
    model, tok = DeepseekForCausalLM(deepseek_config()).eval(), byte_tokenizer()
    layers = moe_layers(model)
    assert [(layer.num_experts, layer.top_k) for layer in layers] == [(6, 2), (6, 2)]
    texts = ["abc", "a longer text"]
    store = capture_routing(model, tok, texts, out_dir=tmp_path / "s", batch_size=2, progress=False)
    enc = tok(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool().reshape(-1)
    for layer in layers:
        own_idx, own_weight = (t[mask].numpy() for t in layer.router.last_selection)
        got_idx, got_weight = store.topk_indices[:, layer.index, :], store.topk_weights[:, layer.index, :]
        assert (np.sort(got_idx, axis=1) == np.sort(own_idx, axis=1)).all()  # same experts per token
        assert (np.diff(got_weight, axis=1) <= 0).all()  # strongest choice first
        for token in range(len(own_idx)):  # each expert keeps its own weight
            own = dict(zip(own_idx[token], own_weight[token]))
            assert np.allclose([own[e] for e in got_idx[token]], got_weight[token])
    with pytest.raises(ValueError, match="record_probs"):
        capture_routing(model, tok, texts, out_dir=tmp_path / "p", record_probs=True, progress=False)


def test_an_unregistered_remote_layout_is_discovered_and_a_registered_adapter_overrides_it():
    model = DeepseekForCausalLM(deepseek_config(model_type="my_remote_moe"))
    discovered = moe_layers(model)  # gate returns (topk_idx, topk_weight, aux): indices found by type and shape
    assert [layer.architecture.found_by for layer in discovered] == ["discovery"] * 2
    output = discovered[0].router(torch.randn(5, model.config.hidden_size))
    read = discovered[0].architecture.read_router_output(output)
    assert read.indices is output[0] and read.weights is output[1] and read.logits is None
    register_architecture(MoEArchitecture(model_types=("my_remote_moe",), read_router_output=read_index_weight_aux))
    try:
        assert [layer.architecture.found_by for layer in moe_layers(model)] == ["registry"] * 2
    finally:
        REGISTRY.pop("my_remote_moe")
