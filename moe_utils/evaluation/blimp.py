"""BLiMP (Warstadt et al. 2020): 67 paradigms of English minimal pairs, the accuracy task a small LM can do.

Each pair is a grammatical ``sentence_good`` and an ungrammatical ``sentence_bad`` that differ in
one phenomenon; a model is right when it gives the good sentence the higher total log-probability
(chance: 50%). Unlike MMLU-Pro multiple choice, where the embedded 7M-parameter model sits at
chance, a small model trained on a few million words is clearly above chance here, so pruning
damage shows as lost accuracy. The study evaluates it through lm-evaluation-harness's stock
``blimp_<paradigm>`` tasks with the data source swapped (:mod:`moe_utils.evaluation.harness`).

Data: ``data_dir``, else ``$MOE_BLIMP_DIR`` (a directory of ``<paradigm>.jsonl``, the authors'
release), else the Hub's ``nyu-mll/blimp`` (one config per paradigm, same fields). The 67
paradigms group into 12 phenomena (``linguistics_term``) and 4 fields (``field``);
:func:`macro_accuracy` averages over paradigms, overall and per field, as the BLiMP paper does.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pandas as pd

from moe_utils.common.data_env import BLIMP_ENV

HUB_DATASET = "nyu-mll/blimp"
TASK_PREFIX = "blimp_"
#: The name of the group of all paradigms' tasks.
GROUP = "blimp"
FIELDS = ("sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pairID")


@functools.lru_cache(maxsize=1)
def paradigms() -> tuple[str, ...]:
    """The 67 paradigm names, as lm-evaluation-harness's stock ``blimp_<paradigm>`` tasks name them."""
    import lm_eval.tasks

    stock = Path(lm_eval.tasks.__file__).parent / "blimp"
    names = sorted(p.stem for p in stock.glob("*.yaml") if not p.name.startswith("_"))
    if len(names) != 67:
        raise RuntimeError(f"lm-evaluation-harness ships {len(names)} BLiMP paradigm tasks at {stock}, not 67")
    return tuple(names)


def task_name(paradigm: str) -> str:
    """``"adjunct_island"`` -> ``"blimp_adjunct_island"``; ValueError for an unknown paradigm."""
    if paradigm not in paradigms():
        raise ValueError(f"unknown BLiMP paradigm {paradigm!r}; known: {', '.join(paradigms())}")
    return TASK_PREFIX + paradigm


def paradigm_of(task: str) -> str | None:
    """The paradigm a task name ``blimp_<paradigm>`` names, None for any other name."""
    if task.startswith(TASK_PREFIX) and task[len(TASK_PREFIX):] in paradigms():
        return task[len(TASK_PREFIX):]
    return None


@functools.lru_cache(maxsize=128)
def _load(paradigm: str, data_dir: str | None) -> pd.DataFrame:
    if data_dir:
        path = Path(data_dir) / f"{paradigm}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"BLiMP paradigm {paradigm!r} not found at {path}. Point data_dir or ${BLIMP_ENV} at a directory "
                f"of <paradigm>.jsonl files (the authors' release), or unset it to read {HUB_DATASET} from the Hub.")
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        frame = pd.DataFrame(rows)
    else:
        import datasets

        frame = datasets.load_dataset(HUB_DATASET, paradigm, split="train").to_pandas()
    missing = [f for f in FIELDS if f not in frame.columns]
    if missing:
        raise ValueError(f"BLiMP paradigm {paradigm!r} lacks the fields {missing}")
    frame = frame[list(FIELDS)].astype({"pairID": str})
    # one paradigm of the release spells its field "syntax/semantics", the others "syntax_semantics"
    frame["field"] = frame["field"].str.replace("/", "_", regex=False)
    return frame


def load_paradigm(paradigm: str, data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """The minimal pairs of one paradigm, in the release's order, with the columns :data:`FIELDS`."""
    task_name(paradigm)  # validates the name
    data_dir = data_dir or os.environ.get(BLIMP_ENV)
    return _load(paradigm, None if data_dir is None else str(data_dir)).copy()


def paradigm_fields(data_dir: str | os.PathLike | None = None) -> pd.Series:
    """Each paradigm's linguistic field (morphology, syntax, semantics, syntax_semantics)."""
    return pd.Series({p: load_paradigm(p, data_dir)["field"].iloc[0] for p in paradigms()}, name="field")


def pair_table(samples: pd.DataFrame, data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """The BLiMP rows of :func:`moe_utils.evaluation.harness.sample_table` (one per pair), with the pair's
    ``paradigm`` and ``field``, sorted by paradigm and pair: the same order for every model."""
    rows = samples[samples["task"].map(paradigm_of).notna()].copy()
    rows["paradigm"] = rows["task"].str[len(TASK_PREFIX):]
    rows["field"] = rows["paradigm"].map(paradigm_fields(data_dir))
    return rows.sort_values(["paradigm", "doc_id"], kind="stable").reset_index(drop=True)


def macro_accuracy(correct: pd.DataFrame) -> pd.Series:
    """BLiMP accuracy from per-pair results (columns ``paradigm``, ``field``, ``correct``):
    the mean over paradigms of each paradigm's accuracy (``all``), and the same per field."""
    per_paradigm = correct.groupby("paradigm").agg(acc=("correct", "mean"), field=("field", "first"))
    out = {"all": per_paradigm["acc"].mean()}
    out.update(per_paradigm.groupby("field")["acc"].mean().to_dict())
    return pd.Series(out, name="accuracy")

