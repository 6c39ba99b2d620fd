"""Hierarchical sparse dictionary learning (HSDL), the paper's section 3.

HSDL factorises the expert activation matrix X (N_e experts x N_s columns, see
:mod:`moe_utils.patterns.expert_matrix`) level by level::

    X   ~ D_1 R_1      D_1 (N_e, p_1) in [0, 1],  R_1 (p_1, N_s) >= 0
    D_k ~ D_{k+1} R_{k+1}                         R_{k+1} (p_{k+1}, p_k) >= 0

Each column of a dictionary D_k is an *atom*: a group of experts, possibly of several layers, that
fire together. Level 0 is X itself with R_0 = I. The loss of Tang et al. (2025), summed over the
levels, has three named terms per level k + 1 (the level whose parameters it fits)::

    sparse = sum_i ||R_{k+1}[i, :]||_inf                                (dictionary size)
    hier   = sum_j ||R_{k+1}[:, j]||_1 ||R_k[j, :]||_1 / N_k            (usage-weighted L1 sparsity)
    rec    = sum_j ||D_k[:, j] - (D_{k+1} R_{k+1})[:, j]||_1 ||R_k[j, :]||_1 / N_k   (L1 reconstruction)
    total  = sum_k sparse + lambda_hier * hier + lambda_rec * rec

with N_k the number of columns of R_k (the mini-batch size at level 0 and 1), so every term is a
mean over columns and does not grow with N_s. Level k + 1 >= 2 is mini-batched too: when level k has
more atoms than ``batch_size``, each step evaluates its ``hier`` and ``rec`` sums on ``batch_size``
of level k's atoms drawn at random, scaled up by p_k / batch_size (an unbiased estimate), so a step
costs N_e p_{k+1} batch_size instead of N_e p_{k+1} p_k (at DeepSeek-MoE-16B's N_e = 1728 with the
default levels, a third). With p_k <= ``batch_size`` (the embedded model, Phi-3.5-MoE) the sums are
whole and the fit is unchanged. Decisions the paper leaves open (parametrisation,
optimiser, N, defaults) are explained on the book's method page. In short: level-1 codes come
from an amortised encoder R_1 = relu(W X + b), which gives :meth:`HSDL.transform` for new columns
and mini-batches over N_s; dictionaries and deeper codes are free parameters projected onto
[0, 1] and [0, inf) after every Adam step, so entries and codes are exactly zero where unused.
"""

from __future__ import annotations

import io
import logging
import math
import numbers
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state

from moe_utils.common.artifacts import package_versions, read_artifact, write_artifact

log = logging.getLogger(__name__)

FORMAT = "moe-hsdl/1"
#: The files :meth:`HSDL.save` writes, each with its sha256 in the manifest.
SAVED_FILES = ("arrays.npz", "codes_1.npz")
TERMS = ("sparse", "hier", "rec")


