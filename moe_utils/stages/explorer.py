"""The routing explorer: one self-contained HTML widget to look at any token, atom or expert of a run.

The paper's authors read their collaboration patterns through a web viewer that needs a server and a
remote tokenizer (section 5). Everything that viewer shows is already in a run's artifacts, so the
book can show it offline, in the page itself:

* **tokens** of a subsample of the captured questions, coloured by the atom that explains each best
  at a chosen HSDL level (:func:`moe_utils.patterns.annotation.attribute_tokens`); a token's routing is its
  layer x expert grid of top-k weights (stage 1's routing store) and its atoms with their
  contributions (:func:`moe_utils.patterns.annotation.level_contributions`);
* **atoms** with their automatic labels, top tokens and domain enrichment with questions as the unit
  (stage 3), and their experts (dictionary entries >= the threshold, stage 2);
* **experts** with their partners in other layers by co-activation lift
  ``P(a, b) / (P(a) P(b))`` over all captured tokens, and their usage per domain. A lift given the
  token (the token-identity null) can be passed in as ``lift_given_token``; the page shows it as a
  column when present;
* **pruning masks** of stage 4: the pruned experts greyed out on the grid, and the tokens whose
  highest-weight expert in some layer is pruned marked.

:func:`explorer_data` collects this as plain JSON-ready data, :func:`explorer_html` renders the
widget (the data in a ``<script type="application/json">`` block with ``<``, ``>`` and ``&``
escaped, read by ``explorer.js``, which inserts all model and dataset text with ``textContent``
only), and :func:`write_page` writes it as a standalone HTML document. No library loads from the
network: the script and the style sheet are read from this package and inlined.

The script is plain DOM code (about 400 lines), not a plotting library's output: what the reader
works with is text (tokens that take keyboard focus, labels, tables) linked to one small grid of
buttons, which a canvas-drawing library such as Bokeh or Plotly would render as glyphs, without
focusable text, while adding about a megabyte of library code to the page.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from moe_utils.patterns.annotation import Annotation, level_contributions
from moe_utils.common.artifacts import atomic_write_bytes
from moe_utils.patterns.expert_matrix import coactivation, label_profiles
from moe_utils.capture.store import RoutingStore
from moe_utils.capture.token_text import OTHER_COLOUR, PALETTE

ASSETS = Path(__file__).parent
SCRIPT, STYLE = ASSETS / "explorer.js", ASSETS / "explorer.css"
CSS_CLASS = "moe-explorer"
#: Atoms listed per token and level (largest contribution first).
TOKEN_ATOMS = 3


def choose_questions(tokens: pd.DataFrame, max_questions: int | None, seed: int = 0) -> list:
    """Sample ids of the questions to show, in the order they are taken: one from every label
    (domain) in turn, each label's questions in a random order, until ``max_questions`` (None: all)."""
    if max_questions is not None and max_questions < 1:
        raise ValueError(f"max_questions must be at least 1 or None, got {max_questions}")
    samples = tokens.drop_duplicates("sample_id")[["sample_id", "label"]]
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(group["sample_id"].to_numpy()))
              for _, group in samples.groupby(samples["label"].astype(str), sort=True)]
    chosen = []
    while any(queues) and (max_questions is None or len(chosen) < max_questions):
        for queue in queues:
            if queue and (max_questions is None or len(chosen) < max_questions):
                chosen.append(queue.pop(0))
    return chosen


def _rounded(values, digits: int) -> list:
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()


def _token_atoms(contributions, rows: np.ndarray) -> list[list[list]]:
    """Per token of ``rows``: its ``TOKEN_ATOMS`` largest ``[atom, contribution]`` at one level."""
    columns = contributions[:, rows].tocsc()
    out = []
    for t in range(len(rows)):
        start, end = columns.indptr[t], columns.indptr[t + 1]
        atoms, values = columns.indices[start:end], columns.data[start:end]
        best = np.lexsort((atoms, -values))[:TOKEN_ATOMS]
        out.append([[int(atoms[b]), round(float(values[b]), 4)] for b in best if values[b] > 0])
    return out


def _level_colours(atoms: np.ndarray) -> dict[str, str]:
    """The atoms explaining the most of the shown tokens get a palette colour (ties by atom id)."""
    found, counts = np.unique(atoms[atoms >= 0], return_counts=True)
    ranked = found[np.lexsort((found, -counts))][:len(PALETTE)]
    return {str(int(a)): PALETTE[i] for i, a in enumerate(ranked)}


