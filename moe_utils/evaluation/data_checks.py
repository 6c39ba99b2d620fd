"""Cheap checks of the local data a run will read, done by the pipeline before the first stage.

A stage reads MMLU-Pro, WikiText-2 or BLiMP only after minutes of other work (stage 0 evaluates the
model before it samples a question); a wrong folder must be reported before that. These checks read
no data: they look for the files each loader opens (:func:`moe_utils.evaluation.data.load_mmlu_pro`,
:func:`moe_utils.evaluation.wikitext.load_wikitext`, :mod:`moe_utils.evaluation.blimp`) and at the MMLU-Pro parquet
schema and the first BLiMP record. A location is the profile's parameter when set, else the
loader's environment variable; with neither, the loaders use the Hub and nothing is checked here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_utils.evaluation.blimp import BLIMP_ENV, FIELDS, paradigms
from moe_utils.evaluation.data import MMLU_PRO_ENV, REQUIRED_COLUMNS
from moe_utils.evaluation.wikitext import SPLITS, WIKITEXT_ENV


def _location(params: Mapping[str, Any], key: str, env: str) -> Path | None:
    value = params.get(key) or os.environ.get(env)
    return Path(value).expanduser() if value else None


def mmlu_pro_problems(directory: Path) -> list[str]:
    """What is missing from an MMLU-Pro folder: the test split's parquet files and their columns."""
    import pyarrow.parquet as pq

    where = f"MMLU-Pro folder {directory} (data_dir or ${MMLU_PRO_ENV})"
    if not directory.is_dir():
        return [f"{where} does not exist"]
    files = sorted(directory.glob("test-*.parquet"))
    if not files:
        return [f"{where} holds no test-*.parquet"]
    problems = []
    for path in files:
        try:
            columns = set(pq.read_schema(path).names)
        except Exception as err:  # noqa: BLE001 - any reason it cannot be read is the message
            problems.append(f"{path} is not a readable parquet file ({err})")
            continue
        if missing := [c for c in REQUIRED_COLUMNS if c not in columns]:
            problems.append(f"{path} lacks the MMLU-Pro column(s) {missing}")
    return problems


def wikitext_problems(directory: Path) -> list[str]:
    """The WikiText-2 split files missing from a folder."""
    where = f"WikiText-2 folder {directory} (wikitext_dir or ${WIKITEXT_ENV})"
    if not directory.is_dir():
        return [f"{where} does not exist"]
    missing = [f"{split}.txt" for split in SPLITS if not (directory / f"{split}.txt").is_file()]
    return [f"{where} lacks {', '.join(missing)}"] if missing else []


def blimp_problems(directory: Path) -> list[str]:
    """BLiMP paradigm files missing from a folder, or whose first record lacks the pair's fields."""
    where = f"BLiMP folder {directory} (blimp_dir or ${BLIMP_ENV})"
    if not directory.is_dir():
        return [f"{where} does not exist"]
    names = paradigms()
    missing = [p for p in names if not (directory / f"{p}.jsonl").is_file()]
    if missing:
        return [f"{where} lacks {len(missing)} of the {len(names)} paradigm files, e.g. {missing[0]}.jsonl"]
    for paradigm in names:
        path = directory / f"{paradigm}.jsonl"
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
        try:
            record = json.loads(first)
        except ValueError:
            return [f"{path}: the first line is not JSON"]
        if not isinstance(record, dict) or (lacking := [f for f in FIELDS if f not in record]):
            return [f"{path}: the first record lacks the fields {lacking if isinstance(record, dict) else FIELDS}"]
    return []


def data_problems(params: Mapping[str, Any], declared: set[str]) -> list[str]:
    """Problems with the data the stages declaring ``declared`` parameters will read, given ``params``
    (the profile's values over the notebooks' defaults)."""
    problems = []
    for key, env, check in (("data_dir", MMLU_PRO_ENV, mmlu_pro_problems),
                            ("wikitext_dir", WIKITEXT_ENV, wikitext_problems),
                            ("blimp_dir", BLIMP_ENV, blimp_problems)):
        if key in declared and (directory := _location(params, key, env)) is not None:
            problems += check(directory)
    return problems
