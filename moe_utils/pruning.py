"""Which experts to prune: CAEP (the paper's section 4, Algorithm 1) and today's baselines.

Every method here ends in a *keep-mask*: a boolean vector over the N_e routed experts in the
layer-major order of the expert matrix X (row ``layer * E + expert``), True = keep. Masks are
applied by :mod:`moe_utils.expert_surgery` (``masked_experts`` for exact masking, ``remove_experts``
for a smaller model).

* **CAEP** (:func:`caep`, :func:`caep_mask`): Algorithm 1 of Tang et al. (2025), global over all
  N_e experts, from the HSDL dictionary D and codes R; plus a guard that no MoE layer keeps fewer
  than ``min_per_layer`` experts (the paper has none), and a per-layer mode (:func:`layerwise_mask`
  on :func:`contribution_scores`).
* **Calibration baselines** from one pass of the model over calibration texts (:func:`calibrate`):
  selection frequency and mean routing weight (the SEER-MoE family), expert activation norm (EAN)
  and REAP (router-weighted expert activation norm), each pruned per layer with one ratio, the
  standard for these methods; random masks (several seeds); and an output-based method (the
  NAEE / GEM family, :func:`output_removal_order`) that greedily removes, per layer, the expert
  whose removal changes the layer's output least on the calibration tokens.
* :func:`pruning_masks` returns every method's masks for a list of ratios;
  :func:`evaluate_masks` evaluates them through lm-evaluation-harness with a cache;
  :func:`save_pruning` / :func:`load_pruning` write and read the stage's artifact.
* For domain-specific pruning, :func:`label_columns` and :func:`hsdl_factors` restrict the codes to
  the columns of X (tokens or samples) of one MMLU-Pro category.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn
from tqdm.auto import tqdm

from moe_utils.models import EMBEDDED, RANDOM_PREFIX, MoELayer, moe_layers
from moe_utils.routing import _forward_kwargs, router_fingerprint
from moe_utils.store import atomic_write_bytes, atomic_write_json, package_versions

log = logging.getLogger(__name__)

#: Every method :func:`pruning_masks` knows, in the order tables show them.
METHODS = ("caep", "caep_layer", "frequency", "router_weight", "ean", "reap", "output", "random")
#: Per-expert statistics of a calibration pass (see :class:`ExpertStats`).
SCORES = ("frequency", "router_weight", "ean", "reap")
_SUMS = ("counts", "weight_sum", "norm_sum", "weighted_norm_sum")
#: Environment variable naming a local MMLU directory (``test/<subject>_test.csv`` ...).
MMLU_ENV = "MOE_MMLU_DIR"
FORMAT = "moe-pruning/1"


# ------------------------------------------------------------------------------------ layout
def _layer_bounds(layer_sizes: Sequence[int], n_e: int) -> np.ndarray:
    sizes = np.asarray(layer_sizes, dtype=np.int64)
    if sizes.ndim != 1 or sizes.size == 0 or (sizes <= 0).any():
        raise ValueError(f"layer_sizes must be a non-empty list of positive expert counts, got {layer_sizes!r}")
    if sizes.sum() != n_e:
        raise ValueError(f"layer_sizes {list(sizes)} sum to {sizes.sum()}, but there are {n_e} experts")
    return np.concatenate([[0], np.cumsum(sizes)])


def _check_min(layer_sizes: Sequence[int], min_per_layer: int) -> None:
    if min_per_layer < 0 or min_per_layer > min(layer_sizes):
        raise ValueError(f"min_per_layer={min_per_layer} must be between 0 and the smallest layer's "
                         f"expert count ({min(layer_sizes)})")


def kept_per_layer(keep: np.ndarray, layer_sizes: Sequence[int]) -> np.ndarray:
    """Number of kept experts in each MoE layer."""
    bounds = _layer_bounds(layer_sizes, len(keep))
    return np.add.reduceat(np.asarray(keep, dtype=np.int64), bounds[:-1])


def _name(row: int, bounds: np.ndarray) -> str:
    layer = int(np.searchsorted(bounds, row, side="right") - 1)
    return f"L{layer}E{row - bounds[layer]}"


# -------------------------------------------------------------------------------------- CAEP
def _usage(R) -> np.ndarray:
    """R_sum: each atom's codes summed over the columns (length N_p); R may be scipy sparse."""
    R = R if sp.issparse(R) else np.asarray(R, dtype=np.float64)
    if R.ndim != 2:
        raise ValueError(f"R must be 2-D (atoms x columns), got shape {R.shape}")
    r_sum = np.asarray(R.sum(axis=1), dtype=np.float64).ravel()
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


