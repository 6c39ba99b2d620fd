"""Annotation of HSDL atoms against independent truth: planted routing in a synthetic store, a
store without structure, brute-force attribution, scipy's Fisher test, real tokenizers' offsets,
scikit-learn's cosine, and an HTML parser for the rendering."""

from __future__ import annotations

from html.parser import HTMLParser
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.figure import Figure
from scipy import stats
from sklearn.metrics.pairwise import cosine_similarity

from moe_utils.patterns import annotation as an
from moe_utils.common import plotting
from moe_utils.capture import token_text
from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.patterns.hsdl import HSDL
from moe_utils.capture.store import RoutingStore, write_store

matplotlib.use("Agg")

LAYOUT = (3, 8)  # 3 MoE layers x 8 experts, top-2
CATEGORIES = ("law", "math", "physics", "psychology")
WORDS = (" court", " theory", " energy", " mind", " value", " system", " river", " city", " model", " rule")
FUNCTION = (" the", " of", " and", " to")
MATH_GROUP = (1, 2, 3)  # expert of layer 0, 1, 2 that math tokens are routed through
DIGIT_GROUP = (5, 6, 7)  # ... and number tokens


def synthetic_store(path, *, planted: bool, seed: int = 0, per_category: int = 15, length: int = 40) -> RoutingStore:
    """Questions of four categories with random top-2 routing. With ``planted``, 80% of the tokens of
    math questions take the cross-layer group MATH_GROUP as first choice, and 80% of number tokens
    DIGIT_GROUP; without, routing is independent of text and category."""
    rng = np.random.default_rng(seed)
    n_layers, n_experts = LAYOUT
    indices, weights, rows = [], [], []
    sample = 0
    for category in CATEGORIES:
        for _ in range(per_category):
            for position in range(length):
                draw = rng.random()
                text = (f" {rng.integers(0, 100)}" if draw < 0.25 else FUNCTION[rng.integers(len(FUNCTION))]
                        if draw < 0.45 else WORDS[rng.integers(len(WORDS))])
                idx = np.stack([rng.choice(n_experts, 2, replace=False) for _ in range(n_layers)])
                for group, applies in ((MATH_GROUP, category == "math"), (DIGIT_GROUP, text.strip().isdigit())):
                    if planted and applies and rng.random() < 0.8:
                        for layer, expert in enumerate(group):
                            idx[layer] = [expert, rng.choice([e for e in range(n_experts) if e != expert])]
                first = rng.uniform(0.5, 0.8, (n_layers, 1))
                indices.append(idx)
                weights.append(np.concatenate([first, 1 - first], axis=1))
                rows.append({"sample_id": sample, "position": position, "token_id": 0, "token": text,
                             "label": category})
            sample += 1
    tokens = pd.DataFrame(rows)
    tokens["token_id"] = pd.factorize(tokens["token"])[0]
    manifest = {"model": {"name": "synthetic", "n_experts": n_experts, "n_layers": n_layers, "top_k": 2},
                "data": {"categories": list(CATEGORIES)}}
    write_store(path, manifest, {"topk_indices": np.stack(indices).astype(np.uint8),
                                 "topk_weights": np.stack(weights).astype(np.float32)}, tokens)
    return RoutingStore.open(path)


def fit(store: RoutingStore) -> HSDL:
    return HSDL(levels=[12, 16], layout=LAYOUT, n_steps=400, batch_size=256, random_state=0).fit(expert_matrix(store))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    store = synthetic_store(tmp_path_factory.mktemp("planted") / "store", planted=True)
    model = fit(store)
    return store, model, an.annotate(store, model)


@pytest.fixture(scope="module")
def null(tmp_path_factory):
    store = synthetic_store(tmp_path_factory.mktemp("null") / "store", planted=False, seed=1)
    model = fit(store)
    return store, model, an.annotate(store, model)


