"""Tiny randomly initialised MoE models built from each architecture's own transformers config.

Tests and benchmarks need real transformers MoE modules without downloading checkpoints: these are
the architectures' own ``*Config`` classes with small sizes, instantiated with random weights, and
a byte-level tokenizer that needs no training data. ``load_model("random:olmoe")`` returns one.
Random routers carry no learned collaboration: never present their patterns as findings.
"""

from __future__ import annotations

from typing import Any

import torch

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


def tiny_config(model_type: str, **overrides: Any):
    """The architecture's own config class at tiny size (``model_type`` as in ``config.model_type``)."""
    from transformers import AutoConfig

    if model_type in BENCH_SHAPES:
        model_type, shape = BENCH_SHAPES[model_type]
        fields = {**_BASE, **TINY_OVERRIDES.get(model_type, {}), **shape}
    elif model_type in TINY_OVERRIDES:
        fields = {**_BASE, **TINY_OVERRIDES[model_type]}
    else:
        raise ValueError(
            f"no tiny config for {model_type!r}; known: {', '.join([*TINY_OVERRIDES, *BENCH_SHAPES])}"
        )
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **{k: v for k, v in fields.items() if v is not None})
    for key, value in fields.items():  # None means "let the config derive it" (e.g. layer_types)
        if value is None and hasattr(config, key):
            setattr(config, key, None)
    if getattr(config, "layer_types", None) is None and "layer_types" in fields:
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    config.pad_token_id = config.eos_token_id = config.bos_token_id = 256
    return config


def random_model(model_type: str, *, seed: int = 0, **overrides: Any):
    """``(model, tokenizer)``: a randomly initialised tiny model of ``model_type`` and a byte tokenizer."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, byte_tokenizer()
