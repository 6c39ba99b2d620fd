"""Token text for the annotation of collaboration patterns (paper section 5, Fig 5): classes and HTML.

The paper labels its patterns by reading the tokens they fire on. Doing that automatically needs
two things that depend on the tokenizer, not on the model:

* :func:`classify_tokens` puts every captured token in one :data:`CLASSES` class (digits, math
  symbols and LaTeX, punctuation, word-piece fragments ...). Whether a token starts a word is read
  from the tokenizer's own marker: ``Ġ`` (byte-level BPE: GPT-2, OLMoE, Qwen, DeepSeek, granite),
  ``▁`` (sentencepiece: Llama, Phi-3.5-MoE, Mixtral) or ``##`` (WordPiece: a continuation). Without
  the tokenizer's pieces, a leading space in the decoded text marks a word start.
* :func:`render_prompt` draws a prompt's tokens coloured by the atom that explains each of them
  (the paper's Fig 5) as self-contained HTML with inline styles and a legend. Token text and labels
  are model and dataset content: everything is HTML-escaped, so a token ``<script>`` shows as text.
"""

from __future__ import annotations

import html
import re
import unicodedata
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

#: Token classes, in the order in which they are tested: a token gets the first that applies.
CLASSES = ("special", "space/newline", "number", "math/LaTeX", "code", "punctuation", "byte fragment",
           "word piece", "single letter", "function word", "capitalised", "word", "other")

