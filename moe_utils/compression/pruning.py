"""Which experts to prune: every method's keep-masks, their evaluation and the stage's artifact.

The paper's section 4 (Table 1, Fig 8) compares CAEP with other pruning methods at several
pruning ratios. Every method ends in a *keep-mask*: a boolean vector over the N_e routed experts
in the layer-major order of the expert matrix X (row ``layer * E + expert``), True = keep; masks
are applied by :mod:`moe_utils.models.expert_surgery`. :func:`pruning_masks` returns every method's masks
for a list of ratios through the registry of :mod:`moe_utils.compression.registry` (one module per
method under :mod:`moe_utils.compression.methods`: CAEP and its per-layer mode; frequency, routing
weight, EAN, REAP and the output-based method; the merging baselines HC-SMoE and M-SMoE, whose
masks also carry the groups merged into each kept expert; random masks);
:func:`resolve_evaluation` / :func:`evaluation_runs` / :func:`evaluation_key` say what each mask
is evaluated on and how an evaluation is cached (:mod:`moe_utils.evaluation.pruning_eval` runs them and
builds Table 1 with paired intervals); :func:`method_ranks` ranks the methods; :func:`label_columns` and
:func:`hsdl_factors` restrict CAEP's codes to one MMLU-Pro category (domain-specific pruning);
:func:`save_pruning` / :func:`load_pruning` write and read the stage's artifact.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from torch import nn

from moe_utils.common.artifacts import json_digest, package_versions, read_artifact, write_artifact
from moe_utils.compression.caep import PruningBudget
from moe_utils.compression.calibration import ExpertStats
from moe_utils.compression import registry
from moe_utils.compression.value import Compression
from moe_utils.evaluation.metrics import better_sign
from moe_utils.models.loading import is_small_model
from moe_utils.common.fingerprint import tree_digest
from moe_utils.evaluation.harness import MC_GROUP, PPL_GROUP, category_slug

log = logging.getLogger(__name__)

#: Every method :func:`pruning_masks` knows (pruning and merging), in the order tables show them:
#: the names of :mod:`moe_utils.compression.registry`.
METHODS = registry.names()
FORMAT = "moe-pruning/2"


# ------------------------------------------------------------------------------ all methods
#: One method's compressed model at one ratio: :class:`moe_utils.compression.value.Compression`.
PruningMask = Compression


def unpruned_mask(n_e: int) -> PruningMask:
    """The all-kept mask: the unpruned model's row of every table."""
    return PruningMask("unpruned", 0.0, np.ones(n_e, dtype=bool))


def unsupported_methods(methods: Sequence[str], budget: PruningBudget) -> dict[str, str]:
    """``{method: why}`` for the methods of ``methods`` that cannot compress a model whose layers allow
    only the keep counts of ``budget`` (:func:`moe_utils.compression.registry.unsupported`)."""
    return registry.unsupported(methods, budget)


def pruning_masks(ratios: Sequence[float], *, budget: PruningBudget,
                  methods: Sequence[str] = METHODS, stats: ExpertStats | None = None,
                  dictionary: tuple[Any, Any] | None = None, threshold_ratio: float = 0.9,
                  seeds: Sequence[int] = (0, 1, 2), model: nn.Module | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True) -> list[PruningMask]:
    """Every method's compression at every ratio, in the order of ``methods`` then ``ratios`` then seeds
    (:func:`moe_utils.compression.registry.build`).

    Args:
        ratios: shares of experts to prune, each in (0, 1).
        budget: experts per MoE layer, the per-layer guard (a model's top-k) and the keep counts
            each router allows (:meth:`moe_utils.compression.caep.PruningBudget.for_model`); every mask rounds
            up to them, and :func:`unsupported_methods` are refused.
        methods: registered names (:data:`METHODS`); each entry says what it needs: ``dictionary=(D, R)``
            (CAEP), ``stats`` (a calibration pass; with kept hidden states for the output-based and
            merging methods), the ``model``; ``random`` uses ``seeds``.
        threshold_ratio: CAEP's k1.
        cache_dir: where the output-based search caches its orders.
    """
    return registry.build(methods, ratios, registry.Inputs(
        budget=budget, stats=stats, dictionary=dictionary, model=model, seeds=seeds,
        threshold_ratio=threshold_ratio, cache_dir=cache_dir, progress=progress))


