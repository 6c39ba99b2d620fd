"""moe_utils.compression.domains: domain columns, domain-restricted scores and CAEP on a store with planted
domain routing, per-document evaluation against the harness's own aggregates, and the
relative-change matrix and its diagonal test on hand-made documents."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from moe_utils.compression import domains
from moe_utils.compression.caep import PruningBudget
from moe_utils.compression.evaluate import evaluate_compressions
from moe_utils.compression.value import Compression
from moe_utils.evaluation.harness import SAMPLE_COLUMNS
from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.compression.pruning import unpruned_mask
from moe_utils.capture.store import RoutingStore, write_store

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MMLU_PRO_DIR = Path(os.environ.get("MOE_MMLU_PRO_DIR") or SHARED / "mmlu_pro")
N_LAYERS, N_EXPERTS, TOP_K = 3, 8, 2
PLANTED = {"math": [0, 1], "law": [4, 5], "physics": [2, 6]}  # each domain's experts in every layer


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory) -> RoutingStore:
    """Tokens of each domain pick its planted experts with probability 0.9 per slot, else a random one."""
    rng = np.random.default_rng(0)
    labels, samples, idx = [], [], []
    sample = 0
    for domain, experts in PLANTED.items():
        for _ in range(4):  # 4 samples per domain, 30 tokens each
            for _ in range(30):
                row = []
                for _ in range(N_LAYERS):
                    if rng.random() < 0.9:
                        row.append(experts)
                    else:
                        row.append(list(rng.choice(N_EXPERTS, size=TOP_K, replace=False)))
                idx.append(row)
                labels.append(domain)
                samples.append(sample)
            sample += 1
    topk = np.array(idx, dtype=np.uint8)  # (n, L, k)
    weights = np.tile(np.array([0.6, 0.4], dtype=np.float32), (*topk.shape[:2], 1))
    tokens = pd.DataFrame({"sample_id": samples, "position": np.arange(len(samples)) % 30, "token_id": 1,
                           "token": "x", "label": labels})
    manifest = {"model": {"name": "synthetic", "n_experts": N_EXPERTS, "n_layers": N_LAYERS, "top_k": TOP_K},
                "data": {}, "fingerprint": {"texts": "planted"}}
    path = tmp_path_factory.mktemp("planted") / "store"
    write_store(path, manifest, {"topk_indices": topk, "topk_weights": weights}, tokens)
    return RoutingStore.open(path)


def _fake_hsdl(store, dictionary, codes, fingerprint=None):
    """What domain pruning reads from a fitted HSDL: D_1, R_1 and the manifest naming the store."""
    return SimpleNamespace(codes_=[sp.csr_matrix(codes)], dictionaries_=[np.asarray(dictionary)],
                           manifest_={"x_spec": {"granularity": "token"},
                                      "store": {"fingerprint": fingerprint or store.manifest["fingerprint"]}})


# ------------------------------------------------------------------------- domain pruning
def test_domain_factors_restrict_the_codes_to_the_domain(planted_store):
    # D = I (one atom per expert) and R = X: e = D @ R_sum is each expert's routing weight in the domain
    x = expert_matrix(planted_store, "token", "weight")
    hsdl = _fake_hsdl(planted_store, np.eye(N_LAYERS * N_EXPERTS), x)
    D, R = domains.domain_factors(hsdl, planted_store, "law")
    assert R.shape == (N_LAYERS * N_EXPERTS, 120)
    e = D @ np.asarray(R.sum(axis=1)).ravel()
    np.testing.assert_allclose(e, x.toarray()[:, 120:240].sum(axis=1), rtol=1e-6)
    assert set(np.argsort(e.reshape(N_LAYERS, N_EXPERTS)[1])[-2:]) == set(PLANTED["law"])
    with pytest.raises(ValueError, match="not in the store"):
        domains.domain_factors(hsdl, planted_store, "biology")


def test_domain_caep_keeps_each_domains_planted_experts(planted_store):
    x = expert_matrix(planted_store, "token", "weight")
    hsdl = _fake_hsdl(planted_store, np.eye(N_LAYERS * N_EXPERTS), x)
    budget = PruningBudget((N_EXPERTS,) * N_LAYERS, TOP_K)
    masks = domains.domain_masks(hsdl, planted_store, list(PLANTED), ratio=0.5, methods=["caep"],
                                 budget=budget, threshold_ratio=0.25)
    assert sorted(masks) == sorted(("caep", d) for d in PLANTED)
    for domain, experts in PLANTED.items():
        keep = masks[("caep", domain)].keep.reshape(N_LAYERS, N_EXPERTS)
        assert keep.sum() <= N_LAYERS * N_EXPERTS // 2
        assert keep[:, experts].all(), domain
        others = sorted({e for d, ex in PLANTED.items() if d != domain for e in ex} - set(experts))
        assert not keep[:, others].all(axis=0).any(), domain  # no other domain's planted expert kept in every layer
    with pytest.raises(ValueError, match="calibration texts"):
        domains.domain_masks(hsdl, planted_store, ["math"], ratio=0.5, methods=["frequency"], budget=budget,
                             threshold_ratio=0.25)


def test_domain_frequency_baseline_is_calibrated_on_the_domain_only(small_model, tmp_path):
    from moe_utils.compression.caep import layerwise_mask
    from moe_utils.capture.routing import capture_routing

    from .conftest import TEXTS

    model, tok = small_model
    split = {"a": TEXTS[:3], "b": TEXTS[3:]}
    store = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "all", labels=["a"] * 3 + ["b"] * 4, progress=False)
    budget = PruningBudget.for_model(model)
    masks = domains.domain_masks(None, store, ["a", "b"], ratio=0.5, methods=["frequency"], budget=budget,
                                 threshold_ratio=0.9, calibration=split, model=model, tokenizer=tok)
    for domain, texts in split.items():  # independent truth: routing captured on the domain's texts alone
        own = capture_routing(model, tok, texts, out_dir=tmp_path / domain, progress=False)
        freq = binary_frequency(own)
        expected = layerwise_mask(freq, budget, 0.5)
        np.testing.assert_array_equal(masks[("frequency", domain)].keep, expected)
    assert not np.array_equal(masks[("frequency", "a")].keep, masks[("frequency", "b")].keep)


def binary_frequency(store) -> np.ndarray:
    return np.asarray(expert_matrix(store, "token", "binary").mean(axis=1)).ravel()


def test_domain_refit_fits_hsdl_on_the_domain_alone(planted_store):
    from moe_utils.patterns.hsdl import HSDL

    x = expert_matrix(planted_store, "token", "weight")
    hsdl = HSDL(levels=[6], n_steps=20, batch_size=64, layout=(N_LAYERS, N_EXPERTS), random_state=0).fit(x)
    hsdl.manifest_ = {"x_spec": {"granularity": "token"}, "store": {"fingerprint": planted_store.manifest["fingerprint"]}}
    D, R = domains.domain_factors(hsdl, planted_store, "physics", refit=True, X=x)
    assert D.shape == (N_LAYERS * N_EXPERTS, 6) and R.shape == (6, 120)
    assert not np.allclose(D, hsdl.dictionaries_[0])
    with pytest.raises(ValueError, match="needs X"):
        domains.domain_factors(hsdl, planted_store, "physics", refit=True)


def test_check_alignment(planted_store):
    codes = np.ones((4, planted_store.n_tokens))
    good = _fake_hsdl(planted_store, np.ones((N_LAYERS * N_EXPERTS, 4)), codes)
    assert domains.check_alignment(good, planted_store) == "token"
    other = _fake_hsdl(planted_store, np.ones((N_LAYERS * N_EXPERTS, 4)), codes, fingerprint={"texts": "other"})
    with pytest.raises(ValueError, match="re-run stage 2"):
        domains.check_alignment(other, planted_store)
    short = _fake_hsdl(planted_store, np.ones((N_LAYERS * N_EXPERTS, 4)), codes[:, :10])
    with pytest.raises(ValueError, match="re-run stage 2"):
        domains.check_alignment(short, planted_store)


def _stage4_results() -> pd.DataFrame:
    rows = [("unpruned", 0.0, None, "mmlu_pro_ppl_math", "bits_per_byte", 2.0, 10),
            ("unpruned", 0.0, None, "mmlu_pro_ppl_law", "bits_per_byte", 4.0, 10),
            ("unpruned", 0.0, None, "wikitext2_ppl", "word_perplexity", 100.0, 5)]
    for method, ppl_change, seeds in (("frequency", 0.3, [None]), ("reap", 0.1, [None]), ("caep", 0.0, [None]),
                                      ("random", -0.5, [0, 1])):
        for ratio, scale in ((0.5, 1.0), (0.25, 0.2)):
            for seed in seeds:
                jitter = 0.0 if seed is None else (0.1 if seed else -0.1)
                rows += [(method, ratio, seed, "mmlu_pro_ppl_math", "bits_per_byte", 2.0 * (1 + ppl_change * scale), 10),
                         (method, ratio, seed, "mmlu_pro_ppl_law", "bits_per_byte", 4.0 * (1 + (ppl_change + jitter) * scale
                                                                                          + 0.05), 10),
                         (method, ratio, seed, "wikitext2_ppl", "word_perplexity", 100.0 * (1 - ppl_change), 5)]
    return pd.DataFrame(rows, columns=["method", "ratio", "seed", "task", "metric", "value", "n"])


def test_strongest_baseline_reads_stage_4_results():
    results = _stage4_results()
    assert domains.strongest_baseline(results, 0.5, task_prefix="mmlu_pro_ppl")[0] == "reap"  # caep, random: no baselines
    ranking = domains.rank_methods(results, 0.5, task_prefix="mmlu_pro_ppl")
    assert ranking["method"].tolist() == ["random", "caep", "reap", "frequency"]
    assert ranking.set_index("method").loc["reap", "score"] == pytest.approx(-(0.1 + 0.15) / 2)
    assert ranking.set_index("method").loc["random", "n_seeds"] == 2
    everything = domains.rank_methods(results, 0.5)  # with WikiText-2, which says the opposite
    assert everything.set_index("method").loc["frequency", "n_tasks"] == 3
    method, reason = domains.strongest_baseline(results, 0.75)
    assert method == "frequency" and "no baseline at ratio 0.75" in reason
    assert domains.strongest_baseline(None, 0.5)[0] == "frequency"


def test_category_breakdown_of_stage_4():
    out = domains.category_breakdown(_stage4_results())
    assert set(out["category"]) == {"math", "law"} and "wikitext" not in "".join(out["category"])
    law = out[(out["method"] == "random") & (out["ratio"] == 0.5) & (out["category"] == "law")].iloc[0]
    # seeds: 1 + (-0.5 -+ 0.1) + 0.05 -> changes -0.55 and -0.35
    assert (law["change"], law["change_min"], law["change_max"], law["n_seeds"]) == pytest.approx((-0.45, -0.55, -0.35, 2))
    freq = out[(out["method"] == "frequency") & (out["ratio"] == 0.25) & (out["category"] == "math")].iloc[0]
    assert freq["change"] == pytest.approx(0.06) and freq["n"] == 10 and freq["metric"] == "bits_per_byte"
    with pytest.raises(ValueError, match="no mmlu_pro_mc_<category>"):
        domains.category_breakdown(_stage4_results(), task_prefix="mmlu_pro_mc")


def test_chance_accuracy():
    if not MMLU_PRO_DIR.is_dir():
        pytest.skip(f"no local MMLU-Pro at {MMLU_PRO_DIR}")
    from moe_utils.evaluation.data import load_mmlu_pro

    questions = load_mmlu_pro("test", MMLU_PRO_DIR)
    ten = questions[questions["options"].map(len) == 10]["question_id"].head(3).tolist()
    four = questions[questions["options"].map(len) == 4]["question_id"].head(1).tolist()
    assert domains.chance_accuracy(ten + four, MMLU_PRO_DIR) == pytest.approx((3 * 0.1 + 0.25) / 4)


# ------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def small_model():
    import torch

    from moe_utils.models.loading import load_model

    torch.manual_seed(0)
    return load_model("random:olmoe")


@pytest.fixture(scope="module")
def evaluated(small_model):
    """The unpruned model and one pruned at half its experts per layer, through stage 5's evaluator
    (stage 4's), on two perplexity categories and one multiple-choice category."""
    if not MMLU_PRO_DIR.is_dir():
        pytest.skip(f"no local MMLU-Pro at {MMLU_PRO_DIR}")
    from moe_utils.models.loading import moe_layers

    model, tok = small_model
    layers = moe_layers(model)
    per = layers[0].num_experts
    keep = np.tile(np.arange(per) < per // 2, len(layers))
    compressions = [unpruned_mask(len(keep)), Compression("frequency", 0.5, keep)]
    return evaluate_compressions(model, tok, compressions, [{"tasks": ["mmlu_pro_ppl_math", "mmlu_pro_ppl_law",
                                                                       "mmlu_pro_mc_law"], "limit": 3}],
                                 cache_dir=None, progress=False, num_fewshot=0, batch_size=4, max_length=128,
                                 data_dir=MMLU_PRO_DIR)


def test_documents_reproduce_the_harness_aggregates(evaluated):
    table, docs = evaluated
    for method in ("unpruned", "frequency"):
        own = docs[docs["method"] == method]
        values = table[table["method"] == method].set_index(["task", "metric"])["value"]
        assert len(own) == 9 and own["question_id"].notna().all()
        for category, task in (("math", "mmlu_pro_ppl_math"), ("law", "mmlu_pro_ppl_law")):
            for metric in ("byte_perplexity", "word_perplexity", "bits_per_byte"):
                got = domains.category_scores(own, metric, [category], n_boot=20)["value"].item()
                assert got == pytest.approx(values[(task, metric)], rel=1e-9)
        acc = domains.category_scores(own, "acc", ["law"])
        assert acc["value"].item() == pytest.approx(values[("mmlu_pro_mc_law", "acc")])
        assert acc["n"].item() == 3 and acc["low"].item() <= acc["value"].item() <= acc["high"].item()
    unpruned, pruned = (docs[docs["method"] == m].dropna(subset=["loglikelihood"]) for m in ("unpruned", "frequency"))
    assert np.array_equal(unpruned["question_id"], pruned["question_id"])
    assert not np.allclose(unpruned["loglikelihood"], pruned["loglikelihood"])
    with pytest.raises(ValueError, match="mmlu_pro_ppl_physics"):
        domains.category_scores(docs, "byte_perplexity", ["physics"])


# --------------------------------------------------------------------------- analysis
def _docs(ll_by_category: dict[str, list[float]], n_bytes: float = 10.0) -> pd.DataFrame:
    rows = []
    for category, lls in ll_by_category.items():
        for i, ll in enumerate(lls):
            rows.append({"task": domains.category_task(category, "byte_perplexity"), "doc_id": i,
                         "question_id": 100 * len(rows) + i, "loglikelihood": ll, "n_bytes": n_bytes, "n_words": 2.0,
                         "correct": np.nan})
    return pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))


