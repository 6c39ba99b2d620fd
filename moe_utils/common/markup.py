"""Outside text made safe for the book's Markdown: model names, directory names, dataset text.

A model is named by whatever the user passes (a Hub id, any local directory), and data sets hold
arbitrary text; the book renders the stages' Markdown (MyST, through markdown-it) and lets raw HTML
through. So every such text goes through one of these helpers before it is put into Markdown:

* :func:`code_span`: as inline code, fenced by more backticks than any run inside it, so that a
  backtick in the text cannot close the span (inside a code span the renderer escapes ``<`` and ``&``);
* :func:`text`: as plain prose, every ASCII punctuation character backslash-escaped (CommonMark
  allows it for all of them), so no emphasis, link, HTML tag, role or math can start;
* :func:`table_cell`: either of the above, with the pipes that would split a table row escaped.

Whitespace runs (newlines included) become one space: a newline would end a paragraph or table row.
"""

from __future__ import annotations

import re
import string

_PUNCTUATION = re.compile("([" + re.escape(string.punctuation) + "])")


def _one_line(value) -> str:
    return " ".join(str(value).split())


def code_span(value) -> str:
    """``value`` as a Markdown inline code span that no character of it can close."""
    content = _one_line(value)
    longest = max((len(run) for run in re.findall(r"`+", content)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if content.startswith("`") or content.endswith("`") or not content else ""
    return f"{fence}{pad}{content}{pad}{fence}"


def text(value) -> str:
    """``value`` as literal Markdown prose: every ASCII punctuation character backslash-escaped."""
    return _PUNCTUATION.sub(r"\\\1", _one_line(value))


def table_cell(value, *, code: bool = False) -> str:
    """``value`` for a cell of a Markdown table: :func:`code_span` (``code``) or :func:`text`, its
    pipes escaped."""
    cell = code_span(value) if code else text(value)
    return cell.replace("|", "\\|") if code else cell  # text() already escaped its pipes
