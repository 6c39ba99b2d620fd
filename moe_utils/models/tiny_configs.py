"""Tiny randomly initialised MoE models built from each architecture's own transformers config.

Tests and benchmarks need real transformers MoE modules without downloading checkpoints: these are
the architectures' own ``*Config`` classes with small sizes, instantiated with random weights, and
a byte-level tokenizer that needs no training data. ``load_model("random:olmoe")`` returns one.
Random routers carry no learned collaboration: never present their patterns as findings.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from moe_utils.models.discovery import EXPERT_COUNT_FIELDS, TOP_K_FIELDS

#: Small sizes shared by every architecture.
_BASE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
)

#: Per-architecture overrides: expert counts, top-k, and the fields each config needs to be small.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, layer_types=None),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_group=1, topk_group=1),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_group=2, topk_group=1),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16, layer_types=None, sliding_window=32),
}

#: Fields that shrinking by name cannot derive, for the model types whose defaults need them: which layers
#: are attention in a tiny hybrid, the sizes of a sparse-attention indexer.
SHRINK_EXTRAS: dict[str, dict[str, Any]] = {
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0,
                  use_mamba_kernels=False),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=2),
}
SHRINK_EXTRAS["qwen4_exp"] = dict(text_config=SHRINK_EXTRAS["qwen4_exp_text"])

#: Larger shapes for benchmarks: OLMoE-1B-7B's layout (64 experts, top-8) scaled to about 100M parameters.
BENCH_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "olmoe-100m": ("olmoe", dict(vocab_size=50304, hidden_size=384, intermediate_size=160, num_hidden_layers=8,
                                 num_attention_heads=6, num_key_value_heads=6, num_experts=64,
                                 num_experts_per_tok=8, tie_word_embeddings=True)),
}


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens plus ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


#: Boolean switches that turn a model's MoE blocks on (off by default in some configs, e.g. gemma4).
MOE_SWITCHES = ("enable_moe_block", "is_moe", "use_moe")
#: Per-layer list fields whose values are layer indices rather than one entry per layer.
LAYER_INDEX_LISTS = ("moe_layers", "mlp_only_layers", "sparse_layers", "dense_layers")
N_TINY_LAYERS = 3
N_TINY_EXPERTS = 8
TINY_TOP_K = 2
#: Fields shrunk by name: the size every tiny model gets.
_SHRUNK = {
    "hidden_size": 64, "vocab_size": 320, "max_position_embeddings": 256, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "qk_head_dim": 16, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1, "first_k_dense_replace": 1, "num_dense_layers": 1, "sliding_window": 32,
    "router_hidden_size": 32, "moe_latent_size": 32, "index_topk": 8, "index_head_dim": 16, "index_n_heads": 2,
    "num_layers": N_TINY_LAYERS, "n_layers": N_TINY_LAYERS, "zero_expert_num": 2, "linear_num_heads": 2,
    "linear_head_dim": 16, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16,
    "mamba_chunk_size": 16, "mamba_dt_rank": 8, "hc_lowrank": 16, "ple_embed_dim": 32,
}


def _shrunk_value(name: str, value: Any) -> Any:
    """The tiny value of one integer config field, or ``value`` when its name is not a size."""
    if name in _SHRUNK:
        return _SHRUNK[name]
    if name in EXPERT_COUNT_FIELDS:
        return N_TINY_EXPERTS
    if name in TOP_K_FIELDS:
        return min(TINY_TOP_K, value)  # some architectures allow top-1 only
    if re.search(r"(intermediate|ffn_hidden|ffn)_(size|dim)$|^moe_ffn_hidden_size$", name):
        return 32
    if name.endswith("vocab_size") or name.startswith("vocab_size"):
        return _SHRUNK["vocab_size"]
    if name in ("n_group", "num_expert_group") and value > 1:
        return 2
    if name == "topk_group" and value > 1:
        return 1
    return value


def _tiny_layer_positions(per_layer: dict[str, list], n_layers: int) -> list[int]:
    """Which original layers a tiny model keeps: every distinct combination of the per-layer fields
    (attention type, MoE or dense, ...) at least once, then the first layers up to N_TINY_LAYERS."""
    seen, positions = set(), []
    for i in range(n_layers):
        signature = tuple(str(values[i]) for values in per_layer.values())
        if signature not in seen:
            seen.add(signature)
            positions.append(i)
    for i in range(n_layers):
        if len(positions) >= N_TINY_LAYERS:
            break
        if i not in positions:
            positions.append(i)
    return sorted(positions)


def _is_per_layer(name: str, value: Any, n_layers: int) -> bool:
    """A config field with one entry per decoder layer: a list, or a pattern string such as
    ``hybrid_override_pattern`` (one character per layer); lists of layer indices are not."""
    if isinstance(value, list):
        return len(value) == n_layers and name not in LAYER_INDEX_LISTS
    return isinstance(value, str) and name.endswith("pattern") and len(value) == n_layers


def shrink_config(config: Any) -> Any:
    """Shrink any transformers config, in place, to a tiny model of the same architecture.

    Sizes are set by field name (hidden 64, intermediate 32, 8 experts, top-2, ...); per-layer
    lists (``layer_types``, ``mlp_layer_types``, ...) keep one layer of each distinct kind, so a
    hybrid model stays hybrid and an MoE model keeps its MoE layers; MoE switches are turned on.
    Nested configs (``text_config``) are shrunk the same way. Returns the shrunk config (a new
    object only where per-layer overrides must be rebuilt, e.g. gemma4's ``per_layer_config``).
    """
    from transformers import PretrainedConfig

    fields = config.to_dict()
    for name in fields:
        try:
            current = getattr(config, name, None)
        except Exception:  # noqa: BLE001 - per-layer attributes (gemma4) refuse a global read
            continue
        if isinstance(current, PretrainedConfig):
            setattr(config, name, shrink_config(current))
        elif name in MOE_SWITCHES and current is False:
            setattr(config, name, True)
        elif isinstance(current, int) and not isinstance(current, bool):
            setattr(config, name, _shrunk_value(name, current))
        elif current is None and name in (*EXPERT_COUNT_FIELDS, *TOP_K_FIELDS, "moe_intermediate_size", "head_dim",
                                           "n_shared_experts"):
            setattr(config, name, _shrunk_value(name, TINY_TOP_K))
    if isinstance(fields.get("kv_lora_rank"), int):  # multi-head latent attention (DeepSeek-V2 family)
        config.head_dim = config.qk_rope_head_dim
        config.num_key_value_heads = config.num_attention_heads
        if "qk_head_dim" in fields:
            config.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    n_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(n_layers, int) and n_layers > N_TINY_LAYERS:
        per_layer = {name: value for name, value in config.to_dict().items() if _is_per_layer(name, value, n_layers)}
        positions = _tiny_layer_positions(per_layer, n_layers)
        for name, values in per_layer.items():
            kept = [values[i] for i in positions]
            setattr(config, name, "".join(kept) if isinstance(values, str) else kept)
        for name in LAYER_INDEX_LISTS:
            indices = getattr(config, name, None)
            if isinstance(indices, list) and all(isinstance(i, int) for i in indices):
                setattr(config, name, [j for j, i in enumerate(positions) if i in indices])
        config.num_hidden_layers = len(positions)
        overrides = config.to_dict().get("per_layer_config")  # {"05": {...}}: per-layer fields (gemma4)
        if isinstance(overrides, dict) and overrides:
            fields = config.to_dict()
            fields["per_layer_config"] = {
                str(j): {key: _shrunk_value(key, value) if isinstance(value, int) else value
                         for key, value in overrides[name].items()}
                for j, i in enumerate(positions) for name in overrides if int(name) == i}
            fields.pop("model_type", None)
            config = type(config)(**fields)  # the per-layer view is built at init only
    return config


def tiny_config(model_type: str, **overrides: Any):
    """The architecture's own config class at tiny size (``model_type`` as in ``config.model_type``).

    Any model type that transformers ships works: its default config is shrunk by
    :func:`shrink_config`; the architectures the study uses most have hand-tuned sizes on top
    (:data:`TINY_OVERRIDES`), and :data:`BENCH_SHAPES` names larger benchmark shapes.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    base_type, shape = BENCH_SHAPES.get(model_type, (model_type, {}))
    if base_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(f"no transformers config for model type {model_type!r}; benchmark shapes: "
                         f"{', '.join(BENCH_SHAPES)}; otherwise any config.model_type that transformers ships")
    if base_type in TINY_OVERRIDES:
        fields = {**_BASE, **TINY_OVERRIDES[base_type], **shape, **overrides}
        config = AutoConfig.for_model(base_type, **{k: v for k, v in fields.items() if v is not None})
        for key, value in fields.items():  # None means "let the config derive it" (e.g. layer_types)
            if value is None and hasattr(config, key):
                setattr(config, key, None)
        if getattr(config, "layer_types", None) is None and "layer_types" in fields:
            config.layer_types = ["full_attention"] * config.num_hidden_layers
    else:
        config = shrink_config(AutoConfig.for_model(base_type))
        for key, value in {**SHRINK_EXTRAS.get(base_type, {}), **shape, **overrides}.items():
            if key == "text_config" and isinstance(value, dict):  # fields of a composite model's text part
                for sub_key, sub_value in value.items():
                    setattr(config.text_config, sub_key, sub_value)
            else:
                setattr(config, key, value)
    for owner in (config, getattr(config, "text_config", None)):
        if owner is not None and getattr(owner, "vocab_size", 0) >= 257:
            owner.pad_token_id = owner.eos_token_id = owner.bos_token_id = 256
    return config


def random_model(model_type: str, *, seed: int = 0, **overrides: Any):
    """``(model, tokenizer)``: a randomly initialised tiny model of ``model_type`` and a byte tokenizer."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, byte_tokenizer()
