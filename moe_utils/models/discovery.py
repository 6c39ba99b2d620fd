"""Finding the MoE blocks of a model from its modules, for model types nobody registered.

The paper's first step (section 1, "expert activation collection") needs each MoE layer's router,
the module that chooses a token's top-k experts. transformers 5 gives its MoE causal LMs one
convention, which this module recognises without knowing the model type:

* a *block* is a module with an experts child (named ``experts`` or of a class ending in
  ``Experts``; shared experts are not routed and are left out) and a router child (named ``gate``
  or ``router``, or of a class whose name says ``Router``, ``Gate`` or ``Gating``);
* the router's forward output carries the choice itself: a tuple holding the top-k expert indices
  (an integer tensor ``(N, k)``), their weights (a float tensor of the same shape) and, usually,
  the router logits over all ``E`` experts.

Discovery probes the first router of a model once, on a zero input, to read that layout and the
true top-k (:func:`router_output_layout`); what cannot be studied gets a :class:`DiscoveryError`
that names the model type and the reason (a router that returns no indices, a router that chooses
among more slots than there are experts, a hash router whose choice is a fixed token table).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ROUTER_NAMES = ("gate", "router")
ROUTER_CLASS = re.compile(r"Router|Gate|Gating")
#: Config fields holding the top-k, read when the router cannot be probed (e.g. on the meta device).
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k_experts", "moe_k")
#: Config fields that hold the routed-expert count (aliases of each other in many configs).
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class DiscoveryError(NotImplementedError):
    """A model whose MoE layers this study cannot read; the message names the model type and why."""


@dataclass(frozen=True)
class OutputLayout:
    """Where a router's output tuple holds the top-k indices, their weights and the logits (or None)."""

    index_at: int
    weights_at: int
    logits_at: int | None


@dataclass(frozen=True)
class FoundBlock:
    """One MoE block found in a model: its qualified name, decoder-layer position and children."""

    name: str
    layer_index: int
    block: nn.Module
    router_attr: str
    experts_attr: str


def _is_shared(name: str) -> bool:
    return "shared" in name.lower()


def experts_child(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The routed experts of ``block`` (fused module or ``ModuleList``), or None."""
    for name, child in block.named_children():
        if _is_shared(name):
            continue
        if name == "experts" or type(child).__name__.endswith("Experts"):
            return name, child
    return None


def router_child(block: nn.Module, experts_attr: str) -> tuple[str, nn.Module] | None:
    """The router of ``block`` (not a shared expert's scalar gate), or None."""
    for name, child in block.named_children():
        if name == experts_attr or _is_shared(name):
            continue
        if name in ROUTER_NAMES or ROUTER_CLASS.search(type(child).__name__):
            return name, child
    return None


def _layer_position(qualified_name: str) -> int:
    """The decoder-layer index in a module path such as ``model.layers.3.mlp`` (first integer)."""
    number = next((part for part in qualified_name.split(".") if part.isdigit()), None)
    return int(number) if number is not None else 0


def find_blocks(model: nn.Module) -> list[FoundBlock]:
    """Every MoE block of ``model`` in module order (blocks inside a found block are not searched)."""
    found: list[FoundBlock] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{b.name}.") for b in found):
            continue
        experts = experts_child(module)
        if experts is None:
            continue
        router = router_child(module, experts[0])
        if router is not None:
            found.append(FoundBlock(name, _layer_position(name), module, router[0], experts[0]))
    return found


def count_experts(experts: nn.Module) -> int | None:
    """Routed experts held by an experts module: its ``ModuleList`` length, or the leading dimension
    shared by its 3-D fused weights, or its own count attribute."""
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    leading = {p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3}
    if len(leading) == 1:
        return leading.pop()
    for attr in EXPERT_COUNT_FIELDS:
        if isinstance(getattr(experts, attr, None), int):
            return getattr(experts, attr)
    return None


def config_value(config: Any, names: tuple[str, ...]) -> int | None:
    """The first integer among ``names`` on ``config`` or its ``text_config``."""
    for owner in (config, getattr(config, "text_config", None)):
        for name in names:
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def declared_top_k(router: nn.Module, config: Any) -> int | None:
    """The top-k a router declares (``router.top_k``), else the config's (:data:`TOP_K_FIELDS`)."""
    top_k = getattr(router, "top_k", None)
    return top_k if isinstance(top_k, int) and not isinstance(top_k, bool) else config_value(config, TOP_K_FIELDS)


def router_output_layout(output: Any) -> OutputLayout | None:
    """Where the indices, weights and logits sit in one router output, or None if it carries no
    top-k choice (a bare tensor of logits, or a tuple without one integer ``(N, k)`` tensor).

    The indices are the one 2-D integer tensor; the weights the float tensor of the same shape
    nearest before it (after it if none is before: the remote-code DeepSeek-MoE gate); the logits
    the first other 2-D float tensor.
    """
    if not isinstance(output, (tuple, list)):
        return None
    tensors = [(i, t) for i, t in enumerate(output) if isinstance(t, torch.Tensor)]
    integer = [i for i, t in tensors if not t.is_floating_point() and t.dim() == 2]
    if len(integer) != 1:
        return None
    index_at = integer[0]
    shape = output[index_at].shape
    same = [i for i, t in tensors if t.is_floating_point() and t.shape == shape]
    if not same:
        return None
    before = [i for i in same if i < index_at]
    weights_at = before[-1] if before else same[0]
    logits = [i for i, t in tensors if t.is_floating_point() and t.dim() == 2 and i != weights_at]
    return OutputLayout(index_at, weights_at, logits[0] if logits else None)


def is_hash_router(router: nn.Module) -> bool:
    """True for a router whose forward needs the token ids: its choice is a fixed token -> expert table
    (DeepSeek-V4's first layers), not a learned function of the hidden state."""
    return "input_ids" in inspect.signature(router.forward).parameters


def probe_router(block: nn.Module, router: nn.Module, hidden_size: int) -> Any | None:
    """The router's output when its block runs on two zero tokens (the block passes the router any
    extra inputs it takes, such as a correction bias), or None when the weights are not materialised
    or the block cannot run alone."""
    param = next(router.parameters(), None)
    if param is None or param.device.type == "meta":
        return None
    seen: list[Any] = []
    handle = router.register_forward_hook(lambda _m, _i, output: seen.append(output))
    try:
        with torch.no_grad():
            block(torch.zeros(1, 2, hidden_size, dtype=param.dtype, device=param.device))
    except Exception:  # noqa: BLE001 - a block that needs more than hidden states: fall back to attributes
        return None
    finally:
        handle.remove()
    return seen[0] if seen else None


def router_scoring(router: nn.Module, config: Any) -> str:
    """``"sigmoid"`` when the router scores experts with a sigmoid (DeepSeek-V3 family), else
    ``"softmax"``: read from ``config.scoring_func`` where the config says, else from the router's
    own forward code."""
    declared = getattr(config, "scoring_func", None) or getattr(getattr(config, "text_config", None),
                                                                "scoring_func", None)
    if isinstance(declared, str):
        return "sigmoid" if "sigmoid" in declared else "softmax"
    try:
        source = inspect.getsource(type(router).forward)
    except (OSError, TypeError):
        return "softmax"
    return "sigmoid" if "sigmoid" in source else "softmax"