def guard_min_per_layer(keep, scores, layer_sizes: Sequence[int], min_per_layer: int) -> tuple[np.ndarray, GuardNote]:
    """Make every layer keep at least ``min_per_layer`` experts without changing the total.

    A layer short of the minimum gets back its highest-scoring pruned experts; as many kept experts
    are then dropped from layers above the minimum, lowest score first (ties: lowest row first).
    The total grows only if no layer has room. Returns the new mask and a :class:`GuardNote`.
    """
    keep = np.array(keep, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    bounds = _layer_bounds(layer_sizes, len(keep))
    _check_min(layer_sizes, min_per_layer)
    counts = kept_per_layer(keep, layer_sizes)
    short = {int(layer): int(n) for layer, n in enumerate(counts) if n < min_per_layer}
    restored: list[int] = []
    for layer in short:
        rows = np.arange(bounds[layer], bounds[layer + 1])
        candidates = rows[~keep[rows]]
        best_first = candidates[np.lexsort((candidates, -scores[candidates]))]
        restored.extend(best_first[: min_per_layer - counts[layer]].tolist())
    keep[restored] = True
    counts = kept_per_layer(keep, layer_sizes)
    dropped: list[int] = []
    kept_rows = np.flatnonzero(keep)
    for row in kept_rows[np.lexsort((kept_rows, scores[kept_rows]))]:
        if len(dropped) == len(restored):
            break
        layer = int(np.searchsorted(bounds, row, side="right") - 1)
        if counts[layer] > min_per_layer:
            keep[row] = False
            counts[layer] -= 1
            dropped.append(int(row))
    note = GuardNote(min_per_layer, short, [_name(r, bounds) for r in restored], [_name(r, bounds) for r in dropped])
    return keep, note


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
        guard: what the per-layer guard changed, or None without ``layer_sizes``.
    """

    keep: np.ndarray
    algorithm_keep: np.ndarray
    contribution: np.ndarray
    threshold: float
    atoms_removed: np.ndarray
    target: float
    reached: bool
    guard: GuardNote | None

    @property
    def note(self) -> str:
        n = len(self.keep)
        text = (f"Algorithm 1 kept {int(self.algorithm_keep.sum())} of {n} experts (target <= {self.target:g}) "
                f"after removing {len(self.atoms_removed)} atoms")
        if not self.reached:
            text += "; the atoms ran out before the target was reached"
        return text + (f"; {self.guard}" if self.guard is not None else "")


def _check_ratio(name: str, value: float, *, low_open: bool = True) -> None:
    if not (isinstance(value, (int, float)) and (0 < value < 1 if low_open else 0 <= value < 1)):
        raise ValueError(f"{name} must be in ({'0' if low_open else '[0'}, 1), got {value!r}")


def caep(D, R, threshold_ratio: float, prune_ratio: float, *, layer_sizes: Sequence[int] | None = None,
         min_per_layer: int = 0) -> CAEPResult:
    """Contribution-aware expert pruning, the paper's Algorithm 1 (section 4), global over N_e experts.

    1. R_sum = R summed over its columns (each atom's usage); e = D @ R_sum.
    2. f = the value at 1-based rank ceil(threshold_ratio * N_e) of e in descending order; m = e >= f.
    3. While m has more than (1 - prune_ratio) * N_e ones and atoms remain: remove the least used
       remaining atom (smallest R_sum, lowest index on ties), recompute e over the remaining atoms,
       m = e >= f.

    f stays fixed. Because D and R are non-negative, e only falls as atoms go, so the number kept
    never rises: the loop's stopping point is found by bisection over the removal order, which
    gives exactly the loop's result. With ``layer_sizes``, :func:`guard_min_per_layer` then makes
    every layer keep at least ``min_per_layer`` experts (for a model: its top-k), scoring experts by
    their full contribution e; the result's ``note`` says what it changed.

    Args:
        D: (N_e, N_p) dictionary, entries >= 0 (HSDL's ``dictionaries_[0]``).
        R: (N_p, N_s) codes >= 0, dense or scipy sparse (HSDL's ``codes_[0]``).
        threshold_ratio: k1 in (0, 1). Only values above 1 - prune_ratio let the loop act; at or
            below it the mask is simply the ceil(k1 N_e) experts of largest contribution.
        prune_ratio: k2 in (0, 1), the share of experts to drop.
    """
    _check_ratio("threshold_ratio", threshold_ratio)
    _check_ratio("prune_ratio", prune_ratio)
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
    keep, guard = algorithm_keep, None
    if layer_sizes is not None:
        keep, guard = guard_min_per_layer(algorithm_keep, e, layer_sizes, min_per_layer)
    return CAEPResult(keep=keep, algorithm_keep=algorithm_keep, contribution=e, threshold=f,
                      atoms_removed=order[:lo], target=target, reached=bool(algorithm_keep.sum() <= target),
                      guard=guard)


def caep_mask(D, R, threshold_ratio: float, prune_ratio: float, *, layer_sizes: Sequence[int] | None = None,
              min_per_layer: int = 0) -> np.ndarray:
    """The keep-mask of :func:`caep` (boolean, length N_e); use :func:`caep` for the guard's note."""
    return caep(D, R, threshold_ratio, prune_ratio, layer_sizes=layer_sizes, min_per_layer=min_per_layer).keep


# --------------------------------------------------------------------------- per-layer masks
def layer_quota(layer_sizes: Sequence[int], prune_ratio: float, min_per_layer: int = 0) -> np.ndarray:
    """Experts each layer keeps when pruning ``prune_ratio`` of every layer: E - round(ratio * E)
    (halves round up), but never fewer than ``min_per_layer``."""
    _check_ratio("prune_ratio", prune_ratio, low_open=False)
    _check_min(layer_sizes, min_per_layer)
    sizes = np.asarray(layer_sizes, dtype=np.int64)
    return np.maximum(sizes - np.floor(prune_ratio * sizes + 0.5).astype(np.int64), min_per_layer)


def layerwise_mask(scores, layer_sizes: Sequence[int], prune_ratio: float, *, min_per_layer: int = 0) -> np.ndarray:
    """Per layer, drop the experts of lowest score, the same ratio in every layer (:func:`layer_quota`).

    Ties are dropped lowest index first. This is how frequency, routing-weight, EAN and REAP
    scores are turned into masks, and CAEP's per-layer mode (with :func:`contribution_scores`).
    """
    scores = np.asarray(scores, dtype=np.float64)
    bounds = _layer_bounds(layer_sizes, len(scores))
    keep = np.zeros(len(scores), dtype=bool)
    for layer, n_keep in enumerate(layer_quota(layer_sizes, prune_ratio, min_per_layer)):
        rows = np.arange(bounds[layer], bounds[layer + 1])
        best_first = rows[np.lexsort((-rows, -scores[rows]))]
        keep[best_first[:n_keep]] = True
    return keep


def random_mask(layer_sizes: Sequence[int], prune_ratio: float, seed: int, *, min_per_layer: int = 0) -> np.ndarray:
    """Per layer, a uniformly random choice of the experts to drop (same count as :func:`layerwise_mask`)."""
    scores = np.random.default_rng(seed).random(int(np.sum(layer_sizes)))
    return layerwise_mask(scores, layer_sizes, prune_ratio, min_per_layer=min_per_layer)


# -------------------------------------------------------------------------- calibration data
def _mmlu_prompt(question: str, choices: Sequence[str], answer: int) -> str:
    letters = "ABCD"
    body = "\n".join(f"{letters[i]}. {str(c).strip()}" for i, c in enumerate(choices))
    return f"{str(question).strip()}\n{body}\nAnswer: {letters[int(answer)]}"


def load_mmlu(split: str = "test", data_dir: str | os.PathLike | None = None) -> list[str]:
    """MMLU questions with their options and answer, one text each (the paper calibrates on MMLU).

    ``data_dir`` (else ``$MOE_MMLU_DIR``) holds ``<split>/<subject>_<split>.csv`` files with the
    header ``question,choice0,choice1,choice2,choice3,answer``; with neither, ``cais/mmlu``
    (config ``all``) comes from the Hugging Face Hub.
    """
    directory = data_dir or os.environ.get(MMLU_ENV)
    if directory:
        files = sorted((Path(directory) / split).glob(f"*_{split}.csv"))
        if not files:
            raise FileNotFoundError(f"no MMLU files {split}/*_{split}.csv in {directory}: point data_dir or "
                                    f"${MMLU_ENV} at a directory of MMLU CSVs, or unset it to use the Hub")
        frame = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
        choices = frame[[f"choice{i}" for i in range(4)]].astype(str).to_numpy().tolist()
        return [_mmlu_prompt(q, c, a) for q, c, a in zip(frame["question"], choices, frame["answer"])]
    from datasets import load_dataset

    rows = load_dataset("cais/mmlu", "all", split=split)
    return [_mmlu_prompt(r["question"], r["choices"], r["answer"]) for r in rows]


def calibration_texts(tokenizer, source: str = "mmlu", *, n_samples: int | None = 128, n_tokens: int | None = 2048,
                      seed: int = 0, data_dir: str | os.PathLike | None = None,
                      prompts: Sequence[str] | None = None) -> list[str]:
    """``n_samples`` texts of ``n_tokens`` tokens each, packed from shuffled documents of ``source``.

    ``"mmlu"``: MMLU test questions with options and answers (:func:`load_mmlu`); the paper
    calibrates on 128 such samples of 2,048 tokens. ``"wikitext"``: WikiText-2 train articles
    (``data_dir`` else ``$MOE_WIKITEXT_DIR`` else the Hub). Documents are joined with blank lines,
    tokenised, cut into consecutive windows and decoded back to text (tokenising a window again
    may differ by a few tokens; calibrate with ``max_length=n_tokens``).
    ``"capture"``: the given ``prompts`` (the stage-1 texts), all of them or ``n_samples`` chosen
    with ``seed``, unchanged (``n_tokens`` is ignored).
    """
    if source == "capture":
        if prompts is None:
            raise ValueError("calibration source 'capture' needs the stage-1 prompts (prompts=...)")
        if n_samples is None or n_samples >= len(prompts):
            return list(prompts)
        chosen = np.sort(np.random.default_rng(seed).permutation(len(prompts))[:n_samples])
        return [prompts[i] for i in chosen]
    if source == "mmlu":
        documents = load_mmlu("test", data_dir)
    elif source == "wikitext":
        from moe_utils.evaluation import wikitext_documents
        from moe_utils.wikitext import load_wikitext

        documents = wikitext_documents(load_wikitext("train", data_dir))
    else:
        raise ValueError(f"calibration source must be 'capture', 'mmlu' or 'wikitext', got {source!r}")
    random.Random(seed).shuffle(documents)
    needed = n_samples * n_tokens
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer(document + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise ValueError(f"{source} holds {len(ids)} tokens, fewer than {n_samples} x {n_tokens}")
    return [tokenizer.decode(ids[i * n_tokens:(i + 1) * n_tokens]) for i in range(n_samples)]


# -------------------------------------------------------------------------- calibration pass
def _check_fused(layer: MoELayer) -> None:
    if isinstance(layer.experts, nn.ModuleList):
        raise NotImplementedError(
            f"MoE layer {layer.index}: experts are a ModuleList (a remote-code layout); calibration needs the "
            "fused experts module of a transformers 5 MoE, called as experts(hidden, top_k_index, top_k_weights)")


def expert_outputs(layer: MoELayer, hidden: torch.Tensor, experts_index: torch.Tensor) -> torch.Tensor:
    """f_e(x): the output of expert ``experts_index[i]`` on ``hidden[i]``, unweighted, (n, H).

    Runs the layer's own fused experts module with a one-hot routing of weight 1
    (``experts(hidden, index[:, None], ones)``), so the architecture's own expert weights,
    activation and biases are used. Calls ``forward`` directly: hooks on the module do not fire.
    """
    _check_fused(layer)
    ones = torch.ones(len(experts_index), 1, dtype=hidden.dtype, device=hidden.device)
    return layer.experts.forward(hidden, experts_index.reshape(-1, 1), ones)


@dataclass
class ExpertStats:
    """Per-expert statistics of one calibration pass; arrays are (n_layers, E), sums over real tokens.

    Attributes:
        n_tokens: real (non-padding) calibration tokens.
        counts: tokens routed to each expert (it was in the token's top-k).
        weight_sum: routing weights the model gave it, summed over those tokens.
        norm_sum: ||f_e(x)||_2 of its output, summed over those tokens.
        weighted_norm_sum: routing weight times ||f_e(x)||_2, summed over those tokens.
        hidden: per MoE layer, the MoE block's input for up to ``keep_hidden`` real tokens (for the
            output-based method); not saved.
    """

    n_tokens: int
    counts: np.ndarray
    weight_sum: np.ndarray
    norm_sum: np.ndarray
    weighted_norm_sum: np.ndarray
    hidden: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def layer_sizes(self) -> list[int]:
        return [self.counts.shape[1]] * self.counts.shape[0]

    def score(self, name: str) -> np.ndarray:
        """One score per expert, (N_e,) in X's row order; larger = more important.

        ``frequency``: share of tokens that select the expert (SEER-MoE's hard count).
        ``router_weight``: its routing weight averaged over all tokens, 0 where not selected
        (SEER-MoE's soft count, with the weights the model used).
        ``ean``: mean ||f_e(x)|| over the tokens routed to it (expert activation norm).
        ``reap``: mean over the tokens routed to it of routing weight x ||f_e(x)|| (REAP).
        Experts never routed score 0 on every measure.
        """
        routed = np.maximum(self.counts, 1)
        values = {"frequency": self.counts / max(self.n_tokens, 1),
                  "router_weight": self.weight_sum / max(self.n_tokens, 1),
                  "ean": self.norm_sum / routed, "reap": self.weighted_norm_sum / routed}
        if name not in values:
            raise ValueError(f"unknown score {name!r}; known: {', '.join(SCORES)}")
        return values[name].ravel()

    def table(self) -> pd.DataFrame:
        """One row per expert: layer, expert and every score."""
        n_layers, n_experts = self.counts.shape
        frame = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), n_experts),
                              "expert": np.tile(np.arange(n_experts), n_layers)})
        for name in SCORES:
            frame[name] = self.score(name)
        return frame


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _cache_path(cache_dir: str | os.PathLike | None, name: str) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / name


def calibrate(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 2048,
              keep_hidden: int = 0, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> ExpertStats:
    """One pass of ``model`` over ``texts``, collecting :class:`ExpertStats` for every routed expert.

    A forward pre-hook on each layer's experts module reads exactly what the MoE block hands its
    experts: the block's input hidden states and the router's chosen indices and weights. For the
    real (non-padding) tokens, every (token, chosen expert) pair's output f_e(x) is computed with
    :func:`expert_outputs`. ``keep_hidden`` > 0 also keeps the first that many real tokens' block
    inputs per layer, for :func:`output_removal_order`. Hooks are always removed. With
    ``cache_dir``, the result is stored there under a digest of the model (:func:`model_identity`),
    the texts and the settings, and read back instead of recomputed.
    """
    if not texts:
        raise ValueError("no calibration texts")
    key = _digest({"model": model_identity(model), "texts": _digest(list(texts)), "batch_size": batch_size,
                   "max_length": max_length, "keep_hidden": keep_hidden})
    path = _cache_path(cache_dir, f"calibration-{key}.npz")
    if path is not None and path.is_file():
        with np.load(path) as cached:
            return ExpertStats(int(cached["n_tokens"]), *(cached[name] for name in _SUMS),
                               hidden=[torch.from_numpy(cached[f"hidden_{i}"]) for i in range(len(cached["counts"]))])
    stats = _calibration_pass(model, tokenizer, texts, batch_size=batch_size, max_length=max_length,
                              keep_hidden=keep_hidden, progress=progress)
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, n_tokens=stats.n_tokens, **{name: getattr(stats, name) for name in _SUMS},
                 **{f"hidden_{i}": h.float().numpy() for i, h in enumerate(stats.hidden)})
        atomic_write_bytes(path, buffer.getvalue())
    return stats


def _calibration_pass(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int,
                      keep_hidden: int, progress: bool) -> ExpertStats:
    layers = moe_layers(model)
    n_experts = max(layer.num_experts for layer in layers)
    sums = {name: torch.zeros(len(layers), n_experts, dtype=torch.float64) for name in _SUMS}
    hidden: list[list[torch.Tensor]] = [[] for _ in layers]
    kept = [0] * len(layers)
    real: dict[str, torch.Tensor] = {}

    def hook_for(layer: MoELayer):
        def hook(_module, args, kwargs):
            states, index, weights = (list(args) + list(kwargs.values()))[:3]
            mask = real["mask"].to(states.device)
            states, index, weights = states[mask], index[mask], weights[mask]
            k = index.shape[1]
            outputs = expert_outputs(layer, states.repeat_interleave(k, dim=0), index.reshape(-1))
            norms = outputs.float().norm(dim=-1).double().cpu()
            flat = index.reshape(-1).cpu()
            w = weights.reshape(-1).double().cpu()
            for name, values in (("counts", torch.ones_like(w)), ("weight_sum", w), ("norm_sum", norms),
                                 ("weighted_norm_sum", w * norms)):
                sums[name][layer.index].index_add_(0, flat, values)
            if kept[layer.index] < keep_hidden:
                take = states[: keep_hidden - kept[layer.index]].detach().cpu()
                hidden[layer.index].append(take)
                kept[layer.index] += len(take)
        return hook

    for layer in layers:
        _check_fused(layer)
    device = next(model.parameters()).device
    kwargs = _forward_kwargs(model)
    n_tokens = 0
    handles = [layer.experts.register_forward_pre_hook(hook_for(layer), with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(texts), batch_size), desc="calibrating", disable=not progress):
                enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                                truncation=True, max_length=max_length)
                real["mask"] = enc["attention_mask"].reshape(-1).bool()
                n_tokens += int(real["mask"].sum())
                model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                      use_cache=False, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    arrays = {name: value.numpy() for name, value in sums.items()}
    return ExpertStats(n_tokens=n_tokens, **arrays,
                       hidden=[torch.cat(parts) if parts else torch.zeros(0) for parts in hidden])


