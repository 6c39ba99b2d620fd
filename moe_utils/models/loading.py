"""Loading MoE language models, and finding their routers and experts.

The paper's first step (section 1, "expert activation collection") needs, for every MoE layer, the
router that picks the top-k experts of each token. transformers 5 gives its MoE causal LMs one
convention (a sparse block holding a router whose forward returns the top-k indices and weights,
and the experts), which :mod:`moe_utils.models.discovery` recognises from the modules themselves, for any
model type, registered or not. :data:`REGISTRY` keeps only what discovery cannot know, and
overrides it: remote-code layouts such as DeepSeek-MoE-16B (model type ``deepseek``), whose gate
returns ``(topk_idx, topk_weight, aux_loss)`` unsorted. Another such layout is added with
:func:`register_architecture`.
"""

from __future__ import annotations

import json
import logging
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from moe_utils.models.deepseek_moe import REMOTE_MODEL_TYPE, load_deepseek_moe  # also registers the port
from moe_utils.models.discovery import (
    EXPERT_COUNT_FIELDS, DiscoveryError, OutputLayout, config_value, count_experts, declared_top_k, find_blocks,
    is_hash_router, probe_router, router_output_layout, router_scoring,
)
from moe_utils.models.tiny_configs import random_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterOutput:
    """One router call, flattened over tokens: ``indices``/``weights`` (N, k), ``logits`` (N, E) or None."""

    indices: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor | None


def read_router_tuple(output: Any) -> RouterOutput:
    """Router output of the transformers 5 convention, wherever its tuple puts the top-k indices,
    weights and logits (:func:`moe_utils.models.discovery.router_output_layout`)."""
    layout = router_output_layout(output)
    if layout is None:
        raise DiscoveryError("this router's output carries no top-k indices (an integer (N, k) tensor with "
                             "float weights of the same shape); register an adapter with a read_router_output")
    logits = None if layout.logits_at is None else output[layout.logits_at]
    return RouterOutput(indices=output[layout.index_at], weights=output[layout.weights_at], logits=logits)


def _count_experts(router: nn.Module, experts: nn.Module, config: Any) -> int:
    for owner, name in ((router, "num_experts"), (experts, "num_experts"), (router, "n_routed_experts")):
        value = getattr(owner, name, None)
        if isinstance(value, int):
            return value
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    value = config_value(config, EXPERT_COUNT_FIELDS)
    if value is None:
        raise ValueError("cannot tell how many experts this MoE block has; give the adapter a count_experts")
    return value


