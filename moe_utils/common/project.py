"""Where the project's files are: the checkout around the package (notebooks, profiles, the book,
committed benchmark results). Every path a stage reads is resolved from here (:func:`resolve`), so
that nothing depends on the working directory a notebook or command runs in."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
PROFILES = ROOT / "params"
EXECUTED = ROOT / "book" / "executed"
BENCH_RESULTS = ROOT / "bench" / "results"


def resolve(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded; a relative path is taken from the project root, not the working directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else ROOT / path