# ------------------------------------------------------------------------ output-based method
def _block_output(block: nn.Module, states: torch.Tensor) -> torch.Tensor:
    out = block(states[None])
    return (out[0] if isinstance(out, tuple) else out)[0].float()


def output_removal_order(model: nn.Module, hidden: Sequence[torch.Tensor], n_remove: Sequence[int], *,
                         cache_dir: str | os.PathLike | None = None, progress: bool = True) -> list[list[int]]:
    """Per MoE layer, the order in which a greedy search removes ``n_remove[layer]`` experts.

    The NAEE / GEM family of output-based pruning: at each step, remove the remaining expert whose
    removal changes the layer's output least on the calibration tokens ``hidden[layer]`` (the MoE
    block's inputs, see :func:`calibrate`), measured as ||y' - y||^2 / ||y||^2 against the
    unpruned output y. The pruned block re-routes every token among the remaining experts with
    :func:`moe_utils.expert_surgery.masked_experts` (the architecture's own routing rule); ties go
    to the lowest index. The orders are nested, so one search serves every ratio. With
    ``cache_dir``, the orders are stored under a digest of the model, the tokens and the counts.
    """
    layers = moe_layers(model)
    if len(hidden) != len(layers) or len(n_remove) != len(layers):
        raise ValueError(f"need calibration tokens and a count for each of the {len(layers)} MoE layers")
    key = _digest({"model": model_identity(model), "n_remove": [int(n) for n in n_remove],
                   "hidden": [hashlib.sha256(h.float().numpy().tobytes()).hexdigest() for h in hidden]})
    path = _cache_path(cache_dir, f"output-{key}.json")
    if path is not None and path.is_file():
        return json.loads(path.read_text())["orders"]
    orders = _greedy_search(model, layers, hidden, n_remove, progress=progress)
    if path is not None:
        atomic_write_json(path, {"orders": orders, "n_remove": [int(n) for n in n_remove]})
    return orders