def _atoms(result: Annotation, level: int) -> list[dict]:
    """The atoms of ``level`` that are in use or explain a token: label, experts, top tokens and
    enrichment with questions as the unit (significant categories first)."""
    annotated = result.level(level)
    by_sample = {int(a): g.sort_values(["significant", "lift"], ascending=[False, False])
                 for a, g in annotated.enrichment_by_sample.groupby("atom")}
    out = []
    for row in annotated.atoms.itertuples(index=False):
        if not (row.alive or row.n_tokens > 0):
            continue
        enrichment = by_sample.get(int(row.atom), pd.DataFrame(columns=["category", "lift", "q", "significant"]))
        out.append({"atom": int(row.atom), "label": str(row.label), "n_tokens": int(row.n_tokens),
                    "experts": [int(r) for r in row.rows], "top_tokens": [str(k) for k in row.top_tokens],
                    "enrichment": [{"category": str(e.category), "lift": round(float(e.lift), 3),
                                    "q": float(f"{e.q:.3g}"), "significant": bool(e.significant)}
                                   for e in enrichment.itertuples(index=False)]})
    return out


def _finite_or_none(value: float, digits: int) -> float | None:
    """``value`` rounded, or ``None`` (shown as "n/a") where it is not finite: JSON has no NaN."""
    return round(float(value), digits) if np.isfinite(value) else None


def _experts(store: RoutingStore, n_partners: int, min_together: int,
             lift_given_token: np.ndarray | None) -> dict:
    """Per expert (row of X): partners in other layers by lift, and usage per domain."""
    co = coactivation(store)  # (N_e, N_e), P(a and b selected for the same token)
    n_e = co.shape[0]
    if lift_given_token is not None and np.shape(lift_given_token) != (n_e, n_e):
        raise ValueError(f"lift_given_token must be ({n_e}, {n_e}) like the co-activation, "
                         f"got {np.shape(lift_given_token)}")
    p = np.diag(co)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(np.outer(p, p) > 0, co / np.outer(p, p), 0.0)
    layer = np.arange(n_e) // store.n_experts
    partners = []
    for a in range(n_e):
        eligible = np.nonzero((layer != layer[a]) & (co[a] * store.n_tokens >= min_together))[0]
        best = eligible[np.lexsort((eligible, -lift[a, eligible]))][:n_partners]
        partners.append([{"expert": int(b), "lift": round(float(lift[a, b]), 3),
                          "together": round(float(co[a, b]), 5),
                          **({"lift_given_token": _finite_or_none(lift_given_token[a, b], 3)}
                             if lift_given_token is not None else {})} for b in best])
    profiles = label_profiles(store).sort_index()
    return {"usage": _rounded(p, 5), "partners": partners, "domains": [str(d) for d in profiles.index],
            "domain_usage": [_rounded(row, 4) for row in profiles.to_numpy()]}