def _count_top_k(router: nn.Module, config: Any) -> int:
    value = declared_top_k(router, config)
    if value is None:
        raise ValueError("cannot tell the router's top-k; set config.num_experts_per_tok or router.top_k")
    return value


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
        found_by: ``"registry"`` for a registered adapter, ``"discovery"`` for one that
            :func:`moe_layers` derived from the model's modules.
        dense_outputs: for a router that returns per-expert ``(N, E)`` tensors instead of top-k
            indices (Llama 4), ``(position in its output, value a pruned expert gets there)``;
            masking expands the pruned router's outputs back to E columns with these values.
    """

    model_types: tuple[str, ...]
    block_attrs: tuple[str, ...] = ("mlp",)
    router_attr: str = "gate"
    experts_attr: str = "experts"
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    read_router_output: Callable[[Any], RouterOutput] = read_router_tuple
    count_experts: Callable[[nn.Module, nn.Module, Any], int] = _count_experts
    count_top_k: Callable[[nn.Module, Any], int] = _count_top_k
    layers_path: str = "model.layers"
    found_by: Literal["registry", "discovery"] = "registry"
    dense_outputs: tuple[tuple[int, float], ...] = ()


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


class NonFiniteError(ValueError):
    """A model gave NaN or infinite outputs (router logits, log-likelihoods): its results would be
    meaningless, so the run stops; the message names the layer or task."""


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


def read_scores_logits(output: Any) -> RouterOutput:
    """Router output of Llama 4: ``(scores, logits)``, both ``(N, E)``; ``scores`` is the sigmoid of the
    chosen experts' logits and exactly 0 elsewhere (the sigmoid of ``-inf``), so the choice is the
    non-zero scores, in order of decreasing score."""
    scores, logits = output[0], output[1]
    k = int((scores != 0).sum(dim=-1).max()) if scores.numel() else 0
    weights, indices = scores.topk(k, dim=-1)
    return RouterOutput(indices=indices, weights=weights, logits=logits)


# Llama 4 (model types llama4_text and llama4): each MoE layer's ``feed_forward`` holds ``router`` (an
# nn.Linear returning (scores, logits), no indices) and ``experts``, which run every expert on its input
# scaled by its score (dense dispatch), beside an always-on ``shared_expert``; dense layers are skipped.
register_architecture(MoEArchitecture(
    model_types=("llama4_text", "llama4"), block_attrs=("feed_forward",), router_attr="router", scoring="sigmoid",
    read_router_output=read_scores_logits, dense_outputs=((0, 0.0), (1, float("-inf"))),
))


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _registered_layers(model: nn.Module, arch: MoEArchitecture) -> list[MoELayer]:
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
            index=len(found), layer_index=layer_index,
            num_experts=arch.count_experts(router, experts, model.config),
            top_k=arch.count_top_k(router, model.config),
            block=block, router=router, experts=experts, architecture=arch,
        ))
    if not found:
        raise NotImplementedError(
            f"no MoE layer found in {type(model).__name__} (model type {model.config.model_type!r}): each "
            f"decoder layer was searched for {arch.block_attrs} holding {arch.router_attr!r} and "
            f"{arch.experts_attr!r}. A dense model has no experts to study; for another MoE layout, "
            "register an adapter with moe_utils.register_architecture."
        )
    return found


@dataclass(frozen=True)
class RouterProbe:
    """What one call of a router showed: its output layout, its top-k, and how many slots its logits score."""

    layout: OutputLayout
    top_k: int
    n_scored: int | None


#: Attribute set on a router once its output has been probed (a :class:`RouterProbe`).
PROBED = "_moe_router_probe"


def _probe(block: nn.Module, router: nn.Module, hidden_size: int | None, model_type: str) -> RouterProbe | None:
    """The router's output layout and true top-k, probed once on zero input and kept on the router."""
    if PROBED in router.__dict__:
        return router.__dict__[PROBED]
    output = probe_router(block, router, hidden_size) if hidden_size else None
    if output is None:
        return None
    layout = router_output_layout(output)
    if layout is None:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else [
            tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in output]
        raise DiscoveryError(
            f"model type {model_type!r}: its router {type(router).__name__} returns {shape}, with no top-k "
            "expert indices (an integer (tokens, k) tensor beside float weights of the same shape): the "
            "experts are chosen elsewhere, so the routing cannot be read from the router. Register an adapter "
            "whose read_router_output derives the choice (moe_utils.register_architecture)."
        )
    n_scored = None if layout.logits_at is None else int(output[layout.logits_at].shape[-1])
    router.__dict__[PROBED] = RouterProbe(layout, int(output[layout.index_at].shape[-1]), n_scored)
    return router.__dict__[PROBED]


