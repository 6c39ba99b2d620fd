"""Expert merging: what a merged expert's weights are, and how a merged model is applied or saved.

Merging (HC-SMoE, M-SMoE: :mod:`moe_utils.compression.methods.hc_smoe`,
:mod:`moe_utils.compression.methods.m_smoe`) replaces each group of experts of a layer by one
expert whose every weight tensor is the weighted average of the members' (the weights: the
members' usage on calibration data). Before averaging, M-SMoE permutes each member's intermediate
neurons to match the kept expert's (:func:`neuron_permutation`, a linear assignment on the neurons'
weight vectors): an expert's function does not depend on the order of its neurons, their average
does.

Routing to a merged expert. The merged expert takes the place of the group's kept expert (its
``groups[layer][g][0]``); the router rows of the merged-away experts are dropped, exactly as for
pruning, and every token's top-k is chosen again among the kept experts by the model's own rule.
Tokens reach the merged expert through the kept expert's own router row; the routing mass the
router gave the merged-away experts is not added to it. (This is what lets the merged model be a
plain checkpoint of the architecture with fewer experts.)

Two ways to apply a merge, which give the same logits: :func:`applied` (a context manager for
evaluation: the kept experts' weights are overwritten in place and the other experts masked with
:func:`moe_utils.models.expert_surgery.masked_experts`; everything is restored on exit) and
:func:`compress` (the merged weights are written, then the merged-away experts physically removed
with :func:`moe_utils.models.expert_surgery.remove_experts`, so the model holds fewer expert weights and
saves with :func:`moe_utils.models.expert_surgery.save_pruned`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from moe_utils.compression.calibration import expert_outputs
from moe_utils.compression.value import Compression, check_groups
from moe_utils.models.expert_surgery import masked_experts, remove_experts
from moe_utils.models.loading import MoELayer, moe_layers

#: Attribute names (experts module, then model config) holding an expert's intermediate width.
INTERMEDIATE_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size")


# --------------------------------------------------------------------------- expert tensors
def expert_tensors(layer: MoELayer) -> dict[str, nn.Parameter]:
    """The per-expert parameters of a layer's fused experts module (first dimension = its experts),
    by qualified name; the routed experts' weights and biases, nothing of the router."""
    if isinstance(layer.experts, nn.ModuleList):
        raise NotImplementedError(f"MoE layer {layer.index}: experts are a ModuleList (a remote-code layout); "
                                  "merging needs the fused experts module of a transformers 5 MoE")
    found = {name: p for name, p in layer.experts.named_parameters()
             if p.dim() and p.shape[0] == layer.num_experts}
    if not found:
        raise NotImplementedError(f"{type(layer.experts).__name__} holds no tensor with {layer.num_experts} "
                                  "expert rows to merge")
    return found


def _widths(layer: MoELayer, config: Any, tensors: dict[str, nn.Parameter], hidden: int) -> list[int]:
    """Candidate intermediate widths: the declared one first (:data:`INTERMEDIATE_ATTRS` on the experts
    module or the config), then every other axis size of the expert tensors but the hidden size."""
    declared = [getattr(owner, name, None) for owner in (layer.experts, config, getattr(config, "text_config", None))
                for name in INTERMEDIATE_ATTRS]
    sizes = [int(n) for p in tensors.values() for n in p.shape[1:] if n != hidden]
    return list(dict.fromkeys([v for v in declared if isinstance(v, int) and v > 0] + sizes))


def permute_neurons(tensor: torch.Tensor, axis: int, mode: str, perm: torch.Tensor) -> torch.Tensor:
    """One expert's ``tensor`` (no expert dimension) with its neurons permuted along ``axis``:
    ``plain`` (one entry per neuron), ``chunked`` (gate then up halves), ``interleaved`` (gate, up
    alternate)."""
    n = len(perm)
    if mode == "plain":
        index = perm
    elif mode == "chunked":
        index = torch.cat([perm, perm + n])
    else:
        index = torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)
    return tensor.index_select(axis, index.to(tensor.device))