def mask_overlap(masks: Sequence[PruningMask]) -> pd.DataFrame:
    """Jaccard similarity of the *pruned* sets of every pair of masks (1 = they prune the same experts)."""
    pruned = np.array([~m.keep for m in masks], dtype=np.float64)
    inter = pruned @ pruned.T
    union = pruned.sum(1)[:, None] + pruned.sum(1)[None, :] - inter
    labels = [m.label for m in masks]
    return pd.DataFrame(np.divide(inter, union, out=np.ones_like(inter), where=union > 0), index=labels, columns=labels)


# ------------------------------------------------------------------------ domain restriction
def label_columns(store, label: str | Iterable[str], granularity: str = "token") -> np.ndarray:
    """Boolean mask over the columns of X (:func:`moe_utils.patterns.expert_matrix.expert_matrix` of ``store``
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
    """(D, R) for CAEP from a fitted :class:`moe_utils.patterns.hsdl.HSDL`, optionally on some columns of X.

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
#: What the small models are evaluated on: BLiMP minimal pairs (above chance for a small model, unlike
#: multiple choice), WikiText-2 and per-category MMLU-Pro question perplexity.
SMALL_MODEL_TASKS = ("blimp", "wikitext2_ppl", "mmlu_pro_ppl")
#: Their default sample sizes: pairs per BLiMP paradigm, WikiText-2 articles, questions per category.
SMALL_MODEL_LIMITS = {"blimp": 20, "wikitext2_ppl": 20, "mmlu_pro_ppl": 5}


def resolve_evaluation(model_name: str, tasks: Sequence[str] | None = None, limit: int | float | None = None,
                       task_limits: Mapping[str, int | float | None] | None = None) -> dict:
    """What each pruned model is evaluated on, with unset fields filled in.

    The embedded and random models: :data:`SMALL_MODEL_TASKS` with the small samples of
    :data:`SMALL_MODEL_LIMITS` (sized so that stage 4 runs in minutes on 2 CPU cores; the stage
    reports the differences they can detect). Multiple-choice MMLU-Pro is left out: the embedded
    model sits at chance on it. Real checkpoints: the paper's :data:`PAPER_TASKS`, every document.
    """
    small = is_small_model(model_name)
    if tasks is None:
        tasks = SMALL_MODEL_TASKS if small else PAPER_TASKS
    if task_limits is None:
        task_limits = SMALL_MODEL_LIMITS if small else {}
    return {"tasks": list(tasks), "limit": limit, "task_limits": dict(task_limits)}


def evaluation_runs(tasks: Sequence[str], categories: Sequence[str], limit: int | float | None = None,
                    task_limits: Mapping[str, int | float | None] | None = None) -> list[dict]:
    """The evaluate() calls for each mask: one per distinct limit, ``{"tasks": [...], "limit": n}``.

    The MMLU-Pro groups ``mmlu_pro_ppl`` and ``mmlu_pro_mc`` become one task per category (so
    every table column is one category); other names are kept. ``task_limits`` (by task or group
    name) overrides ``limit``; limits of tasks not asked for are ignored.
    """
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



#: ValueError naming the methods of a list that are not registered.
check_methods = registry.check_methods