def _greedy_search(model: nn.Module, layers: list[MoELayer], hidden: Sequence[torch.Tensor], n_remove: Sequence[int],
                   *, progress: bool) -> list[list[int]]:
    from moe_utils.expert_surgery import PruningError, masked_experts

    orders: list[list[int]] = []
    steps = tqdm(total=int(sum(n_remove)), desc="output-based search", disable=not progress)
    with torch.no_grad():
        for layer, states, count in zip(layers, hidden, n_remove):
            if len(states) == 0:
                raise ValueError(f"no calibration tokens for MoE layer {layer.index}: calibrate with keep_hidden > 0")
            weight = next(layer.block.parameters())  # the block's own device (device_map="auto" spreads layers)
            states = states.to(device=weight.device, dtype=weight.dtype)
            reference = _block_output(layer.block, states)
            scale = float(reference.pow(2).sum()) or 1.0
            keep = [np.arange(other.num_experts) for other in layers]
            order: list[int] = []
            for _ in range(count):
                best: tuple[float, int] | None = None
                for candidate in keep[layer.index]:
                    trial = list(keep)
                    trial[layer.index] = keep[layer.index][keep[layer.index] != candidate]
                    try:
                        with masked_experts(model, trial):
                            change = float((_block_output(layer.block, states) - reference).pow(2).sum()) / scale
                    except PruningError as err:
                        raise PruningError(f"the output-based method removes one expert at a time, which this "
                                           f"router does not allow: {err}") from err
                    if best is None or change < best[0]:
                        best = (change, int(candidate))
                order.append(best[1])
                keep[layer.index] = keep[layer.index][keep[layer.index] != best[1]]
                steps.update()
            orders.append(order)
    steps.close()
    return orders