def _atom_of(atoms: pd.DataFrame, group) -> pd.Series:
    """The level-1 atom holding the most experts of a planted group (at least two), most tokens first."""
    rows = {layer * LAYOUT[1] + expert for layer, expert in enumerate(group)}
    hits = atoms["rows"].map(lambda r: len(rows & set(r)))
    candidates = atoms[hits >= 2].sort_values("n_tokens", ascending=False)
    assert len(candidates), "HSDL found no atom of the planted group"
    return candidates.iloc[0]


# ------------------------------------------------------------------------------ planted truth
def test_planted_domain_group_is_labelled_with_its_category(planted):
    _, _, result = planted
    level = result.level(1)
    atom = _atom_of(level.atoms, MATH_GROUP)
    assert "[math" in atom["label"] and atom["categories"][0] == "math"
    rows = level.enrichment[level.enrichment["atom"] == atom["atom"]].set_index("category")
    assert rows.loc["math", "q"] < 1e-6 and rows.loc["math", "lift"] > 2
    assert not rows.drop(index="math")["significant"].any()
    by_sample = level.enrichment_by_sample
    assert by_sample[(by_sample["atom"] == atom["atom"]) & (by_sample["category"] == "math")]["q"].iloc[0] < 0.01
    assert atom["domain_specific"] and atom["domain_specific_by_sample"]


def test_planted_number_group_has_the_number_class(planted):
    _, _, result = planted
    atom = _atom_of(result.level(1).atoms, DIGIT_GROUP)
    assert atom["top_class"] == "number" and atom["label"].startswith("number")
    assert all(key.isdigit() for key in atom["top_tokens"])
    assert not atom["domain_specific"]  # numbers are spread over all categories


def test_no_structure_means_nothing_significant(null):
    _, _, result = null
    for level in result.levels:
        assert level.atoms["n_tokens"].sum() == (result.tokens[f"atom_{level.level}"] >= 0).sum()
        assert not level.enrichment["significant"].any(), level.enrichment.nsmallest(3, "q")
        assert not level.enrichment_by_sample["significant"].any()
        assert not level.atoms["label"].str.contains(r"\[").any()


def test_labels_are_deterministic(planted, tmp_path):
    store, model, result = planted
    again = an.annotate(store, model)
    for a, b in zip(result.levels, again.levels):
        pd.testing.assert_frame_equal(a.atoms, b.atoms)
    model.save(tmp_path / "hsdl")
    reloaded = an.annotate(store, HSDL.load(tmp_path / "hsdl"))
    assert [lv.labels for lv in reloaded.levels] == [lv.labels for lv in result.levels]


def test_domain_similarity_matches_sklearn_and_finds_the_odd_domain(planted):
    store, _, _ = planted
    profiles = an.domain_profiles(store)
    np.testing.assert_allclose(profiles.sum(axis=1), 1.0)
    similarity = an.domain_similarity(profiles)
    np.testing.assert_allclose(similarity.to_numpy(), cosine_similarity(profiles.to_numpy()), atol=1e-12)
    centered = an.domain_similarity(profiles, centered=True)
    values = profiles.to_numpy()
    np.testing.assert_allclose(centered.to_numpy(), cosine_similarity(values - values.mean(axis=0)), atol=1e-12)
    pairs = an.ranked_pairs(similarity)
    assert len(pairs) == 6 and pairs["cosine"].is_monotonic_decreasing
    assert "math" not in (pairs.iloc[0]["a"], pairs.iloc[0]["b"])  # the planted domain is the odd one out
    assert all("math" in (a, b) for a, b in pairs.tail(3)[["a", "b"]].to_numpy())