def explorer_data(store: RoutingStore, hsdl, result: Annotation, masks: Sequence = (), *, run: dict,
                  max_questions: int | None = 30, max_tokens: int | None = 160, seed: int = 0,
                  max_entries: int = 250_000, n_partners: int = 5, min_together: int = 5,
                  lift_given_token: np.ndarray | None = None) -> dict:
    """Everything the widget shows, as JSON-ready data.

    Args:
        store: stage 1's routing store. hsdl: stage 2's HSDL fitted on its token columns.
        result: stage 3's annotation of that HSDL (:func:`moe_utils.patterns.annotation.annotate`).
        masks: stage 4's :class:`moe_utils.compression.pruning.PruningMask` list (an all-kept mask is skipped).
        run: what produced the run, shown on the page (e.g. ``{"artifacts": ..., "profile": ...}``).
        max_questions: questions shown (:func:`choose_questions`); None shows all.
        max_tokens: the first tokens of each shown question; None shows whole questions.
        seed: of the question sample.
        max_entries: at most this many routing entries (tokens x layers x top-k) on the page, which
            keeps it within a few MB for large models: fewer questions are shown when needed.
        n_partners, min_together: partners listed per expert, among those selected together with
            it for at least ``min_together`` tokens.
        lift_given_token: optional (N_e, N_e) co-activation lift given the token (the token-identity null).
    """
    tokens = result.tokens
    if len(tokens) != store.n_tokens:
        raise ValueError(f"the annotation has {len(tokens)} tokens, the store {store.n_tokens}: annotate this "
                         "store's HSDL (re-run stages 2 and 3)")
    lengths = tokens.groupby("sample_id", sort=False).size()
    per_token = store.n_layers * store.top_k  # routing entries of one token
    chosen, entries = [], 0
    for sample in choose_questions(tokens, max_questions, seed):
        entries += min(int(lengths[sample]), max_tokens or int(lengths[sample])) * per_token
        if chosen and entries > max_entries:
            break
        chosen.append(sample)
    member = tokens["sample_id"].isin(chosen).to_numpy()
    shown = tokens[member].assign(row=np.nonzero(member)[0]).sort_values(["sample_id", "position"], kind="stable")
    if max_tokens is not None:
        shown = shown.groupby("sample_id", sort=False).head(max_tokens)
    rows = shown["row"].to_numpy()
    questions = [{"sample": str(sample), "label": str(group["label"].iloc[0]), "n_tokens": int(lengths[sample]),
                  "n_shown": len(group)} for sample, group in shown.groupby("sample_id", sort=False)]
    n_levels = len(result.levels)
    contributions = level_contributions(hsdl)
    levels = []
    for k in range(1, n_levels + 1):
        atoms_k = shown[f"atom_{k}"].to_numpy(dtype=np.int64)
        levels.append({"level": k, "atom": atoms_k.tolist(), "colours": _level_colours(atoms_k),
                       "token_atoms": _token_atoms(contributions[k - 1], rows),
                       "atoms": _atoms(result, k)})
    question_index = {q["sample"]: i for i, q in enumerate(questions)}
    model = store.manifest["model"]
    return {
        "meta": {"model": str(model["name"]), "revision": model.get("revision"), "run": run,
                 "n_layers": store.n_layers, "n_experts": store.n_experts, "top_k": store.top_k,
                 "n_questions": int(store.n_samples), "n_tokens": int(store.n_tokens),
                 "n_questions_shown": len(questions), "n_tokens_shown": len(rows),
                 "max_tokens": max_tokens, "subsampled": len(questions) < store.n_samples,
                 "truncated": any(q["n_shown"] < q["n_tokens"] for q in questions),
                 "lift_given_token": lift_given_token is not None, "palette_other": OTHER_COLOUR},
        "questions": questions,
        "tokens": {"text": shown["token"].astype(str).tolist(), "row": rows.tolist(),
                   "question": [question_index[str(s)] for s in shown["sample_id"]],
                   "experts": np.asarray(store.topk_indices[rows], dtype=np.int64).tolist(),
                   "weights": _rounded(store.topk_weights[rows], 3)},
        "levels": levels,
        "experts": _experts(store, n_partners, min_together, lift_given_token),
        "masks": [{"label": f"{m.label} at {m.ratio:.0%}", "method": m.method, "ratio": float(m.ratio),
                   "seed": m.seed, "pruned": np.nonzero(~np.asarray(m.keep, dtype=bool))[0].tolist()}
                  for m in masks if not np.asarray(m.keep, dtype=bool).all()],
    }


def json_for_script(data) -> str:
    """JSON safe inside an HTML ``<script>`` element: ``<``, ``>`` and ``&`` (and the JavaScript line
    separators) as ``\\u`` escapes, so no text in it can close the element or open a comment."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def explorer_html(data: dict) -> str:
    """The widget: its style, its data and its script, with nothing loaded from elsewhere."""
    return (f'<div class="{CSS_CLASS}"><style>{STYLE.read_text()}</style>'
            f'<script type="application/json" class="mx-data">{json_for_script(data)}</script>'
            '<noscript>The explorer needs JavaScript.</noscript>'
            f'<script>{SCRIPT.read_text()}</script></div>')


def write_page(path: str | os.PathLike, data: dict, title: str = "Routing explorer") -> Path:
    """A standalone HTML document holding only the widget (atomically written)."""
    import html

    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'</head><body>{explorer_html(data)}</body></html>')
    atomic_write_bytes(path, page.encode())
    return Path(path)
