"""Tests for moe_utils.evaluation.data: MMLU-Pro loading, cleaning, selection and prompt formatting.

Small synthetic parquet files written into tmp_path exercise each rule; the real offline copy
(../shared/data/mmlu_pro, skipped when absent) checks the known defects of that export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from moe_utils.evaluation import data
from moe_utils.evaluation.data import (
    LETTERS,
    MMLU_PRO_ENV,
    PAPER_CATEGORIES,
    clean_mmlu_pro,
    format_prompt,
    load_mmlu_pro,
    load_prompts,
    select_questions,
)

REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmlu_pro"


def _row(qid: int, category: str, options: list[str], answer: str, answer_index: int,
         question: str | None = None) -> dict:
    return {
        "question_id": qid,
        "question": question or f"Question number {qid}?",
        "options": options,
        "answer": answer,
        "answer_index": answer_index,
        "cot_content": "",
        "category": category,
        "src": "synthetic",
    }


def _write(directory: Path, rows: list[dict], split: str = "test") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{split}-00000-of-00001.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def small_dir(tmp_path: Path) -> Path:
    """A tiny export with the real defects: padded options, a letter/index clash, a bad letter."""
    rows = [
        _row(1, "math", [" 1", "2 ", "3", "4"], "A", 0),
        _row(2, "math", ["x", "y", "\tz\n", "w"], "C", 1),  # letter C, index 1: trust the letter
        _row(3, "law", ["yes", "no"], "D", 3),  # letter beyond the two options: dropped
        _row(4, "law", ["a", "b", "c"], "B", 1),
    ]
    directory = tmp_path / "mmlu_pro"
    _write(directory, rows)
    _write(directory, rows[:2], split="validation")
    return directory


@pytest.fixture
def many_dir(tmp_path: Path) -> Path:
    """Three categories of 30, 25 and 5 questions, rows deliberately out of question_id order."""
    rows = []
    for offset, (category, count) in enumerate([("math", 30), ("physics", 25), ("law", 5)]):
        rows += [_row(1000 * (offset + 1) + i, category, ["p", "q"], "A", 0) for i in range(count)]
    directory = tmp_path / "many"
    _write(directory, rows[::-1])
    return directory


# ---------------------------------------------------------------------------- synthetic: loading
def test_options_are_stripped_and_reported(small_dir: Path) -> None:
    df = load_mmlu_pro("test", data_dir=small_dir)
    by_id = df.set_index("question_id")
    assert by_id.loc[1, "options"] == ["1", "2", "3", "4"]
    assert by_id.loc[2, "options"] == ["x", "y", "z", "w"]
    assert all(type(o) is list and all(type(x) is str for x in o) for o in df["options"])
    report = df.attrs["cleaning"]
    assert report["options_stripped"] == 3
    assert report["questions_with_stripped_options"] == 2
    assert report["empty_options_dropped"] == 0
    assert set(df.columns) >= {"cot_content", "src"}  # all columns kept


def test_letter_index_clash_trusts_letter(small_dir: Path) -> None:
    df = load_mmlu_pro(data_dir=small_dir)
    by_id = df.set_index("question_id")
    assert by_id.loc[2, "answer"] == "C"
    assert by_id.loc[2, "answer_index"] == 2
    assert df.attrs["cleaning"]["answer_index_fixed"] == [2]
    assert (df["answer"].map(LETTERS.index) == df["answer_index"]).all()


def test_answer_beyond_options_is_dropped(small_dir: Path) -> None:
    df = load_mmlu_pro(data_dir=small_dir)
    assert sorted(df["question_id"]) == [1, 2, 4]
    report = df.attrs["cleaning"]
    assert report["dropped_invalid_answer"] == [3]
    assert (report["rows_in"], report["rows_out"]) == (4, 3)


def test_empty_options_dropped_and_answer_relettered() -> None:
    raw = pd.DataFrame([_row(7, "math", ["a", "  ", "b", "c"], "C", 2)])
    df, report = clean_mmlu_pro(raw)
    assert df.loc[0, "options"] == ["a", "b", "c"]
    assert (df.loc[0, "answer"], df.loc[0, "answer_index"]) == ("B", 1)
    assert report["empty_options_dropped"] == 1
    assert raw.loc[0, "options"] == ["a", "  ", "b", "c"]  # input untouched


def test_validation_split_and_unknown_split(small_dir: Path) -> None:
    assert sorted(load_mmlu_pro("validation", data_dir=small_dir)["question_id"]) == [1, 2]
    with pytest.raises(ValueError, match="split"):
        load_mmlu_pro("train", data_dir=small_dir)


def test_env_var_selects_directory(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MMLU_PRO_ENV, str(small_dir))
    assert sorted(load_mmlu_pro()["question_id"]) == [1, 2, 4]


def test_explicit_data_dir_beats_env_var(small_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MMLU_PRO_ENV, str(tmp_path / "nowhere"))
    assert len(load_mmlu_pro(data_dir=small_dir)) == 3


def test_no_directory_uses_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MMLU_PRO_ENV, raising=False)
    calls = []

    def fake_hub(split: str) -> pd.DataFrame:
        calls.append(split)
        return pd.DataFrame([_row(5, "math", [" a", "b"], "A", 0)])

    monkeypatch.setattr(data, "_read_hub", fake_hub)
    df = load_mmlu_pro("validation")
    assert calls == ["validation"]
    assert df.loc[0, "options"] == ["a", "b"]


def test_missing_directory_error_names_env_var(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "does-not-exist"
    monkeypatch.setenv(MMLU_PRO_ENV, str(missing))
    with pytest.raises(FileNotFoundError) as info:
        load_mmlu_pro()
    message = str(info.value)
    assert str(missing) in message
    assert "$MOE_MMLU_PRO_DIR" in message and "data_dir=" in message and "Hub" in message


def test_missing_split_file_error(small_dir: Path) -> None:
    (small_dir / "validation-00000-of-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"validation-\*\.parquet.*MOE_MMLU_PRO_DIR"):
        load_mmlu_pro("validation", data_dir=small_dir)


def test_missing_column_error(tmp_path: Path) -> None:
    row = _row(1, "math", ["a", "b"], "A", 0)
    del row["answer_index"], row["category"]
    path = _write(tmp_path / "bad", [row])
    with pytest.raises(ValueError) as info:
        load_mmlu_pro(data_dir=tmp_path / "bad")
    message = str(info.value)
    assert "answer_index" in message and "category" in message and str(path) in message
    assert "'question'" not in message.split("expected")[0]  # present columns not named missing


# -------------------------------------------------------------------------- synthetic: selection
def test_unknown_category_error(many_dir: Path) -> None:
    df = load_mmlu_pro(data_dir=many_dir)
    with pytest.raises(ValueError) as info:
        select_questions(df, ["math", "astrology"])
    message = str(info.value)
    assert "astrology" in message
    assert all(c in message for c in ("math", "physics", "law"))


def test_sampling_counts_order_and_determinism(many_dir: Path) -> None:
    df = load_mmlu_pro(data_dir=many_dir)
    a = select_questions(df, ["physics", "math"], n_per_category=10, seed=1)
    b = select_questions(df.sample(frac=1, random_state=9), ["physics", "math"], 10, seed=1)
    c = select_questions(df, ["physics", "math"], n_per_category=10, seed=2)
    assert a["category"].tolist() == ["physics"] * 10 + ["math"] * 10
    assert list(a.index) == list(range(20))
    for _, group in a.groupby("category"):
        assert group["question_id"].is_monotonic_increasing
    assert a["question_id"].tolist() == b["question_id"].tolist()  # seed, not row order, decides
    assert a["question_id"].tolist() != c["question_id"].tolist()


def test_sampling_more_than_available_takes_all(many_dir: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    df = load_mmlu_pro(data_dir=many_dir)
    with caplog.at_level(logging.WARNING, logger="moe_utils.evaluation.data"):
        out = select_questions(df, ["law", "math"], n_per_category=8)
    assert out["category"].value_counts().to_dict() == {"law": 5, "math": 8}
    assert any("law" in r.getMessage() for r in caplog.records)
    assert len(select_questions(df)) == 60  # None: every category, every question


# ------------------------------------------------------------------------- synthetic: formatting
def test_format_prompt_exact() -> None:
    row = _row(9, "math", ["3", "4", "5"], "B", 1, question="What is 2 + 2? ")
    assert format_prompt(row) == "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nAnswer:"
    assert format_prompt(row, with_answer=True).endswith("\nC. 5\nAnswer: B")
    assert format_prompt(row, with_options=False) == "What is 2 + 2?\nAnswer:"


def test_load_prompts(many_dir: Path) -> None:
    texts, labels, questions = load_prompts(["law", "physics"], n_per_category=3, data_dir=many_dir)
    assert labels == ["law"] * 3 + ["physics"] * 3
    assert len(texts) == len(questions) == 6
    assert texts[0] == format_prompt(questions.iloc[0])


def test_load_prompts_excludes_ids_before_sampling(many_dir: Path) -> None:
    """Held-out questions (stage 6): none of the excluded ids, and still the number asked for."""
    _, _, fitted = load_prompts(["physics"], n_per_category=20, seed=0, data_dir=many_dir)
    _, _, held = load_prompts(["physics"], n_per_category=5, seed=1, data_dir=many_dir,
                              exclude_ids=fitted["question_id"])
    assert len(held) == 5 and not set(held["question_id"]) & set(fitted["question_id"])
    _, _, rest = load_prompts(["physics"], n_per_category=None, data_dir=many_dir, exclude_ids=fitted["question_id"])
    assert sorted(rest["question_id"]) == sorted(set(range(2000, 2025)) - set(fitted["question_id"]))


# ------------------------------------------------------------------------------- the real copy
@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    if not (REAL_DIR / "test-00000-of-00001.parquet").is_file():
        pytest.skip(f"local MMLU-Pro copy not found at {REAL_DIR}")
    return load_mmlu_pro("test", data_dir=REAL_DIR)


def test_real_shape_and_categories(real: pd.DataFrame) -> None:
    assert len(real) == 12032
    assert real["category"].nunique() == 14
    assert set(PAPER_CATEGORIES) <= set(real["category"])
    assert real["question_id"].is_unique


def test_real_options_clean(real: pd.DataFrame) -> None:
    assert all(o == o.strip() and o for options in real["options"] for o in options)
    report = real.attrs["cleaning"]
    # README: 615 options / 526 questions with a stray *space*; str.strip also catches tabs etc.
    assert report["options_stripped"] >= 615
    assert report["questions_with_stripped_options"] >= 526
    assert report["dropped_invalid_answer"] == []


def test_real_question_3983_fixed(real: pd.DataFrame) -> None:
    row = real.set_index("question_id").loc[3983]
    assert row["answer"] == "C" and row["answer_index"] == 2
    assert real.attrs["cleaning"]["answer_index_fixed"] == [3983]


def test_real_answer_index_matches_letter(real: pd.DataFrame) -> None:
    assert (real["answer"].map(LETTERS.index) == real["answer_index"]).all()
    assert all(i < len(o) for i, o in zip(real["answer_index"], real["options"]))


def test_real_paper_selection(real: pd.DataFrame) -> None:
    sel = select_questions(real, PAPER_CATEGORIES, n_per_category=20, seed=0)
    assert sel["category"].tolist() == [c for c in PAPER_CATEGORIES for _ in range(20)]
    again = select_questions(real, PAPER_CATEGORIES, n_per_category=20, seed=0)
    assert sel["question_id"].tolist() == again["question_id"].tolist()