# ------------------------------------------------------------------------------ attribution
@pytest.fixture
def toy():
    """3 layers x 4 experts; 3 level-1 atoms, 3 level-2 atoms (hand-made, as in test_patterns)."""
    d1 = np.zeros((12, 3), np.float32)
    d1[[1, 11], 0] = [1.0, 0.8]
    d1[4, 1] = 0.9
    d1[[2, 6], 2] = [0.5, 0.5]
    d2 = np.zeros((12, 3), np.float32)
    d2[1, 0], d2[11, 1], d2[4, 2] = 1.0, 0.8, 0.9
    r2 = np.array([[1.0, 0, 0.2], [0.9, 0, 0], [0, 1.0, 0]], np.float32)  # (p2, p1)
    r1 = sp.csr_matrix(np.array([[2.0, 0, 1.0, 0], [0, 1.0, 1.5, 0], [0.5, 0, 0, 0]], np.float32))
    return SimpleNamespace(dictionaries_=[d1, d2], codes_=[r1, r2], layout=(3, 4))


def test_contributions_and_attribution_by_brute_force(toy):
    r1, r2 = toy.codes_[0].toarray(), toy.codes_[1]
    expected = [np.zeros((3, 4)), np.zeros((3, 4))]
    for t in range(4):
        for j in range(3):
            expected[0][j, t] = toy.dictionaries_[0][:, j].sum() * r1[j, t]
            expected[1][j, t] = toy.dictionaries_[1][:, j].sum() * sum(r2[j, i] * r1[i, t] for i in range(3))
    got = an.level_contributions(toy)
    for level in range(2):
        np.testing.assert_allclose(got[level].toarray(), expected[level], rtol=1e-6)
    table = an.attribute_tokens(toy)
    assert table["atom_1"].tolist() == [0, 1, 0, -1]  # token 3 has no code at all
    assert table["atom_2"].tolist() == [0, 2, 2, -1]
    np.testing.assert_allclose(table["contribution_1"][:3], [3.6, 0.9, 1.8], rtol=1e-6)
    np.testing.assert_allclose(table["share_1"][0], 3.6 / 4.1, rtol=1e-6)
    assert table["share_1"].iloc[3] == 0
    for block in (1, 3):  # token by token, and blocks that do not divide the tokens
        pd.testing.assert_frame_equal(an.attribute_tokens(toy, block=block), table)


def test_token_table_rejects_a_model_of_other_columns(planted, toy):
    store, _, _ = planted
    with pytest.raises(ValueError, match="granularity='token'"):
        an.token_table(store, toy)


def test_hierarchy_tree_counts_nested_tokens(planted):
    _, model, result = planted
    tree = an.hierarchy_tree(result, model, level=1, min_share=0.0)
    tokens = result.tokens
    for row in tree.sample(min(8, len(tree)), random_state=0).itertuples():
        both = ((tokens["atom_1"] == row.parent) & (tokens["atom_2"] == row.child)).sum()
        assert row.overlap == both
        n_child = (tokens["atom_2"] == row.child).sum()
        assert row.child_tokens == n_child
        if n_child:
            assert row.nesting == pytest.approx(both / n_child)
    assert tree["parent_label"].notna().all() and tree["child_label"].notna().all()
    with pytest.raises(ValueError, match="no level"):
        an.hierarchy_tree(result, model, level=2)


# ------------------------------------------------------------------------------ statistics
def test_enrichment_matches_fisher_exact_and_corrections():
    rng = np.random.default_rng(3)
    atoms = rng.integers(-1, 6, 900)
    labels = np.where(rng.random(900) < 0.3, "a", np.where(rng.random(900) < 0.5, "b", "c"))
    atoms[(labels == "a") & (rng.random(900) < 0.3)] = 2  # atom 2 prefers category a
    table = an.enrichment(atoms, labels, 7, correction="bh")
    assert set(table["atom"]) == set(range(6))  # atom 6 has no token and is not tested
    for row in table.itertuples():
        member, in_atom = labels == row.category, atoms == row.atom
        both = int((member & in_atom).sum())
        odds = [[both, int((~member & in_atom).sum())], [int((member & ~in_atom).sum()), int((~member & ~in_atom).sum())]]
        assert row.p == pytest.approx(stats.fisher_exact(odds, alternative="greater").pvalue, rel=1e-6)
        assert row.overlap == both
    p = table["p"].to_numpy()
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    bh = np.minimum.accumulate(ranked[::-1])[::-1]
    np.testing.assert_allclose(table["q"].to_numpy()[order], np.minimum(bh, 1.0), rtol=1e-9)
    bonferroni = an.enrichment(atoms, labels, 7, correction="bonferroni")
    np.testing.assert_allclose(bonferroni["q"], np.minimum(1.0, p * len(p)))
    assert table.set_index(["atom", "category"]).loc[(2, "a"), "significant"]
    with pytest.raises(ValueError, match="correction"):
        an.enrichment(atoms, labels, 7, correction="holm")
    with pytest.raises(ValueError, match="sample_ids"):
        an.enrichment(atoms, labels, 7, unit="sample")


