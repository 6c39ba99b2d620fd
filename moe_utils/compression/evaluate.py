"""One evaluator for the compressed models of stages 4 and 5: every document's result, cached per model.

The paper evaluates its pruned models zero-shot with lm-evaluation-harness (section 4, Table 1 and
Fig 9). Stages 4 (pruning and merging methods on BLiMP, WikiText-2 and MMLU-Pro perplexity) and 5
(domain-specific pruning on every MMLU-Pro domain) both evaluate one model under many
:class:`~moe_utils.compression.value.Compression` values with :func:`evaluate_compressions`:

* every compression, on every *run* (``{"tasks": [...], "limit": n, "num_fewshot": k}``; a run's
  ``num_fewshot`` overrides the one in the settings), goes through the real harness
  (:func:`moe_utils.evaluation.harness.run_harness`: the harness's task definitions, requests,
  ``process_results`` and aggregation), with its per-document log kept as one table,
  :func:`moe_utils.evaluation.harness.sample_table` (columns :data:`DOCUMENT_COLUMNS`: the compression's
  method, ratio, seed and digest, then the task, document, MMLU-Pro question id, correctness,
  log-likelihood, word and byte counts, and the margin of a multiple-choice answer);
* each (compression, run) is one entry of a :class:`moe_utils.common.artifacts.KeyedCache` (kind
  ``eval``) keyed by :func:`moe_utils.compression.pruning.evaluation_key`: the compression's digest (so a merge
  never reads a pruning's scores), the run, the settings, the model and the scorer; the cache adds
  the package's code, the data and the versions. The entry holds the harness's table and the
  documents as Parquet (lossless: a warm run reads back exactly what a cold one computed);
* with ``batch_masks`` (the default) the pruned compressions still to compute are scored
  ``group_size`` at a time in shared forward passes (:class:`moe_utils.evaluation.multi_mask.MultiMaskLM`),
  the harness's tasks and their requests built once per run (:func:`moe_utils.evaluation.harness.requests_reused`:
  per compression the harness only asks the model and applies the tasks' filters, ``process_results``
  and aggregation); a merge has its own weights, so each is scored alone,
  with its merged weights written over its kept experts (:func:`moe_utils.compression.merging.applied`).
  ``batch_masks=False`` is the plain harness model one compression at a time (``HFLM`` over the
  masked model), as both stages evaluated before; the two agree to float rounding
  (tests/test_compression_evaluate.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from moe_utils.evaluation import harness as evaluation
from moe_utils.common.artifacts import package_versions
from moe_utils.common.cache import KeyedCache
from moe_utils.compression import merging
from moe_utils.compression.value import Compression
from moe_utils.evaluation.multi_mask import MAX_TOKENS, MultiMaskLM
from moe_utils.compression.pruning import evaluation_key
from moe_utils.capture.routing import model_identity

#: The compression's identity in both tables.
IDENTITY = ("method", "ratio", "seed", "digest")
#: Columns of the per-document table.
DOCUMENT_COLUMNS = (*IDENTITY, *evaluation.SAMPLE_COLUMNS)
#: Columns of the per-task table (the harness's metrics; ``seconds``: the wall time of the
#: evaluation when computed, a group's shared passes counted where they ran; ``cached``: read back).
RESULT_COLUMNS = (*IDENTITY, "pruned_share", *evaluation.COLUMNS, "seconds", "cached")
#: How many pruned models share one forward pass by default.
GROUP_SIZE = 32


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` for the block (None: unchanged)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _encode(result: tuple[pd.DataFrame, pd.DataFrame], describe: Mapping[str, Any]):
    table, docs = result
    return {"table.parquet": _parquet(table), "documents.parquet": _parquet(docs)}, {
        "describe": dict(describe), "versions": package_versions(("torch", "transformers", "lm_eval", "moe-collab-study"))}


def _decode(folder: Path, manifest: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(folder / "table.parquet"), pd.read_parquet(folder / "documents.parquet")


def _groups(compressions: Sequence[Compression], todo: list[int], batch_masks: bool, group_size: int) -> list[list[int]]:
    """The compressions to compute, as groups that share forward passes: pruned ones ``group_size``
    at a time (one at a time without ``batch_masks``), each merge alone."""
    pruned = [i for i in todo if not compressions[i].merged]
    size = max(1, group_size) if batch_masks else 1
    return [pruned[i: i + size] for i in range(0, len(pruned), size)] + [[i] for i in todo if compressions[i].merged]


def evaluate_compressions(model, tokenizer, compressions: Sequence[Compression], runs: Sequence[Mapping[str, Any]], *,
                          cache_dir: str | os.PathLike | None, batch_masks: bool = True, group_size: int = GROUP_SIZE,
                          max_tokens: int = MAX_TOKENS, model_id: Mapping[str, Any] | None = None,
                          threads: int | None = None, progress: bool = True,
                          **settings: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate ``model`` under every compression on every run, keeping every document's result.

    Args:
        compressions: the compressed models (:func:`moe_utils.compression.pruning.unpruned_mask` for the
            reference); duplicates by digest are evaluated once.
        runs: harness calls, ``{"tasks": [...], "limit": n}`` and optionally ``"num_fewshot"``
            (:func:`moe_utils.compression.pruning.evaluation_runs`).
        cache_dir: the evaluation cache (None: nothing kept); a cached entry is read, not re-run.
        batch_masks: score the pruned compressions ``group_size`` at a time in shared forward passes.
        max_tokens: rows x padded length of one shared forward pass.
        model_id: the model's identity in the keys (default :func:`moe_utils.capture.routing.model_identity`).
        threads: torch's intra-op threads during the evaluations (None: unchanged; not in the key).
            A model of a few million parameters gains nothing from several, and on a busy machine
            they make every forward pass wait for the slowest core.
        settings: other keyword arguments of :func:`moe_utils.evaluation.harness.run_harness`
            (num_fewshot, batch_size, max_length, categories, data_dir, wikitext_dir, blimp_dir).

    Returns:
        ``(results, documents)``: one row per compression, run's task and metric
        (:data:`RESULT_COLUMNS`) and one row per compression and document (:data:`DOCUMENT_COLUMNS`),
        in the order of ``compressions`` and ``runs``; ``seed`` is a nullable integer.
    """
    model_id = dict(model_id) if model_id is not None else model_identity(model)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    cache = KeyedCache(cache_dir, "eval")
    scorer = "multi_mask" if batch_masks else "hflm"
    found: dict[tuple[int, int], tuple[pd.DataFrame, pd.DataFrame, bool]] = {}
    bar = tqdm(total=len(compressions) * len(runs), desc="evaluating compressed models", disable=not progress)
    for r, run in enumerate(runs):
        run_settings = {**settings, **({"num_fewshot": run["num_fewshot"]} if "num_fewshot" in run else {})}
        spec = {"tasks": list(run["tasks"]), "limit": run.get("limit"), "per_document": True, "scorer": scorer}
        keys = [evaluation_key(c, spec, run_settings, model_id) for c in compressions]
        first: dict[str, int] = {}
        for i, c in enumerate(compressions):
            first.setdefault(c.digest, i)
            hit = cache.load(keys[i]) if first[c.digest] == i else None
            if hit is not None:
                found[(i, r)] = (*_decode(*hit), True)
                bar.update()
        todo = [i for i in first.values() if (i, r) not in found]
        prepared = _prepared(run, run_settings) if todo and batch_masks else None
        with evaluation.requests_reused(prepared[0]) if prepared else contextlib.nullcontext():
            for group in _groups(compressions, todo, batch_masks, group_size):
                for i, result in zip(group, _compute(model, tokenizer, [compressions[i] for i in group], run,
                                                     run_settings, prepared, max_tokens, threads)):
                    cache.store(keys[i], *_encode(result, {"method": compressions[i].method,
                                                            "ratio": compressions[i].ratio, "seed": compressions[i].seed,
                                                            "run": spec, "settings": run_settings, "model": model_id}))
                    found[(i, r)] = (*result, False)
                    bar.update()
        for i, c in enumerate(compressions):  # duplicates read their first's entry
            if (i, r) not in found:
                found[(i, r)] = found[(first[c.digest], r)]
                bar.update()
    bar.close()
    tables, docs = [], []
    for i, c in enumerate(compressions):
        ident = {"method": c.method, "ratio": c.ratio, "seed": c.seed, "digest": c.digest}
        for r in range(len(runs)):
            table, frame, cached = found[(i, r)]
            tables.append(table.assign(**ident, pruned_share=c.pruned_share, cached=cached))
            docs.append(frame.assign(**ident))
    results = pd.concat(tables, ignore_index=True)[list(RESULT_COLUMNS)]
    documents = pd.concat(docs, ignore_index=True)[list(DOCUMENT_COLUMNS)]
    for frame in (results, documents):
        frame["seed"] = frame["seed"].astype("Int64")
    return results, documents