# ------------------------------------------------------------------------------ all methods
@dataclass
class PruningMask:
    """One method's keep-mask at one ratio (and seed, for random masks), with a note."""

    method: str
    ratio: float
    keep: np.ndarray
    seed: int | None = None
    note: str = ""

    @property
    def label(self) -> str:
        return self.method if self.seed is None else f"{self.method} (seed {self.seed})"

    @property
    def pruned_share(self) -> float:
        return float(1 - self.keep.mean())


def unpruned_mask(n_e: int) -> PruningMask:
    """The all-kept mask: the unpruned model's row of every table."""
    return PruningMask("unpruned", 0.0, np.ones(n_e, dtype=bool))


def pruning_masks(ratios: Sequence[float], *, layer_sizes: Sequence[int], min_per_layer: int,
                  methods: Sequence[str] = METHODS, stats: ExpertStats | None = None,
                  dictionary: tuple[Any, Any] | None = None, threshold_ratio: float = 0.9,
                  seeds: Sequence[int] = (0, 1, 2), model: nn.Module | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True) -> list[PruningMask]:
    """Every method's keep-mask at every ratio, in the order of ``methods`` then ``ratios`` then seeds.

    Args:
        ratios: shares of experts to prune, each in (0, 1).
        layer_sizes, min_per_layer: experts per MoE layer and the per-layer guard (a model's top-k).
        methods: names from :data:`METHODS`. ``caep`` (global Algorithm 1 with the guard) and
            ``caep_layer`` (the same contributions, per layer) need ``dictionary=(D, R)``; ``frequency``,
            ``router_weight``, ``ean``, ``reap`` need ``stats``; ``output`` needs ``stats`` with kept
            hidden states and the ``model``; ``random`` uses ``seeds``.
        threshold_ratio: CAEP's k1.
        cache_dir: where :func:`output_removal_order` caches its search.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown pruning method(s) {unknown}; known: {', '.join(METHODS)}")
    needs = {"caep": ("dictionary=(D, R)", dictionary), "caep_layer": ("dictionary=(D, R)", dictionary),
             "output": ("stats and model", stats if model is not None else None),
             **{s: ("stats", stats) for s in SCORES}}
    missing = [f"{m} needs {needs[m][0]}" for m in methods if m in needs and needs[m][1] is None]
    if missing:
        raise ValueError("; ".join(missing))
    for ratio in ratios:
        _check_ratio("prune ratio", ratio)
    sizes = list(layer_sizes)
    quotas = {r: layer_quota(sizes, r, min_per_layer) for r in ratios}
    wanted = {r: np.asarray(sizes) - np.floor(r * np.asarray(sizes) + 0.5).astype(int) for r in ratios}

    def quota_note(ratio: float) -> str:
        if np.array_equal(quotas[ratio], wanted[ratio]):
            return ""
        return f"guard: each layer keeps at least {min_per_layer} experts (instead of {wanted[ratio].min()})"

    orders = None
    if "output" in methods:
        n_remove = [size - min(int(quotas[r][i]) for r in ratios) for i, size in enumerate(sizes)]
        orders = output_removal_order(model, stats.hidden, n_remove, cache_dir=cache_dir, progress=progress)
    bounds = _layer_bounds(sizes, sum(sizes))
    masks: list[PruningMask] = []
    for method in methods:
        for ratio in ratios:
            if method == "caep":
                result = caep(*dictionary, threshold_ratio, ratio, layer_sizes=sizes, min_per_layer=min_per_layer)
                masks.append(PruningMask(method, ratio, result.keep, note=result.note))
            elif method == "random":
                masks.extend(PruningMask(method, ratio, random_mask(sizes, ratio, seed, min_per_layer=min_per_layer),
                                         seed=seed, note=quota_note(ratio)) for seed in seeds)
            elif method == "output":
                keep = np.ones(sum(sizes), dtype=bool)
                for layer, order in enumerate(orders):
                    keep[bounds[layer] + np.asarray(order[: sizes[layer] - quotas[ratio][layer]], dtype=int)] = False
                masks.append(PruningMask(method, ratio, keep, note=quota_note(ratio)))
            else:
                scores = contribution_scores(*dictionary) if method == "caep_layer" else stats.score(method)
                masks.append(PruningMask(method, ratio, layerwise_mask(scores, sizes, ratio, min_per_layer=min_per_layer),
                                         note=quota_note(ratio)))
    return masks


def mask_overlap(masks: Sequence[PruningMask]) -> pd.DataFrame:
    """Jaccard similarity of the *pruned* sets of every pair of masks (1 = they prune the same experts)."""
    pruned = np.array([~m.keep for m in masks], dtype=np.float64)
    inter = pruned @ pruned.T
    union = pruned.sum(1)[:, None] + pruned.sum(1)[None, :] - inter
    labels = [m.label for m in masks]
    return pd.DataFrame(np.divide(inter, union, out=np.ones_like(inter), where=union > 0), index=labels, columns=labels)


# ------------------------------------------------------------------------ domain restriction
def label_columns(store, label: str | Iterable[str], granularity: str = "token") -> np.ndarray:
    """Boolean mask over the columns of X (:func:`moe_utils.expert_matrix.expert_matrix` of ``store``
    at ``granularity``) selecting the tokens or samples whose label (e.g. MMLU-Pro category) is given."""
    wanted = {label} if isinstance(label, str) else set(label)
    labels = store.tokens["label"].to_numpy()
    present = set(pd.unique(labels))
    if not wanted <= present:
        raise ValueError(f"label(s) {sorted(wanted - present, key=str)} are not in the store; present: "
                         f"{sorted(present, key=str)}")
    if granularity == "token":
        return np.isin(labels, list(wanted))
    if granularity == "sample":
        frame = store.tokens.drop_duplicates("sample_id").sort_values("sample_id")
        return frame["label"].isin(list(wanted)).to_numpy()
    raise ValueError(f"granularity must be 'token' or 'sample', got {granularity!r}")


def hsdl_factors(hsdl, *, level: int = 1, columns: np.ndarray | None = None) -> tuple[np.ndarray, sp.csr_matrix]:
    """(D, R) for CAEP from a fitted :class:`moe_utils.hsdl.HSDL`, optionally on some columns of X.

    Level 1: D_1 and the codes R_1 (p_1, N_s). Level k > 1: D_k and R_k ... R_2 R_1 (p_k, N_s), the
    deeper atoms' usage through the columns. ``columns`` (a boolean mask or indices over X's
    columns, e.g. :func:`label_columns`) keeps only those columns: CAEP fitted on one domain.
    """
    if not 1 <= level <= len(hsdl.dictionaries_):
        raise ValueError(f"level must be between 1 and {len(hsdl.dictionaries_)}, got {level}")
    codes = hsdl.codes_[0].tocsr()
    if columns is not None:
        columns = np.asarray(columns)
        if columns.dtype == bool and len(columns) != codes.shape[1]:
            raise ValueError(f"columns mask has {len(columns)} entries for {codes.shape[1]} columns of X")
        codes = codes[:, columns]
    for deeper in hsdl.codes_[1:level]:
        codes = sp.csr_matrix(deeper) @ codes
    return np.asarray(hsdl.dictionaries_[level - 1]), sp.csr_matrix(codes)


# ------------------------------------------------------------------------------ evaluation
#: The paper's zero-shot lm-evaluation-harness tasks (its Table 1 and Fig 8), plus MMLU-Pro.
PAPER_TASKS = ("arc_challenge", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "rte", "winogrande",
               "mmlu_pro_mc")
#: What the small models are evaluated on: per-category MMLU-Pro perplexity and multiple choice, WikiText-2.
SMALL_MODEL_TASKS = ("mmlu_pro_ppl", "mmlu_pro_mc", "wikitext2_ppl")


def resolve_evaluation(model_name: str, tasks: Sequence[str] | None = None, limit: int | float | None = None,
                       task_limits: Mapping[str, int | float | None] | None = None) -> dict:
    """What each pruned model is evaluated on, with unset fields filled in.

    The embedded and random models: :data:`SMALL_MODEL_TASKS` (their accuracy is near chance,
    perplexity still moves) with small samples, 5 questions per MMLU-Pro category and task and one
    WikiText-2 article (two evaluate() calls per model), so that the stage runs in minutes on a CPU. Real
    checkpoints: the paper's :data:`PAPER_TASKS`, every document.
    """
    small = model_name == EMBEDDED or model_name.startswith(RANDOM_PREFIX)
    if tasks is None:
        tasks = SMALL_MODEL_TASKS if small else PAPER_TASKS
    if limit is None and small:
        limit = 5
    if task_limits is None:
        task_limits = {"wikitext2_ppl": 1} if small else {}
    return {"tasks": list(tasks), "limit": limit, "task_limits": dict(task_limits)}


def evaluation_runs(tasks: Sequence[str], categories: Sequence[str], limit: int | float | None = None,
                    task_limits: Mapping[str, int | float | None] | None = None) -> list[dict]:
    """The evaluate() calls for each mask: one per distinct limit, ``{"tasks": [...], "limit": n}``.

    The MMLU-Pro groups ``mmlu_pro_ppl`` and ``mmlu_pro_mc`` become one task per category (so
    every table column is one category); other names are kept. ``task_limits`` (by task or group
    name) overrides ``limit``; limits of tasks not asked for are ignored.
    """
    from moe_utils.evaluation import MC_GROUP, PPL_GROUP, category_slug

    task_limits = dict(task_limits or {})
    unused = [name for name in task_limits if name not in tasks]
    if unused:
        log.info("task_limits for %s ignored: not among the tasks %s", unused, list(tasks))
    runs: dict[Any, list[str]] = {}
    for name in tasks:
        expanded = ([f"{name}_{category_slug(c)}" for c in categories] if name in (MC_GROUP, PPL_GROUP) else [name])
        runs.setdefault(task_limits.get(name, limit), []).extend(expanded)
    return [{"tasks": names, "limit": run_limit} for run_limit, names in runs.items()]


def primary_metric(task: str, metrics: Iterable[str]) -> str:
    """The metric a table shows for ``task``: normalised accuracy if the task has one (the paper's
    measure), else accuracy; word perplexity for WikiText-2; bits per byte for other perplexities."""
    metrics = list(metrics)
    for name in ("acc_norm", "acc"):
        if name in metrics:
            return name
    preferred = "word_perplexity" if task.startswith("wikitext") else "bits_per_byte"
    if preferred in metrics:
        return preferred
    return metrics[0]


def model_identity(model: nn.Module) -> dict:
    """What identifies a model's evaluations: name, revision, the routers' weights, the parameter count."""
    return {"name": str(getattr(model, "name_or_path", "")), "revision": getattr(model.config, "_commit_hash", None),
            "routers": router_fingerprint(model), "n_parameters": sum(p.numel() for p in model.parameters())}


def evaluation_key(keep: np.ndarray, run: Mapping[str, Any], settings: Mapping[str, Any], model_id: Mapping) -> str:
    """sha256 naming one evaluation: the mask, the tasks and limit, the other evaluate() settings,
    the data locations and the model (name, revision, router weights, parameter count)."""
    payload = {"keep": np.packbits(np.asarray(keep, dtype=bool)).tobytes().hex(), "n": len(keep), "run": run,
               "settings": settings, "model": model_id,
               "env": {k: os.environ.get(k) for k in ("MOE_MMLU_PRO_DIR", "MOE_WIKITEXT_DIR", "HF_HUB_OFFLINE")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def evaluate_masks(model: nn.Module, tokenizer, masks: Sequence[PruningMask], runs: Sequence[Mapping[str, Any]], *,
                   cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   **settings: Any) -> pd.DataFrame:
    """Evaluate the model under every mask with :func:`moe_utils.evaluation.evaluate`.

    Args:
        masks: from :func:`pruning_masks` (add :func:`unpruned_mask` for the reference row).
        runs: evaluate() calls per mask, each ``{"tasks": [...], "limit": n}`` (tasks that need
            different sample sizes go in different runs).
        cache_dir: one JSON per (mask, run, settings, model) under this directory, keyed by
            :func:`evaluation_key`; a cached evaluation is read, not re-run.
        settings: the other keyword arguments of ``evaluate`` (num_fewshot, batch_size,
            max_length, categories, data_dir, wikitext_dir, bootstrap_iters).

    Returns:
        Long table: method, ratio, seed, pruned_share, task, metric, value, stderr, n, seconds, cached.
    """
    from moe_utils.evaluation import evaluate
    from moe_utils.expert_surgery import masked_experts

    model_id = model_identity(model)
    cache = Path(cache_dir) if cache_dir is not None else None
    frames = []
    jobs = [(mask, dict(run)) for mask in masks for run in runs]
    for mask, run in tqdm(jobs, desc="evaluating masks", disable=not progress):
        key = evaluation_key(mask.keep, run, settings, model_id)
        path = cache / f"eval-{key}.json" if cache is not None else None
        if path is not None and path.is_file():
            entry = json.loads(path.read_text())
            table, seconds, cached = pd.DataFrame(entry["rows"]), entry["seconds"], True
        else:
            start = time.perf_counter()
            with masked_experts(model, mask.keep):
                table = evaluate(model, tokenizer, run["tasks"], limit=run.get("limit"), **settings)
            seconds, cached = time.perf_counter() - start, False
            if path is not None:
                atomic_write_json(path, {"key": key, "method": mask.method, "ratio": mask.ratio, "seed": mask.seed,
                                         "run": run, "settings": settings, "model": model_id, "seconds": seconds,
                                         "rows": json.loads(table.to_json(orient="records"))})
        table = table.assign(method=mask.method, ratio=mask.ratio, seed=mask.seed, pruned_share=mask.pruned_share,
                             seconds=seconds, cached=cached)
        frames.append(table)
    columns = ["method", "ratio", "seed", "pruned_share", "task", "metric", "value", "stderr", "n", "seconds", "cached"]
    return pd.concat(frames, ignore_index=True)[columns]


def score_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Each task's primary metric (:func:`primary_metric`) per method and ratio: mean, spread
    (standard deviation over seeds, 0 for deterministic methods), number of seeds, share pruned."""
    chosen = {task: primary_metric(task, group["metric"]) for task, group in results.groupby("task", sort=False)}
    rows = results[results["metric"] == results["task"].map(chosen)]
    summary = rows.groupby(["method", "ratio", "task", "metric"], sort=False).agg(
        mean=("value", "mean"), std=("value", lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0),
        n_seeds=("value", "size"), pruned_share=("pruned_share", "mean"), n=("n", "first"))
    return summary.reset_index()