def neuron_layout(layer: MoELayer, config: Any) -> dict[str, tuple[int, str]]:
    """Where each per-expert tensor holds the intermediate neurons: ``{name: (axis, mode)}`` (axis
    of the tensor without its expert dimension; mode as in :func:`permute_neurons`), found by trying the
    axes whose size is an intermediate width (or twice it) and keeping the assignment under which a
    random permutation of expert 0's neurons leaves its output unchanged (checked on random inputs
    with the layer's own experts module). Raises NotImplementedError when none does."""
    tensors = expert_tensors(layer)
    hidden = _hidden_size(layer)
    weight = next(iter(tensors.values()))
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(8, hidden, generator=generator).to(weight.device, weight.dtype)
    index = torch.zeros(len(probe), dtype=torch.long, device=weight.device)
    with torch.no_grad():
        reference = expert_outputs(layer, probe, index).float()
        scale = float(reference.abs().max()) or 1.0
        for width in _widths(layer, config, tensors, hidden):
            layout = _find_layout(layer, tensors, width, probe, index, reference, scale, generator)
            if layout is not None:
                return layout
    raise NotImplementedError(f"MoE layer {layer.index} ({type(layer.experts).__name__}): no layout of its expert "
                              "tensors lets a permutation of the intermediate neurons keep the expert's output, "
                              "so neurons cannot be aligned")


def _find_layout(layer, tensors, width, probe, index, reference, scale, generator) -> dict[str, tuple[int, str]] | None:
    """The assignment of neuron axes (most tensors permuted first) under which a random permutation of
    ``width`` neurons of expert 0 leaves its output on ``probe`` unchanged, or None."""
    options = {}
    for name, param in tensors.items():
        choices = [None]
        for axis, size in enumerate(param.shape[1:]):
            if size == width:
                choices.append((axis, "plain"))
            if size == 2 * width:
                choices += [(axis, "chunked"), (axis, "interleaved")]
        options[name] = choices
    perm = torch.randperm(width, generator=generator)
    for combo in sorted(itertools.product(*options.values()), key=lambda c: -sum(o is not None for o in c)):
        if all(o is None for o in combo):
            return None
        layout = {n: o for n, o in zip(options, combo) if o is not None}
        saved = {n: tensors[n].data[0].clone() for n in layout}
        try:
            for n, (axis, mode) in layout.items():
                tensors[n].data[0] = permute_neurons(saved[n], axis, mode, perm)
            changed = float((expert_outputs(layer, probe, index).float() - reference).abs().max()) / scale
        finally:
            for n, value in saved.items():
                tensors[n].data[0] = value
        if changed < 1e-4:
            return layout
    return None


def _hidden_size(layer: MoELayer) -> int:
    router = next(p for p in layer.router.parameters() if p.dim() == 2)
    return int(router.shape[-1])


def neuron_permutation(reference: dict[str, torch.Tensor], member: dict[str, torch.Tensor],
                       layout: dict[str, tuple[int, str]]) -> torch.Tensor:
    """The permutation of ``member``'s intermediate neurons that best matches ``reference``'s: every
    neuron is the vector of all its weights (over the tensors of ``layout``), and the assignment
    maximises the summed inner products of matched neurons (scipy's ``linear_sum_assignment``).
    Returns ``perm`` with member neuron ``perm[j]`` placed at position j."""
    def features(tensors):
        parts = []
        for name, (axis, mode) in layout.items():
            t = tensors[name].float().movedim(axis, 0)
            n = t.shape[0] if mode == "plain" else t.shape[0] // 2
            if mode == "chunked":
                t = torch.cat([t[:n], t[n:]], dim=-1) if t.dim() > 1 else torch.stack([t[:n], t[n:]], dim=-1)
            elif mode == "interleaved":
                t = t.reshape(n, 2, *t.shape[1:])
            parts.append(t.reshape(n, -1))
        return torch.cat(parts, dim=1)

    score = (features(reference) @ features(member).T).cpu().numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