def _harness_settings(settings: Mapping[str, Any]) -> tuple[dict, int, int | None, int | None]:
    """``settings`` split into the task-building ones, and batch size, max length and num_fewshot."""
    harness = dict(settings)
    return harness, harness.pop("batch_size", 8), harness.pop("max_length", None), harness.pop("num_fewshot", None)


def _prepared(run: Mapping[str, Any], settings: Mapping[str, Any]) -> tuple[list, Any]:
    """The harness's tasks of ``run`` (:func:`moe_utils.evaluation.harness.harness_tasks`), built once
    for every group of the run."""
    return evaluation.harness_tasks(run["tasks"], limit=run.get("limit"), **_harness_settings(settings)[0])


def _compute(model, tokenizer, group: list[Compression], run: Mapping[str, Any], settings: Mapping[str, Any],
             prepared: tuple[list, Any] | None, max_tokens: int,
             threads: int | None) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """The harness's table and documents of every compression of ``group`` on ``run``: with
    ``prepared`` (the run's tasks, their requests built once: :func:`moe_utils.evaluation.harness.requests_reused`)
    in shared passes, else with the plain harness model."""
    harness, batch_size, max_length, num_fewshot = _harness_settings(settings)
    limit = run.get("limit")
    out = []
    with torch_threads(threads):
        if prepared is None:  # the plain harness model, one compression at a time
            (compression,) = group
            start = time.perf_counter()
            with merging.applied(model, compression):
                raw = evaluation.run_harness(model, tokenizer, run["tasks"], limit=limit, log_samples=True,
                                             bootstrap_iters=0, batch_size=batch_size, max_length=max_length,
                                             num_fewshot=num_fewshot, **harness)
            table = evaluation.results_table(raw).assign(seconds=time.perf_counter() - start)
            return [(table, evaluation.sample_table(raw))]
        merged = group[0] if group[0].merged else None
        was_training = model.training
        with merging.applied(model, merged) if merged is not None else contextlib.nullcontext():
            start = time.perf_counter()
            keeps = [np.ones_like(merged.keep)] if merged is not None else [c.keep for c in group]
            lm = MultiMaskLM(model, tokenizer, keeps, batch_size=batch_size, max_length=max_length,
                             max_tokens=max_tokens)
            for index in range(len(group)):
                lm.select(index)
                raw = evaluation.run_harness(model, tokenizer, run["tasks"], limit=limit, log_samples=True,
                                             bootstrap_iters=0, num_fewshot=num_fewshot, lm=lm, prepared=prepared)
                now = time.perf_counter()
                out.append((evaluation.results_table(raw).assign(seconds=now - start), evaluation.sample_table(raw)))
                start = now
        model.train(was_training)
    return out