def test_top_tokens_rank_by_count_times_log_lift():
    keys = ["x"] * 10 + ["y"] * 10 + ["z"] * 80
    atoms = [0] * 8 + [1] * 2 + [0] * 3 + [1] * 7 + [1] * 80
    top = an.top_tokens(keys, atoms, n=2, min_count=2)
    x = top[(top["atom"] == 0) & (top["key"] == "x")].iloc[0]
    assert x["count"] == 8 and x["lift"] == pytest.approx((8 / 11) / 0.1)
    assert x["score"] == pytest.approx(8 * np.log2((8 / 11) / 0.1))
    assert top[top["atom"] == 0]["key"].tolist() == ["x", "y"]
    assert top[top["atom"] == 1]["key"].tolist() == ["z"]  # x and y are under-represented in atom 1


# ------------------------------------------------------------------------------ token classes
@pytest.mark.parametrize("scheme, pieces", [
    ("byte-bpe", ["The", "Ġthe", "ory", "Ġof", "Ġ39", "3", "Ġ\\", "frac", "Ġ+", ",", "Ċ", "A", ".", "Ġget_value",
                  "Ġdef", "ĠCourt", "Ġcontract"]),
    ("sentencepiece", ["▁The", "▁the", "ory", "▁of", "▁39", "3", "▁\\", "frac", "▁+", ",", "<0x0A>", "A", ".",
                       "▁get_value", "▁def", "▁Court", "▁contract"]),
    ("wordpiece", ["The", "the", "##ory", "of", "39", "##3", "\\", "frac", "+", ",", "[SEP]", "A", ".", "get_value",
                   "def", "Court", "contract"]),
])
def test_token_classes_for_each_tokenizer_family(scheme, pieces):
    texts = ["The", " the", "ory", " of", " 39", "3", " \\", "frac", " +", ",", "\n", "A", ".", " get_value", " def",
             " Court", " contract"]
    if scheme == "wordpiece":
        texts[10] = "[SEP]"
    expected = ["function word", "word", "word piece", "function word", "number", "number", "math/LaTeX",
                "math/LaTeX", "math/LaTeX", "punctuation", "space/newline", "single letter", "punctuation", "code",
                "code", "capitalised", "word"]
    if scheme == "wordpiece":
        expected[10] = "special"
    assert token_text.detect_scheme(pieces) == scheme
    # sentencepiece and WordPiece tokens decode without their leading space: only the pieces tell
    stripped = [t.lstrip() for t in texts] if scheme != "byte-bpe" else texts
    got = token_text.classify_tokens(stripped, pieces=pieces, scheme=scheme)
    assert got["token_class"].tolist() == expected


def _word_start_truth(text: str, offsets) -> list:
    """From the source text: a token whose first character is a letter or digit starts a word iff the
    character before it is not a letter or digit (None for other tokens)."""
    truth = []
    for start, end in offsets:
        while start < end and text[start].isspace():
            start += 1
        if start >= end or not text[start].isalnum():
            truth.append(None)
        else:
            truth.append(start == 0 or not text[start - 1].isalnum())
    return truth


