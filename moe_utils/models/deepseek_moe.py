"""DeepSeek-MoE-16B on transformers 5, without its remote code: the paper's pruning model (section 4).

``deepseek-ai/deepseek-moe-16b-base`` (and ``-chat``) ships modeling code written for transformers
4.36, which imports ``is_torch_fx_available`` and no longer loads. Its computation is a Llama
decoder (multi-head attention with rotary positions, RMSNorm, SwiGLU) whose feed-forward, from layer
``first_k_dense_replace`` on (every ``moe_layer_freq``-th layer), is a DeepSeek-MoE block: a softmax
router over ``n_routed_experts`` fine-grained experts that sends each token to its top-k (weights not
renormalised unless ``norm_topk_prob``), plus ``n_shared_experts`` always-on experts fused into one
MLP of ``n_shared_experts * moe_intermediate_size`` units::

    y = sum_{i in topk(softmax(W_g x))} softmax(W_g x)_i * E_i(x) + S(x)

This port builds exactly that from transformers' own modules: Llama's decoder, Qwen2-MoE's router
(softmax, top-k, optional renormalisation) and fused experts, and a Llama MLP for the shared
experts, so discovery, capture, masking and removal treat it like any native MoE. The checkpoint's
per-expert ``ModuleList`` tensors (``mlp.experts.<e>.{gate,up,down}_proj.weight``) are stacked into
the fused ``gate_up_proj`` / ``down_proj`` by :func:`convert_state_dict`; every other tensor keeps
its name. :func:`load_deepseek_moe` reads a checkpoint directory (safetensors only) with it.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers import initialization as init
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaPreTrainedModel
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts, Qwen2MoeTopKRouter

log = logging.getLogger(__name__)

#: ``model_type`` of the checkpoint's own (remote-code) config, and of this port.
REMOTE_MODEL_TYPE = "deepseek"
PORT_MODEL_TYPE = "deepseek_moe"


@strict
class DeepseekMoeConfig(LlamaConfig):
    """A Llama config with DeepSeek-MoE's expert fields, under the checkpoint's own names."""

    model_type = PORT_MODEL_TYPE
    attribute_map = {**LlamaConfig.attribute_map, "num_experts": "n_routed_experts"}

    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    moe_intermediate_size: int = 1408
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"


class DeepseekMoeBlock(nn.Module):
    """Routed experts chosen by a softmax top-k router, plus always-on shared experts."""

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__()
        self.gate = Qwen2MoeTopKRouter(config)
        self.experts = Qwen2MoeExperts(config)
        shared = copy.copy(config)
        shared.intermediate_size = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = LlamaMLP(shared)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.gate(flat)
        return (self.experts(flat, index, weights) + self.shared_experts(flat)).reshape(shape)


def is_moe_layer(config: DeepseekMoeConfig, layer_index: int) -> bool:
    """The checkpoint's rule: MoE from ``first_k_dense_replace`` on, every ``moe_layer_freq``-th layer."""
    return layer_index >= config.first_k_dense_replace and layer_index % config.moe_layer_freq == 0


def _init_weights(self, module: nn.Module) -> None:
    """Llama's initialisation, and the same normal(0, initializer_range) for routers and fused experts."""
    LlamaPreTrainedModel._init_weights(self, module)
    std = self.config.initializer_range
    if isinstance(module, Qwen2MoeExperts):
        init.normal_(module.gate_up_proj, mean=0.0, std=std)
        init.normal_(module.down_proj, mean=0.0, std=std)
    elif isinstance(module, Qwen2MoeTopKRouter):
        init.normal_(module.weight, mean=0.0, std=std)


class DeepseekMoeModel(LlamaModel):
    """Llama's decoder with DeepSeek-MoE blocks in place of the MLP of its MoE layers."""

    config_class = DeepseekMoeConfig
    _init_weights = _init_weights

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__(config)
        for index, layer in enumerate(self.layers):
            if is_moe_layer(config, index):
                layer.mlp = DeepseekMoeBlock(config)
        self.post_init()


