"""Downstream evaluation of in-memory (masked, pruned) models with EleutherAI's lm-evaluation-harness.

The paper this study reproduces, "Unveiling Hidden Collaboration within Mixture-of-Experts in LLMs"
(arXiv 2504.12359), evaluates its pruned models zero-shot with the EleutherAI lm-evaluation-harness.
:func:`evaluate` runs the *real* harness (``lm_eval.simple_evaluate`` on an
``lm_eval.models.huggingface.HFLM`` wrapping the model object), so a model whose experts are
masked or pruned in memory (hooks, edited weights) is evaluated as it is, without saving it, and
the result comes back as a tidy :class:`pandas.DataFrame` with columns
``task, metric, value, stderr, n`` (one row per task x metric; ``n`` is the number of documents
evaluated; ``stderr`` is NaN where the harness gives none).

Task names this module defines (anything else goes to the harness's stock tasks unchanged, e.g.
``arc_challenge``, ``hellaswag``, ``mmlu``, ``leaderboard_mmlu_pro``; those need the Hub):

``mmlu_pro_mc`` (group), ``mmlu_pro_mc_<category>``
    MMLU-Pro multiple choice by log-likelihood of the answer letter (" A", " B", ...), set up like
    the stock ``leaderboard_mmlu_pro`` (5-shot by default, ``first_n`` few-shot sampler, metric
    ``acc``, the stock prompt ``"{question}\\nA. ...\\nAnswer:"`` through
    :func:`moe_utils.evaluation.data.format_prompt`, the same prompts whose routing the study captures), on
    cleaned data (stripped options and question, the answer letter trusted), with the 5
    validation questions of the same category as few-shot examples. The group row is the
    size-weighted (= pooled) accuracy. ``acc_norm`` is not reported: every choice is one letter, so it always equals ``acc``.
``mmlu_pro_ppl`` (group), ``mmlu_pro_ppl_<category>``
    Perplexity of the question text of one category (``loglikelihood_rolling``): metrics
    ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte`` as the harness computes them for
    rolling tasks. The group expands to its categories; it has no pooled row (the harness can
    only average perplexities, which is not a perplexity).
``wikitext2_ppl``
    WikiText-2 test perplexity, one document per article, same metrics, words counted as
    :func:`moe_utils.evaluation.wikitext.count_words` (see ``tasks/wikitext2_ppl.yaml``).

``blimp`` (group), ``blimp_<paradigm>``
    BLiMP minimal pairs (:mod:`moe_utils.evaluation.blimp`): lm-eval's stock ``blimp_<paradigm>`` tasks
    (``tasks/blimp.yaml``: both sentences scored after the end-of-text token, right when the
    grammatical one is likelier; metric ``acc``) on data from ``blimp_dir``, else
    ``$MOE_BLIMP_DIR``, else the Hub's ``nyu-mll/blimp``. The group expands to the 67 paradigm
    tasks and has no pooled row: BLiMP's score is the macro average over paradigms
    (:func:`moe_utils.evaluation.blimp.macro_accuracy` of :func:`sample_table`).

``<category>`` is a slug of an MMLU-Pro category (spaces become underscores:
``computer_science``). The small embedded model's multiple-choice accuracy sits near chance
(1/10 for most questions), which is why the per-category perplexities exist: they move
measurably when experts are pruned.

Data-path mechanism: the static part of each task is a YAML template shipped in
``moe_utils/evaluation/tasks/`` (``mmlu_pro_mc.yaml``, ``mmlu_pro_ppl.yaml``, ``wikitext2_ppl.yaml``).
:func:`build_tasks` reads a template, adds the run-time parts (task name, the prompt functions,
and a ``custom_dataset`` callable that returns the already loaded and cleaned rows) and builds an
``lm_eval`` ``ConfigurableTask`` from the dict; no YAML is written and no ``include_path`` is
needed. The rows come from the project's loaders: MMLU-Pro from
:func:`moe_utils.evaluation.data.load_mmlu_pro` (``data_dir``, else ``$MOE_MMLU_PRO_DIR``, else the Hub
``TIGER-Lab/MMLU-Pro``; options stripped, the answer letter trusted), WikiText-2 from
:func:`moe_utils.evaluation.wikitext.load_wikitext` (``wikitext_dir``, else ``$MOE_WIKITEXT_DIR``, else the
Hub ``wikitext`` / ``wikitext-2-v1``). This module does not touch ``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE``: set them yourself on a machine without the Hub, or a Hub lookup (stock
tasks, a missing local path) retries for about 25 s before failing.

Side effects of the harness worth knowing: ``simple_evaluate`` re-seeds Python's, NumPy's and
torch's global random generators (its defaults 0 / 1234 / 1234), and ``HFLM`` puts the model in
eval mode (restored afterwards here) and calls its ``tie_weights()``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
import yaml

from moe_utils.evaluation import blimp
from moe_utils.evaluation.data import LETTERS, MMLU_PRO_ENV, format_prompt, load_mmlu_pro
from moe_utils.evaluation.wikitext import WIKITEXT_ENV, count_words, load_wikitext, logit_batch_size
from moe_utils.models.loading import NonFiniteError

log = logging.getLogger(__name__)

#: Directory of the YAML task templates.
TASKS_DIR = Path(__file__).parent / "tasks"
MC_GROUP = "mmlu_pro_mc"
PPL_GROUP = "mmlu_pro_ppl"
WIKITEXT_TASK = "wikitext2_ppl"
#: The 14 MMLU-Pro categories, as the data set spells them.
MMLU_PRO_CATEGORIES = (
    "biology", "business", "chemistry", "computer science", "economics", "engineering", "health",
    "history", "law", "math", "other", "philosophy", "physics", "psychology",
)
#: Columns of the table :func:`evaluate` returns.
COLUMNS = ("task", "metric", "value", "stderr", "n")

_HEADING = re.compile(r"^ = [^=].* = $")  # a WikiText article title line (sections have "= =")


# ------------------------------------------------------------------------------------ names
def category_slug(category: str) -> str:
    """``"computer science"`` -> ``"computer_science"`` (the form used in task names)."""
    return category.strip().replace(" ", "_")


def resolve_category(name: str) -> str:
    """Return the MMLU-Pro category named by ``name`` (spelled as in the data, or as a slug).

    Raises ValueError, listing the valid slugs, for anything else.
    """
    by_slug = {category_slug(c): c for c in MMLU_PRO_CATEGORIES}
    key = category_slug(str(name)).lower()
    if key not in by_slug:
        raise ValueError(
            f"unknown MMLU-Pro category {name!r}; valid categories: {sorted(by_slug)}"
        )
    return by_slug[key]


def _resolve_categories(categories: Iterable[str] | str | None) -> list[str]:
    if categories is None:
        return list(MMLU_PRO_CATEGORIES)
    if isinstance(categories, str):
        categories = [categories]
    resolved = list(dict.fromkeys(resolve_category(c) for c in categories))
    if not resolved:
        raise ValueError("categories is empty; pass None for all MMLU-Pro categories")
    return resolved


def _parse(name: str) -> tuple[str, str | None] | None:
    """``(kind, category)`` for a name this module defines, None for a stock harness task.

    kind is ``"mc"`` or ``"ppl"`` (category None for the group), ``"wikitext"`` or ``"blimp"``
    (the paradigm in place of the category).
    """
    if name == WIKITEXT_TASK:
        return "wikitext", None
    if name == blimp.GROUP:
        return "blimp", None
    if blimp.paradigm_of(name) is not None:
        return "blimp", blimp.paradigm_of(name)
    for kind, prefix in (("mc", MC_GROUP), ("ppl", PPL_GROUP)):
        if name == prefix:
            return kind, None
        if name.startswith(prefix + "_"):
            return kind, resolve_category(name[len(prefix) + 1:])
    return None


# ------------------------------------------------------------------------ prompt functions
def mc_doc_to_text(doc: Mapping[str, Any]) -> str:
    """The multiple-choice prompt: ``"{question}\\nA. ...\\nAnswer:"`` (stock leaderboard format)."""
    return format_prompt(doc)


def mc_doc_to_choice(doc: Mapping[str, Any]) -> list[str]:
    """One letter per option; the harness scores ``target_delimiter + letter`` (``" A"``)."""
    return list(LETTERS[: len(doc["options"])])


def ppl_doc_to_target(doc: Mapping[str, Any]) -> str:
    """The text whose perplexity ``mmlu_pro_ppl_*`` measures: the question, stripped."""
    return str(doc["question"]).strip()


def blimp_doc_to_choice(doc: Mapping[str, Any]) -> list[str]:
    """The two sentences of a BLiMP pair, the grammatical one first (the stock task's
    ``{{[sentence_good, sentence_bad]}}``, without compiling a Jinja template for every pair)."""
    return [doc["sentence_good"], doc["sentence_bad"]]


def wikitext_process_results(doc: Mapping[str, Any], results: Sequence[Any]) -> dict[str, tuple]:
    """Per-document (log-likelihood, count) pairs; words as :func:`moe_utils.evaluation.wikitext.count_words`."""
    (loglikelihood,) = results
    n_bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, count_words(doc["page"])),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


def wikitext_documents(text: str) -> list[str]:
    """Split a WikiText-2 split into articles: each from a ``" = Title = "`` line to the next.

    Each article keeps its lines exactly as in the file, newlines included; blank lines before
    the first title are dropped.
    """
    docs: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")):
            docs.append([])
        if docs:
            docs[-1].append(line)
    return ["".join(lines) for lines in docs]


def article_opening(article: str, words: int | None) -> str:
    """The first whole lines of ``article`` that hold at least ``words`` words (None: all of it).

    Scoring the openings of many articles instead of a few whole ones buys more independent units
    for a bootstrap over articles at the same cost (a model's perplexity is then that of the
    openings: stage 4 says so where it reports it)."""
    if words is None:
        return article
    if words < 1:
        raise ValueError(f"wikitext_words must be a positive number of words, got {words}")
    kept, count = [], 0
    for line in article.splitlines(keepends=True):
        if count >= words:
            break
        kept.append(line)
        count += len(line.split())
    return "".join(kept)


# ------------------------------------------------------------------------------ task build
def _template(name: str) -> dict[str, Any]:
    with open(TASKS_DIR / f"{name}.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _dataset_dict(splits: Mapping[str, pd.DataFrame]):
    import datasets

    return datasets.DatasetDict(
        {split: datasets.Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False)
         for split, df in splits.items()}
    )


def _returning(dataset, **_ignored):
    """``custom_dataset`` callable: the harness passes the task metadata as keyword arguments."""
    return dataset


@functools.lru_cache(maxsize=4)
def _load_split(split: str, data_dir: str | None, env_dir: str | None) -> pd.DataFrame:
    """One cleaned MMLU-Pro split per (split, location): a pruning study evaluates dozens of
    models on the same questions. ``env_dir`` is ``$MOE_MMLU_PRO_DIR``, part of the key only."""
    return load_mmlu_pro(split, data_dir)


class _MmluPro:
    """Hands out the MMLU-Pro questions of one category, from splits loaded once per process."""

    def __init__(self, data_dir: str | os.PathLike | None):
        self.data_dir = data_dir

    def _split(self, split: str) -> pd.DataFrame:
        data_dir = None if self.data_dir is None else str(self.data_dir)
        return _load_split(split, data_dir, os.environ.get(MMLU_PRO_ENV))

    @property
    def test(self) -> pd.DataFrame:
        return self._split("test")

    @property
    def validation(self) -> pd.DataFrame:
        return self._split("validation")

    def rows(self, split: str, category: str) -> pd.DataFrame:
        df = getattr(self, split)
        out = df[df["category"] == category]
        if out.empty:
            raise ValueError(
                f"MMLU-Pro {split} split has no questions of category {category!r} "
                f"(data from {self.data_dir or os.environ.get(MMLU_PRO_ENV) or 'the Hub'})"
            )
        return out


@contextlib.contextmanager
def _quiet_custom_dataset_warning():
    """Silence the harness's per-task advice on ``--metadata`` for custom datasets (14x per group)."""
    logger = logging.getLogger("lm_eval.api.task")

    def keep(record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _mc_task(category: str, source: _MmluPro):
    from lm_eval.api.task import ConfigurableTask

    cfg = _template(MC_GROUP)
    dataset = _dataset_dict({"test": source.rows("test", category),
                             "validation": source.rows("validation", category)})
    cfg.update(
        task=f"{MC_GROUP}_{category_slug(category)}",
        custom_dataset=functools.partial(_returning, dataset),
        doc_to_text=mc_doc_to_text,
        doc_to_choice=mc_doc_to_choice,
    )
    return ConfigurableTask(config=cfg)


def _ppl_task(category: str, source: _MmluPro):
    from lm_eval.api.task import ConfigurableTask

    cfg = _template(PPL_GROUP)
    dataset = _dataset_dict({"test": source.rows("test", category)})
    cfg.update(
        task=f"{PPL_GROUP}_{category_slug(category)}",
        custom_dataset=functools.partial(_returning, dataset),
        doc_to_target=ppl_doc_to_target,
    )
    return ConfigurableTask(config=cfg)


def _wikitext_task(wikitext_dir: str | os.PathLike | None, words: int | None = None):
    from lm_eval.api.task import ConfigurableTask

    cfg = _template(WIKITEXT_TASK)
    docs = [article_opening(d, words) for d in wikitext_documents(load_wikitext("test", wikitext_dir))]
    log.info("WikiText-2 test: %d articles from %s", len(docs),
             wikitext_dir or os.environ.get(WIKITEXT_ENV) or "the Hub")
    dataset = _dataset_dict({"test": pd.DataFrame({"page": docs})})
    cfg.update(custom_dataset=functools.partial(_returning, dataset),
               process_results=wikitext_process_results)
    return ConfigurableTask(config=cfg)


def _blimp_task(paradigm: str, blimp_dir: str | os.PathLike | None, limit: int | float | None):
    from lm_eval.api.task import ConfigurableTask

    pairs = blimp.load_paradigm(paradigm, blimp_dir)
    if isinstance(limit, int):  # the harness evaluates the first `limit` pairs: building the task on
        pairs = pairs.head(limit)  # those alone gives the same requests, ~10x faster for 67 tasks
    cfg = _template(blimp.GROUP)
    cfg.update(task=blimp.task_name(paradigm), doc_to_choice=blimp_doc_to_choice,
               custom_dataset=functools.partial(_returning, _dataset_dict({"train": pairs})))
    return ConfigurableTask(config=cfg)


def build_tasks(
    tasks: Sequence[str] | str,
    *,
    data_dir: str | os.PathLike | None = None,
    wikitext_dir: str | os.PathLike | None = None,
    categories: Iterable[str] | None = None,
    blimp_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    wikitext_words: int | None = None,
) -> list:
    """Turn task names into what ``lm_eval.simple_evaluate(tasks=...)`` takes.

    Names this module defines become ``ConfigurableTask`` objects (groups: an ``lm_eval`` ``Group``
    for ``mmlu_pro_mc``, the category tasks for ``mmlu_pro_ppl``) with their data loaded; other
    names are returned unchanged for the harness's ``TaskManager``. ``categories`` restricts the
    two MMLU-Pro groups (not explicitly named category tasks). A category task also covered by a
    requested group is built once. ``limit`` (the harness's, when it is a count) builds each BLiMP
    task on its first ``limit`` pairs only; ``wikitext_words`` scores each WikiText-2 article's opening
    only (:func:`article_opening`). Raises ValueError for an unknown MMLU-Pro category.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ValueError("no tasks given")
    group_cats = _resolve_categories(categories)
    parsed = [(name, _parse(name)) for name in tasks]  # validates every name before any loading
    groups_asked = {p[0] for _, p in parsed if p is not None and p[1] is None and p[0] != "wikitext"}
    expanded = [(blimp.task_name(p), ("blimp", p)) for p in blimp.paradigms()]
    parsed = [item for name, spec in parsed
              for item in (expanded if spec == ("blimp", None) else [(name, spec)])]
    source = _MmluPro(data_dir)
    out: list = []
    seen: set[str] = set()
    with _quiet_custom_dataset_warning():
        for name, spec in parsed:
            if name in seen:
                continue
            seen.add(name)
            if spec is None:
                out.append(name)
                continue
            kind, category = spec
            if kind == "wikitext":
                out.append(_wikitext_task(wikitext_dir, wikitext_words))
            elif kind == "blimp":
                out.append(_blimp_task(category, blimp_dir, limit))
            elif category is not None:
                if kind in groups_asked and category in group_cats:
                    log.debug("%s is part of the requested group; evaluated once", name)
                    continue
                out.append((_mc_task if kind == "mc" else _ppl_task)(category, source))
            elif kind == "mc":
                from lm_eval.api.group import Group
                from lm_eval.config.group import AggMetricConfig

                group = Group(
                    name=MC_GROUP,
                    aggregate_metric_list=[AggMetricConfig(metric="acc", filter_list=["none"],
                                                           aggregation="mean", weight_by_size=True)],
                    metadata={"version": 1.0},
                )
                for c in group_cats:
                    group.add(_mc_task(c, source))
                out.append(group)
            else:  # the ppl group: its category tasks, no pooled row
                out.extend(_ppl_task(c, source) for c in group_cats)
    return out


# -------------------------------------------------------------------------------- evaluate
def harness_tasks(
    tasks: Sequence[str] | str,
    *,
    limit: int | float | None = None,
    data_dir: str | os.PathLike | None = None,
    categories: Iterable[str] | None = None,
    wikitext_dir: str | os.PathLike | None = None,
    blimp_dir: str | os.PathLike | None = None,
    wikitext_words: int | None = None,
) -> tuple[list, Any]:
    """``(tasks, task_manager)`` as ``simple_evaluate`` takes them (:func:`build_tasks`, data loaded):
    built once, they serve every :func:`run_harness` call with the same tasks and ``limit`` (the
    harness builds each run's requests afresh from them). The stock task index is built only when
    a stock task is asked for (it takes ~10 s); ValueError for an unknown task."""
    from lm_eval.tasks import TaskManager

    specs = build_tasks(tasks, data_dir=data_dir, wikitext_dir=wikitext_dir, categories=categories,
                        blimp_dir=blimp_dir, limit=limit, wikitext_words=wikitext_words)
    stock = [s for s in specs if isinstance(s, str)]
    task_manager = TaskManager() if stock else TaskManager(include_defaults=False)
    if stock:
        known = set(task_manager.all_tasks)
        unknown = [s for s in stock if s not in known and not Path(s).is_file()]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}: neither defined here "
                             f"({MC_GROUP}[_<category>], {PPL_GROUP}[_<category>], {WIKITEXT_TASK}, "
                             f"{blimp.GROUP}[_<paradigm>]) "
                             "nor lm-eval stock tasks")
    return specs, task_manager


@contextlib.contextmanager
def requests_reused(specs: Sequence) -> Iterator[None]:
    """While active, each task object of ``specs`` (:func:`harness_tasks`) builds its requests (the
    contexts, continuations and rolling windows of ``Task.build_all_requests``) on its first run
    only; a later run with the same arguments and few-shot setting gets the same ``Instance`` objects
    back, their responses cleared, and the harness does the rest as on every run: it asks the model,
    applies the task's filters, ``process_results`` and aggregation (each task's configuration, which
    the harness copies into every result, is also dumped once). For scoring many pruned models
    on the same documents (:func:`moe_utils.compression.evaluate.evaluate_compressions`): the
    requests do not depend on the model, and building them was most of the harness's own time per
    run (BLiMP's 67 tasks). Stock tasks given by name are built afresh by the harness on every run."""
    from lm_eval.api.group import Group
    from lm_eval.api.task import Task

    tasks = [task for spec in specs for task in
             (spec.get_all_tasks() if isinstance(spec, Group) else [spec] if isinstance(spec, Task) else [])]
    for task in tasks:
        task.build_all_requests = _built_once(task, task.build_all_requests)
        task.dump_config = _dumped_once(task, task.dump_config)
    try:
        yield
    finally:
        for task in tasks:
            for name in ("build_all_requests", "dump_config"):
                vars(task).pop(name, None)  # the class's own method again


def _dumped_once(task, dump):
    """``task.dump_config`` computed once per ``num_fewshot`` (the harness copies every task's whole
    configuration into every run's result; only the few-shot setting changes between runs)."""
    dumped: dict[Any, dict] = {}

    def dump_or_reuse() -> dict:
        key = task.config.num_fewshot
        if key not in dumped:
            dumped[key] = dump()
        return dumped[key]

    return dump_or_reuse


def _built_once(task, build):
    """``task.build_all_requests`` that builds on the first call and, on a later call with the same
    arguments and ``num_fewshot``, only clears the responses of the instances it built."""
    built: dict[str, Any] = {}

    def build_or_reuse(**kwargs: Any) -> None:
        key = (task.config.num_fewshot, kwargs)
        if built.get("key") != key:
            build(**kwargs)
            built["key"] = key
            return
        for instance in task.instances:
            instance.resps, instance.filtered_resps = [], {}

    return build_or_reuse


def run_harness(
    model,
    tokenizer,
    tasks: Sequence[str] | str,
    *,
    limit: int | float | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    categories: Iterable[str] | None = None,
    wikitext_dir: str | os.PathLike | None = None,
    bootstrap_iters: int = 100,
    log_samples: bool = False,
    blimp_dir: str | os.PathLike | None = None,
    lm: Any = None,
    prepared: tuple[list, Any] | None = None,
    wikitext_words: int | None = None,
) -> dict:
    """Run lm-evaluation-harness on an in-memory causal LM; return the raw ``simple_evaluate`` result.

    The arguments are those of :func:`evaluate`; ``wikitext_words``: score each WikiText-2
    article's opening only (:func:`article_opening`); ``log_samples`` keeps the harness's per-document
    log (``result["samples"]``). ``lm``: the harness model to use instead of a fresh ``HFLM`` over
    ``model`` (e.g. :class:`moe_utils.evaluation.multi_mask.MultiMaskLM`); ``prepared``: :func:`harness_tasks`
    of these tasks and ``limit``, built earlier. The harness's environment report is skipped and
    the model's train mode is restored afterwards.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    specs, task_manager = prepared if prepared is not None else harness_tasks(
        tasks, limit=limit, data_dir=data_dir, categories=categories, wikitext_dir=wikitext_dir, blimp_dir=blimp_dir,
        wikitext_words=wikitext_words)
    was_training = model.training
    if lm is None:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        if (capped := logit_batch_size(model, batch_size, lm.max_length)) < batch_size:  # a batch's logits, at worst
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=capped, max_length=max_length)
    _require_finite(lm)
    log.info("evaluating %s (limit=%s, num_fewshot=%s, max_length=%d, batch_size=%s)",
             list(tasks) if not isinstance(tasks, str) else [tasks], limit, num_fewshot,
             lm.max_length, lm.batch_size)
    try:
        # The harness's environment report (torch's collect_env: pip and nvidia-smi subprocesses)
        # costs ~0.5 s per call, and its `git describe` of the working directory one more
        # subprocess per call; neither is part of what this module returns.
        with mock.patch("lm_eval.evaluator.add_env_info", _skip_environment_report), \
                mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None), _quiet_progress():
            return lm_eval.simple_evaluate(
                model=lm, tasks=specs, limit=limit, num_fewshot=num_fewshot,
                bootstrap_iters=bootstrap_iters, task_manager=task_manager, log_samples=log_samples,
            )
    finally:
        model.train(was_training)


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str] | str,
    *,
    limit: int | float | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    categories: Iterable[str] | None = None,
    wikitext_dir: str | os.PathLike | None = None,
    bootstrap_iters: int = 100,
    blimp_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Evaluate an in-memory causal LM with lm-evaluation-harness; return a tidy table.

    Args:
        model: a ``transformers`` causal LM object, already on its device (hooks and masks stay
            active during the evaluation).
        tokenizer: its tokenizer object.
        tasks: task names (see the module docstring); other names go to the harness's stock
            tasks (a stock task name or YAML path; ValueError for anything else).
        limit: documents per task (the first ones of the split), or a fraction if < 1.
        data_dir: local MMLU-Pro parquet directory (else ``$MOE_MMLU_PRO_DIR``, else the Hub).
        batch_size, max_length: passed to ``HFLM`` (max_length None: the model's own).
        num_fewshot: overrides every task's default (5 for ``mmlu_pro_mc*``); perplexity tasks
            stay 0-shot.
        categories: restrict the ``mmlu_pro_mc`` / ``mmlu_pro_ppl`` groups to these categories
            (names or slugs, e.g. the paper's five ``moe_utils.evaluation.data.PAPER_CATEGORIES``).
        wikitext_dir: local WikiText-2 directory (else ``$MOE_WIKITEXT_DIR``, else the Hub).
        blimp_dir: local BLiMP directory (else ``$MOE_BLIMP_DIR``, else the Hub).
        bootstrap_iters: for the harness's stderr. This module's tasks never bootstrap (the
            accuracy stderr is closed-form, perplexities get none), so it only matters for stock
            tasks with bootstrapped metrics; 0 turns every stderr off.

    Returns:
        DataFrame with columns ``task, metric, value, stderr, n``: one row per task (and
        ``mmlu_pro_mc`` group) and metric; ``metric`` is the harness's metric name, followed by
        ``,<filter>`` for a filter other than ``none``.
    """
    return results_table(run_harness(
        model, tokenizer, tasks, limit=limit, data_dir=data_dir, batch_size=batch_size, max_length=max_length,
        num_fewshot=num_fewshot, categories=categories, wikitext_dir=wikitext_dir, bootstrap_iters=bootstrap_iters,
        blimp_dir=blimp_dir,
    ))


def _require_finite(lm) -> None:
    """Make the harness model's log-likelihood methods raise :class:`~moe_utils.models.loading.NonFiniteError`,
    naming the task and document, for a NaN or infinite log-likelihood: a broken model must stop the
    run, not score 100% on BLiMP (NaN comparisons) or report a perplexity of nan."""
    def checked(method):
        @functools.wraps(method)
        def wrapper(requests, *args, **kwargs):
            results = method(requests, *args, **kwargs)
            for request, result in zip(requests, results):
                value = result[0] if isinstance(result, tuple) else result
                if not math.isfinite(float(value)):
                    raise NonFiniteError(f"task {request.task_name}, document {request.doc_id}: the model's "
                                         f"log-likelihood is {value} (NaN or inf); its weights are broken, check "
                                         "the checkpoint")
            return results
        return wrapper

    if getattr(lm, "_finite_checked", False):  # a harness model used for several runs is wrapped once
        return
    lm.loglikelihood = checked(lm.loglikelihood)
    lm.loglikelihood_rolling = checked(lm.loglikelihood_rolling)
    lm._finite_checked = True


#: The harness's modules that draw progress bars: one per task while building its requests, one per
#: request type while tokenizing and scoring.
_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


def _silent_tqdm(*args: Any, **kwargs: Any):
    """``tqdm`` with its bar off, whatever the caller asked for."""
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """The harness's own progress bars off during a run: a stage that scores a hundred models
    shows one bar for its whole loop, not thousands of short ones in its executed notebook."""
    with contextlib.ExitStack() as stack:
        for module in _BAR_MODULES:
            stack.enter_context(mock.patch(f"{module}.tqdm", _silent_tqdm))
        yield


def _skip_environment_report(storage: dict) -> None:
    storage["pretty_env_info"] = "not collected by moe_utils.evaluation.harness.evaluate"


def results_table(results: Mapping[str, Any]) -> pd.DataFrame:
    """The tidy ``task, metric, value, stderr, n`` table of a ``simple_evaluate`` result."""
    n_samples = results.get("n-samples", {})
    groups = results.get("groups", {})
    rows = []
    for name, metrics in {**results["results"], **groups}.items():
        if name in n_samples:
            n = n_samples[name]["effective"]
        else:  # a group: the documents of its tasks
            n = metrics.get("sample_len")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({
                "task": name,
                "metric": metric if filt == "none" else key,
                "value": _number(value),
                "stderr": _number(stderr),
                "n": pd.NA if n is None else int(n),
            })
    table = pd.DataFrame(rows, columns=list(COLUMNS)).drop_duplicates(["task", "metric"])
    table["n"] = table["n"].astype("Int64")
    return table.reset_index(drop=True)


def _number(x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):  # "N/A", None
        return math.nan
    return value


def _target_index(sample: Mapping[str, Any]) -> int:
    """The position of a multiple-choice sample's right answer among its choices: its ``target``
    when that is an index, else the choice whose continuation is the target (an answer letter)."""
    target = sample["target"]
    if isinstance(target, (int, float)) or str(target).isdigit():
        return int(target)
    choices = [str(arguments[1]).strip() for arguments in sample["arguments"]]
    return choices.index(str(target).strip())


#: Columns of :func:`sample_table`.
SAMPLE_COLUMNS = ("task", "doc_id", "question_id", "correct", "loglikelihood", "n_words", "n_bytes", "margin")


def sample_table(results: Mapping[str, Any]) -> pd.DataFrame:
    """One row per evaluated document of a ``run_harness(..., log_samples=True)`` result, for the
    paired statistics of a pruning study (every model sees the same documents).

    MMLU-Pro documents carry their ``question_id`` (NaN for other documents), so that a stage can
    leave out the questions it fitted its pruning on. Multiple-choice documents (BLiMP pairs, MMLU-Pro questions) get ``correct`` (0/1, the harness's
    ``acc``) and ``margin``: the log-likelihood of the target choice minus the best other choice
    (for a BLiMP pair: log P(good) - log P(bad)). Rolling-perplexity documents get their
    ``loglikelihood`` (nats), ``n_words`` and ``n_bytes`` (the counts the task's metrics divide by).
    """
    rows = []
    for task, samples in results["samples"].items():
        for s in samples:
            row = dict.fromkeys(SAMPLE_COLUMNS, math.nan) | {"task": task, "doc_id": int(s["doc_id"])}
            if isinstance(s.get("doc"), Mapping) and "question_id" in s["doc"]:
                row["question_id"] = float(s["doc"]["question_id"])
            if "acc" in s:
                row["correct"] = float(s["acc"])
                lls = [float(r[0]) for r in s["filtered_resps"]]
                target = _target_index(s)
                row["margin"] = lls[target] - max(ll for i, ll in enumerate(lls) if i != target)
            elif "word_perplexity" in s:
                row["loglikelihood"], row["n_words"] = s["word_perplexity"]
                row["n_bytes"] = s["byte_perplexity"][1]
            rows.append(row)
    frame = pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))
    frame["question_id"] = frame["question_id"].astype("Int64")
    return frame.sort_values(["task", "doc_id"], kind="stable").reset_index(drop=True)
