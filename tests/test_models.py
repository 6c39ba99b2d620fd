"""The MoE architecture registry: every supported architecture, dense models, custom adapters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moe_utils.models import REGISTRY, MoEArchitecture, RouterOutput, load_model, moe_layers, register_architecture
from moe_utils.routing import capture_routing
from moe_utils.tiny_configs import random_model

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


def test_registered_type_without_moe_blocks_gets_clear_error():
    model, _ = random_model("olmoe")
    for layer in model.model.layers:
        del layer.mlp.gate  # an unknown layout under a known model type
    with pytest.raises(NotImplementedError, match="no MoE layer found.*register an adapter"):
        moe_layers(model)


def test_register_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(MoEArchitecture(model_types=("olmoe",)))


def test_unknown_random_architecture():
    with pytest.raises(ValueError, match="no tiny config"):
        load_model("random:not_a_model")


# --- A custom MoE of the older layout: ModuleList experts, gate returning (topk_idx, topk_weight, aux) ---

class ToyGate(nn.Module):
    def __init__(self, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(n_experts, hidden))
        self.last_selection = None

    def forward(self, hidden_states):  # (B, T, H)
        scores = torch.softmax(hidden_states.reshape(-1, hidden_states.shape[-1]) @ self.weight.T, dim=-1)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1)
        self.last_selection = topk_idx
        return topk_idx, topk_weight, torch.zeros(())


class ToyMoE(nn.Module):
    def __init__(self, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.gate = ToyGate(hidden, n_experts, top_k)
        self.experts = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_experts))

    def forward(self, h):
        idx, weight, _ = self.gate(h)
        flat = h.reshape(-1, h.shape[-1])
        out = torch.zeros_like(flat)
        for slot in range(idx.shape[1]):
            for e, expert in enumerate(self.experts):
                rows = idx[:, slot] == e
                out[rows] += weight[rows, slot, None] * expert(flat[rows])
        return h + out.reshape(h.shape)


class ToyLayer(nn.Module):
    def __init__(self, hidden, n_experts, top_k):
        super().__init__()
        self.mlp = ToyMoE(hidden, n_experts, top_k)

    def forward(self, h):
        return self.mlp(h)


class ToyMoEForCausalLM(nn.Module):
    def __init__(self, vocab=260, hidden=16, n_layers=2, n_experts=6, top_k=2):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy_remote_moe", num_hidden_layers=n_layers)
        self.embed = nn.Embedding(vocab, hidden)
        self.model = SimpleNamespace(layers=nn.ModuleList(ToyLayer(hidden, n_experts, top_k) for _ in range(n_layers)))
        self.layers = self.model.layers  # registered as a submodule
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return SimpleNamespace(logits=self.head(h))


@pytest.fixture
def toy_adapter():
    arch = register_architecture(MoEArchitecture(
        model_types=("toy_remote_moe",),
        read_router_output=lambda out: RouterOutput(indices=out[0], weights=out[1], logits=None),
    ))
    yield arch
    REGISTRY.pop("toy_remote_moe")


def test_unregistered_custom_moe_is_refused():
    with pytest.raises(NotImplementedError, match="toy_remote_moe"):
        moe_layers(ToyMoEForCausalLM())


def test_custom_adapter_captures_the_gates_own_selection(toy_adapter, tmp_path):
    from moe_utils.tiny_configs import byte_tokenizer

    torch.manual_seed(0)
    model, tok = ToyMoEForCausalLM().eval(), byte_tokenizer()
    layers = moe_layers(model)
    assert [(layer.num_experts, layer.top_k) for layer in layers] == [(6, 2), (6, 2)]
    texts = ["abc", "a longer text"]
    store = capture_routing(model, tok, texts, out_dir=tmp_path / "s", batch_size=2, progress=False)
    enc = tok(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool().reshape(-1)
    for layer in layers:
        own = layer.router.last_selection[mask].numpy()
        assert (store.topk_indices[:, layer.index, :] == own).all()
    with pytest.raises(ValueError, match="record_probs"):
        capture_routing(model, tok, texts, out_dir=tmp_path / "p", record_probs=True, progress=False)