# ------------------------------------------------------------------------------------- input
class _Columns:
    """Read-only access to the columns of X (N_e, N_s) in mini-batches, never densifying all of X.

    Checks X once: 2-D, real, finite, non-negative, not empty. A sparse X is held as CSR of X.T,
    so that a mini-batch of columns is a cheap row slice.
    """

    def __init__(self, X, name: str = "X"):
        if isinstance(X, torch.Tensor):
            self.kind, self.data = "torch", X.detach()
        elif sp.issparse(X):
            self.kind, self.data = "sparse", X
        else:
            self.kind, self.data = "dense", np.asarray(X)
            dtype = self.data.dtype
            if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
                raise ValueError(f"{name} must hold real numbers, got dtype {self.data.dtype}")
        shape = tuple(self.data.shape)
        if len(shape) != 2:
            raise ValueError(f"{name} must be 2-D (experts x columns), got shape {shape}")
        self.n_rows, self.n_cols = shape
        if 0 in shape:
            raise ValueError(f"{name} is empty: shape {shape}")
        if self.kind == "sparse":
            self.data = sp.csr_matrix(X.T, dtype=np.float32)  # (N_s, N_e): row i = column i of X
        values = self.data.data if self.kind == "sparse" else self.data
        if self.kind == "torch":
            finite, minimum = bool(torch.isfinite(values).all()), float(values.min())
        else:
            finite, minimum = bool(np.isfinite(values).all()), float(values.min()) if values.size else 0.0
        if not finite:
            raise ValueError(f"{name} contains NaN or infinite values")
        if minimum < 0:
            raise ValueError(f"{name} has negative entries (min {minimum:.3g}); HSDL factorises non-negative "
                             "activations (routing weights, indicators or probabilities)")

    def scale(self) -> float:
        """The median non-zero entry (0 if X is all zeros): X is divided by it so that codes are O(1)."""
        if self.kind == "sparse":
            values = self.data.data
        elif self.kind == "dense":
            values = self.data[self.data != 0]
        else:
            values = self.data[self.data != 0].cpu().numpy()
        values = values[values != 0].astype(np.float32)
        return float(np.median(values)) if values.size else 0.0

    def batch(self, idx: np.ndarray | slice, device: torch.device) -> torch.Tensor:
        """Columns ``idx`` as a dense float32 tensor (B, N_e): one row per column of X."""
        if self.kind == "sparse":
            out = torch.from_numpy(self.data[idx].toarray())
        elif self.kind == "dense":
            out = torch.from_numpy(np.ascontiguousarray(self.data[:, idx].T, dtype=np.float32))
        else:
            index = idx if isinstance(idx, slice) else torch.as_tensor(idx, device=self.data.device)
            out = self.data[:, index].T.contiguous()
        return out.to(device=device, dtype=torch.float32, non_blocking=True)

    def bags(self, idx: slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Columns ``idx`` as bags of their non-zero entries: (row indices, offsets, values), each
        column's entries in row order: what ``torch.nn.functional.embedding_bag`` reads. A sparse X is
        read without densifying; every kind of X gives the same bags."""
        if self.kind == "sparse":
            block = self.data[idx]
            block.sort_indices()
            indices, values = torch.from_numpy(block.indices.astype(np.int64)), torch.from_numpy(block.data)
            offsets = torch.from_numpy(block.indptr[:-1].astype(np.int64))
        else:
            dense = self.batch(idx, torch.device("cpu"))
            cols, indices = torch.nonzero(dense, as_tuple=True)  # row-major: column by column, rows in order
            values = dense[cols, indices]
            counts = torch.bincount(cols, minlength=dense.shape[0])
            offsets = torch.cumsum(counts, 0) - counts
        to = dict(device=device, non_blocking=True)
        return indices.to(**to), offsets.to(**to), values.to(dtype=torch.float32, **to)


def _fit(resid: torch.Tensor, delta: float, weights: torch.Tensor | None) -> dict:
    """L1 norm of each row of ``resid`` (one row per column of the level below), weighted by
    ``weights`` (summed) or averaged; and its Huber-smoothed version for optimisation."""
    l1 = resid.abs()
    smooth = torch.where(l1 < delta, resid.pow(2) / (2 * delta), l1 - delta / 2) if delta > 0 else l1
    if weights is None:
        return {"rec": l1.sum(1).mean(), "fit": smooth.sum(1).mean()}
    return {"rec": (l1.sum(1) * weights).sum(), "fit": (smooth.sum(1) * weights).sum()}


def _pair_seeds(active: torch.Tensor, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """(N_e, n) seed atoms, each a pair of experts (entries 1): the pairs of ``active`` (B, N_e), a
    boolean batch, most significantly active together (z-score of their count against independent
    choices); random pairs when fewer pairs than ``n`` co-occur more often than chance."""
    active = active.float()
    n_e = active.shape[1]
    counts = active.T @ active  # (N_e, N_e)
    single = counts.diagonal()
    expected = torch.outer(single, single) / max(1, active.shape[0])
    excess = ((counts - expected) / (expected + 1).sqrt()).triu(1)
    excess[torch.ones_like(excess, dtype=torch.bool).tril()] = -1.0
    values, flat = torch.topk(excess.ravel(), min(20 * n, excess.numel()))
    flat = flat[values > 0].tolist()
    chosen, used = [], set()
    for key in flat:  # the strongest pairs first, each expert in one seed while others remain
        a, b = divmod(key, n_e)
        if a not in used and b not in used:
            chosen.append(key)
            used.update((a, b))
            if len(chosen) == n:
                break
    taken = set(chosen)
    chosen += [key for key in flat if key not in taken][: n - len(chosen)]
    flat = torch.tensor(chosen, dtype=torch.long, device=active.device)
    rows, cols = flat // n_e, flat % n_e
    if rows.numel() < n:  # fill with random pairs
        extra = n - rows.numel()
        a = torch.randint(n_e, (extra,), generator=gen, device=active.device)
        rows = torch.cat([rows, a])
        cols = torch.cat([cols, (a + 1 + torch.randint(max(1, n_e - 1), (extra,), generator=gen,
                                                       device=active.device)) % n_e])
    seeds = torch.zeros(n_e, n, device=active.device)
    index = torch.arange(n, device=active.device)
    seeds[rows, index] = 1.0
    seeds[cols, index] = 1.0
    return seeds


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------- estimator
def check_levels(levels) -> None:
    """ValueError unless ``levels`` is a non-empty list of positive ints (atom counts) or floats
    (multiples of N_e): what :class:`HSDL` accepts, also checked by the pipeline before any stage runs."""
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__len__") or len(levels) == 0:
        raise ValueError(f"levels must be a non-empty list of atom counts, got {levels!r}")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, numbers.Real) or not level > 0:
            raise ValueError(f"levels must be positive ints (counts) or floats (multiples of N_e), "
                             f"got {level!r} in {list(levels)}")


class HSDL(BaseEstimator):
    """Hierarchical sparse dictionary learning of expert collaboration (paper section 3).

    Parameters:
        levels: atoms per level, ``[p_1, p_2, ...]``. An int is a count; a float is a multiple of
            N_e (``0.5`` = half as many atoms as experts), resolved at fit into ``level_sizes_``.
        lambda_hier: weight of the usage-weighted L1 code sparsity (lambda_1 of the paper). Its
            ratio to ``lambda_rec`` is the price of a unit of code in units of L1 error.
        lambda_rec: weight of the usage-weighted L1 reconstruction (lambda_2 of the paper). An atom's
            L_inf cost must be paid back by reconstruction, so an atom used by fewer than about
            1 / lambda_rec of the columns is switched off.
        n_steps: Adam steps (mini-batches); may stop earlier, see ``tol``.
        batch_size: columns per mini-batch (N of the level-0 and level-1 terms), and the most atoms of
            a level on which the next level's terms are evaluated per step (drawn at random when the
            level has more; see the module's docstring).
        learning_rate: Adam's initial learning rate, halved ``lr_halvings`` times at equal intervals
            (the paper halves 4e-4 every 500 of its 2000 epochs).
        warmup: share of the steps over which the two sparsity terms are ramped in from 0.
        smoothing, smooth_fraction: the L1 reconstruction is Huber-smoothed with a width falling
            linearly from ``smoothing`` (in units of X's median non-zero) to 0 over this share of the
            steps; afterwards the objective is exactly the paper's.
        resample_every: share of the steps between re-seeding dead or duplicate level-1 atoms
            (first half of the run only; 0 disables it).
        tol, max_no_improvement: after the smoothing phase, stop when the logged loss (one mean per
            1% of the steps) improved by less than ``tol`` (relative) ``max_no_improvement`` times
            in a row; ``tol=0`` runs all steps.
        layout: ``(n_layers, n_experts)`` of the model, if known: then X must have
            ``n_layers * n_experts`` rows (catches a transposed X) and the pattern views use it.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` ...
        random_state: seed of initialisation and batch order; a fixed seed gives the same fit on CPU.
        init: how level-1 atoms start: ``"pairs"``, the expert pairs that fire together most above
            chance; ``"random"``, the experts of randomly drawn columns (the initialisation
            control of the atoms' stability, :mod:`moe_utils.patterns.hsdl_controls`).
        verbose: log the loss terms at every logging point.

    Attributes:
        level_sizes_: resolved ``[p_1, ...]``.
        dictionaries_: ``D_k`` (N_e, p_k) float32 in [0, 1], one per level.
        codes_: ``codes_[0]`` is R_1 (p_1, N_s) as scipy CSR, in X's units (``D_1 @ R_1 ~ X``);
            ``codes_[k]`` is R_{k+1} (p_{k+1}, p_k), a dense array >= 0.
        encoder_: ``(W, b)`` of the level-1 encoder, in normalised units (see ``x_scale_``).
        x_scale_: X is divided by this (its median non-zero entry) before fitting.
        loss_history_: ``{"step": [...], "total": [...], "level1.sparse": [...], "level1.hier": ...,
            "level1.rec": ..., "level2.sparse": ...}``: the exact (unsmoothed, fully weighted) terms
            of every level on each step's mini-batches, averaged over each 1% of the steps.
        n_steps_, n_iter_: optimisation steps run, and passes over the columns they make.
        n_resampled_: level-1 atoms re-seeded during training.
        fit_seconds_: wall time of the optimisation (without computing ``codes_[0]``).
        n_features_in_: N_e.
    """

    def __init__(self, levels=(1.0, 2.0), *, lambda_hier: float = 500.0, lambda_rec: float = 1000.0,
                 n_steps: int = 600, batch_size: int = 512, learning_rate: float = 1e-2, lr_halvings: int = 3,
                 warmup: float = 0.1, smoothing: float = 1.0, smooth_fraction: float = 0.5,
                 resample_every: float = 0.05, tol: float = 1e-4, max_no_improvement: int = 10,
                 layout: tuple[int, int] | None = None, device: str = "auto", random_state=None,
                 init: str = "pairs", verbose: bool = False):
        self.levels = levels
        self.lambda_hier = lambda_hier
        self.lambda_rec = lambda_rec
        self.n_steps = n_steps
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.lr_halvings = lr_halvings
        self.warmup = warmup
        self.smoothing = smoothing
        self.smooth_fraction = smooth_fraction
        self.resample_every = resample_every
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.layout = layout
        self.device = device
        self.random_state = random_state
        self.init = init
        self.verbose = verbose

    # ------------------------------------------------------------------ validation
    def _level_sizes(self, n_e: int, n_s: int) -> list[int]:
        levels = self.levels
        check_levels(levels)
        sizes = []
        for level in levels:
            sizes.append(int(level) if isinstance(level, numbers.Integral) else max(1, round(float(level) * n_e)))
        if sizes[0] > n_s:
            raise ValueError(f"levels {list(levels)} do not fit: level 1 asks for {sizes[0]} atoms but X has "
                             f"only {n_s} columns (N_s); use fewer atoms or more columns")
        return sizes

    def _check_rows(self, columns: _Columns, fitted: bool) -> None:
        n_e = columns.n_rows
        if self.layout is not None:
            n_layers, n_experts = self.layout
            if n_e != n_layers * n_experts:
                raise ValueError(f"X has shape {(columns.n_rows, columns.n_cols)} but layout "
                                 f"{tuple(self.layout)} means N_e = {n_layers * n_experts} rows: X must be "
                                 "experts x columns (did you pass X.T?)")
        if fitted and n_e != self.n_features_in_:
            raise ValueError(f"X has {n_e} rows but the model was fitted on N_e = {self.n_features_in_} "
                             f"(X must be experts x columns; got shape {(columns.n_rows, columns.n_cols)})")
        if not fitted and self.layout is None and columns.n_rows > columns.n_cols:
            warnings.warn(f"X has more rows ({columns.n_rows}) than columns ({columns.n_cols}); HSDL expects "
                          "experts x columns (pass layout= to check the orientation)", stacklevel=3)

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None) -> "HSDL":
        """Learn the dictionaries and codes of every level from X (N_e, N_s); returns ``self``."""
        if self.init not in ("pairs", "random"):
            raise ValueError(f"init must be 'pairs' or 'random', got {self.init!r}")
        columns = _Columns(X)
        self._check_rows(columns, fitted=False)
        n_e, n_s = columns.n_rows, columns.n_cols
        sizes = self._level_sizes(n_e, n_s)
        scale = columns.scale()
        if scale == 0:
            raise ValueError("X is all zeros: there is nothing to factorise")
        device = _resolve_device(self.device)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        order_rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        atom_rng = np.random.default_rng([seed, 1])  # level >= 2 mini-batches: the column order is unchanged
        batch = min(self.batch_size, n_s)
        per_epoch = math.ceil(n_s / batch)
        n_steps = max(1, int(self.n_steps))
        warmup, smooth = int(self.warmup * n_steps), int(self.smooth_fraction * n_steps)
        every = max(1, int(self.resample_every * n_steps)) if self.resample_every else n_steps + 1
        log_every = max(1, n_steps // 100)

        params = self._init_params(columns, sizes, scale, gen, order_rng, device)
        # One Adam step moves every weight by about the learning rate, so a code moves by that times
        # the number of non-zeros it reads: the encoder's rate is scaled to read ~10 of them.
        encoder_lr = self.learning_rate * min(1.0, 10.0 / max(1.0, params["nnz"]))
        optimiser = torch.optim.Adam([{"params": [params["W"], params["b"]], "lr": encoder_lr},
                                      {"params": params["D"] + params["R"]}], lr=self.learning_rate)
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimiser, step_size=max(1, n_steps // (self.lr_halvings + 1)), gamma=0.5)
        names = ["total"] + [f"level{k + 1}.{t}" for k in range(len(sizes)) for t in TERMS]
        history = {"step": [], **{name: [] for name in names}}
        sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        usage = torch.zeros(sizes[0], device=device)  # level-1 code mass since the last resampling
        best, stale, step, n_resampled, since_log = math.inf, 0, 0, 0, 0
        start = time.perf_counter()
        while step < n_steps:
            for idx in np.array_split(order_rng.permutation(n_s), per_epoch):
                xb = columns.batch(np.sort(idx), device) / scale  # (B, N_e)
                delta = self.smoothing * max(0.0, 1.0 - step / smooth) if smooth else 0.0
                ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
                picks = [None if p <= self.batch_size else torch.from_numpy(np.sort(atom_rng.choice(
                    p, self.batch_size, replace=False))).to(device) for p in sizes[:-1]]
                terms, r1 = self._terms(params, xb, delta, picks)
                objective = sum(ramp * (t["sparse"] + self.lambda_hier * t["hier"]) + self.lambda_rec * t["fit"]
                                for t in terms)
                optimiser.zero_grad(set_to_none=True)
                objective.backward()
                optimiser.step()
                scheduler.step()
                step += 1
                with torch.no_grad():
                    for d in params["D"]:
                        d.clamp_(0.0, 1.0)  # dictionary entries in [0, 1]
                    for r in params["R"]:
                        r.clamp_(min=0.0)  # deeper codes non-negative
                    total = sum(t["sparse"] + self.lambda_hier * t["hier"] + self.lambda_rec * t["rec"]
                                for t in terms)
                    sums += torch.stack([total] + [t[n] for t in terms for n in TERMS]).double()
                    usage += r1.sum(0)
                since_log += 1
                if step % every == 0 and step <= n_steps // 2:
                    n_resampled += self._resample(params, optimiser, xb, r1.detach(), usage)
                    usage.zero_()
                if step % log_every == 0 or step == n_steps:
                    means = (sums / since_log).tolist()
                    history["step"].append(step)
                    for name, value in zip(names, means):
                        history[name].append(value)
                    sums.zero_()
                    since_log = 0
                    if self.verbose:
                        log.info("step %d/%d %s", step, n_steps,
                                 " ".join(f"{n}={v:.4g}" for n, v in zip(names, means)))
                    if step > max(smooth, warmup):  # early stopping once the objective is the paper's
                        best, stale = (means[0], 0) if means[0] < best * (1 - self.tol) else (best, stale + 1)
                        if self.tol > 0 and stale >= self.max_no_improvement:
                            n_steps = step
                if step >= n_steps:
                    break
        self.fit_seconds_ = time.perf_counter() - start
        self.level_sizes_ = sizes
        self.n_features_in_ = n_e
        self.x_scale_ = float(scale)
        self.encoder_ = (params["W"].detach().cpu().numpy(), params["b"].detach().cpu().numpy())
        self.dictionaries_ = [d.detach().cpu().numpy() for d in params["D"]]
        self.loss_history_ = history
        self.n_steps_, self.n_iter_, self.n_resampled_ = step, math.ceil(step / per_epoch), n_resampled
        self.codes_ = [self._encode(columns, sparse=True)] + [r.detach().cpu().numpy() for r in params["R"]]
        return self

    def _init_params(self, columns, sizes, scale, gen, order_rng, device) -> dict:
        """Level-1 atoms start as the expert pairs that fire together most above chance, with an
        encoder that codes ~1 where both fire; deeper levels start as random parts of the level above."""
        n_e = columns.n_rows
        picks = np.sort(order_rng.choice(columns.n_cols, size=min(columns.n_cols, 8192), replace=False))
        sample = columns.batch(picks, torch.device("cpu"))
        if self.init == "pairs":
            d1 = _pair_seeds(sample / scale > 0.5, sizes[0], gen)  # (N_e, p_1)
        else:
            d1 = (sample[torch.randint(sample.shape[0], (sizes[0],), generator=gen)] > 0).T.float()
        w = (d1 / d1.pow(2).sum(0, keepdim=True).clamp_min(1.0)).T.contiguous()  # (p_1, N_e)
        b = torch.zeros(sizes[0])
        dicts, codes = [d1], []
        for p_prev, p in zip(sizes[:-1], sizes[1:]):
            parent = dicts[-1][:, torch.randint(p_prev, (p,), generator=gen)]
            dicts.append(parent * (torch.rand(n_e, p, generator=gen) < 0.5).float())
            codes.append(torch.rand(p, p_prev, generator=gen) * (2.0 / p))
        to = dict(device=device, dtype=torch.float32)
        W = w.to(**to).requires_grad_()
        b = b.to(**to).requires_grad_()
        D = [d.to(**to).requires_grad_() for d in dicts]
        R = [r.to(**to).requires_grad_() for r in codes]
        return {"W": W, "b": b, "D": D, "R": R, "nnz": float((sample > 0).sum(1).float().mean())}

    def _terms(self, params: dict, xb: torch.Tensor, delta: float = 0.0,
               picks: list | None = None) -> tuple[list[dict], torch.Tensor]:
        """The named loss terms of every level on one normalised mini-batch xb (B, N_e).

        ``rec`` is the L1 reconstruction; ``fit`` is what is optimised in its place: the same when
        ``delta`` is 0, else its Huber smoothing (quadratic below ``delta``), used early in the run.
        ``picks[k - 1]``, if not None, holds the atoms of level k on which level k + 1's ``hier`` and
        ``rec`` are estimated (scaled by p_k over their number); None: all of them.
        """
        r1 = torch.relu(xb @ params["W"].T + params["b"])  # (B, p_1)
        resid = xb - r1 @ params["D"][0].T  # (B, N_e)
        terms = [{"sparse": r1.amax(0).sum(), "hier": r1.sum(1).mean(), **_fit(resid, delta, None)}]
        usage = r1.detach().mean(0)  # ||R_1[j, :]||_1 / N_1 for each level-1 atom j
        for level, (d_prev, d, r) in enumerate(zip(params["D"][:-1], params["D"][1:], params["R"])):
            cols = picks[level] if picks else None
            part, target, weight = (r, d_prev, usage) if cols is None else (r[:, cols], d_prev[:, cols], usage[cols])
            scale = d_prev.shape[1] / target.shape[1]
            fit = _fit((target - d @ part).T, delta, weight)
            terms.append({"sparse": r.amax(1).sum(), "hier": (part.abs().sum(0) * weight).sum() * scale,
                          "rec": fit["rec"] * scale, "fit": fit["fit"] * scale})
            usage = r.detach().mean(1)
        return terms, r1

    @staticmethod
    def _resample(params: dict, optimiser, xb: torch.Tensor, r1: torch.Tensor, usage: torch.Tensor) -> int:
        """Re-seed level-1 atoms that coded no column since the last check, or that duplicate a more
        used atom (cosine > 0.95), with the batch's worst reconstructed columns; their Adam state is
        reset. A dead atom never comes back by gradient, and a duplicate wastes a slot."""
        with torch.no_grad():
            d1, W, b = params["D"][0], params["W"], params["b"]
            unit = d1 / d1.norm(dim=0, keepdim=True).clamp_min(1e-12)
            cos = (unit.T @ unit).triu(1)  # (p, p), pairs i < j
            more_used = usage[:, None] >= usage[None, :]  # i is used at least as much as j
            duplicate = ((cos > 0.95) & more_used).any(0) | ((cos.T > 0.95) & ~more_used.T).any(0)
            dead = torch.nonzero((usage <= 0) | duplicate).ravel()
            if dead.numel() == 0:
                return 0
            missed = (xb - r1 @ d1.T) > 0.5  # (B, N_e): entries the dictionary leaves half unexplained
            atoms = _pair_seeds(missed, dead.numel(), None).to(d1)  # (N_e, n)
            d1[:, dead] = atoms
            W[dead] = (atoms / atoms.pow(2).sum(0, keepdim=True)).T
            b[dead] = 0.0
            for param, index in ((d1, (slice(None), dead)), (W, dead), (b, dead)):
                for buffer in optimiser.state.get(param, {}).values():
                    if torch.is_tensor(buffer) and buffer.dim() > 0:
                        buffer[index] = 0.0
        return int(dead.numel())

    # ------------------------------------------------------------------ inference
    def _encode(self, columns: _Columns, sparse: bool):
        """Level-1 codes of every column: relu(W x + b), W x summed over x's non-zero entries only
        (``embedding_bag`` over the rows of W^T: a column of X selects L x k of its N_e experts, so this
        reads about k / E of W), in blocks of ``batch_size`` columns."""
        device = _resolve_device(self.device)
        w_t = torch.as_tensor(self.encoder_[0].T.copy(), device=device)  # (N_e, p_1): one row per expert
        b = torch.as_tensor(self.encoder_[1], device=device)
        blocks = []
        with torch.no_grad():
            for start in range(0, columns.n_cols, max(1, self.batch_size)):
                indices, offsets, values = columns.bags(slice(start, min(start + self.batch_size, columns.n_cols)),
                                                        device)
                wx = torch.nn.functional.embedding_bag(indices, w_t, offsets, mode="sum",
                                                       per_sample_weights=values / self.x_scale_)
                codes = torch.relu(wx + b) * self.x_scale_  # (B, p_1) in X's units
                codes = codes.cpu().numpy()
                blocks.append(sp.csr_matrix(codes) if sparse else codes)
        if sparse:
            return sp.vstack(blocks, format="csr").T.tocsr()
        return np.concatenate(blocks).T

    def transform(self, X):
        """Level-1 codes R_1 (p_1, n) of new columns X (N_e, n): CSR for sparse X, else a dense array."""
        self._check_fitted()
        columns = _Columns(X)
        self._check_rows(columns, fitted=True)
        return self._encode(columns, sparse=columns.kind == "sparse")

    def inverse_transform(self, codes):
        """D_1 @ R_1: the reconstruction (N_e, n) of level-1 codes (dense)."""
        self._check_fitted()
        return np.asarray(self.dictionaries_[0] @ (codes.toarray() if sp.issparse(codes) else np.asarray(codes)))

    def reconstruction_error(self, X, norm: str = "l1") -> float:
        """||X - D_1 R_1|| / ||X|| in the L1 (entrywise, the paper's) or Frobenius norm."""
        self._check_fitted()
        if norm not in ("l1", "fro"):
            raise ValueError(f"norm must be 'l1' or 'fro', got {norm!r}")
        columns = _Columns(X)
        self._check_rows(columns, fitted=True)
        device = _resolve_device(self.device)
        w, b, d = (torch.as_tensor(a, device=device) for a in (*self.encoder_, self.dictionaries_[0]))
        err = ref = 0.0
        with torch.no_grad():
            for start in range(0, columns.n_cols, self.batch_size):
                block = slice(start, min(start + self.batch_size, columns.n_cols))
                xb = columns.batch(block, device) / self.x_scale_
                resid = xb - torch.relu(xb @ w.T + b) @ d.T
                p = 1 if norm == "l1" else 2
                err += float(resid.abs().pow(p).sum())
                ref += float(xb.abs().pow(p).sum())
        return (err / ref) if norm == "l1" else math.sqrt(err / ref)

    def score(self, X, y=None) -> float:
        """Relative L1 reconstruction error of X by level 1 (lower is better, unlike scikit-learn's scores)."""
        return self.reconstruction_error(X, "l1")

    def hierarchy_error(self) -> list[float]:
        """For each level k >= 1 with a level below: ||D_k - D_{k+1} R_{k+1}||_1 / ||D_k||_1."""
        self._check_fitted()
        out = []
        for d_prev, d, r in zip(self.dictionaries_[:-1], self.dictionaries_[1:], self.codes_[1:]):
            out.append(float(np.abs(d_prev - d @ r).sum() / max(np.abs(d_prev).sum(), 1e-12)))
        return out

    def _check_fitted(self) -> None:
        if not hasattr(self, "dictionaries_"):
            raise RuntimeError("this HSDL is not fitted yet: call fit(X) first")

    # ------------------------------------------------------------------ persistence
    def save(self, path, extra: dict | None = None) -> Path:
        """Write the fitted model to directory ``path`` as a checksummed artifact folder
        (:func:`moe_utils.common.artifacts.write_artifact`): arrays, then ``manifest.json`` (parameters,
        sizes, loss history, versions, and ``extra``, e.g. the X spec and the store)."""
        self._check_fitted()
        path = Path(path)
        arrays = {"encoder_W": self.encoder_[0], "encoder_b": self.encoder_[1]}
        arrays.update({f"D{k + 1}": d for k, d in enumerate(self.dictionaries_)})
        arrays.update({f"R{k + 2}": r for k, r in enumerate(self.codes_[1:])})
        writers = {"arrays.npz": lambda h: np.savez(h, **arrays),
                   "codes_1.npz": lambda h: sp.save_npz(h, self.codes_[0], compressed=True)}
        files = {}
        for name in SAVED_FILES:
            buffer = io.BytesIO()
            writers[name](buffer)
            files[name] = buffer.getvalue()
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}
        write_artifact(path, files, {
            "format": FORMAT, "params": params, "level_sizes": self.level_sizes_,
            "n_features_in": self.n_features_in_, "n_columns_fit": int(self.codes_[0].shape[1]),
            "x_scale": self.x_scale_, "n_iter": self.n_iter_, "n_steps": self.n_steps_,
            "n_resampled": self.n_resampled_,
            "fit_seconds": self.fit_seconds_, "loss_history": self.loss_history_,
            "versions": package_versions(("torch", "numpy", "scipy", "scikit-learn", "moe-collab-study")),
            **(extra or {}),
        })
        return path

    @classmethod
    def load(cls, path, *, device: str | None = None) -> "HSDL":
        """Load a model written by :meth:`save`, checking every file against the manifest."""
        path = Path(path)
        manifest = read_artifact(path, what="HSDL model", fix="re-fit the model (stage 02_hsdl)", format=FORMAT,
                                 required=SAVED_FILES, exact=True)
        params = dict(manifest["params"])
        if params.get("layout") is not None:
            params["layout"] = tuple(params["layout"])
        if device is not None:
            params["device"] = device
        model = cls(**params)
        with np.load(path / "arrays.npz") as arrays:
            n_levels = len(manifest["level_sizes"])
            model.encoder_ = (arrays["encoder_W"], arrays["encoder_b"])
            model.dictionaries_ = [arrays[f"D{k + 1}"] for k in range(n_levels)]
            deeper = [arrays[f"R{k + 2}"] for k in range(n_levels - 1)]
        model.codes_ = [sp.load_npz(path / "codes_1.npz").tocsr()] + deeper
        model.level_sizes_ = manifest["level_sizes"]
        model.n_features_in_ = manifest["n_features_in"]
        model.x_scale_ = manifest["x_scale"]
        model.loss_history_ = manifest["loss_history"]
        model.n_iter_, model.n_steps_ = manifest["n_iter"], manifest["n_steps"]
        model.fit_seconds_, model.n_resampled_ = manifest["fit_seconds"], manifest["n_resampled"]
        model.manifest_ = manifest
        return model
