"""MMLU-Pro: the questions the study routes through the model, loaded, cleaned and formatted.

The paper "Unveiling Hidden Collaboration within Mixture-of-Experts in LLMs" (section 5,
experiments) probes expert collaboration with MMLU-Pro questions from five domains: math,
computer science, physics, law and psychology (:data:`PAPER_CATEGORIES`). This module

* loads MMLU-Pro (TIGER-Lab, MIT licence) either from a local parquet export
  (``data_dir`` or ``$MOE_MMLU_PRO_DIR``: a directory with ``test-*.parquet`` and
  ``validation-*.parquet``) or, with neither set, from the Hugging Face Hub (``TIGER-Lab/MMLU-Pro``);
* always cleans it (:func:`clean_mmlu_pro`): strips whitespace around every option (in the export
  some 600 options carry a stray leading/trailing space, most of them the correct answer, so a
  model could read the answer off the whitespace), drops options that are empty after stripping,
  trusts the answer *letter* where ``answer`` and ``answer_index`` disagree (``question_id`` 3983
  in the export: ``answer='C'``, ``answer_index=1``; the letter agrees with the upstream fix), and
  drops rows whose answer letter points past the options. The loader logs what it changed and
  attaches the report as ``df.attrs["cleaning"]``;
* selects a deterministic per-category sample (:func:`select_questions`) and formats prompts in
  the style of lm-eval's ``leaderboard_mmlu_pro`` task (:func:`format_prompt`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from moe_utils.common.data_env import MMLU_PRO_ENV

log = logging.getLogger(__name__)

#: Hugging Face Hub id of the data set.
HUB_ID = "TIGER-Lab/MMLU-Pro"
#: The five MMLU-Pro categories of the paper's section 5 experiments.
PAPER_CATEGORIES = ("math", "computer science", "physics", "law", "psychology")
#: Option letters; MMLU-Pro has up to ten options per question.
LETTERS = "ABCDEFGHIJ"
SPLITS = ("test", "validation")
REQUIRED_COLUMNS = ("question_id", "question", "options", "answer", "answer_index", "category")

_WHERE_HINT = (
    f"pass data_dir=... or set ${MMLU_PRO_ENV} to a directory holding test-*.parquet / "
    "validation-*.parquet, or unset it to use the Hub"
)


# --------------------------------------------------------------------------------------- loading
def load_mmlu_pro(split: str = "test", data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Return one MMLU-Pro split as a cleaned DataFrame (all columns kept).

    ``data_dir`` (or else ``$MOE_MMLU_PRO_DIR``) names a directory with ``{split}-*.parquet``;
    with neither, the split is downloaded from the Hub (``TIGER-Lab/MMLU-Pro``). The cleaning
    report of :func:`clean_mmlu_pro` is logged and stored in ``df.attrs["cleaning"]``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    directory = data_dir if data_dir is not None else os.environ.get(MMLU_PRO_ENV) or None
    if directory is not None:
        raw = _read_local(split, Path(directory))
        source = str(directory)
    else:
        raw = _read_hub(split)
        source = HUB_ID
    df, report = clean_mmlu_pro(raw)
    _log_report(report, split, source)
    df.attrs["cleaning"] = report
    return df


def _read_local(split: str, directory: Path) -> pd.DataFrame:
    """Read and concatenate ``directory/{split}-*.parquet``, checking the required columns."""
    if not directory.is_dir():
        raise FileNotFoundError(f"MMLU-Pro directory {directory} does not exist: {_WHERE_HINT}.")
    files = sorted(directory.glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no MMLU-Pro parquet for split {split!r} ({split}-*.parquet) in {directory}: {_WHERE_HINT}."
        )
    frames = []
    for path in files:
        frame = pd.read_parquet(path)
        _check_columns(frame, str(path))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _read_hub(split: str) -> pd.DataFrame:
    """Download one split from the Hugging Face Hub."""
    from datasets import load_dataset

    log.info("loading MMLU-Pro split %r from the Hub (%s); set $%s to use a local copy",
             split, HUB_ID, MMLU_PRO_ENV)
    frame = load_dataset(HUB_ID, split=split).to_pandas()
    _check_columns(frame, f"{HUB_ID} ({split})")
    return frame


def _check_columns(df: pd.DataFrame, where: str) -> None:
    """Raise ValueError naming the required columns that ``df`` (read from ``where``) lacks."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"MMLU-Pro data {where} lacks required column(s) {missing}; "
            f"expected at least {list(REQUIRED_COLUMNS)}, found {list(df.columns)}"
        )