#: Word-start markers of the tokenizer families (raw vocabulary pieces, not decoded text).
BPE_SPACE, SP_SPACE, WORDPIECE_CONT = "Ġ", "▁", "##"

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither such what which who whom
whose where when why how whether if then than so as because since while although though unless until
and or but nor yet not of in on at to for from by with without within into onto upon over under about
above below between among through during before after against along across around behind beyond near
off out up down per via i me my mine we us our ours you your yours he him his she her hers it its they
them their theirs one ones be is am are was were been being have has had having do does did done can
could may might must shall should will would there here also only just very too more most much many
few less least other another same own
""".split())

#: Programming words that are rarely English words (whole words only).
CODE_WORDS = frozenset("""
def elif lambda void null nullptr printf println cout endl std malloc struct bool boolean async await
const int char float args kwargs self init len str dict enum typedef namespace
""".split())
CODE_OPERATORS = ("==", "!=", "->", "=>", "::", "&&", "||", "++", "+=", "-=", "//", "/*", "*/", "#include",
                  "</", "/>", "()", "[]", "{}")
MATH_CHARS = frozenset("+*/=<>^%|~$\\{}_")
_NUMBER = re.compile(r"^[+-]?\d[\d.,]*%?$")
_CAMEL = re.compile(r"^[a-z]+[A-Z]")
_SNAKE = re.compile(r"[A-Za-z0-9]_[A-Za-z0-9]")
_SPECIAL = re.compile(r"^(<\|[^|<>]+\|>|</?s>|<(unk|pad|bos|eos|mask)>|\[(CLS|SEP|PAD|UNK|MASK)\])$", re.I)


def detect_scheme(vocabulary: Iterable[str]) -> str:
    """``"byte-bpe"``, ``"sentencepiece"``, ``"wordpiece"`` or ``"text"`` (no marker), from raw pieces.

    Pass the whole vocabulary (``tokenizer.get_vocab()``) rather than a few pieces: a short
    prompt may contain no marked piece at all.
    """
    counts = {BPE_SPACE: 0, SP_SPACE: 0, WORDPIECE_CONT: 0}
    for piece in vocabulary:
        for marker in counts:
            if piece.startswith(marker) and len(piece) > len(marker):
                counts[marker] += 1
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        return "text"
    return {BPE_SPACE: "byte-bpe", SP_SPACE: "sentencepiece", WORDPIECE_CONT: "wordpiece"}[best]


def word_starts(texts: Sequence[str], *, pieces: Sequence[str] | None = None, scheme: str | None = None,
                sample_ids: Sequence | None = None) -> np.ndarray:
    """Whether each token begins a word (tokens in reading order; ``sample_ids`` marks prompt starts).

    A marked piece decides: ``Ġ``/``▁`` starts a word, a WordPiece ``##`` piece continues one and any
    other WordPiece piece starts one. Unmarked tokens (BPE and sentencepiece pieces without the
    marker, or decoded ``texts`` without a leading space when there are no ``pieces``) continue a
    word only when they begin with a letter or digit and the previous token of the prompt ends
    with one.
    """
    n = len(texts)
    texts = [str(t) for t in texts]
    if pieces is not None and len(pieces) != n:
        raise ValueError(f"{len(pieces)} pieces for {n} tokens")
    scheme = scheme or (detect_scheme(pieces) if pieces is not None else "text")
    marked = np.zeros(n, dtype=np.int8)  # +1 starts a word, -1 continues one, 0 undecided
    if pieces is None or scheme == "text":
        marked[[i for i, t in enumerate(texts) if t[:1].isspace()]] = 1
    elif scheme == "wordpiece":
        marked[:] = [(-1 if str(p).startswith(WORDPIECE_CONT) else 1) for p in pieces]
    else:
        marker = BPE_SPACE if scheme == "byte-bpe" else SP_SPACE
        marked[[i for i, p in enumerate(pieces) if str(p).startswith(marker)]] = 1
    first = np.ones(n, dtype=bool)
    if sample_ids is not None:
        ids = np.asarray(sample_ids)
        first[1:] = ids[1:] != ids[:-1]
    else:
        first[1:] = False
    glued = np.array([False] + [a[-1:].isalnum() and b[:1].isalnum() for a, b in zip(texts[:-1], texts[1:])],
                     dtype=bool)[:n]
    return np.where(marked != 0, marked > 0, first | ~glued)


@lru_cache(maxsize=None)
def token_class(text: str, starts_word: bool = True, ends_word: bool = True, after_backslash: bool = False) -> str:
    """The :data:`CLASSES` entry of one token, from its decoded text and context.

    ``starts_word``/``ends_word``: the token begins a word / the next token does not continue it
    (function words, code words and single letters are whole words only: ``" the"`` followed by
    ``"ory"`` is the start of a word, not an article). ``after_backslash``: the previous token of the
    prompt is ``\\`` with no space in between (a LaTeX command split by the tokenizer, ``\\`` +
    ``frac``).
    """
    core = text.strip()
    if _SPECIAL.match(core):
        return "special"
    if not core:
        return "space/newline"
    if core.startswith(WORDPIECE_CONT) and len(core) > len(WORDPIECE_CONT):
        core = core[len(WORDPIECE_CONT):]  # a WordPiece continuation decoded alone keeps its marker
        starts_word = False
    if _NUMBER.match(core) or core.isnumeric():
        return "number"
    if after_backslash and core[:1].isalpha():
        return "math/LaTeX"
    code_like = any(op in core for op in CODE_OPERATORS) or _SNAKE.search(core) or _CAMEL.search(core)
    mathy = any(c in MATH_CHARS or unicodedata.category(c) == "Sm" or "GREEK" in unicodedata.name(c, "")
                for c in core)
    if core.startswith("\\") or (mathy and not code_like):
        return "math/LaTeX"
    whole = starts_word and ends_word
    if code_like or (whole and core in CODE_WORDS):
        return "code"
    if "\ufffd" in core:
        return "byte fragment"
    if all(unicodedata.category(c)[0] in "PS" for c in core):
        return "punctuation"
    if not any(c.isalpha() for c in core):
        return "other"
    if not starts_word:
        return "word piece"
    if whole and len(core) == 1 and core != "a":
        return "single letter"
    if whole and core.lower() in FUNCTION_WORDS:
        return "function word"
    if core[0].isupper():
        return "capitalised"
    return "word" if core.isalpha() or core.replace("-", "").replace("'", "").isalpha() else "other"


def classify_tokens(texts: Sequence[str], *, pieces: Sequence[str] | None = None, scheme: str | None = None,
                    sample_ids: Sequence | None = None) -> pd.DataFrame:
    """Token class and word start of every token (in reading order): columns ``token_class``, ``word_start``.

    ``texts`` are the decoded tokens (the store's ``token`` column); ``pieces`` the raw vocabulary
    pieces (``tokenizer.convert_ids_to_tokens``), which carry the word-start markers; ``scheme`` as
    :func:`detect_scheme` returns it for the tokenizer's vocabulary.
    """
    texts = [str(t) for t in texts]
    n = len(texts)
    starts = word_starts(texts, pieces=pieces, scheme=scheme, sample_ids=sample_ids)
    same_prompt = np.ones(max(0, n - 1), dtype=bool)  # token i + 1 is in the prompt of token i
    if sample_ids is not None:
        ids = np.asarray(sample_ids)
        same_prompt = ids[1:] == ids[:-1]
    ends = np.ones(n, dtype=bool)
    ends[:-1] = starts[1:] | ~same_prompt
    spaced = np.array([t[:1].isspace() for t in texts], dtype=bool)  # a space before the token
    if pieces is not None:
        spaced |= np.array([str(p).startswith((BPE_SPACE, SP_SPACE)) for p in pieces], dtype=bool)
    after_backslash = np.zeros(n, dtype=bool)
    after_backslash[1:] = same_prompt & ~spaced[1:] & np.array([t.strip() == "\\" for t in texts[:-1]], dtype=bool)
    classes = [token_class(t, bool(s), bool(e), bool(b)) for t, s, e, b in zip(texts, starts, ends, after_backslash)]
    return pd.DataFrame({"token_class": pd.Categorical(classes, categories=CLASSES), "word_start": starts})


# ------------------------------------------------------------------------------------ rendering
#: Light qualitative colours (ColorBrewer Set3 without its grey), dark text stays readable on all.
PALETTE = ("#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
           "#bc80bd", "#ccebc5", "#ffed6f")
OTHER_COLOUR = "#eeeeee"
CSS_CLASS = "moe-token-render"


def _display_text(text: str) -> str:
    """Escaped token text; a newline shows as a return sign followed by a real line break."""
    return html.escape(text, quote=True).replace("\r", "").replace("\n", "\u23ce\n").replace("\t", "\u21e5")


def render_prompt(texts: Sequence[str], rows: Sequence[tuple[str, Sequence[int], Mapping[int, str]]], *,
                  max_colours: int = 10, caption: str | None = None) -> str:
    """HTML of one prompt's tokens, once per row, each token coloured by its atom (the paper's Fig 5).

    Args:
        texts: the prompt's decoded tokens, in order.
        rows: ``(name, atom_of_each_token, {atom: label})`` per row, e.g. one row per HSDL level;
            an atom below 0 means no atom explains the token.
        max_colours: the atoms explaining most of the prompt's tokens get their own colour (at most
            ``len(PALETTE)``); the rest share a light grey. Every token's tooltip names its atom.
        caption: a line above the rows.

    Returns a ``<div class="moe-token-render">`` with inline styles only (no scripts, no external
    CSS), so it shows the same in Jupyter and in the built book; all text is HTML-escaped.
    """
    max_colours = min(max_colours, len(PALETTE))
    parts = [f'<div class="{CSS_CLASS}" style="font-family:sans-serif;font-size:13px;color:#111;'
             'border:1px solid #ddd;border-radius:4px;padding:8px;margin:6px 0;background:#fff">']
    if caption:
        parts.append(f'<div style="font-weight:bold;margin-bottom:4px">{html.escape(caption, quote=True)}</div>')
    for name, atoms, labels in rows:
        atoms = np.asarray(atoms, dtype=np.int64)
        if len(atoms) != len(texts):
            raise ValueError(f"row {name!r} has {len(atoms)} atoms for {len(texts)} tokens")
        found, counts = np.unique(atoms[atoms >= 0], return_counts=True)
        ranked = found[np.lexsort((found, -counts))][:max_colours]  # most tokens first, ties by atom id
        colour = {int(a): PALETTE[i] for i, a in enumerate(ranked)}
        parts.append(f'<div style="margin:6px 0 2px 0;font-weight:bold">{html.escape(name, quote=True)}</div>'
                     '<div style="white-space:pre-wrap;line-height:1.9;font-family:monospace">')
        for text, atom in zip(texts, atoms.tolist()):
            tip = (f"{name}: atom {atom}: {labels.get(atom, '')}" if atom >= 0 else f"{name}: no atom")
            parts.append(f'<span title="{html.escape(tip, quote=True)}" style="background:'
                         f'{colour.get(atom, OTHER_COLOUR)};color:#111;border-radius:2px">'
                         f'{_display_text(str(text))}</span>')
        parts.append('</div><div style="font-size:12px;margin-top:2px">')
        for atom in ranked.tolist():
            parts.append(f'<span style="display:inline-block;margin:1px 8px 1px 0"><span style="display:'
                         f'inline-block;width:0.9em;height:0.9em;background:{colour[atom]};border:1px solid #999;'
                         f'vertical-align:middle"></span> atom {atom}: '
                         f'{html.escape(str(labels.get(atom, "")), quote=True)}</span>')
        if len(found) > len(ranked):
            parts.append(f'<span style="display:inline-block"><span style="display:inline-block;width:0.9em;'
                         f'height:0.9em;background:{OTHER_COLOUR};border:1px solid #999;vertical-align:middle">'
                         f'</span> {len(found) - len(ranked)} other atoms</span>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)
