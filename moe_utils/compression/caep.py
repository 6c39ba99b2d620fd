"""Contribution-aware expert pruning (CAEP): the paper's section 4, Algorithm 1, and per-layer masks.

Every function here works on *keep-masks*: boolean vectors over the N_e routed experts in the
layer-major order of the expert matrix X (row ``layer * E + expert``), True = keep.
:func:`caep` runs Algorithm 1 of Tang et al. (2025) globally over all N_e
experts from the HSDL dictionary D and codes R (:func:`contribution_scores`: e = D @ R_sum), with
a guard (:func:`guard_min_per_layer`, not in the paper) that no MoE layer keeps fewer than
``min_per_layer`` experts; :func:`layerwise_mask` prunes any per-expert score with one ratio in
every layer (:meth:`PruningBudget.quota`), which is CAEP's per-layer mode and how the calibration
baselines of :mod:`moe_utils.compression.calibration` become masks; :func:`random_mask` is the random baseline.

What a mask must respect travels as one :class:`PruningBudget`: the experts per layer, the guard,
and the keep counts each router allows. Group-limited routers (DeepSeek-V3 family) allow only some
(:func:`moe_utils.models.expert_surgery.allowed_counts`); every builder here rounds a layer's count up to
the next allowed one (:func:`round_up_to_allowed`): such a model keeps a few more experts than the
ratio asks, and the notes say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from moe_utils.models.expert_surgery import allowed_counts
from moe_utils.models.loading import moe_layers


# ------------------------------------------------------------------------------------ budget
@dataclass(frozen=True)
class PruningBudget:
    """What a keep-mask must respect in each MoE layer, in X's layer-major order.

    Attributes:
        layer_sizes: routed experts per MoE layer (the mask has ``sum(layer_sizes)`` entries).
        min_per_layer: the guard: no layer keeps fewer experts (for a model: its top-k).
        allowed: per layer, the kept counts its router can route, or None for any count (only
            group-limited routers restrict them: :func:`moe_utils.models.expert_surgery.allowed_counts`);
            None: every layer allows any count.
    """

    layer_sizes: tuple[int, ...]
    min_per_layer: int = 0
    allowed: tuple[tuple[int, ...] | None, ...] | None = None

    def __post_init__(self):
        sizes = np.asarray(self.layer_sizes)
        if sizes.ndim != 1 or sizes.size == 0 or not np.issubdtype(sizes.dtype, np.integer) or (sizes <= 0).any():
            raise ValueError(f"layer_sizes must be a non-empty list of positive expert counts, got {self.layer_sizes!r}")
        object.__setattr__(self, "layer_sizes", tuple(int(n) for n in sizes))
        if not 0 <= self.min_per_layer <= min(self.layer_sizes):
            raise ValueError(f"min_per_layer={self.min_per_layer} must be between 0 and the smallest layer's "
                             f"expert count ({min(self.layer_sizes)})")
        if self.allowed is not None:
            if len(self.allowed) != len(self.layer_sizes):
                raise ValueError(f"allowed has {len(self.allowed)} entries, but there are {len(self.layer_sizes)} "
                                 "MoE layers")
            object.__setattr__(self, "allowed", tuple(None if rule is None else tuple(int(c) for c in rule)
                                                      for rule in self.allowed))

    @classmethod
    def for_model(cls, model, layers=None, *, min_per_layer: int | None = None) -> "PruningBudget":
        """The budget of a loaded model: its layers' expert counts, the guard ``min_per_layer``
        (default: the model's top-k) and the counts its routers allow. ``layers``: the model's
        :func:`moe_utils.models.loading.moe_layers`, found when not given."""
        layers = moe_layers(model) if layers is None else layers
        guard = max(layer.top_k for layer in layers) if min_per_layer is None else min_per_layer
        return cls(tuple(layer.num_experts for layer in layers), guard, allowed_counts(model, layers))

    @property
    def n_experts(self) -> int:
        """N_e, the length of a keep-mask."""
        return sum(self.layer_sizes)

    @property
    def restricted(self) -> bool:
        """Whether some layer's router allows only some kept counts."""
        return self.allowed is not None and any(rule is not None for rule in self.allowed)

    def bounds(self, n_e: int | None = None) -> np.ndarray:
        """Row where each layer starts in X, and N_e last; checks a mask length ``n_e``."""
        if n_e is not None and n_e != self.n_experts:
            raise ValueError(f"layer_sizes {list(self.layer_sizes)} sum to {self.n_experts}, but there are {n_e} "
                             "experts")
        return np.concatenate([[0], np.cumsum(self.layer_sizes)])

    def rule(self, layer: int) -> tuple[int, ...] | None:
        return None if self.allowed is None else self.allowed[layer]

    def next_allowed(self, layer: int, count: int) -> int:
        """The smallest count >= ``count`` that ``layer`` allows (``count`` where any is allowed)."""
        rule = self.rule(layer)
        if rule is None:
            return int(count)
        above = [c for c in rule if c >= count]
        if not above:
            raise ValueError(f"layer {layer} keeps {count} experts, above every count its router allows ({list(rule)})")
        return min(above)

    def kept_per_layer(self, keep) -> np.ndarray:
        """Number of kept experts in each MoE layer."""
        bounds = self.bounds(len(keep))
        return np.add.reduceat(np.asarray(keep, dtype=np.int64), bounds[:-1])

    def quota(self, prune_ratio: float, *, guard: bool = True, rounded: bool = True) -> np.ndarray:
        """Experts each layer keeps when pruning ``prune_ratio`` of every layer: E - round(ratio * E)
        (halves round up), but never fewer than ``min_per_layer`` (unless ``guard=False``), and rounded
        up to a count the layer allows (unless ``rounded=False``)."""
        check_ratio("prune_ratio", prune_ratio, low_open=False)
        sizes = np.asarray(self.layer_sizes, dtype=np.int64)
        quota = sizes - np.floor(prune_ratio * sizes + 0.5).astype(np.int64)
        if guard:
            quota = np.maximum(quota, self.min_per_layer)
        if rounded:
            quota = np.array([self.next_allowed(layer, int(q)) for layer, q in enumerate(quota)], dtype=np.int64)
        return quota

    def expert_name(self, row: int) -> str:
        """``L<layer>E<expert>`` of row ``row`` of X."""
        bounds = self.bounds()
        layer = int(np.searchsorted(bounds, row, side="right") - 1)
        return f"L{layer}E{row - bounds[layer]}"


def check_ratio(name: str, value: float, *, low_open: bool = True) -> None:
    """A ratio in (0, 1) (``low_open``) or [0, 1); ValueError naming it otherwise."""
    if not (isinstance(value, (int, float)) and (0 < value < 1 if low_open else 0 <= value < 1)):
        raise ValueError(f"{name} must be in ({'0' if low_open else '[0'}, 1), got {value!r}")


# -------------------------------------------------------------------------------------- CAEP
def _usage(R) -> np.ndarray:
    """R_sum: each atom's codes summed over the columns (length N_p); R may be scipy sparse."""
    R = R if sp.issparse(R) else np.asarray(R, dtype=np.float64)
    if R.ndim != 2:
        raise ValueError(f"R must be 2-D (atoms x columns), got shape {R.shape}")
    r_sum = np.asarray(R.sum(axis=1), dtype=np.float64).ravel()
    if not np.isfinite(r_sum).all():
        raise ValueError("R holds NaN or infinite codes: the HSDL fit (or the routing it was fitted on) is "
                         "broken; re-run stage 02 and check the capture")
    if (sp.issparse(R) and R.nnz and R.data.min() < 0) or (not sp.issparse(R) and np.min(R, initial=0) < 0):
        raise ValueError("R has negative codes; CAEP expects HSDL's non-negative codes")
    return r_sum


def contribution_scores(D, R) -> np.ndarray:
    """Each expert's contribution e = D @ R_sum (Algorithm 1, steps 1-2): its weight in every atom
    times that atom's usage. D (N_e, N_p) >= 0, R (N_p, N_s) >= 0 (dense or scipy sparse)."""
    D = np.asarray(D, dtype=np.float64)
    r_sum = _usage(R)
    if D.ndim != 2 or D.shape[1] != r_sum.shape[0]:
        raise ValueError(f"D must be (N_e, N_p) with N_p = {r_sum.shape[0]} rows of R, got shape {D.shape}")
    if not np.isfinite(D).all():
        raise ValueError("D holds NaN or infinite entries: the HSDL fit is broken; re-run stage 02")
    if D.size and D.min() < 0:
        raise ValueError("D has negative entries; CAEP expects HSDL's dictionary in [0, 1]")
    return D @ r_sum


@dataclass(frozen=True)
class GuardNote:
    """What the per-layer guard changed: layers short of ``min_per_layer``, experts it restored
    (highest score first) and experts it dropped elsewhere to keep the number kept (lowest first)."""

    min_per_layer: int
    short_layers: dict[int, int]  # layer -> experts it kept before the guard
    restored: list[str]
    dropped: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.restored)

    def __str__(self) -> str:
        if not self.changed:
            return f"guard: every layer kept at least {self.min_per_layer} experts; nothing changed"
        short = ", ".join(f"layer {layer} kept {n}" for layer, n in self.short_layers.items())
        text = (f"guard (at least {self.min_per_layer} experts per layer): {short}; restored "
                f"{', '.join(self.restored)}")
        if len(self.dropped) == len(self.restored):
            return text + f"; dropped {', '.join(self.dropped)} elsewhere to keep the same number of experts"
        extra = len(self.restored) - len(self.dropped)
        return text + (f"; dropped {', '.join(self.dropped) or 'none'} elsewhere: {extra} more experts kept "
                       "than requested, as every other layer was at its minimum")