def test_relative_change_by_hand():
    ln2 = np.log(2)
    original = _docs({"math": [-10 * ln2, -10 * ln2], "law": [-20 * ln2, -20 * ln2]})  # byte ppl 2 and 4
    pruned = {"math": _docs({"math": [-10 * ln2, -10 * ln2], "law": [-30 * ln2, -30 * ln2]})}  # 2 and 8
    pruned["math"]["question_id"] = original["question_id"]
    table = domains.relative_change_table(original, pruned, "byte_perplexity", ["math", "law"], n_boot=50)
    cells = table.set_index("evaluated")
    assert cells.loc["math", "change"] == pytest.approx(0.0)
    assert cells.loc["law", "original"] == pytest.approx(4.0) and cells.loc["law", "pruned"] == pytest.approx(8.0)
    assert cells.loc["law", "change"] == pytest.approx(1.0)
    assert cells.loc["law", "low"] == pytest.approx(1.0) and cells.loc["law", "n"] == 2  # identical docs: no spread
    bits = domains.relative_change_table(original, pruned, "bits_per_byte", ["law"], n_boot=10)
    assert bits["change"].item() == pytest.approx(0.5)  # 2 -> 3 bits per byte
    other = _docs({"math": [-1.0, -1.0], "law": [-1.0, -1.0]})
    other["question_id"] += 1
    with pytest.raises(ValueError, match="other math questions"):
        domains.relative_change_table(original, {"x": other}, "byte_perplexity", ["math"])


