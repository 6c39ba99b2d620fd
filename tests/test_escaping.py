"""Model and dataset text shown in the book's tables is escaped (HTML), never rendered as markup."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from moe_utils import plotting

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.py"))
PLANTED = "<img src=x onerror=alert(1)>"


def _styler_format_calls(source: str) -> list[str]:
    """The ``.format(...)`` calls of pandas Styler chains (statements holding ``.style``) in a notebook."""
    calls = []
    for statement in source.split("\n\n"):
        if ".style" not in statement:
            continue
        for start in (m.end() for m in re.finditer(r"\.format\(", statement)):
            depth, end = 1, start
            while depth:
                depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(statement[end], 0)
                end += 1
            calls.append(statement[start:end - 1])
    return calls


def test_every_styled_table_of_every_stage_escapes_its_cells():
    calls = {path.name: _styler_format_calls(path.read_text()) for path in NOTEBOOKS}
    assert sum(map(len, calls.values())) >= 15  # the check sees the stages' tables
    unescaped = {name: [c for c in found if 'escape="html"' not in c] for name, found in calls.items()}
    assert not any(unescaped.values()), unescaped


def test_a_planted_token_renders_as_text_in_a_stage_table():
    plotting.use_style()  # every stage calls it first: tables without a format call escape too
    atoms = pd.DataFrame({"atom": [3, 7], "label": [PLANTED, "'>' and & quotes \""], "q": [1e-5, 2e-3]})
    for styler in (atoms.style.hide(axis="index").format({"q": "{:.1e}"}, escape="html"), atoms.style):
        html = styler.to_html()
        assert PLANTED not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
        assert "&#39;&gt;&#39; and &amp; quotes &#34;" in html or "&#39;&gt;&#39; and &amp; quotes &quot;" in html