def _best_pruned(keep: np.ndarray, scores: np.ndarray, bounds: np.ndarray, layer: int, n: int) -> list[int]:
    """The ``n`` highest-scoring pruned rows of ``layer`` (ties: lowest row first), to restore."""
    rows = np.arange(bounds[layer], bounds[layer + 1])
    candidates = rows[~keep[rows]]
    return candidates[np.lexsort((candidates, -scores[candidates]))][:n].tolist()


def guard_min_per_layer(keep, scores, budget: PruningBudget) -> tuple[np.ndarray, GuardNote]:
    """Make every layer keep at least ``budget.min_per_layer`` experts without changing the total.

    A layer short of the minimum gets back its highest-scoring pruned experts; as many kept experts
    are then dropped from layers above the minimum, lowest score first (ties: lowest row first).
    The total grows only if no layer has room. Returns the new mask and a :class:`GuardNote`.
    """
    keep = np.array(keep, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    bounds, minimum = budget.bounds(len(keep)), budget.min_per_layer
    counts = budget.kept_per_layer(keep)
    short = {int(layer): int(n) for layer, n in enumerate(counts) if n < minimum}
    restored: list[int] = []
    for layer in short:
        restored.extend(_best_pruned(keep, scores, bounds, layer, minimum - counts[layer]))
    keep[restored] = True
    counts = budget.kept_per_layer(keep)
    dropped: list[int] = []
    kept_rows = np.flatnonzero(keep)
    for row in kept_rows[np.lexsort((kept_rows, scores[kept_rows]))]:
        if len(dropped) == len(restored):
            break
        layer = int(np.searchsorted(bounds, row, side="right") - 1)
        if counts[layer] > minimum:
            keep[row] = False
            counts[layer] -= 1
            dropped.append(int(row))
    note = GuardNote(minimum, short, [budget.expert_name(r) for r in restored], [budget.expert_name(r) for r in dropped])
    return keep, note


def round_up_to_allowed(keep, scores, budget: PruningBudget) -> tuple[np.ndarray, list[str]]:
    """Make every layer's kept count one its router allows (``budget.allowed``), by restoring the
    layer's highest-scoring pruned experts (ties: lowest row first) up to the next allowed count.

    Returns the new mask and the restored experts (``L<layer>E<expert>``), empty when nothing changed.
    """
    keep = np.array(keep, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    bounds = budget.bounds(len(keep))
    restored: list[int] = []
    for layer, count in enumerate(budget.kept_per_layer(keep).tolist()):
        restored.extend(_best_pruned(keep, scores, bounds, layer, budget.next_allowed(layer, count) - count))
    keep[restored] = True
    return keep, [budget.expert_name(r) for r in restored]


@dataclass(frozen=True)
class CAEPResult:
    """Outcome of :func:`caep`.

    Attributes:
        keep: (N_e,) keep-mask after the guard (``algorithm_keep`` before it).
        contribution: e = D @ R_sum with every atom, (N_e,).
        threshold: f, the ceil(threshold_ratio * N_e)-th largest contribution.
        atoms_removed: atoms dropped by the loop, in order (least used first).
        target: (1 - prune_ratio) * N_e, the most experts the loop may leave.
        reached: whether the loop ended at or below the target (False: atoms ran out first).
        guard: what the per-layer guard changed, or None without a ``budget``.
        rounded: experts restored so that each layer keeps a count its router allows.
    """

    keep: np.ndarray
    algorithm_keep: np.ndarray
    contribution: np.ndarray
    threshold: float
    atoms_removed: np.ndarray
    target: float
    reached: bool
    guard: GuardNote | None
    rounded: tuple[str, ...] = ()

    @property
    def note(self) -> str:
        n = len(self.keep)
        text = (f"Algorithm 1 kept {int(self.algorithm_keep.sum())} of {n} experts (target <= {self.target:g}) "
                f"after removing {len(self.atoms_removed)} atoms")
        if not self.reached:
            text += "; the atoms ran out before the target was reached"
        text += f"; {self.guard}" if self.guard is not None else ""
        if self.rounded:
            text += (f"; restored {', '.join(self.rounded)} so that every layer keeps a count its "
                     "group-limited router allows")
        return text


def caep(D, R, threshold_ratio: float, prune_ratio: float, *, budget: PruningBudget | None = None) -> CAEPResult:
    """Contribution-aware expert pruning, the paper's Algorithm 1 (section 4), global over N_e experts.

    1. R_sum = R summed over its columns (each atom's usage); e = D @ R_sum.
    2. f = the value at 1-based rank ceil(threshold_ratio * N_e) of e in descending order; m = e >= f.
    3. While m has more than (1 - prune_ratio) * N_e ones and atoms remain: remove the least used
       remaining atom (smallest R_sum, lowest index on ties), recompute e over the remaining atoms,
       m = e >= f.

    f stays fixed. Because D and R are non-negative, e only falls as atoms go, so the number kept
    never rises: the loop's stopping point is found by bisection over the removal order, which
    gives exactly the loop's result. With a ``budget``, :func:`guard_min_per_layer` then makes
    every layer keep at least ``budget.min_per_layer`` experts (for a model: its top-k), scoring
    experts by their full contribution e, and :func:`round_up_to_allowed` applies the counts a
    group-limited router allows; the result's ``note`` says what they changed.

    Args:
        D: (N_e, N_p) dictionary, entries >= 0 (HSDL's ``dictionaries_[0]``).
        R: (N_p, N_s) codes >= 0, dense or scipy sparse (HSDL's ``codes_[0]``).
        threshold_ratio: k1 in (0, 1). Only values above 1 - prune_ratio let the loop act; at or
            below it the mask is simply the ceil(k1 N_e) experts of largest contribution.
        prune_ratio: k2 in (0, 1), the share of experts to drop.
    """
    check_ratio("threshold_ratio", threshold_ratio)
    check_ratio("prune_ratio", prune_ratio)
    D = np.asarray(D, dtype=np.float64)
    e = contribution_scores(D, R)
    r_sum = _usage(R)
    n_e = len(e)
    rank = math.ceil(threshold_ratio * n_e)
    f = float(np.sort(e)[::-1][rank - 1])
    target = (1 - prune_ratio) * n_e
    order = np.argsort(r_sum, kind="stable")  # least used first; stable = lowest index on ties

    def mask_after(t: int) -> np.ndarray:  # m once the t least used atoms are gone
        weights = r_sum.copy()
        weights[order[:t]] = 0.0
        return D @ weights >= f

    lo, hi = 0, len(order)  # the loop stops at the first t with |m_t| <= target, else at t = N_p
    while lo < hi:
        mid = (lo + hi) // 2
        if mask_after(mid).sum() <= target:
            hi = mid
        else:
            lo = mid + 1
    algorithm_keep = mask_after(lo)
    if not algorithm_keep.any() and budget is None:
        raise ValueError(f"CAEP keeps no expert at all (threshold_ratio {threshold_ratio}, prune_ratio "
                         f"{prune_ratio}): every contribution fell below the threshold; lower prune_ratio or "
                         "raise threshold_ratio, or pass a budget whose guard keeps each layer's top-k")
    keep, guard, rounded = algorithm_keep, None, []
    if budget is not None:
        keep, guard = guard_min_per_layer(algorithm_keep, e, budget)
        keep, rounded = round_up_to_allowed(keep, e, budget)
    return CAEPResult(keep=keep, algorithm_keep=algorithm_keep, contribution=e, threshold=f,
                      atoms_removed=order[:lo], target=target, reached=bool(algorithm_keep.sum() <= target),
                      guard=guard, rounded=tuple(rounded))


# --------------------------------------------------------------------------- per-layer masks
def layerwise_mask(scores, budget: PruningBudget, prune_ratio: float) -> np.ndarray:
    """Per layer, drop the experts of lowest score, the same ratio in every layer
    (:meth:`PruningBudget.quota`).

    Ties are dropped lowest index first. This is how frequency, routing-weight, EAN and REAP
    scores are turned into masks, and CAEP's per-layer mode (with :func:`contribution_scores`).
    """
    scores = np.asarray(scores, dtype=np.float64)
    bounds = budget.bounds(len(scores))
    keep = np.zeros(len(scores), dtype=bool)
    for layer, n_keep in enumerate(budget.quota(prune_ratio)):
        rows = np.arange(bounds[layer], bounds[layer + 1])
        best_first = rows[np.lexsort((-rows, -scores[rows]))]
        keep[best_first[:n_keep]] = True
    return keep


def random_mask(budget: PruningBudget, prune_ratio: float, seed: int) -> np.ndarray:
    """Per layer, a uniformly random choice of the experts to drop (same count as :func:`layerwise_mask`)."""
    scores = np.random.default_rng(seed).random(budget.n_experts)
    return layerwise_mask(scores, budget, prune_ratio)