def test_diagonal_summary_finds_a_planted_diagonal():
    rng = np.random.default_rng(0)
    cats = ["math", "law", "physics"]
    base = {c: list(-rng.uniform(20, 40, size=12)) for c in cats}
    original = _docs(base)
    pruned = {}
    for target in cats:  # pruning for `target` costs 5% log-likelihood on it, 30% elsewhere, plus noise
        frame = _docs({c: [ll * (1.05 if c == target else 1.3) * rng.uniform(0.98, 1.02) for ll in base[c]]
                       for c in cats})
        frame["question_id"] = original["question_id"]
        pruned[target] = frame
    test, interval = domains.diagonal_summary(original, pruned, "byte_perplexity", cats, n_boot=200)
    assert test.p_value == pytest.approx(1 / 6) and test.n_best_columns == 3  # 3! = 6 permutations
    assert interval.low > 0 and interval.estimate == pytest.approx(test.advantage)
    # the labels swapped: pruning for math is now called law's
    swapped = {"math": pruned["law"], "law": pruned["physics"], "physics": pruned["math"]}
    test, interval = domains.diagonal_summary(original, swapped, "byte_perplexity", cats, n_boot=200)
    assert test.p_value > 0.5 and interval.high < 0
    with pytest.raises(ValueError, match="one pruned model per domain"):
        domains.diagonal_summary(original, {"math": pruned["math"]}, "byte_perplexity", cats)