def table1(summary: pd.DataFrame, ratio: float, *, tasks: Sequence[str] | None = None,
           digits: int = 3) -> pd.DataFrame:
    """The paper's Table 1 layout at one ratio: the unpruned row first, then one row per method
    (random as mean ± spread over seeds), one column per task (all, or ``tasks``: e.g. leave out the
    sub-tasks of a stock group); AVG = mean of the accuracy columns when there are at least two;
    ``pruned`` = the share of experts actually pruned."""
    chosen = summary[(summary["ratio"] == ratio) | (summary["method"] == "unpruned")]
    order = list(dict.fromkeys(["unpruned", *chosen["method"]]))
    mean = chosen.pivot(index="method", columns="task", values="mean").reindex(order)
    std = chosen.pivot(index="method", columns="task", values="std").reindex(order)
    seeds = chosen.groupby("method")["n_seeds"].max().reindex(order)
    tasks = list(dict.fromkeys(chosen["task"])) if tasks is None else [t for t in tasks if t in set(chosen["task"])]
    acc = [t for t in tasks if chosen.loc[chosen["task"] == t, "metric"].iloc[0].startswith("acc")]
    mean, std = mean[tasks], std[tasks]
    if len(acc) >= 2:
        mean.insert(0, "AVG", mean[acc].mean(axis=1))
        std.insert(0, "AVG", std[acc].mean(axis=1))
    text = mean.map(lambda v: f"{v:.{digits}f}")
    for method in order:
        if seeds[method] > 1:
            text.loc[method] = [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(mean.loc[method], std.loc[method])]
    pruned = chosen.groupby("method")["pruned_share"].mean().reindex(order)
    text.insert(0, "pruned", [f"{p:.0%}" for p in pruned])
    text.columns.name = None
    return text