def evaluation_key(compression: Compression | np.ndarray, run: Mapping[str, Any], settings: Mapping[str, Any],
                   model_id: Mapping) -> str:
    """sha256 naming one evaluation: the compressed model (:attr:`moe_utils.compression.value.Compression.digest`;
    a bare keep-mask is a pruning), the tasks and limit, the other evaluate() settings
    with the digest of each data folder they name (``data_dir``, ``blimp_dir`` ...), and the model
    (:func:`moe_utils.capture.routing.model_identity`); the evaluation cache
    (:class:`moe_utils.common.cache.KeyedCache`) adds the code, the ``$MOE_*_DIR`` data and versions."""
    if not isinstance(compression, Compression):
        compression = Compression("mask", 0.0, np.asarray(compression, dtype=bool))
    payload = {"compression": compression.digest, "run": run,
               "settings": settings, "model": model_id,
               "data": {k: tree_digest(v) for k, v in settings.items() if k.endswith("_dir") and v}}
    return json_digest(payload)


def method_ranks(summary: pd.DataFrame, ratio: float, *, tasks: Sequence[str] | None = None) -> pd.Series:
    """Mean rank of each method over the tasks at one ratio (1 = best on every task; accuracy:
    higher is better, perplexity and bits per byte: lower), best first; ties share the mean rank."""
    rows = summary[summary["ratio"] == ratio]
    if tasks is not None:
        rows = rows[rows["task"].isin(list(tasks))]
    signed = rows["mean"] * rows["metric"].map(better_sign)
    ranks = signed.groupby(rows["task"]).rank(ascending=False)
    return ranks.groupby(rows["method"]).mean().sort_values().rename("mean rank")


# ------------------------------------------------------------------------------- artifacts
def save_pruning(path: str | os.PathLike, masks: Sequence[PruningMask], results: pd.DataFrame, *,
                 stats: ExpertStats | None = None, extra: dict | None = None) -> Path:
    """Write the stage's artifact folder (:func:`moe_utils.common.artifacts.write_artifact`): ``masks.npz``
    (one keep-mask per row), ``results.csv``, ``stats.npz`` (calibration sums), then a checksummed
    ``manifest.json`` listing every mask (method, ratio, seed, note; for a merge its groups and
    alignment, its weights in ``masks.npz``) and ``extra`` (parameters, inputs)."""
    path = Path(path)
    weights = np.array([m.weights if m.merged else np.zeros(len(m.keep)) for m in masks], dtype=np.float64)
    files = {"masks.npz": _npz(keep=np.array([m.keep for m in masks], dtype=bool), weights=weights),
             "results.csv": results.to_csv(index=False).encode()}
    if stats is not None:
        files["stats.npz"] = _npz(n_tokens=stats.n_tokens, counts=stats.counts, weight_sum=stats.weight_sum,
                                  norm_sum=stats.norm_sum, weighted_norm_sum=stats.weighted_norm_sum)
    write_artifact(path, files, {
        "format": FORMAT, "masks": [{"method": m.method, "ratio": m.ratio, "seed": m.seed, "note": m.note,
                                     "n_kept": int(m.keep.sum()), "groups": m.groups, "align": m.align}
                                    for m in masks],
        "versions": package_versions(("torch", "transformers", "lm_eval", "numpy", "moe-collab-study")),
        **(extra or {})})
    return path


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def load_pruning(path: str | os.PathLike) -> tuple[list[PruningMask], pd.DataFrame, dict]:
    """Read :func:`save_pruning`'s artifact, checking every file against the manifest:
    ``(masks, results, manifest)``; :class:`moe_utils.common.artifacts.ArtifactMissing` (a
    FileNotFoundError) when stage 4 has not written it."""
    path = Path(path)
    manifest = read_artifact(path, what="pruning artifact", fix="re-run stage 04_pruning", format=FORMAT,
                             required=("masks.npz", "results.csv"))
    with np.load(path / "masks.npz") as arrays:
        keeps, weights = arrays["keep"], arrays["weights"]
    masks = [PruningMask(m["method"], m["ratio"], keep, seed=m["seed"], note=m["note"], groups=m["groups"],
                         weights=w if m["groups"] is not None else None, align=m["align"])
             for m, keep, w in zip(manifest["masks"], keeps, weights)]
    return masks, pd.read_csv(path / "results.csv"), manifest
