"""Loading MoE language models, and the registry that says where their routers and experts are.

The paper's first step (section 1, "expert activation collection") needs, for every MoE layer, the
router that picks the top-k experts of each token. transformers 5 gives most MoE causal LMs the
same shape: a sparse block (``mlp`` or ``block_sparse_moe``) holding a router module (``gate`` or
``router``) whose forward returns ``(router_logits, top_k_weights, top_k_index)``, and fused
experts. What still differs between architectures (attribute names, how routing scores are formed)
lives in one table, :data:`REGISTRY`, of :class:`MoEArchitecture` adapters. Remote-code layouts
have adapters too: DeepSeek-MoE-16B (model type ``deepseek``), whose experts are a ``ModuleList``
and whose gate returns ``(topk_idx, topk_weight, aux_loss)``. Any other layout is supported by
registering an adapter with :func:`register_architecture`.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterOutput:
    """One router call, flattened over tokens: ``indices``/``weights`` (N, k), ``logits`` (N, E) or None."""

    indices: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor | None


def read_logits_weights_indices(output: Any) -> RouterOutput:
    """Router output of the transformers 5 convention: ``(router_logits, top_k_weights, top_k_index)``."""
    logits, weights, indices = output[:3]
    return RouterOutput(indices=indices, weights=weights, logits=logits)


def _count_experts(router: nn.Module, experts: nn.Module, config: Any) -> int:
    for owner, name in ((router, "num_experts"), (experts, "num_experts"), (router, "n_routed_experts")):
        value = getattr(owner, name, None)
        if isinstance(value, int):
            return value
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    for name in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError("cannot tell how many experts this MoE block has; give the adapter a count_experts")


def _count_top_k(router: nn.Module, config: Any) -> int:
    for value in (getattr(router, "top_k", None), getattr(config, "num_experts_per_tok", None)):
        if isinstance(value, int):
            return value
    raise ValueError("cannot tell the router's top-k; set config.num_experts_per_tok or router.top_k")


@dataclass(frozen=True)
class MoEArchitecture:
    """How to find and read the MoE layers of one family of models (an adapter of the registry).

    Attributes:
        model_types: ``config.model_type`` values this adapter serves.
        block_attrs: attribute names, on a decoder layer, of the sparse MoE block (first found wins).
        router_attr: attribute of the block holding the router module (the module that is hooked).
        experts_attr: attribute of the block holding the experts (fused module or ``ModuleList``).
        scoring: how the router turns logits into routing probabilities over all experts, used when
            full probabilities are recorded: ``"softmax"`` or ``"sigmoid"`` (DeepSeek-V3 family).
        read_router_output: turns the router's forward output into a :class:`RouterOutput`.
        count_experts: ``(router, experts, config) -> E`` routed experts per layer.
        count_top_k: ``(router, config) -> k``.
        layers_path: dotted path from the ``*ForCausalLM`` model to its list of decoder layers.
    """

    model_types: tuple[str, ...]
    block_attrs: tuple[str, ...] = ("mlp",)
    router_attr: str = "gate"
    experts_attr: str = "experts"
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    read_router_output: Callable[[Any], RouterOutput] = read_logits_weights_indices
    count_experts: Callable[[nn.Module, nn.Module, Any], int] = _count_experts
    count_top_k: Callable[[nn.Module, Any], int] = _count_top_k
    layers_path: str = "model.layers"


@dataclass
class MoELayer:
    """One MoE layer of a model: ``index`` counts MoE layers only (row block ``index * E`` of X)."""

    index: int
    layer_index: int  # position among all decoder layers (dense layers included)
    num_experts: int
    top_k: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    architecture: MoEArchitecture = field(repr=False)


REGISTRY: dict[str, MoEArchitecture] = {}


def register_architecture(architecture: MoEArchitecture, *, overwrite: bool = False) -> MoEArchitecture:
    """Add an adapter to the registry, for every model type it names; returns it.

    Example, for a remote-code model of type ``my_moe`` whose ``mlp.gate`` returns
    ``(topk_idx, topk_weight, aux)`` and whose ``mlp.experts`` is a ``ModuleList`` (the layout of
    DeepSeek-MoE, whose adapter below reads its gate with :func:`read_index_weight_aux`)::

        register_architecture(MoEArchitecture(model_types=("my_moe",), read_router_output=read_index_weight_aux))
    """
    for model_type in architecture.model_types:
        if model_type in REGISTRY and not overwrite:
            raise ValueError(f"model type {model_type!r} is already registered; pass overwrite=True to replace it")
    for model_type in architecture.model_types:
        REGISTRY[model_type] = architecture
    return architecture


# The transformers 5 native MoE causal LMs (fused experts, router returning logits, weights, indices).
register_architecture(MoEArchitecture(model_types=(
    "olmoe", "flex_olmo", "qwen2_moe", "qwen3_moe", "qwen3_next", "mixtral", "minimax",
    "deepseek_v2", "ernie4_5_moe", "hunyuan_v1_moe",
)))
register_architecture(MoEArchitecture(model_types=("deepseek_v3", "glm4_moe", "dots1"), scoring="sigmoid"))
register_architecture(MoEArchitecture(model_types=("phimoe", "gpt_oss", "jamba"), router_attr="router"))
register_architecture(MoEArchitecture(
    model_types=("granitemoe", "granitemoeshared", "granitemoehybrid"),
    block_attrs=("block_sparse_moe",), router_attr="router",
))


def read_index_weight_aux(output: Any) -> RouterOutput:
    """Router output of the remote-code DeepSeek-MoE gate: ``(topk_idx, topk_weight, aux_loss)``.

    That gate takes its top-k with ``sorted=False``; the choices are re-ordered here by decreasing
    weight, so that slot 0 is the strongest choice as with every native router. It returns no
    logits, so full probabilities cannot be recorded (``record_probs`` must be False).
    """
    indices, weights = output[0], output[1]
    weights, order = weights.sort(dim=-1, descending=True)
    return RouterOutput(indices=indices.gather(-1, order), weights=weights, logits=None)


# DeepSeek-MoE-16B (deepseek-ai/deepseek-moe-16b-base/-chat, remote code, model_type "deepseek"): each
# MoE layer's ``mlp`` is a DeepseekMoE holding ``gate`` (MoEGate, with ``top_k`` and ``n_routed_experts``),
# ``experts`` (a ModuleList of routed experts) and ``shared_experts`` (always on, so outside X as the
# paper's section 2 says). The first ``first_k_dense_replace`` layers have a dense ``mlp`` without a
# gate and are skipped by :func:`moe_layers`.
register_architecture(MoEArchitecture(model_types=("deepseek",), read_router_output=read_index_weight_aux))


def architecture_of(model: nn.Module) -> MoEArchitecture:
    """The registered adapter for ``model.config.model_type``, or a clear error saying how to add one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in REGISTRY:
        raise NotImplementedError(
            f"model type {model_type!r} is not in the MoE registry (known: {', '.join(sorted(REGISTRY))}). "
            "If it is an MoE model, describe where its router and experts are with "
            "moe_utils.register_architecture(MoEArchitecture(model_types=(...,), block_attrs=..., "
            "router_attr=..., read_router_output=...)); see the 'Reproducing' page of the book."
        )
    return REGISTRY[model_type]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` in depth order; dense layers (e.g. DeepSeek's first) are skipped."""
    arch = architecture_of(model)
    try:
        decoder_layers = operator.attrgetter(arch.layers_path)(model)
    except AttributeError as err:
        raise NotImplementedError(
            f"{type(model).__name__} has no {arch.layers_path!r}; set layers_path in its MoEArchitecture"
        ) from err
    found: list[MoELayer] = []
    for layer_index, layer in enumerate(decoder_layers):
        block = next((getattr(layer, a) for a in arch.block_attrs if hasattr(layer, a)), None)
        router = getattr(block, arch.router_attr, None)
        experts = getattr(block, arch.experts_attr, None)
        if router is None or experts is None:
            continue
        found.append(MoELayer(
            index=len(found),
            layer_index=layer_index,
            num_experts=arch.count_experts(router, experts, model.config),
            top_k=arch.count_top_k(router, model.config),
            block=block,
            router=router,
            experts=experts,
            architecture=arch,
        ))
    if not found:
        raise NotImplementedError(
            f"no MoE layer found in {type(model).__name__} (model type {model.config.model_type!r}): each "
            f"decoder layer was searched for {arch.block_attrs} holding {arch.router_attr!r} and "
            f"{arch.experts_attr!r}. A dense model has no experts to study; for another MoE layout, "
            "register an adapter with moe_utils.register_architecture."
        )
    sizes = {(layer.num_experts, layer.top_k) for layer in found}
    if len(sizes) > 1:
        log.warning("MoE layers differ in (experts, top-k): %s; X uses the largest count per layer", sizes)
    return found


def model_summary(model: nn.Module) -> dict:
    """Architecture facts that a routing store's manifest records."""
    layers = moe_layers(model)
    return {
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "n_layers": len(layers),
        "n_experts": max(layer.num_experts for layer in layers),
        "top_k": max(layer.top_k for layer in layers),
        "layer_indices": [layer.layer_index for layer in layers],
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }


#: Name of the model shipped with the package (see :mod:`moe_utils.tiny_moe`).
EMBEDDED = "embedded"
#: Prefix of names that build a small randomly initialised model from an architecture's config.
RANDOM_PREFIX = "random:"


def load_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load an MoE causal LM and its tokenizer; returns ``(model, tokenizer)`` in eval mode.

    ``name_or_path`` is a Hub id, a local directory, ``"embedded"`` (the small model shipped with
    the package, trained on WikiText-2) or ``"random:<model_type>"`` (a tiny randomly initialised
    model of that architecture, for tests and benchmarks; see :mod:`moe_utils.tiny_configs`).
    Weights load through safetensors only. ``device_map="auto"`` spreads a large model over the
    devices of one machine (accelerate); otherwise the model goes to ``device`` (default: CUDA if
    available, else CPU). ``dtype`` defaults to float32 on CPU and bfloat16 on GPU. Remote code
    runs only if ``trust_remote_code=True`` is passed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        on_gpu = device_map is not None or str(device).startswith("cuda")
        dtype = torch.bfloat16 if on_gpu and torch.cuda.is_available() else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if name.startswith(RANDOM_PREFIX):
        from moe_utils.tiny_configs import random_model

        model, tokenizer = random_model(name[len(RANDOM_PREFIX):])
        model = model.to(dtype)
    else:
        if name == EMBEDDED:
            from moe_utils.tiny_moe import EMBEDDED_DIR

            if not (EMBEDDED_DIR / "model.safetensors").is_file():
                raise FileNotFoundError(
                    f"the embedded model is missing from {EMBEDDED_DIR}; train it with "
                    "`python -m moe_utils.tiny_moe train --data-dir <wikitext-2 dir>`"
                )
            name = str(EMBEDDED_DIR)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
            revision=revision, use_safetensors=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    if device_map is None:
        model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.name_or_path = str(name_or_path)
    moe_layers(model)  # fail now, with the registry's message, if this is not a known MoE layout
    return model, tokenizer
