"""One compressed model, as a value: :class:`Compression` (which method, at which ratio and seed, the
experts kept and, for merging, what was merged into each), with the one digest every cache key uses.

Every pruning method of the paper's section 4 (CAEP and the baselines) ends in a *keep-mask*: a
boolean vector over the N_e routed experts in the layer-major order of the expert matrix X (row
``layer * E + expert``, True = keep). An expert-merging method (HC-SMoE, M-SMoE:
:mod:`moe_utils.compression.merging`) keeps the same kind of mask, the experts whose router rows
survive, and says in ``groups`` which experts were merged into each kept one, with the ``weights``
of the weighted average and whether the members' neurons were aligned first (``align``). Two
compressions that give the same model have the same :attr:`Compression.digest`: for pruning only the
mask counts (two methods that prune the same experts share an evaluation), for merging also the
groups, weights and alignment, so a merged model can never read a pruned model's cached scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_utils.common.artifacts import json_digest

#: Per MoE layer, per kept expert (in increasing index order), the original indices merged into it,
#: the kept expert first.
Groups = list[list[list[int]]]


@dataclass
class Compression:
    """One method's compressed model at one ratio (and seed, for random masks), with a note.

    Attributes:
        method: the method's name in :mod:`moe_utils.compression.registry`.
        ratio: the share of routed experts the method was asked to remove, in [0, 1).
        keep: (N_e,) bool, the experts (router rows) kept, in X's layer-major order.
        seed: the seed of a random method, else None.
        note: what the budget changed (guard, group-limited counts), for the tables.
        groups: merging only: :data:`Groups`, one group per kept expert (an expert in no group is
            pruned; the methods here put every expert in a group).
        weights: merging only: (N_e,) non-negative weight of every expert in its group's average.
        align: merging only: whether each member's intermediate neurons are permuted to match the
            kept expert's before averaging.
    """

    method: str
    ratio: float
    keep: np.ndarray
    seed: int | None = None
    note: str = ""
    groups: Groups | None = None
    weights: np.ndarray | None = None
    align: bool = False

    @property
    def label(self) -> str:
        return self.method if self.seed is None else f"{self.method} (seed {self.seed})"

    @property
    def pruned_share(self) -> float:
        """The share of routed experts the compressed model no longer holds."""
        return float(1 - self.keep.mean())

    @property
    def merged(self) -> bool:
        return self.groups is not None

    def describe(self) -> dict[str, Any]:
        """What defines the compressed model, JSON-able: the keep bits and, for a merge, the groups,
        weights and alignment (method, ratio, seed and note do not change the model)."""
        out: dict[str, Any] = {"keep": np.packbits(np.asarray(self.keep, dtype=bool)).tobytes().hex(),
                               "n": int(len(self.keep))}
        if self.merged:
            out["merge"] = {"groups": self.groups, "align": bool(self.align),
                            "weights": np.asarray(self.weights, dtype=np.float64).tobytes().hex()}
        return out

    @property
    def digest(self) -> str:
        """sha256 of :meth:`describe`: the model this compression gives, as every cache key names it."""
        return json_digest(self.describe())


def pruned(keep: Any, method: str = "mask", ratio: float = 0.0) -> Compression:
    """A :class:`Compression` that only prunes (a bare keep-mask)."""
    return Compression(method, ratio, np.asarray(keep, dtype=bool))


def check_groups(compression: Compression, layer_sizes: list[int]) -> None:
    """ValueError unless ``groups`` holds, in every layer, one group per kept expert, led by that kept
    expert, the groups disjoint (an expert in no group is pruned), and ``weights`` gives every group
    a positive total."""
    if not compression.merged:
        return
    groups, keep = compression.groups, np.asarray(compression.keep, dtype=bool)
    bounds = np.concatenate([[0], np.cumsum(layer_sizes)])
    if len(groups) != len(layer_sizes):
        raise ValueError(f"{compression.label}: {len(groups)} layers of groups for {len(layer_sizes)} MoE layers")
    weights = np.asarray(compression.weights, dtype=np.float64)
    if weights.shape != keep.shape or (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"{compression.label}: weights must be {keep.shape} finite and >= 0")
    for layer, (size, layer_groups) in enumerate(zip(layer_sizes, groups)):
        kept = np.flatnonzero(keep[bounds[layer]: bounds[layer + 1]])
        members = [i for g in layer_groups for i in g]
        if len(set(members)) != len(members) or not set(members) <= set(range(size)):
            raise ValueError(f"{compression.label}: the groups of MoE layer {layer} overlap or name experts "
                             f"outside 0..{size - 1}")
        if [g[0] for g in layer_groups] != kept.tolist():
            raise ValueError(f"{compression.label}: MoE layer {layer}: each group must be led by its kept expert "
                             f"({kept.tolist()}), in that order")
        for g in layer_groups:
            if weights[bounds[layer] + np.asarray(g)].sum() <= 0:
                raise ValueError(f"{compression.label}: MoE layer {layer}: group {g} has no weight")
