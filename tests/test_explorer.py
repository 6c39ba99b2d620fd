"""The routing explorer (moe_utils.stages.explorer), built from a synthetic run and used in headless Chromium.

Every interaction is checked against independent truth: a token's grid against the routing store's
arrays, an atom's tokens against :func:`moe_utils.patterns.annotation.attribute_tokens` of the fitted HSDL and
its experts against the dictionary, a mask's grey cells and marked tokens against the keep-mask and
the store, an expert's partners against co-activation counted by brute force. A planted hostile token
must stay text; no request may leave the page and no script may fail.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from moe_utils.patterns import annotation as an
from moe_utils.stages import explorer
from moe_utils.patterns import token_null
from moe_utils.patterns.atoms import atom_experts
from moe_utils.compression.pruning import PruningMask
from moe_utils.capture.store import RoutingStore, write_store
from tests.test_annotation import LAYOUT, fit, synthetic_store
from tests.test_book_html import SCREENSHOTS, launch_browser, watch

PLANTED = '<img src=x onerror="window.__planted=1">'
MAX_QUESTIONS, MAX_TOKENS = 8, 25
THRESHOLD = 0.5


# ------------------------------------------------------------------------------ the synthetic run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A planted synthetic store whose questions all begin with hostile markup (so it is shown, and
    frequent enough to reach the atoms' top tokens), its HSDL, annotation, two masks and the explorer
    written as a standalone page."""
    root = tmp_path_factory.mktemp("explorer")
    base = synthetic_store(root / "base", planted=True, per_category=6, length=40)
    tokens = base.tokens.copy()
    tokens.loc[tokens["position"] == 0, "token"] = PLANTED
    write_store(root / "store", {"model": base.manifest["model"], "data": base.manifest["data"]},
                {"topk_indices": np.asarray(base.topk_indices), "topk_weights": np.asarray(base.topk_weights)},
                tokens)
    store = RoutingStore.open(root / "store")
    hsdl = fit(store)
    result = an.annotate(store, hsdl, threshold=THRESHOLD)
    n_e = LAYOUT[0] * LAYOUT[1]
    rng = np.random.default_rng(3)
    keep_random = np.ones(n_e, dtype=bool)
    keep_random[rng.choice(n_e, n_e // 2, replace=False)] = False
    keep_top = np.ones(n_e, dtype=bool)
    keep_top[[1, 8 + 2, 16 + 3]] = False  # the planted math group, first choice of most math tokens
    masks = [PruningMask("unpruned", 0.0, np.ones(n_e, dtype=bool)), PruningMask("random", 0.5, keep_random, seed=0),
             PruningMask("frequency", 0.125, keep_top)]
    data = explorer.explorer_data(store, hsdl, result, masks, run={"artifacts": "synthetic"},
                                  max_questions=MAX_QUESTIONS, max_tokens=MAX_TOKENS, seed=0)
    page = explorer.write_page(root / "explorer.html", data)
    return {"store": store, "hsdl": hsdl, "result": result, "masks": masks[1:], "data": data, "page": page}


# ------------------------------------------------------------------------------ data, no browser
def test_json_cannot_break_out_of_its_script():
    hostile = {"token": "</script><script>alert(1)</script><!-- & \u2028"}
    text = explorer.json_for_script(hostile)
    assert not re.search(r"[<>&\u2028]", text)
    assert json.loads(text) == hostile


def test_questions_are_sampled_evenly_per_domain(run):
    data, tokens = run["data"], run["store"].tokens
    labels = [q["label"] for q in data["questions"]]
    assert len(labels) == MAX_QUESTIONS and data["meta"]["subsampled"] and data["meta"]["truncated"]
    assert pd.Series(labels).value_counts().tolist() == [MAX_QUESTIONS // 4] * 4
    rows = np.asarray(data["tokens"]["row"])
    shown = tokens.iloc[rows]
    assert (shown.groupby("sample_id")["position"].agg(list).map(lambda p: p == list(range(MAX_TOKENS)))).all()
    assert data["tokens"]["text"] == shown["token"].tolist()
    with pytest.raises(ValueError, match="at least 1"):
        explorer.choose_questions(tokens, 0)
    per_question = MAX_TOKENS * LAYOUT[0] * 2  # routing entries of a shown question (top-2)
    small = explorer.explorer_data(run["store"], run["hsdl"], run["result"], run={}, max_questions=MAX_QUESTIONS,
                                   max_tokens=MAX_TOKENS, max_entries=3 * per_question + 1)
    assert small["meta"]["n_questions_shown"] == 3 and small["tokens"]["text"] == [
        t for t, q in zip(data["tokens"]["text"], data["tokens"]["question"])
        if data["questions"][q]["sample"] in {s["sample"] for s in small["questions"]}]


def test_a_lift_given_the_token_is_shown_when_given(run, browser, tmp_path):
    """The hook for the token-identity null: an (N_e, N_e) lift given the token becomes a column of
    the partners table; a matrix of another shape is refused."""
    n_e = LAYOUT[0] * LAYOUT[1]
    given = np.arange(n_e * n_e, dtype=float).reshape(n_e, n_e) / 100
    data = explorer.explorer_data(run["store"], run["hsdl"], run["result"], run={}, max_questions=2,
                                  lift_given_token=given)
    partners = data["experts"]["partners"]
    assert data["meta"]["lift_given_token"] and all(
        p["lift_given_token"] == round(given[a, p["expert"]], 3) for a in range(n_e) for p in partners[a])
    with pytest.raises(ValueError, match=r"\(24, 24\)"):
        explorer.explorer_data(run["store"], run["hsdl"], run["result"], run={}, lift_given_token=given[:3])
    tab = browser.new_page()
    tab.goto(explorer.write_page(tmp_path / "given.html", data).as_uri())
    tab.locator(".mx-cell[data-layer='0'][data-expert='1']").click()
    header = tab.locator(".mx-expert-panel table").first.locator("th").all_text_contents()
    first = partners[1][0]
    row = tab.locator(".mx-expert-panel table").first.locator("tr").nth(1).locator("td").all_text_contents()
    tab.close()
    assert header[-1] == "lift given the token" and row[-1] == f"{first['lift_given_token']:.2f}"


def test_the_token_null_lift_reaches_the_page_and_undefined_lifts_read_na(run, browser, tmp_path):
    """Stage 7 passes the token-identity null's lift (moe_utils.patterns.token_null); a lift that is not
    defined (no expectation) is written as null and shown as "n/a", never as invalid JSON."""
    given = token_null.coselection(run["store"]).lift(given_token=True)
    data = explorer.explorer_data(run["store"], run["hsdl"], run["result"], run={}, max_questions=2,
                                  lift_given_token=given)
    first = data["experts"]["partners"][1][0]
    assert first["lift_given_token"] == pytest.approx(given[1, first["expert"]], abs=1e-3)
    given[1, first["expert"]] = np.nan
    data = explorer.explorer_data(run["store"], run["hsdl"], run["result"], run={}, max_questions=2,
                                  lift_given_token=given)
    assert data["experts"]["partners"][1][0]["lift_given_token"] is None
    tab = browser.new_page()
    tab.goto(explorer.write_page(tmp_path / "na.html", data).as_uri())
    tab.locator(".mx-cell[data-layer='0'][data-expert='1']").click()
    row = tab.locator(".mx-expert-panel table").first.locator("tr").nth(1).locator("td").all_text_contents()
    tab.close()
    assert row[-1] == "n/a"


def test_the_all_kept_mask_is_not_offered(run):
    assert [m["method"] for m in run["data"]["masks"]] == ["random", "frequency"]


# ------------------------------------------------------------------------------ in the browser
@pytest.fixture(scope="module")
def browser():
    with launch_browser() as chromium:
        yield chromium


@pytest.fixture
def page(browser, run):
    """The explorer page, opened from disk; after the test, no script error and no request out."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    tab = context.new_page()
    seen = watch(context, tab, local_prefixes=("file://",))
    tab.goto(run["page"].as_uri())
    tab.wait_for_selector(".moe-explorer[data-ready='1']")
    yield tab
    problems = seen["errors"] + [f"request left the page: {url}" for url in seen["blocked"]]
    context.close()
    assert not problems, problems


def _cells(page, cls: str) -> set[tuple[int, int]]:
    return {tuple(map(int, pair)) for pair in page.eval_on_selector_all(
        f".mx-cell.{cls}", "cells => cells.map(c => [c.dataset.layer, c.dataset.expert])")}


def _rows(page, cls: str) -> set[int]:
    return set(page.eval_on_selector_all(f".mx-token.{cls}", "spans => spans.map(s => +s.dataset.row)"))


def test_hovering_a_token_shows_exactly_its_experts(page, run):
    store = run["store"]
    spans = page.locator(".mx-token")
    n = spans.count()
    assert n == run["data"]["meta"]["n_tokens_shown"]
    for index in (0, 1, n // 2, n - 1):
        span = spans.nth(index)
        span.hover()
        row = int(span.get_attribute("data-row"))
        assert span.text_content() == store.tokens["token"].iloc[row]
        truth = {(layer, int(e)) for layer in range(store.n_layers) for e in store.topk_indices[row, layer]}
        assert _cells(page, "mx-routed") == truth
        for layer, expert in truth:
            title = page.locator(f".mx-cell[data-layer='{layer}'][data-expert='{expert}']").get_attribute("title")
            k = list(store.topk_indices[row, layer]).index(expert)
            assert float(title.split("weight ")[1]) == pytest.approx(float(store.topk_weights[row, layer, k]), abs=1e-3)
    page.mouse.move(0, 0)
    assert _cells(page, "mx-routed") == set()


def test_tokens_work_with_the_keyboard(page, run):
    store = run["store"]
    page.locator(".mx-token").first.focus()
    page.keyboard.press("ArrowRight")
    focused = page.evaluate("document.activeElement.dataset.row")
    assert focused is not None and page.evaluate("document.activeElement.dataset.index") == "1"
    row = int(focused)
    assert _cells(page, "mx-routed") == {(layer, int(e)) for layer in range(store.n_layers)
                                         for e in store.topk_indices[row, layer]}
    page.keyboard.press("Enter")
    assert page.locator(".mx-token[aria-pressed='true']").count() == 1
    page.locator(".mx-mask").focus()  # leaving the tokens keeps the pinned one on the grid
    assert _cells(page, "mx-routed") == {(layer, int(e)) for layer in range(store.n_layers)
                                         for e in store.topk_indices[row, layer]}
    assert page.eval_on_selector_all(".mx-token[tabindex='0']", "s => s.length") == 1


def test_selecting_an_atom_highlights_exactly_its_tokens_and_experts(page, run):
    hsdl, store = run["hsdl"], run["store"]
    truth = an.attribute_tokens(hsdl)
    rows = np.asarray(run["data"]["tokens"]["row"])
    for level in (1, 2):
        page.locator(".mx-level").nth(level - 1).check()
        assigned = truth[f"atom_{level}"].to_numpy()[rows]
        found, counts = np.unique(assigned[assigned >= 0], return_counts=True)
        for atom in (int(found[np.argmax(counts)]), int(found[np.argmin(counts)])):
            page.locator(f".mx-atom[data-atom='{atom}']").click()
            assert _rows(page, "mx-atom-token") == set(rows[assigned == atom].tolist())
            experts = atom_experts(hsdl.dictionaries_[level - 1], THRESHOLD)[atom]
            assert _cells(page, "mx-atom-expert") == {(int(r) // store.n_experts, int(r) % store.n_experts)
                                                      for r in experts}
            page.locator(f".mx-atom[data-atom='{atom}']").click()  # selecting again clears it
            assert _rows(page, "mx-atom-token") == set()


def test_choosing_a_mask_greys_exactly_its_pruned_experts(page, run):
    store = run["store"]
    rows = np.asarray(run["data"]["tokens"]["row"])
    n_experts = store.n_experts
    for option, mask in enumerate(run["masks"]):
        page.select_option(".mx-mask", str(option))
        pruned = np.nonzero(~mask.keep)[0]
        assert _cells(page, "mx-pruned") == {(int(r) // n_experts, int(r) % n_experts) for r in pruned}
        weights = np.asarray(store.topk_weights)[rows]  # (n, L, k)
        top = np.take_along_axis(np.asarray(store.topk_indices, dtype=np.int64)[rows],
                                 weights.argmax(axis=2)[..., None], axis=2)[..., 0]  # (n, L)
        loses = (~mask.keep[top + np.arange(store.n_layers) * n_experts]).any(axis=1)
        assert _rows(page, "mx-loses-top") == set(rows[loses].tolist())
        assert 0 < loses.sum()
    page.select_option(".mx-mask", "-1")
    assert _cells(page, "mx-pruned") == set() and _rows(page, "mx-loses-top") == set()


def test_an_expert_lists_its_strongest_partners_in_other_layers(page, run):
    store = run["store"]
    n_layers, n_experts = store.n_layers, store.n_experts
    selected = np.zeros((store.n_tokens, n_layers * n_experts), dtype=bool)
    for t in range(store.n_tokens):
        for layer in range(n_layers):
            selected[t, layer * n_experts + np.asarray(store.topk_indices[t, layer], dtype=int)] = True
    together = selected.T.astype(int) @ selected.astype(int)
    p = selected.mean(axis=0)
    expert = 1 * n_experts + 2  # layer 1, expert 2 (of the planted math group)
    page.locator(".mx-cell[data-layer='1'][data-expert='2']").click()
    partners = _cells(page, "mx-partner")
    lift = together[expert] / store.n_tokens / (p[expert] * p)
    eligible = [b for b in range(n_layers * n_experts) if b // n_experts != 1 and together[expert, b] >= 5]
    shown = [layer * n_experts + e for layer, e in partners]
    assert len(shown) == min(5, len(eligible)) and set(shown) <= set(eligible)
    assert min(lift[shown]) >= max(lift[[b for b in eligible if b not in shown]], default=0) - 1e-9
    table = page.locator(".mx-expert-panel table").first.inner_text()
    for b in shown:
        assert f"L{b // n_experts}E{b % n_experts}\t{lift[b]:.2f}" in table


def test_a_hostile_token_stays_text(page, run):
    data = run["data"]
    first = [i for i, q in enumerate(data["tokens"]["question"]) if i == 0 or data["tokens"]["question"][i - 1] != q]
    assert [data["tokens"]["text"][i] for i in first] == [PLANTED] * MAX_QUESTIONS
    span = page.locator(f".mx-token[data-index='{first[1]}']")
    assert span.text_content() == PLANTED
    span.hover()
    assert PLANTED in page.locator(".mx-token-panel").text_content()
    page.locator(".mx-atom").first.click()
    assert page.locator(".mx-token[data-index] img, .mx-atoms img, .mx-details img").count() == 0
    assert page.evaluate("document.querySelectorAll('.moe-explorer img').length") == 0
    assert page.evaluate("window.__planted === undefined")


def test_screenshots_of_the_views(page, run):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator(".mx-token").nth(3).click()
    page.locator(".mx-atom").first.click()
    page.select_option(".mx-mask", "1")
    page.locator(".mx-cell[data-layer='1'][data-expert='2']").click()
    path = SCREENSHOTS / "explorer-synthetic.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000