def test_versus_general_by_hand():
    ln2 = np.log(2)
    original = _docs({"math": [-10 * ln2] * 3, "law": [-10 * ln2] * 3})  # byte ppl 2 everywhere
    specific = {"math": _docs({"math": [-11 * ln2] * 3, "law": [-15 * ln2] * 3}),   # math: 2 -> 2^1.1
                "law": _docs({"math": [-15 * ln2] * 3, "law": [-12 * ln2] * 3})}    # law: 2 -> 2^1.2
    general = _docs({"math": [-12 * ln2] * 3, "law": [-11 * ln2] * 3})              # 2^1.2 and 2^1.1
    out = domains.versus_general(original, specific, general, "byte_perplexity", ["math", "law"], n_boot=20).set_index("domain")
    assert out.loc["math", "specific"] == pytest.approx(2 ** 0.1 - 1)
    assert out.loc["math", "gain"] == pytest.approx(2 ** 0.2 - 2 ** 0.1)  # specific is better on math
    assert out.loc["law", "gain"] == pytest.approx(2 ** 0.1 - 2 ** 0.2)   # and worse on law
    assert out.loc["law", "low"] == pytest.approx(out.loc["law", "gain"]) and out.loc["law", "n"] == 3


def test_breaking_order_and_caep_versus_baselines():
    results = _stage4_results()
    order = domains.breaking_order(domains.category_breakdown(results))
    assert list(order.index) == [0.25, 0.5] and set(order.columns) == {"math", "law"}
    # law's rows carry an extra +5% for every method: it breaks first at both ratios
    assert (order.idxmax(axis=1) == "law").all()
    assert order.loc[0.5, "math"] == pytest.approx(np.mean([0.3, 0.1, 0.0, -0.5]))
    versus = domains.caep_versus_best_baseline(results, 0.5, task_prefix="mmlu_pro_ppl")
    assert versus["baseline"] == "reap" and versus["caep"] == pytest.approx(-0.025)
    assert versus["baseline_score"] == pytest.approx(-0.125) and versus["n_tasks"] == 2
    assert domains.caep_versus_best_baseline(results, 0.75) is None