def method_ranks(summary: pd.DataFrame, ratio: float, *, tasks: Sequence[str] | None = None) -> pd.Series:
    """Mean rank of each method over the tasks at one ratio (1 = best on every task; accuracy:
    higher is better, perplexity and bits per byte: lower), best first; ties share the mean rank."""
    rows = summary[summary["ratio"] == ratio]
    if tasks is not None:
        rows = rows[rows["task"].isin(list(tasks))]
    signed = rows["mean"].where(rows["metric"].str.startswith("acc"), -rows["mean"])
    ranks = signed.groupby(rows["task"]).rank(ascending=False)
    return ranks.groupby(rows["method"]).mean().sort_values().rename("mean rank")


# ------------------------------------------------------------------------------- artifacts
def save_pruning(path: str | os.PathLike, masks: Sequence[PruningMask], results: pd.DataFrame, *,
                 stats: ExpertStats | None = None, extra: dict | None = None) -> Path:
    """Write the stage's artifact: ``masks.npz`` (one keep-mask per row), ``results.csv``, ``stats.npz``
    (calibration sums), then a checksummed ``manifest.json`` listing every mask (method, ratio, seed,
    note) and ``extra`` (parameters, inputs)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").unlink(missing_ok=True)  # invalid until the new manifest lands
    payloads = {}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, keep=np.array([m.keep for m in masks], dtype=bool))
    payloads["masks.npz"] = buffer.getvalue()
    payloads["results.csv"] = results.to_csv(index=False).encode()
    if stats is not None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, n_tokens=stats.n_tokens, counts=stats.counts, weight_sum=stats.weight_sum,
                            norm_sum=stats.norm_sum, weighted_norm_sum=stats.weighted_norm_sum)
        payloads["stats.npz"] = buffer.getvalue()
    files = {}
    for name, data in payloads.items():
        atomic_write_bytes(path / name, data)
        files[name] = hashlib.sha256(data).hexdigest()
    manifest = {"format": FORMAT, "files": files,
                "masks": [{"method": m.method, "ratio": m.ratio, "seed": m.seed, "note": m.note,
                           "n_kept": int(m.keep.sum())} for m in masks],
                "versions": package_versions(("torch", "transformers", "lm_eval", "numpy", "moe-collab-study")),
                **(extra or {})}
    atomic_write_json(path / "manifest.json", manifest)
    return path


def load_pruning(path: str | os.PathLike) -> tuple[list[PruningMask], pd.DataFrame, dict]:
    """Read :func:`save_pruning`'s artifact, checking every file against the manifest:
    ``(masks, results, manifest)``."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"no pruning artifact at {path}: manifest.json is missing (run stage 04_pruning)")
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    for name, digest in manifest["files"].items():
        if hashlib.sha256((path / name).read_bytes()).hexdigest() != digest:
            raise ValueError(f"{path}: {name} does not match its checksum in the manifest; re-run the stage")
    with np.load(path / "masks.npz") as arrays:
        keeps = arrays["keep"]
    masks = [PruningMask(m["method"], m["ratio"], keep, seed=m["seed"], note=m["note"])
             for m, keep in zip(manifest["masks"], keeps)]
    return masks, pd.read_csv(path / "results.csv"), manifest


def resolve_calibration(model_name: str, source: str | None = None, n_samples: int | None = None,
                        n_tokens: int | None = None) -> dict:
    """The calibration set, with unset fields filled in.

    Source by default: the paper's MMLU for real checkpoints; for the embedded and random models,
    ``"capture"``, the stage-1 prompts, i.e. the very texts CAEP's dictionary was fitted on, so
    that every method sees the same data. Sizes by default: the paper's 128 samples of 2,048 tokens
    for ``"mmlu"`` and ``"wikitext"``; every prompt, at the capture's length, for ``"capture"``.
    """
    if source is None:
        source = "capture" if model_name == EMBEDDED or model_name.startswith(RANDOM_PREFIX) else "mmlu"
    if source not in ("capture", "mmlu", "wikitext"):
        raise ValueError(f"calibration source must be 'capture', 'mmlu' or 'wikitext', got {source!r}")
    if source != "capture":
        n_samples = 128 if n_samples is None else n_samples
        n_tokens = 2048 if n_tokens is None else n_tokens
    return {"source": source, "n_samples": n_samples, "n_tokens": n_tokens}
