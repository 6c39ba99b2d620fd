"""Applying a keep-mask to an MoE model: exact masking, and real removal of the pruned experts.

Expert pruning (the paper's section 4, CAEP, and every baseline of :mod:`moe_utils.compression.pruning`)
ends in a *keep-mask*: a boolean vector over the N_e routed experts in the layer-major order of the
expert matrix X (row ``layer * E + expert``, layers counted over MoE layers only, in the order of
:func:`moe_utils.models.loading.moe_layers`). Per-layer lists of kept expert indices are accepted too. The
paper does not say how the router treats pruned experts (section 4 leaves it open); here they are
never selected, and each token's top-k is chosen again among the remaining experts with
the architecture's own routing rule: softmax then top-k, renormalised or not (OLMoE, Qwen-MoE,
Mixtral, DeepSeek-V2), top-k on the logits then a softmax over the k (granite, gpt-oss), sigmoid
scores with a correction bias and group-limited top-k (DeepSeek-V3), sparsemixer (Phi-MoE).

Two ways to apply a mask, which give the same logits:

* :func:`masked_experts` (a context manager): nothing is freed. While it is active, each pruned
  router's ``forward`` is a pruned copy of the router (its rows, per-expert bias buffers and
  counts sliced to the kept experts: the very code that routes the removed model), whose output is
  mapped back to the original expert indices, with ``-inf`` logits for the pruned experts. Because
  the router's own output is masked, every forward hook on it, whatever its registration order
  (:func:`moe_utils.capture.routing.record_routing`, transformers' ``output_router_logits`` recorder), sees
  the masked routing. Everything is restored on exit, also after an exception.
* :func:`remove_experts`: slices the fused expert tensors (and gpt-oss's expert biases), the router
  rows and per-expert buffers (``e_score_correction_bias``), updates the modules' expert counts and
  the config (a ``ModuleList`` of experts, as in the remote-code DeepSeek-MoE-16B, keeps the kept
  modules). The model really shrinks. With the same count in every layer it saves with
  ``save_pretrained`` and reloads with plain ``from_pretrained``; with counts that differ by layer
  (global pruning such as CAEP) :func:`save_pruned` / :func:`load_pruned` store and rebuild the
  per-layer counts, and plain ``from_pretrained`` on such a checkpoint fails with an error that
  names :func:`load_pruned` (it never loads re-initialised weights).

Group-limited routers (DeepSeek-V3 family) split the experts into ``n_group`` consecutive groups.
A pruned layer must keep a count divisible by ``n_group`` with at least two experts per group (the
group score sums the two best), and enough experts in the ``topk_group`` chosen groups for top-k.
The kept experts are then grouped as the removed model groups them: ``n_group`` runs of
consecutive kept experts; these are the original groups exactly when the kept experts are spread
evenly over them (a warning says when they are not).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from transformers import PretrainedConfig

from moe_utils.models.discovery import EXPERT_COUNT_FIELDS, find_blocks, router_output_layout
from moe_utils.models.loading import PROBED, MoELayer, moe_layers
from moe_utils.common.artifacts import atomic_write_json

log = logging.getLogger(__name__)

#: Module attributes that hold a layer's routed-expert count (``out_features``: routers that are an ``nn.Linear``).
COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "out_features")
#: Config key under which :func:`save_pruned` records per-layer expert counts.
PER_LAYER_KEY = "moe_experts_per_layer"
#: Config key of a per-layer checkpoint: the expert count its model class is built with before each MoE
#: layer is cut to its own count (the largest kept count, or the original one where blocks outside X,
#: such as hash-routed ones, keep every expert).
BUILT_KEY = "moe_experts_built"
#: Config key of a per-layer checkpoint that keeps its real ``model_type``; ``model_type`` itself holds
#: a marker that no transformers class claims, so plain ``from_pretrained`` fails on it, loudly.
MODEL_TYPE_KEY = "moe_pruned_model_type"
PER_LAYER_MARKER = "{} with per-layer expert counts: load it with moe_utils.models.expert_surgery.load_pruned"


class PruningError(ValueError):
    """A keep-mask that cannot be applied to this model (the message says why and what to do)."""


# ------------------------------------------------------------------------------ keep-masks
def _group_rule(layer: MoELayer) -> tuple[int, int, int] | None:
    """``(n_group, topk_group, min_per_group)`` for a group-limited router, else None."""
    router = layer.router
    n_group = getattr(router, "num_group", None)
    if not isinstance(n_group, int) or getattr(router, "topk_method", None) == "greedy":
        return None
    # sigmoid routers (DeepSeek-V3 family) score a group by the sum of its two best experts
    min_per_group = 2 if layer.architecture.scoring == "sigmoid" else 1
    return n_group, int(router.topk_group), min_per_group


def _group_counts(layer: MoELayer) -> list[int] | None:
    """The keep counts a group-limited router allows (see the module docstring), else None."""
    rule = _group_rule(layer)
    if rule is None:
        return None
    n_group, topk_group, min_per_group = rule
    return [c for c in range(n_group, layer.num_experts + 1, n_group)
            if c // n_group >= min_per_group and topk_group * (c // n_group) >= layer.top_k]


def allowed_counts(model: nn.Module, layers: list[MoELayer] | None = None) -> list[list[int] | None]:
    """Per MoE layer (``layers``, found when not given), the numbers of experts a pruned layer may
    keep, or None where any count from top-k up is allowed. Only group-limited routers (DeepSeek-V3
    family) restrict it; :meth:`moe_utils.compression.caep.PruningBudget.for_model` puts them in the budget
    that the mask builders of :mod:`moe_utils.compression.caep` and :mod:`moe_utils.compression.pruning` respect."""
    return [_group_counts(layer) for layer in (moe_layers(model) if layers is None else layers)]


def _check_layer(layer: MoELayer, kept: np.ndarray) -> None:
    count, where = len(kept), f"MoE layer {layer.index} (decoder layer {layer.layer_index})"
    if count == 0:
        raise PruningError(f"{where} would keep no expert: every layer must keep at least top-k = "
                           f"{layer.top_k} experts (pruning's min_per_layer guards this)")
    if count < layer.top_k:
        raise PruningError(f"{where} would keep {count} expert(s), fewer than the {layer.top_k} its router "
                           f"sends every token to; keep at least top-k = {layer.top_k} experts per layer "
                           "(pruning's min_per_layer guards this)")
    valid = _group_counts(layer)
    if valid is None or count == layer.num_experts or count in valid:
        return
    n_group, topk_group, min_per_group = _group_rule(layer)
    per_group = count // n_group
    raise PruningError(
        f"{where} routes within {n_group} groups (top {topk_group} groups, then top-{layer.top_k}); it "
        f"would keep {count} experts, which "
        + (f"is not divisible by n_group = {n_group}" if count % n_group else
           f"leaves {per_group} per group (at least {min_per_group} needed, and {topk_group} group(s) "
           f"must hold top-k = {layer.top_k})")
        + f". Keep one of these counts in that layer: {valid} (a PruningBudget.for_model(model) makes "
        "the mask builders round up to one)"
    )


def _as_array(keep: Any) -> np.ndarray | None:
    """``keep`` as a 1-D array when it is a flat mask, None when it is a list of per-layer lists."""
    if isinstance(keep, torch.Tensor):
        return keep.detach().cpu().numpy()
    if isinstance(keep, np.ndarray):
        return keep
    if len(keep) and all(isinstance(v, (bool, np.bool_)) for v in keep):
        return np.asarray(keep, dtype=bool)
    return None


def normalize_keep(model: nn.Module, keep: Any, layers: list[MoELayer] | None = None) -> list[np.ndarray]:
    """Kept expert indices per MoE layer (sorted ``int64`` arrays), checked against the model.

    Args:
        model: an MoE model known to :mod:`moe_utils.models.loading`.
        keep: a boolean keep-mask of length N_e = n_moe_layers * E in X's layer-major order
            (row ``layer * E + expert``; ``True`` = keep), as a numpy array, torch tensor or list of
            bools; or a list with one sequence of kept expert indices per MoE layer.

    Raises:
        PruningError: wrong length or type, an index out of range or repeated, a layer left with
            no expert or fewer than top-k, or a count that breaks a group-limited router's groups.
    """
    layers = moe_layers(model) if layers is None else layers
    n_experts = max(layer.num_experts for layer in layers)
    flat = _as_array(keep)
    if flat is not None:
        if flat.dtype != np.bool_:
            raise PruningError(f"a keep-mask must be boolean (True = keep), got dtype {flat.dtype}; pass "
                               "mask.astype(bool), or one list of kept expert indices per MoE layer")
        expected = len(layers) * n_experts
        if flat.shape != (expected,):
            raise PruningError(f"the keep-mask has shape {flat.shape}; this model needs a flat mask of "
                               f"N_e = {len(layers)} MoE layers x {n_experts} experts = {expected} entries, "
                               "in X's layer-major order (row = layer * E + expert)")
        rows = flat.reshape(len(layers), n_experts)
        for layer in layers:
            if rows[layer.index, layer.num_experts:].any():
                raise PruningError(f"the keep-mask keeps experts >= {layer.num_experts} in MoE layer "
                                   f"{layer.index}, which has only {layer.num_experts}")
        kept = [np.flatnonzero(rows[layer.index, :layer.num_experts]) for layer in layers]
    else:
        if len(keep) != len(layers):
            raise PruningError(f"got {len(keep)} per-layer index lists; this model has {len(layers)} MoE "
                               "layers (dense layers are not counted)")
        kept = []
        for layer, indices in zip(layers, keep):
            arr = np.asarray(indices).reshape(-1)
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise PruningError(f"MoE layer {layer.index}: kept experts must be integer indices, got "
                                   f"dtype {arr.dtype}")
            arr = np.sort(arr.astype(np.int64))
            if arr.size and (arr[0] < 0 or arr[-1] >= layer.num_experts):
                raise PruningError(f"MoE layer {layer.index}: expert indices must lie in [0, "
                                   f"{layer.num_experts}), got {arr.tolist()}")
            if np.unique(arr).size != arr.size:
                raise PruningError(f"MoE layer {layer.index}: an expert index is repeated in {arr.tolist()}")
            kept.append(arr)
    for layer, indices in zip(layers, kept):
        _check_layer(layer, indices)
    return [indices.astype(np.int64) for indices in kept]


# ------------------------------------------------------------------------------ slicing
def _slice_tensor(tensor: torch.Tensor, index: torch.Tensor, n_experts: int, shared: int = 0) -> torch.Tensor | None:
    """``tensor`` restricted to the experts ``index``: along its first dimension when that has
    ``n_experts`` entries (or ``n_experts + shared``: a router that also scores its ``shared`` always-on
    experts in trailing rows, which are kept), along its last when only leading singleton dimensions
    precede it (ERNIE's ``moe_statics`` bias is ``(1, E)``); None for a tensor that is not per expert."""
    if tensor.dim() and shared and tensor.shape[0] == n_experts + shared:
        rows = torch.cat([index, torch.arange(n_experts, n_experts + shared, device=index.device)])
        return tensor.index_select(0, rows.to(tensor.device))
    if tensor.dim() and tensor.shape[0] == n_experts:
        return tensor.index_select(0, index.to(tensor.device))
    if tensor.dim() > 1 and tensor.shape[-1] == n_experts and all(d == 1 for d in tensor.shape[:-1]):
        return tensor.index_select(-1, index.to(tensor.device))
    return None


def _slice_module(module: nn.Module, index: torch.Tensor, n_experts: int, *, recurse: bool) -> int:
    """Keep the experts ``index`` in every per-expert parameter and buffer of ``module`` (and of its
    children when ``recurse``), and set its expert-count attributes to ``len(index)``; returns how
    many tensors were sliced. A module holding a ``config`` gets a copy with the new count."""
    sliced = 0
    module.__dict__.pop(PROBED, None)  # what discovery learnt from calling it no longer holds
    shared = getattr(module, "n_shared_experts", 0) if recurse else 0
    shared = shared if isinstance(shared, int) else 0
    for owner in (module.modules() if recurse else [module]):
        for name, param in list(owner.named_parameters(recurse=False)):
            new = _slice_tensor(param.detach(), index, n_experts, shared)
            if new is not None:
                setattr(owner, name, nn.Parameter(new.clone(), requires_grad=param.requires_grad))
                sliced += 1
        for name, buffer in list(owner.named_buffers(recurse=False)):
            new = None if buffer is None else _slice_tensor(buffer, index, n_experts, shared)
            if new is not None:
                owner._buffers[name] = new.clone()
                sliced += 1
        for attr in COUNT_ATTRS:
            if getattr(owner, attr, None) == n_experts:
                setattr(owner, attr, len(index))
        if shared and getattr(owner, "n_total_experts", None) == n_experts + shared:
            owner.n_total_experts = len(index) + shared
        if recurse and isinstance(getattr(owner, "config", None), PretrainedConfig):
            owner.config = copy.copy(owner.config)
            _set_config_count(owner.config, len(index))
    return sliced


def _pruned_router(layer: MoELayer, index: torch.Tensor) -> nn.Module:
    """A copy of ``layer.router`` that routes among the experts ``index`` only (new local indices)."""
    router = copy.deepcopy(layer.router)
    router.__dict__.pop("forward", None)  # an instance-level forward (e.g. from accelerate) stays behind
    if not _slice_module(router, index, layer.num_experts, recurse=True):
        raise NotImplementedError(f"{type(router).__name__} holds no tensor with {layer.num_experts} expert rows "
                                  "to slice: register an adapter for this router")
    return router


def _masked_forward(pruned: nn.Module, index: torch.Tensor, layer: MoELayer, model_type: str):
    """The forward that replaces a router's while masked: route with ``pruned`` (per-expert inputs the
    block passes, such as a correction bias, sliced alike), then map the choice back to ``index``:
    the top-k indices, and the logits (``-inf`` for pruned experts); or, for a router with
    ``dense_outputs`` (Llama 4), every per-expert output, with its value for pruned experts."""
    n_experts = layer.num_experts

    def restrict(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[-1] == n_experts:
            return value.index_select(-1, index.to(value.device))
        return value

    def expand(tensor: torch.Tensor, fill: float) -> torch.Tensor:
        full = tensor.new_full((*tensor.shape[:-1], n_experts), fill)
        full[..., index.to(tensor.device)] = tensor
        return full

    def forward(hidden, *args, **kwargs):
        output = pruned.forward(hidden, *map(restrict, args), **{k: restrict(v) for k, v in kwargs.items()})
        if layer.architecture.dense_outputs:
            output = list(output)
            for position, fill in layer.architecture.dense_outputs:
                output[position] = expand(output[position], fill)
            return tuple(output)
        layout = router_output_layout(output)
        if layout is None:
            raise PruningError(f"model type {model_type!r}: the router's output carries no top-k indices, so "
                               "pruned experts cannot be masked; register an adapter for this layout")
        output = list(output)
        output[layout.index_at] = index.to(output[layout.index_at].device)[output[layout.index_at]]
        if layout.logits_at is not None:
            output[layout.logits_at] = expand(output[layout.logits_at], float("-inf"))
        return tuple(output)

    return forward


def _warn_regrouped(layer: MoELayer, kept: np.ndarray) -> None:
    rule = _group_rule(layer)
    if rule is None or len(kept) == layer.num_experts:
        return
    n_group = rule[0]
    original = kept // (layer.num_experts // n_group)
    if not np.array_equal(np.bincount(original, minlength=n_group), np.full(n_group, len(kept) // n_group)):
        log.warning("MoE layer %d: the kept experts are not spread evenly over the %d original routing groups; "
                    "they are regrouped into %d runs of %d consecutive kept experts, as the removed model "
                    "groups them", layer.index, n_group, n_group, len(kept) // n_group)


@contextlib.contextmanager
def masked_experts(model: nn.Module, keep: Any,
                   layers: list[MoELayer] | None = None) -> Iterator[list[np.ndarray]]:
    """Route ``model`` as if the pruned experts were gone, for the duration of the ``with`` block.

    Pruned experts can never be selected; the top-k is chosen again among the kept experts by the
    architecture's own rule (the router's own code runs on its kept rows). Router logits of pruned
    experts read ``-inf``. No memory is freed: use :func:`remove_experts` for that; both give the
    same logits. Yields the kept indices per MoE layer (:func:`normalize_keep`). ``layers``: the
    model's MoE layers, found when not given.
    """
    layers = moe_layers(model) if layers is None else layers
    kept = normalize_keep(model, keep, layers)
    patched: list[tuple[nn.Module, bool, Any]] = []
    try:
        for layer, indices in zip(layers, kept):
            if len(indices) == layer.num_experts:
                continue  # nothing pruned in this layer: its router stays as it is
            _warn_regrouped(layer, indices)
            index = torch.as_tensor(indices, device=next(layer.router.parameters()).device)
            router = layer.router
            patched.append((router, "forward" in router.__dict__, router.__dict__.get("forward")))
            router.forward = _masked_forward(_pruned_router(layer, index), index, layer,
                                             str(getattr(model.config, "model_type", "")))
        yield kept
    finally:
        _restore_forwards(patched)


def _restore_forwards(patched: list[tuple[nn.Module, bool, Any]]) -> None:
    """Undo router ``forward`` patches, newest first: ``(router, had its own forward, that forward)``."""
    for router, had_own, previous in reversed(patched):
        if had_own:
            router.forward = previous
        else:
            del router.forward


def _split_rows(value: Any, rows: int, blocks: int) -> list:
    """``value`` cut into ``blocks`` equal parts along dim 0 when it is a tensor with ``rows`` rows,
    else the same value for every block."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
        return list(value.chunk(blocks))
    return [value] * blocks


def _joined(outputs: list) -> Any:
    """The block outputs of a router put back together along dim 0 (tensors) or taken from the first
    block (anything else)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs) if first.dim() else first
    if isinstance(first, (tuple, list)):
        return type(first)(_joined(list(parts)) for parts in zip(*outputs))
    return first


def _row_masked_forward(forwards: list, n_blocks: int):
    """A router forward that routes block ``b`` of ``n_blocks`` equal blocks of rows (dim 0 of the
    hidden states, and of any argument with as many rows) with ``forwards[b]``."""
    def forward(hidden, *args, **kwargs):
        rows = hidden.shape[0]
        if rows % n_blocks:
            raise PruningError(f"the batch has {rows} rows, not {n_blocks} equal blocks: row_masked_experts needs "
                               "the batch replicated once per mask, mask-major")
        parts_args = [_split_rows(a, rows, n_blocks) for a in args]
        parts_kwargs = {k: _split_rows(v, rows, n_blocks) for k, v in kwargs.items()}
        outputs = [forwards[b](part, *(p[b] for p in parts_args), **{k: p[b] for k, p in parts_kwargs.items()})
                   for b, part in enumerate(hidden.chunk(n_blocks))]
        return _joined(outputs)

    return forward


@contextlib.contextmanager
def row_masked_experts(model: nn.Module, keeps: list, layers: list[MoELayer] | None = None) -> Iterator[None]:
    """Several keep-masks at once, one per block of the batch: while active, a batch of
    ``len(keeps) * B`` sequences is ``len(keeps)`` blocks of ``B`` consecutive rows, and block ``b``
    is routed exactly as :func:`masked_experts` routes ``keeps[b]`` (the same pruned router copies
    and mapping back; a mask that keeps every expert of a layer leaves that layer's router as it
    is). Every other module sees the whole batch, so one forward pass scores every mask: the rows
    do not interact (causal attention within a sequence, experts applied per token). Used by
    :mod:`moe_utils.evaluation.multi_mask` to score several pruned models in one pass."""
    layers = moe_layers(model) if layers is None else layers
    kept = [normalize_keep(model, keep, layers) for keep in keeps]
    model_type = str(getattr(model.config, "model_type", ""))
    patched: list[tuple[nn.Module, bool, Any]] = []
    try:
        for position, layer in enumerate(layers):
            per_mask = [k[position] for k in kept]
            if all(len(indices) == layer.num_experts for indices in per_mask):
                continue
            router = layer.router
            own = router.forward
            device = next(router.parameters()).device
            forwards = []
            for indices in per_mask:
                if len(indices) == layer.num_experts:
                    forwards.append(own)
                    continue
                _warn_regrouped(layer, indices)
                index = torch.as_tensor(indices, device=device)
                forwards.append(_masked_forward(_pruned_router(layer, index), index, layer, model_type))
            patched.append((router, "forward" in router.__dict__, router.__dict__.get("forward")))
            router.forward = _row_masked_forward(forwards, len(keeps))
        yield
    finally:
        _restore_forwards(patched)


# ------------------------------------------------------------------------------ removal
def _set_config_count(config: Any, count: Any) -> None:
    """Set the routed-expert count of ``config`` and of its text part (composite models, e.g. gemma4)."""
    for owner in (config, getattr(config, "text_config", None)):
        for name in EXPERT_COUNT_FIELDS:
            if owner is not None and (isinstance(getattr(owner, name, None), int)
                                      or name in getattr(owner, "attribute_map", {})):
                setattr(owner, name, count)


def _raw_count_owners(raw: dict) -> list[dict]:
    """A saved ``config.json`` and its ``text_config`` section: where expert counts are written."""
    return [raw, *([raw["text_config"]] if isinstance(raw.get("text_config"), dict) else [])]


def remove_experts(model: nn.Module, keep: Any) -> nn.Module:
    """Physically remove the pruned experts from ``model`` (in place); returns the model.

    Slices, in every MoE layer, the fused expert tensors (gpt-oss's expert biases too), the router's
    rows and per-expert buffers, and updates the expert counts of the router, experts and block
    modules, of the model itself, and of its config. Kept experts are renumbered ``0..n-1`` in their
    original order. When every layer keeps the same count the config holds it and the model saves
    with ``save_pretrained``; otherwise ``config.moe_experts_per_layer`` holds the counts and the
    model must be saved with :func:`save_pruned`.
    """
    layers = moe_layers(model)
    kept = normalize_keep(model, keep, layers)
    old_counts = {layer.num_experts for layer in layers}
    for layer, indices in zip(layers, kept):
        if len(indices) == layer.num_experts:
            continue
        index = torch.as_tensor(indices, device=next(layer.router.parameters()).device)
        _slice_module(layer.router, index, layer.num_experts, recurse=True)
        _slice_module(layer.block, index, layer.num_experts, recurse=False)  # per-expert biases the block holds
        if isinstance(layer.experts, nn.ModuleList):  # one module per expert (remote-code DeepSeek-MoE)
            layer.experts = nn.ModuleList(layer.experts[i] for i in indices.tolist())
            setattr(layer.block, layer.architecture.experts_attr, layer.experts)
        else:
            # recurse: per-expert tensors may sit in the experts' own submodules (Ergo's post_expert_norm)
            if not _slice_module(layer.experts, index, layer.num_experts, recurse=True):
                raise NotImplementedError(f"{type(layer.experts).__name__} holds no tensor with "
                                          f"{layer.num_experts} expert rows to slice")
    counts = [len(indices) for indices in kept]
    unrouted = len(find_blocks(model)) > len(layers)  # blocks outside X (hash-routed) keep every expert
    if unrouted:
        setattr(model.config, PER_LAYER_KEY, counts)
        new_count = None
    elif len(set(counts)) == 1:
        _set_config_count(model.config, counts[0])
        if hasattr(model.config, PER_LAYER_KEY):
            delattr(model.config, PER_LAYER_KEY)
        new_count: int | None = counts[0]
    else:
        _set_config_count(model.config, max(counts))
        setattr(model.config, PER_LAYER_KEY, counts)
        new_count = None  # the model-level count (used by the auxiliary loss) has no single value
    for owner in (model, getattr(model, "model", None)):
        for attr in COUNT_ATTRS:
            if owner is not None and getattr(owner, attr, None) in old_counts:
                setattr(owner, attr, new_count)
    return model


def experts_per_layer(model: nn.Module) -> list[int]:
    """Routed experts in each MoE layer of ``model``."""
    return [layer.num_experts for layer in moe_layers(model)]


# ------------------------------------------------------------------------------ saving
WEIGHTS = "model.safetensors"


def save_pruned(model: nn.Module, path: str | Path, *, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Save a model returned by :func:`remove_experts` so that :func:`load_pruned` rebuilds it exactly.

    Same count in every layer: ``save_pretrained`` (plain ``from_pretrained`` reloads it). Counts
    that differ by layer: ``config.json`` holds them under ``moe_experts_per_layer``, and its
    ``model_type`` is a marker that no transformers class claims (the real one is kept under
    ``moe_pruned_model_type``), as do its expert-count fields, so plain ``from_pretrained`` fails,
    whatever its options, with a message naming :func:`load_pruned`; no layer can be silently
    re-initialised. The weights
    go to ``model.safetensors`` as the model names them (fused expert tensors). The directory is
    written beside ``path`` and moved into place when complete.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_model

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; choose another directory or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = experts_per_layer(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if len(set(counts)) == 1 and not hasattr(model.config, PER_LAYER_KEY):
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.config.save_pretrained(tmp)
            raw = json.loads((tmp / "config.json").read_text())
            raw[MODEL_TYPE_KEY] = raw["model_type"]
            raw[BUILT_KEY] = next(owner[name] for owner in _raw_count_owners(raw) for name in EXPERT_COUNT_FIELDS
                                  if isinstance(owner.get(name), int))
            raw["model_type"] = PER_LAYER_MARKER.format(raw["model_type"])
            for owner in _raw_count_owners(raw):  # also stops a model class's own from_pretrained
                for name in EXPERT_COUNT_FIELDS:
                    if name in owner:
                        owner[name] = raw["model_type"]
            raw[PER_LAYER_KEY] = counts
            atomic_write_json(tmp / "config.json", raw)
            save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", PER_LAYER_KEY: json.dumps(counts)})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.replace(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_pruned(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a checkpoint written by :func:`save_pruned` (or ``save_pretrained``); returns the model in eval mode.

    Per-layer counts are rebuilt by making the model at its recorded build count (``moe_experts_built``)
    without initialising it,
    removing the surplus experts of each layer, then loading every tensor strictly from
    ``model.safetensors`` (a missing or unexpected tensor is an error).
    """
    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    raw = PretrainedConfig._dict_from_json_file(path / "config.json")  # decodes the Infinity transformers writes
    if PER_LAYER_KEY not in raw:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    else:
        counts = [int(c) for c in raw.pop(PER_LAYER_KEY)]
        with safe_open(str(path / WEIGHTS), "pt") as handle:
            stored = json.loads((handle.metadata() or {}).get(PER_LAYER_KEY, "null"))
        if stored != counts:
            raise PruningError(f"{path}: config.json says {counts} experts per layer, {WEIGHTS} says {stored}; "
                               "the checkpoint is inconsistent, save it again with save_pruned")
        raw["model_type"] = raw.pop(MODEL_TYPE_KEY)
        for owner in _raw_count_owners(raw):
            owner.update({name: raw.get(BUILT_KEY, max(counts)) for name in EXPERT_COUNT_FIELDS if name in owner})
        raw.pop(BUILT_KEY, None)
        config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None))
        remove_experts(model, [np.arange(count) for count in counts])
        model.tie_weights()
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
        loaded = {p.data_ptr() for name, p in model.state_dict().items() if name not in missing}
        untied = [name for name in missing if model.state_dict()[name].data_ptr() not in loaded]
        if unexpected or untied:  # a tied tensor (embeddings = LM head) is stored once, under one name
            raise PruningError(f"{path / WEIGHTS} does not match the model: missing {untied}, unexpected "
                               f"{unexpected}; save it again with save_pruned")
    if device is not None:
        model = model.to(device)
    return model.eval()