def _log_report(report: Mapping[str, Any], split: str, source: str) -> None:
    """Log the cleaning report at INFO (WARNING for rows whose answer was changed or dropped)."""
    log.info(
        "MMLU-Pro %s from %s: %d rows in, %d out; stripped %d options in %d questions; "
        "dropped %d empty options",
        split, source, report["rows_in"], report["rows_out"], report["options_stripped"],
        report["questions_with_stripped_options"], report["empty_options_dropped"],
    )
    if report["answer_index_fixed"]:
        log.warning("MMLU-Pro %s: answer_index disagreed with the answer letter for question_id %s; "
                    "trusted the letter", split, report["answer_index_fixed"])
    if report["dropped_invalid_answer"]:
        log.warning("MMLU-Pro %s: dropped question_id %s (answer letter outside the options)",
                    split, report["dropped_invalid_answer"])


# -------------------------------------------------------------------------------------- cleaning
def clean_mmlu_pro(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Clean an MMLU-Pro frame; return ``(cleaned copy, report)``. All columns are kept.

    * every option is stripped of leading/trailing whitespace (options become ``list[str]``);
    * options that are empty after stripping are dropped, and the answer re-lettered to follow;
    * where ``answer`` (letter) and ``answer_index`` disagree the letter is trusted;
    * rows whose answer is not a letter, points past the options, or points at an empty option
      are dropped.

    Report keys: ``rows_in``, ``rows_out``, ``options_stripped`` (options changed by stripping),
    ``questions_with_stripped_options``, ``empty_options_dropped``, ``answer_index_fixed`` and
    ``dropped_invalid_answer`` (lists of question_id).
    """
    _check_columns(df, "passed to clean_mmlu_pro")
    report: dict[str, Any] = {
        "rows_in": len(df), "rows_out": 0, "options_stripped": 0,
        "questions_with_stripped_options": 0, "empty_options_dropped": 0,
        "answer_index_fixed": [], "dropped_invalid_answer": [],
    }
    keep: list[bool] = []
    new_options: list[list[str]] = []
    new_answers: list[str | None] = []
    new_indices: list[int] = []
    for qid, options, answer, answer_index in zip(
        df["question_id"], df["options"], df["answer"], df["answer_index"]
    ):
        raw = [str(o) for o in options]
        stripped = [o.strip() for o in raw]
        changed = sum(a != b for a, b in zip(raw, stripped))
        report["options_stripped"] += changed
        report["questions_with_stripped_options"] += changed > 0

        idx = _letter_index(answer)
        if idx is None or idx >= len(stripped) or not stripped[idx]:
            report["dropped_invalid_answer"].append(int(qid))
            keep.append(False)
            new_options.append(stripped)
            new_answers.append(answer)
            new_indices.append(-1)
            continue
        if pd.isna(answer_index) or int(answer_index) != idx:
            report["answer_index_fixed"].append(int(qid))
        options_out, idx_out = _drop_empty(stripped, idx)
        report["empty_options_dropped"] += len(stripped) - len(options_out)
        keep.append(True)
        new_options.append(options_out)
        new_answers.append(LETTERS[idx_out])
        new_indices.append(idx_out)

    out = df.copy()
    out["options"] = pd.Series(new_options, index=df.index, dtype=object)
    out["answer"] = pd.Series(new_answers, index=df.index, dtype=df["answer"].dtype)
    out["answer_index"] = pd.Series(new_indices, index=df.index, dtype="int64")
    out = out[pd.Series(keep, index=df.index)].reset_index(drop=True)
    report["rows_out"] = len(out)
    return out, report


def _letter_index(answer: Any) -> int | None:
    """Position of an answer letter in :data:`LETTERS`, or None if it is not one."""
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip() in LETTERS:
        return LETTERS.index(answer.strip())
    return None


def _drop_empty(options: list[str], answer_idx: int) -> tuple[list[str], int]:
    """Drop empty options; return the kept options and the answer's new position."""
    kept = [o for o in options if o]
    shift = sum(1 for o in options[:answer_idx] if not o)
    return kept, answer_idx - shift


# ------------------------------------------------------------------------------------- selection
def select_questions(
    df: pd.DataFrame,
    categories: Sequence[str] | str | None = None,
    n_per_category: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Keep the given categories (all, in first-seen order, if None) and sample up to n of each.

    Sampling is deterministic in ``seed`` and independent of the input row order (rows are sorted
    by ``question_id`` before sampling). Output: categories in the order given, questions sorted by
    ``question_id`` within each, fresh index. ``n_per_category=None`` keeps all questions; an n
    larger than a category holds keeps all of it and logs a warning.
    """
    present = list(dict.fromkeys(df["category"]))
    wanted = _resolve_categories(categories, present)
    if n_per_category is not None and n_per_category < 0:
        raise ValueError(f"n_per_category must be >= 0 or None, got {n_per_category}")
    parts = [_sample_category(df, cat, n_per_category, seed) for cat in wanted]
    if not parts:
        return df.iloc[0:0].reset_index(drop=True)
    return pd.concat(parts, ignore_index=True)


def _resolve_categories(categories: Sequence[str] | str | None, present: list[str]) -> list[str]:
    """Validate requested categories against those present; de-duplicate keeping order."""
    if categories is None:
        return present
    wanted = [categories] if isinstance(categories, str) else list(dict.fromkeys(categories))
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise ValueError(f"unknown MMLU-Pro categor(y/ies) {unknown}; valid: {sorted(present)}")
    return wanted


def _sample_category(df: pd.DataFrame, category: str, n: int | None, seed: int) -> pd.DataFrame:
    """Up to ``n`` questions of one category, sampled with ``seed``, sorted by question_id."""
    sub = df[df["category"] == category].sort_values("question_id", kind="stable")
    if n is not None and n > len(sub):
        log.warning("category %r has %d questions, fewer than the %d asked for: taking all",
                    category, len(sub), n)
    elif n is not None:
        sub = sub.sample(n=n, random_state=seed).sort_values("question_id", kind="stable")
    return sub


# ------------------------------------------------------------------------------------ formatting
def format_prompt(row: Mapping[str, Any] | pd.Series, *, with_options: bool = True,
                  with_answer: bool = False) -> str:
    """Format one question exactly as lm-eval's stock ``leaderboard_mmlu_pro`` task does.

    ``"{question}\\nA. ...\\nB. ...\\nAnswer:"``; ``with_answer`` appends ``" {letter}"``;
    ``with_options=False`` gives ``"{question}\\nAnswer:"``. The question text is stripped of
    surrounding whitespace (options are already clean).
    """
    lines = [str(row["question"]).strip()]
    if with_options:
        lines.extend(f"{LETTERS[i]}. {option}" for i, option in enumerate(row["options"]))
    prompt = "\n".join(lines) + "\nAnswer:"
    if with_answer:
        prompt += f" {row['answer']}"
    return prompt


def load_prompts(
    categories: Iterable[str] = PAPER_CATEGORIES,
    n_per_category: int | None = 20,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    with_options: bool = True,
    split: str = "test",
    exclude_ids: Iterable[int] = (),
) -> tuple[list[str], list[str], pd.DataFrame]:
    """Load, select and format: return ``(prompt texts, category labels, selected questions)``.

    ``exclude_ids``: ``question_id`` values left out before sampling (e.g. the questions an
    estimator was fitted on, to draw held-out ones)."""
    table = load_mmlu_pro(split, data_dir)
    excluded = set(int(i) for i in exclude_ids)
    if excluded:
        table = table[~table["question_id"].isin(excluded)]
    questions = select_questions(table, list(categories), n_per_category, seed)
    texts = [format_prompt(row, with_options=with_options) for _, row in questions.iterrows()]
    return texts, questions["category"].tolist(), questions
