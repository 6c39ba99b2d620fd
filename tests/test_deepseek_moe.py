"""The DeepSeek-MoE port against the checkpoint's own layout, rebuilt here from its published design.

The reference keeps the remote code's module tree and tensor names (``mlp.gate.weight``,
``mlp.experts.<e>.{gate,up,down}_proj.weight``, ``mlp.shared_experts.*``) and computes the MoE block
the plain way: a softmax gate whose unsorted top-k weights are not renormalised, each chosen expert
run on its tokens, the shared experts on every token. The port must give its logits exactly, from
converted tensors, from a checkpoint directory in the remote config's format (no remote code), and
survive every conformance check.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from moe_utils.models.conformance import CHECKS, check_model
from moe_utils.models.deepseek_moe import DeepseekMoeForCausalLM, convert_state_dict, load_deepseek_moe, port_config
from moe_utils.models.loading import load_model, moe_layers
from moe_utils.models.tiny_configs import byte_tokenizer

#: The checkpoint's config.json fields, at tiny size (deepseek-moe-16b-base's names and flags).
REMOTE = dict(model_type="deepseek", architectures=["DeepseekForCausalLM"],
              auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
              vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, moe_layer_freq=1,
              n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=2, norm_topk_prob=False,
              scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu",
              max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
              attention_bias=False, tie_word_embeddings=False, bos_token_id=256, eos_token_id=256, pad_token_id=256)


class RemoteGate(nn.Module):
    def __init__(self, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, hidden) / hidden ** 0.5)
        self.top_k = top_k

    def forward(self, hidden):  # -> (topk_idx, topk_weight, aux_loss), the remote gate's output
        scores = torch.softmax(hidden.reshape(-1, hidden.shape[-1]) @ self.weight.T, dim=-1)
        weight, index = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        return index, weight, None


class RemoteMoE(nn.Module):
    def __init__(self, config: LlamaConfig, remote: dict):
        super().__init__()
        expert = copy.copy(config)
        expert.intermediate_size = remote["moe_intermediate_size"]
        shared = copy.copy(config)
        shared.intermediate_size = remote["moe_intermediate_size"] * remote["n_shared_experts"]
        self.gate = RemoteGate(config.hidden_size, remote["n_routed_experts"], remote["num_experts_per_tok"])
        self.experts = nn.ModuleList(LlamaMLP(expert) for _ in range(remote["n_routed_experts"]))
        self.shared_experts = LlamaMLP(shared)

    def forward(self, hidden):
        flat = hidden.reshape(-1, hidden.shape[-1])
        index, weight, _ = self.gate(flat)
        out = self.shared_experts(flat)
        for slot in range(index.shape[1]):
            for e, expert in enumerate(self.experts):
                rows = index[:, slot] == e
                if rows.any():
                    out[rows] = out[rows] + weight[rows, slot, None] * expert(flat[rows])
        return out.reshape(hidden.shape)


def remote_reference(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = {k: v for k, v in REMOTE.items() if k in LlamaConfig.__dataclass_fields__}
    config = LlamaConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": REMOTE["rope_theta"]})
    model = LlamaForCausalLM(config)
    for index, layer in enumerate(model.model.layers):
        if index >= REMOTE["first_k_dense_replace"]:
            layer.mlp = RemoteMoE(config, REMOTE)
    for param in model.parameters():  # every tensor drawn, so that no weight can be silently skipped
        nn.init.normal_(param, std=0.2)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))


def test_converted_tensors_give_the_reference_logits():
    reference = remote_reference()
    config = port_config(REMOTE)
    port = DeepseekMoeForCausalLM(config).eval()
    port.load_state_dict(convert_state_dict(reference.state_dict(), config), strict=True)
    assert (_logits(port, IDS) - _logits(reference, IDS)).abs().max() <= 1e-5
    layers = moe_layers(port)
    assert [(l.layer_index, l.num_experts, l.top_k) for l in layers] == [(i, 6, 2) for i in (1, 2, 3)]


@pytest.fixture
def checkpoint(tmp_path):
    """A directory shaped like the Hub's deepseek-moe-16b-base: remote config, safetensors, tokenizer."""
    reference = remote_reference()
    (tmp_path / "config.json").write_text(json.dumps(REMOTE))
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    names = sorted(state)
    save_file({k: state[k] for k in names[: len(names) // 2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[len(names) // 2:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    byte_tokenizer().save_pretrained(tmp_path)
    return tmp_path, reference


def test_load_model_reads_the_checkpoint_without_remote_code(checkpoint):
    path, reference = checkpoint
    model, tokenizer = load_model(path, device="cpu")  # trust_remote_code stays False
    assert type(model).__name__ == "DeepseekMoeForCausalLM"
    assert (_logits(model, IDS) - _logits(reference, IDS)).abs().max() <= 1e-5
    assert tokenizer("hello")["input_ids"]


def test_the_port_passes_every_conformance_check(checkpoint, tmp_path):
    path, _ = checkpoint
    model = load_deepseek_moe(path)
    row = check_model(model, byte_tokenizer(), tmp_path)
    assert {check: row[check] for check in CHECKS} == {check: "pass" for check in CHECKS}
    assert row["found_by"] == "discovery"


def test_a_checkpoint_missing_an_expert_is_refused(checkpoint):
    path, reference = checkpoint
    state = {k: v.contiguous() for k, v in reference.state_dict().items()
             if k != "model.layers.2.mlp.experts.5.up_proj.weight"}
    for shard in path.glob("*.safetensors"):
        shard.unlink()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.experts.*exactly 6 experts"):
        load_deepseek_moe(path)


def test_what_the_port_does_not_implement_is_refused():
    with pytest.raises(NotImplementedError, match="rotary"):
        port_config({**REMOTE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(NotImplementedError, match="softmax"):
        port_config({**REMOTE, "scoring_func": "sigmoid"})
