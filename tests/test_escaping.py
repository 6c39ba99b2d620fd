"""Model and dataset text shown in the book's tables is escaped (HTML), never rendered as markup."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from moe_utils.common import plotting

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


# ------------------------------------------------------------- Markdown: model and directory names
HOSTILE = "/tmp/m`<img src=x onerror=alert(1)>`*x*|y"


def _render(markdown: str) -> str:
    """HTML of ``markdown`` as the book's MyST renders it (markdown-it, raw HTML passed through, tables)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


def _no_markup(rendered: str) -> None:
    assert "<img" not in rendered and "<em>" not in rendered, rendered


def test_code_span_keeps_a_backtick_and_markup_inside_the_span():
    from moe_utils.common.markup import code_span

    for name in (HOSTILE, "``a``", "`", "plain/name", "a\nb"):
        rendered = _render(f"**Model:** {code_span(name)} and more")
        _no_markup(rendered)
        assert rendered.count("<code>") == 1
        code = rendered.split("<code>")[1].split("</code>")[0]
        assert code.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&quot;", '"') == \
            " ".join(name.split())


def test_the_old_code_span_let_the_markup_through():
    """The control: the way names were printed before lets the planted tag reach the HTML."""
    assert "<img" in _render(f"**Model:** `{HOSTILE}`")


def test_text_and_table_cells_render_literally():
    from moe_utils.common.markup import code_span, table_cell, text

    rendered = _render(f"Data from {text(HOSTILE)}.")
    _no_markup(rendered)
    assert "m`&lt;img src=x onerror=alert(1)&gt;`*x*|y" in rendered
    table = "| a | b |\n|---|---|\n" + f"| {table_cell(HOSTILE)} | {table_cell(HOSTILE, code=True)} |\n"
    rendered = _render(table)
    _no_markup(rendered)
    assert rendered.count("<td>") == 2  # the pipes in the name did not add a column
    assert code_span(HOSTILE) != table_cell(HOSTILE, code=True)


def test_every_markdown_that_names_the_model_escapes_it(tmp_path):
    """The model card's summary, the random-model caveat, stage 5's description and the status page."""
    from types import SimpleNamespace

    import pandas as pd

    from moe_utils import stages
    from moe_utils.stages import mmlu_pro_results as domain_results, model_card
    from moe_utils.pipeline.status import write_status_page

    layers = [SimpleNamespace(num_experts=4, top_k=2)]
    usage = pd.DataFrame([[0.25, 0.25, 0.25, 0.25]]).to_numpy()
    _no_markup(_render(model_card.summary(HOSTILE, {"total": 1e6, "active_per_token": 5e5}, layers, 10.0, 0.5,
                                          usage, None)))
    _no_markup(_render(stages.model_caveat("random:" + HOSTILE)))
    store = SimpleNamespace(n_layers=2, n_experts=4, top_k=2,
                            tokens=pd.DataFrame({"label": ["math", "law"]}))
    inputs = SimpleNamespace(store=store, stage4=None)
    _no_markup(_render(domain_results.describe_inputs(inputs, HOSTILE, ["math", "law"], n_per_category=1,
                                                      ratio=0.5)))
    status = {"profile": HOSTILE, "overrides": {"model": HOSTILE}, "commit": None, "about": None,
              "machine": {"platform": "p", "python": "3", "cpus": 1}, "versions": {"x": "1"},
              "stages": [{"stage": "01_capture", "parameters": {"model": HOSTILE + "```\n<img src=x>"}}]}
    page = tmp_path / "status.md"
    write_status_page(status, page)
    rendered = _render(page.read_text())
    assert "<img" not in rendered and "<em>x</em>" not in rendered  # (the page's own emphasis is fine)


def test_every_notebook_prints_the_model_name_through_code_span():
    """No notebook puts a model name between bare backticks."""
    for path in NOTEBOOKS:
        source = path.read_text()
        assert not re.search(r"`\{(model|model_name|setup\.model_name)\}`", source), path.name