def test_cached_masks_round_trip(tmp_path):
    from moe_utils.compression.pruning import PruningMask

    calls = []

    def compute():
        calls.append(1)
        return {("caep", "math"): PruningMask("caep", 0.5, np.array([1, 0, 1, 0], bool), note="guard: nothing"),
                ("reap", "law"): PruningMask("reap", 0.5, np.array([0, 1, 1, 0], bool))}

    first, hit = domains.cached_masks(tmp_path, {"ratio": 0.5}, compute)
    again, hit2 = domains.cached_masks(tmp_path, {"ratio": 0.5}, compute)
    assert (hit, hit2, len(calls)) == (False, True, 1)
    assert list(again) == list(first) and again[("caep", "math")].note == "guard: nothing"
    np.testing.assert_array_equal(again[("reap", "law")].keep, first[("reap", "law")].keep)
    domains.cached_masks(tmp_path, {"ratio": 0.25}, compute)
    assert len(calls) == 2


def _mc_docs(correct_by_category: dict[str, list[int]]) -> pd.DataFrame:
    rows = [{"task": domains.category_task(c, "acc"), "doc_id": i, "question_id": 1000 * k + i, "loglikelihood": np.nan,
             "n_bytes": np.nan, "n_words": np.nan, "correct": float(v)}
            for k, (c, values) in enumerate(correct_by_category.items()) for i, v in enumerate(values)]
    return pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))


def test_accuracy_matrix_and_its_diagonal():
    rng = np.random.default_rng(1)
    cats = ["math", "law", "physics"]
    truth = {c: (rng.random(60) < 0.6).astype(int) for c in cats}
    original = _mc_docs({c: list(v) for c, v in truth.items()})
    # pruning for `target` keeps its own answers, loses a third of the correct answers elsewhere
    pruned = {t: _mc_docs({c: [v if (c == t or i % 3) else 0 for i, v in enumerate(truth[c])] for c in cats})
              for t in cats}
    table = domains.relative_change_table(original, pruned, "acc", cats, n_boot=100)
    own = table[table["target"] == table["evaluated"]]
    assert np.allclose(own["change"], 0) and (table.loc[table["target"] != table["evaluated"], "change"] < 0).all()
    test, interval = domains.diagonal_summary(original, pruned, "acc", cats, n_boot=100)
    assert test.p_value == pytest.approx(1 / 6) and test.n_best_columns == 3 and interval.low > 0
    scores = domains.category_scores(original, "acc", ["law"])
    assert scores["value"].item() == pytest.approx(truth["law"].mean()) and scores["n"].item() == 60
    hopeless = _mc_docs({c: [0] * 5 for c in cats})
    with pytest.raises(ValueError, match="accuracy|acc is 0"):
        domains.diagonal_summary(hopeless, {t: hopeless for t in cats}, "acc", cats)