def _trained_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the theory of relativity explains energy and mass", "courts interpret contracts and statutes",
              "psychologists measure emotion and motivation", "computers execute programs quickly"] * 20
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]"])
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<unk>"], unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]" if kind == "wordpiece" else "<unk>")


@pytest.mark.parametrize("kind", ["byte-bpe", "wordpiece", "sentencepiece"])
def test_word_starts_from_real_tokenizers(kind):
    """As capture stores them: pieces from convert_ids_to_tokens, texts decoded one token at a time."""
    if kind == "byte-bpe":
        from transformers import AutoTokenizer

        from moe_utils.models.tiny_moe import EMBEDDED_DIR

        tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    else:
        tokenizer = _trained_tokenizer(kind)
    text = "the theory explains energy and motivation of courts"
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = encoded["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    texts = tokenizer.batch_decode([[i] for i in ids])
    scheme = token_text.detect_scheme(tokenizer.get_vocab())
    assert scheme == kind
    got = token_text.word_starts(texts, pieces=pieces, scheme=scheme)
    truth = _word_start_truth(text, encoded["offset_mapping"])
    assert any(t is False for t in truth), f"{kind}: the text should split some word: {pieces}"
    assert [bool(g) for g, t in zip(got, truth) if t is not None] == [t for t in truth if t is not None]


# ------------------------------------------------------------------------------ rendering
class _TextAndTags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.classes = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.classes += [v for k, v in attrs if k == "class"]

    def handle_data(self, data):
        self.text.append(data)


def test_rendering_escapes_token_text_and_labels():
    texts = ["<script>", "alert('x')", "</script>", " & ", '"quoted"', "\n", "<b>"]
    atoms = [0, 0, 1, 1, 2, -1, 0]
    labels = {0: "<img src=x onerror=alert(1)>", 1: 'say "hi" & <go>', 2: "plain"}
    out = token_text.render_prompt(texts, [("level 1", atoms, labels)], caption="<i>caption</i>")
    assert "<script" not in out.lower() and "<img" not in out and "<b>" not in out and "<i>" not in out
    assert "&lt;script&gt;" in out and "&amp;" in out and "&quot;quoted&quot;" in out
    parser = _TextAndTags()
    parser.feed(out)
    assert set(parser.tags) <= {"div", "span"}  # no script, style, link or image
    assert parser.classes[0] == token_text.CSS_CLASS
    shown = "".join(parser.text)
    for token in ("<script>", "alert('x')", "</script>", '"quoted"', "<b>", "<i>caption</i>"):
        assert token in shown  # the parser unescapes: the text is shown literally
    for label in labels.values():
        assert label in shown  # legend
    with pytest.raises(ValueError, match="atoms"):
        token_text.render_prompt(texts, [("level 1", atoms[:-1], labels)])


def test_render_a_stored_prompt(planted):
    _, _, result = planted
    out = result.render(3, max_colours=4, caption="question 3")
    parser = _TextAndTags()
    parser.feed(out)
    prompt = result.tokens[result.tokens["sample_id"] == 3]
    assert parser.text.count(prompt["token"].iloc[0]) >= 2  # once per level
    assert out.count("level 1") >= 1 and out.count("level 2") >= 1
    with pytest.raises(ValueError, match="sample_id"):
        result.render(10_000)


# ------------------------------------------------------------------------------ figures
def test_figures(planted):
    store, _, result = planted
    level = result.level(1)
    profiles = an.domain_profiles(store)
    atoms = level.atoms["atom"].tolist()[:6]
    base = result.tokens["token_class"].value_counts(normalize=True)
    figures = [
        plotting.domain_similarity(profiles, an.domain_similarity(profiles),
                                   an.domain_similarity(profiles, centered=True), n_experts=LAYOUT[1]),
        plotting.enrichment_heatmap(level.enrichment, atoms, labels=level.labels),
        plotting.token_class_heatmap(level.classes, base, atoms, labels=level.labels),
    ]
    assert all(isinstance(f, Figure) for f in figures)
    matplotlib.pyplot.close("all")