# ------------------------------------------------------------------------------- merging
def merged_slices(model: nn.Module, compression: Compression,
                  layers: list[MoELayer] | None = None) -> list[dict[str, dict[int, torch.Tensor]]]:
    """Per MoE layer, ``{tensor name: {kept expert: merged slice}}`` for every group of more than one
    expert: the ``weights``-weighted average of the members' slices (after aligning each member's
    neurons to the kept expert's when ``compression.align``)."""
    layers = moe_layers(model) if layers is None else layers
    check_groups(compression, [layer.num_experts for layer in layers])
    bounds = np.concatenate([[0], np.cumsum([layer.num_experts for layer in layers])])
    weights = np.asarray(compression.weights, dtype=np.float64)
    out = []
    with torch.no_grad():
        for layer, groups in zip(layers, compression.groups):
            tensors = expert_tensors(layer)
            layout = neuron_layout(layer, model.config) if compression.align and any(len(g) > 1 for g in groups) else {}
            slices: dict[str, dict[int, torch.Tensor]] = {name: {} for name in tensors}
            for group in groups:
                if len(group) == 1:
                    continue
                w = weights[bounds[layer.index] + np.asarray(group)]
                w = w / w.sum()
                lead = {name: t[group[0]] for name, t in tensors.items()}
                total = {name: lead[name].double() * w[0] for name in tensors}
                for share, member in zip(w[1:], group[1:]):
                    own = {name: t[member] for name, t in tensors.items()}
                    if layout:
                        perm = neuron_permutation(lead, own, layout)
                        own = {name: permute_neurons(value, *layout[name], perm) if name in layout else value
                               for name, value in own.items()}
                    for name in tensors:
                        total[name] += own[name].double() * share
                for name, param in tensors.items():
                    slices[name][group[0]] = total[name].to(param.dtype)
            out.append(slices)
    return out


def _write(layers: list[MoELayer], slices) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
    """Write the merged slices into the experts' tensors; returns what they held, for restoring."""
    previous = []
    with torch.no_grad():
        for layer, per_tensor in zip(layers, slices):
            tensors = expert_tensors(layer)
            for name, by_expert in per_tensor.items():
                for expert, value in by_expert.items():
                    previous.append((tensors[name], expert, tensors[name].data[expert].clone()))
                    tensors[name].data[expert] = value.to(tensors[name].device)
    return previous


@contextlib.contextmanager
def applied(model: nn.Module, compression: Compression, layers: list[MoELayer] | None = None) -> Iterator[None]:
    """The model as ``compression`` makes it, for the duration of the ``with`` block: pruning masks
    the removed experts (:func:`moe_utils.models.expert_surgery.masked_experts`); merging also writes each
    group's merged weights over its kept expert. Everything is restored on exit, also after an error;
    the unpruned model (every expert kept) is left as it is."""
    keep = np.asarray(compression.keep, dtype=bool)
    if keep.all():
        yield
        return
    layers = moe_layers(model) if layers is None else layers
    previous = _write(layers, merged_slices(model, compression, layers)) if compression.merged else []
    try:
        with masked_experts(model, keep, layers):
            yield
    finally:
        with torch.no_grad():
            for param, expert, value in reversed(previous):
                param.data[expert] = value


def compress(model: nn.Module, compression: Compression) -> nn.Module:
    """Apply ``compression`` for good (in place; returns the model): merged weights written over the
    kept experts, then every other expert physically removed
    (:func:`moe_utils.models.expert_surgery.remove_experts`, router rows included); save the result with
    :func:`moe_utils.models.expert_surgery.save_pruned`."""
    layers = moe_layers(model)
    if compression.merged:
        _write(layers, merged_slices(model, compression, layers))
    return remove_experts(model, np.asarray(compression.keep, dtype=bool))