class DeepseekMoeForCausalLM(LlamaForCausalLM):
    """Llama's causal-LM head on :class:`DeepseekMoeModel`."""

    config_class = DeepseekMoeConfig
    _init_weights = _init_weights

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__(config)
        self.model = DeepseekMoeModel(config)
        self.post_init()


AutoConfig.register(PORT_MODEL_TYPE, DeepseekMoeConfig)
AutoModelForCausalLM.register(DeepseekMoeConfig, DeepseekMoeForCausalLM)

_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def port_config(raw: dict[str, Any]) -> DeepseekMoeConfig:
    """The port's config from the checkpoint's ``config.json`` fields (model type ``deepseek``);
    fields the computation does not use (auto_map, auxiliary-loss settings) are dropped."""
    known = {f.name for f in fields(DeepseekMoeConfig)}
    values = {k: v for k, v in raw.items() if k in known and k != "rope_parameters"}
    theta = raw.get("rope_theta", 10000.0)
    if raw.get("rope_scaling"):
        raise NotImplementedError(f"this checkpoint scales its rotary positions ({raw['rope_scaling']}); the port "
                                  "implements the published DeepSeek-MoE-16B, which does not")
    if raw.get("scoring_func", "softmax") != "softmax":
        raise NotImplementedError(f"the port routes with a softmax; this checkpoint says {raw['scoring_func']!r}")
    dropped = sorted(set(raw) - known - {"rope_theta", "rope_scaling", "model_type", "architectures", "auto_map"})
    if dropped:
        log.info("DeepSeek-MoE port: config fields not used by the computation: %s", ", ".join(dropped))
    return DeepseekMoeConfig(**values, rope_parameters={"rope_type": "default", "rope_theta": theta})


def convert_state_dict(state: dict[str, torch.Tensor], config: DeepseekMoeConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the port's names: each MoE layer's per-expert
    ``gate_proj``/``up_proj`` stacked as ``experts.gate_up_proj`` (E, 2I, H) and ``down_proj`` as
    ``experts.down_proj`` (E, H, I); every other tensor unchanged."""
    converted: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, tensor in state.items():
        match = _EXPERT_KEY.match(name)
        if match:
            experts.setdefault(match[1], {})[(int(match[2]), match[3])] = tensor
        else:
            converted[name] = tensor
    for prefix, parts in experts.items():
        n = config.n_routed_experts
        missing = [(e, p) for e in range(n) for p in ("gate", "up", "down") if (e, p) not in parts]
        if missing or len(parts) != 3 * n:
            raise ValueError(f"{prefix}: the checkpoint does not hold gate, up and down weights for exactly "
                             f"{n} experts (missing {missing[:4]}...)")
        converted[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(n)])
        converted[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
    return converted


def load_deepseek_moe(path: str | Path, *, dtype: torch.dtype | None = None) -> DeepseekMoeForCausalLM:
    """The port with a DeepSeek-MoE checkpoint's weights (a directory with ``config.json`` and
    ``*.safetensors``), loaded strictly: a missing or unexpected tensor is an error."""
    from safetensors.torch import load_file
    from transformers.initialization import no_init_weights

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") != REMOTE_MODEL_TYPE:
        raise ValueError(f"{path} holds model type {raw.get('model_type')!r}, not DeepSeek-MoE ({REMOTE_MODEL_TYPE!r})")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path} has no *.safetensors weights; this project loads weights through "
                                "safetensors only")
    config = port_config(raw)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    with no_init_weights():
        model = DeepseekMoeForCausalLM(config)
    converted = convert_state_dict(state, config)
    if config.tie_word_embeddings:
        converted.setdefault("lm_head.weight", converted["model.embed_tokens.weight"])
    model.load_state_dict(converted, strict=True)
    return model.to(dtype) if dtype is not None else model
