"""No hand-typed results in the book's pages: every percentage or decimal in the prose of book/*.md
and of the notebooks' Markdown cells must be glued from the run, be a figure of the paper quoted as
the paper's, or be one of the settings listed in :data:`SETTINGS` (a parameter, a threshold, a
confidence level: fixed by the code, not measured by the run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT.parent / "shared" / "docs" / "paper.md"

#: Percentages and decimals, not inside a word, a version or a model name (Phi-3.5-MoE).
NUMBER = re.compile(r"(?<![\w.\-/])(\d+(?:\.\d+)?\s?%|\d*\.\d+)(?![\w.]*\w)")
#: What is not prose, within a line: math, inline code, roles and link targets.
NOT_PROSE = [re.compile(p, re.S) for p in (r"\$\$.*?\$\$", r"\$[^$\n]+\$", r"\{[\w:-]+\}`[^`]*`", r"`[^`]*`",
                                            r"\]\([^)]*\)")]
FENCE = re.compile(r"^\s*(`{3,}|~{3,}|:{3,})(.*)$")
#: A sentence quotes the paper when it names it or one of its models.
PAPER_MARKERS = re.compile(r"paper|Phi-3\.5-MoE|Phi-MoE|DeepSeek-MoE-16B|tang2025unveiling", re.I)
#: Settings the prose states (each number with the phrase it belongs to): thresholds, defaults,
#: confidence levels and test sizes that the code fixes, not results of the run.
SETTINGS = [
    r"checked every 1% of the run", r"over the first 10% of the steps", r"cosine above 0\.95",
    r"every 5% of the run", r"ratio is\s+the price of one unit of code .* at 0\.5", r"by more than 0\.5",
    r"about 0\.1% of the columns", r"entry of at least 0\.5", r"share at least 20% and at least 1\.5",
    r"share at least 20% and 1\.5", r"at least 10% of (a level-1|it|them)", r"more than 95% of the parent",
    r"chance:? 50%", r"adjusted\s+value is below 0\.05", r"Holm-adjusted p below 0\.05", r"95% (bootstrap )?interval", r"5%\s+two-sided", r"80% power",
    r"at most 60% of its perplexity", r"below 0\.5%", r"CC BY-SA 3\.0", r"k_1 = 0\.9", r"0\.9 by default",
    r"k1 = 0\.5", r"at a 25% pruning ratio", r"prunes 50% whatever", r"with the default 0\.9",
    r"Re-run with\s+0\.8 and 0\.99", r"refill at 75%", r"10% of a perplexity", r"within 3% of the model card",
    r"transformers 4\.36", r"\d\.\d GB", r"top 10% of (co-selected )?pairs", r"top 10%",
    r"with a 95%", r"the 95%", r"every ratio of at\s+least 10%", r"width shrinks to 0\.01", r"default 0\.9",
    r"unpruned model at 0%", r"100% by construction", r"in at least 95% of the splits",
    r"95% of the draws", r"holding at least 90% of their weight", r"covered at 10%",
]


def without_code(text: str) -> str:
    """The lines of ``text`` outside code fences; a directive's fence (```{figure}, :::{note}) keeps
    its body, a caption, without the fence and option lines."""
    kept, directives, code = [], [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        info = fence.group(2).strip() if fence else ""
        if code is not None:
            code = None if fence and fence.group(1) == code and not info else code
        elif fence and info.startswith("{"):
            directives.append(fence.group(1))
        elif fence and not info and directives and directives[-1] == fence.group(1):
            directives.pop()
        elif fence:
            code = fence.group(1)  # a code block, bare or with its language
        elif not re.match(r"^\s*:[\w-]+:", line):
            kept.append(line)
    return "\n".join(kept)


def prose_sentences(text: str) -> list[str]:
    text = without_code(text)
    for pattern in NOT_PROSE:
        text = pattern.sub(" ", text)
    text = re.sub(r"\s+", " ", text)
    return re.split(r"(?<=[.!?:;])\s+(?=[A-Z*({\-])", text)


def notebook_markdown(path: Path) -> str:
    cells = path.read_text().split("# %%")
    return "\n\n".join("\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                                 for line in cell.splitlines()[1:])
                       for cell in cells if cell.startswith(" [markdown]"))


def pages() -> dict[str, str]:
    found = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "book").glob("*.md"))}
    found.update({str(p.relative_to(ROOT)): notebook_markdown(p) for p in sorted((ROOT / "notebooks").glob("*.py"))})
    return found


def paper_numbers() -> set[str]:
    if not PAPER.is_file():
        pytest.skip(f"the paper's summary {PAPER} is not here")
    return {m.replace(" ", "") for m in NUMBER.findall(PAPER.read_text())}


def unglued(text: str, paper: set[str]) -> list[tuple[str, str]]:
    """(number, sentence) for every percentage or decimal of the prose that is neither the paper's
    (a number of the paper's summary, in a sentence that names the paper) nor a listed setting."""
    hits = []
    for sentence in prose_sentences(text):
        if any(re.search(s, sentence) for s in SETTINGS):
            continue
        for number in NUMBER.findall(sentence):
            if number.replace(" ", "") in paper and PAPER_MARKERS.search(sentence):
                continue
            hits.append((number, sentence.strip()))
    return hits


def test_no_unglued_numbers_in_the_book():
    paper = paper_numbers()
    problems = [f"{page}: {number!r} in: {sentence[:160]}" for page, text in pages().items()
                for number, sentence in unglued(text, paper)]
    assert not problems, ("numbers typed by hand (glue them from the run, mark them as the paper's, or add "
                          "a setting to SETTINGS):\n" + "\n".join(problems))


def test_the_scanner_catches_typed_results_and_passes_glued_ones():
    paper = {"60%", ".650"}
    typed = "With 96 atoms and 0.5, atoms hold 2.1 experts, 65% across layers, at an error of 0.33."
    assert [n for n, _ in unglued(typed, paper)] == ["0.5", "2.1", "65%", "0.33"]
    glued = ("HSDL recovers {glue:text}`executed/06_routing_prediction.ipynb::hsdl_recall:.1f`% of the next "
             "layer's top-k, at $\\lambda = 0.5$ and `alpha=0.01`.")
    assert unglued(glued, paper) == []
    assert unglued("The paper reports about 60% for Phi-3.5-MoE.", paper) == []
    assert [n for n, _ in unglued("This run finds about 60% across layers.", paper)] == ["60%"]
    assert [n for n, _ in unglued("CAEP keeps .650 of it.", paper)] == [".650"]
    assert unglued("Intervals use a 95% bootstrap interval over questions.", paper) == []
    fenced = "```python\nx = 0.33\n```\n```{glue:figure} fig\n:name: fig-x\n\nA caption at 0.47.\n```"
    assert [n for n, _ in unglued(fenced, paper)] == ["0.47"]