def _discovered_layers(model: nn.Module) -> list[MoELayer]:
    model_type = _model_type(model)
    config = getattr(model, "config", None)
    blocks = find_blocks(model)
    if not blocks:
        raise DiscoveryError(
            f"no MoE block found in {type(model).__name__} (model type {model_type!r}): no module holds both "
            "an experts module (named 'experts' or of a class ending in 'Experts') and a router (named 'gate' "
            "or 'router', or a class named *Router/*Gate/*Gating). A dense model has no experts to study; for "
            "another MoE layout, register an adapter with moe_utils.register_architecture."
        )
    hidden_size = config_value(config, ("hidden_size", "d_model"))
    found: list[MoELayer] = []
    hashed: list[int] = []
    for found_block in blocks:
        router = getattr(found_block.block, found_block.router_attr)
        experts = getattr(found_block.block, found_block.experts_attr)
        if is_hash_router(router):  # e.g. DeepSeek-V4's hash layers: a fixed token -> expert table
            hashed.append(found_block.layer_index)
            continue
        n_experts = count_experts(experts)
        if n_experts is None:
            leading = sorted({p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3})
            raise DiscoveryError(
                f"model type {model_type!r}: cannot tell how many experts {type(experts).__name__} holds: "
                + (f"its fused weights disagree on it ({leading}: zero-computation or other non-expert slots)"
                   if len(leading) > 1 else "no ModuleList, 3-D fused weights or count attribute")
                + "; register an adapter for this layout")
        probed = _probe(found_block.block, router, hidden_size, model_type) if not found else found[0].router.__dict__.get(PROBED)
        if not found and probed is not None and probed.n_scored not in (None, n_experts):
            raise DiscoveryError(
                f"model type {model_type!r}: its router scores {probed.n_scored} slots but its experts module "
                f"holds {n_experts} experts (zero-computation or other non-expert slots): the expert matrix X "
                "and pruning need one slot per expert. Register an adapter for this layout.")
        top_k = probed.top_k if probed is not None else declared_top_k(router, config)
        if top_k is None:
            raise DiscoveryError(f"model type {model_type!r}: cannot tell the router's top-k; set "
                                 "config.num_experts_per_tok or router.top_k")
        architecture = MoEArchitecture(
            model_types=(model_type,), block_attrs=(found_block.name.rsplit(".", 1)[-1],),
            router_attr=found_block.router_attr, experts_attr=found_block.experts_attr,
            scoring=router_scoring(router, config), read_router_output=read_router_tuple, found_by="discovery",
        )
        found.append(MoELayer(index=len(found), layer_index=found_block.layer_index, num_experts=n_experts,
                              top_k=top_k, block=found_block.block, router=router, experts=experts,
                              architecture=architecture))
    if not found:
        raise DiscoveryError(
            f"model type {model_type!r}: every MoE block routes by a hash of the token (layers {hashed}), a fixed "
            "table with no learned choice, so there is no collaboration to study")
    if not getattr(model, "_moe_discovery_logged", False):
        first = found[0]
        log.info("MoE layers of %s (%s), found by discovery: %d blocks like %s, router %r (%s), experts %r (%s), "
                 "E=%d, k=%d, scoring %s%s", type(model).__name__, model_type, len(found), blocks[0].name,
                 first.architecture.router_attr, type(first.router).__name__, first.architecture.experts_attr,
                 type(first.experts).__name__, first.num_experts, first.top_k, first.architecture.scoring,
                 f"; hash-routed layers {hashed} left out" if hashed else "")
        model.__dict__["_moe_discovery_logged"] = True
    return found


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` in depth order; dense layers (e.g. DeepSeek's first) are skipped.

    A registered adapter (:data:`REGISTRY`) is used when the model type has one; otherwise the
    layers are discovered from the modules (:mod:`moe_utils.models.discovery`), and one log line says what
    was found. A model whose routing cannot be read raises :class:`DiscoveryError` with the reason.
    """
    model_type = _model_type(model)
    found = _registered_layers(model, REGISTRY[model_type]) if model_type in REGISTRY else _discovered_layers(model)
    sizes = {(layer.num_experts, layer.top_k) for layer in found}
    if len(sizes) > 1:
        log.warning("MoE layers differ in (experts, top-k): %s; X uses the largest count per layer", sizes)
    return found


def model_summary(model: nn.Module, layers: list[MoELayer] | None = None) -> dict:
    """Architecture facts that a routing store's manifest records (``layers``: its MoE layers,
    found when not given)."""
    layers = moe_layers(model) if layers is None else layers
    return {
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "n_layers": len(layers),
        "n_experts": max(layer.num_experts for layer in layers),
        "top_k": max(layer.top_k for layer in layers),
        "layer_indices": [layer.layer_index for layer in layers],
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }


def parameter_counts(model) -> dict:
    """``{"total", "routed_experts", "active_per_token"}`` parameters of a causal LM.

    Routed experts are the parameters of each MoE layer's experts module (shared experts, routers
    and dense layers are outside it and always active); a token uses top-k of a layer's E routed
    experts, so the active count is every other parameter plus ``k / E`` of each layer's experts.
    """
    total = sum(p.numel() for p in model.parameters())
    per_layer = [(sum(p.numel() for p in layer.experts.parameters()), layer.top_k, layer.num_experts)
                 for layer in moe_layers(model)]
    routed = sum(n for n, _, _ in per_layer)
    active = total - routed + sum(n * k // e for n, k, e in per_layer)
    return {"total": total, "routed_experts": routed, "active_per_token": active}


#: Name of the model shipped with the package (see :mod:`moe_utils.models.tiny_moe`).
EMBEDDED = "embedded"
#: Where the trained model ships inside the package; ``load_model("embedded")`` reads it.
EMBEDDED_DIR = Path(__file__).parent / "embedded" / "tiny-moe"
#: Prefix of names that build a small randomly initialised model from an architecture's config.
RANDOM_PREFIX = "random:"


def is_small_model(name: str) -> bool:
    """Whether ``name`` is the embedded model or a randomly initialised one (``random:<type>``):
    the models whose stages use small samples and perplexities, and whose results are no finding."""
    return name == EMBEDDED or name.startswith(RANDOM_PREFIX)


def _checkpoint_model_type(name: str, revision: str | None) -> str | None:
    """``model_type`` in a checkpoint's ``config.json`` (local directory or Hub), read as plain JSON, so
    that a type transformers does not know (DeepSeek-MoE's ``deepseek``) is still recognised."""
    local = Path(name) / "config.json"
    if not local.is_file():
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(name, "config.json", revision=revision))
    return json.loads(local.read_text()).get("model_type")


def _local_checkpoint(name: str, revision: str | None) -> str:
    """A directory holding the checkpoint: ``name`` itself, or its Hub snapshot (config, safetensors,
    tokenizer; the remote modeling code is not fetched)."""
    if Path(name).is_dir():
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])


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
    model of that architecture, for tests and benchmarks; see :mod:`moe_utils.models.tiny_configs`).
    Weights load through safetensors only. ``device_map="auto"`` spreads a large model over the
    devices of one machine (accelerate); otherwise the model goes to ``device`` (default: CUDA if
    available, else CPU). ``dtype`` defaults to float32 on CPU and bfloat16 on GPU. Remote code
    runs only if ``trust_remote_code=True`` is passed; without it, a DeepSeek-MoE checkpoint (model
    type ``deepseek``, e.g. the paper's ``deepseek-ai/deepseek-moe-16b-base``) loads into the port of
    :mod:`moe_utils.models.deepseek_moe` (``device_map`` is not supported there: the model goes to ``device``).
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
        model, tokenizer = random_model(name[len(RANDOM_PREFIX):])
        model = model.to(dtype)
    else:
        if name == EMBEDDED:
            if not (EMBEDDED_DIR / "model.safetensors").is_file():
                raise FileNotFoundError(
                    f"the embedded model is missing from {EMBEDDED_DIR}; train it with "
                    "`python -m moe_utils.models.tiny_moe train --data-dir <wikitext-2 dir>`"
                )
            name = str(EMBEDDED_DIR)
        if not trust_remote_code and _checkpoint_model_type(name, revision) == REMOTE_MODEL_TYPE:
            if device_map is not None:
                raise ValueError("the DeepSeek-MoE port loads onto one device: pass device=... instead of "
                                 "device_map, or trust_remote_code=True for the checkpoint's own code")
            name = _local_checkpoint(name, revision)  # DeepSeek-MoE: the port in moe_utils, no remote code
            model = load_deepseek_moe(name, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                revision=revision, use_safetensors=True,
            )
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
        if not tokenizer("hello world")["input_ids"]:
            raise ValueError(f"the tokenizer of {name} encodes 'hello world' to no tokens: the checkpoint has no "
                             "usable tokenizer files (tokenizer.json, tokenizer.model, vocab files); copy those of "
                             "the model it was trained from into the directory")
    if device_map is None:
        model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.name_or_path = str(name_or_path)
    moe_layers(model)  # fail now, with the reason, if this model's routing cannot be read
    return model, tokenizer
