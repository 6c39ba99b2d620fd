"""Every method's masks, domain restriction, evaluation and the artifact (moe_utils.compression.pruning):
masks of every method from real calibration statistics, the evaluation cache, Table 1 and ranks,
and the checksummed artifact."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from moe_utils.compression import caep, pruning
from moe_utils.capture.routing import capture_routing

from .conftest import TEXTS


# ---------------------------------------------------------------------------- all methods
def test_pruning_masks_for_every_method(olmoe, olmoe_stats):
    model, _ = olmoe
    D = np.random.default_rng(0).random((24, 5))
    R = sp.random(5, 40, density=0.4, random_state=0, format="csr")
    budget = caep.PruningBudget((8, 8, 8), 2)
    masks = pruning.pruning_masks([0.25, 0.5], budget=budget, stats=olmoe_stats,
                                  dictionary=(D, R), seeds=(0, 1), model=model, progress=False)
    assert [m.label for m in masks[:4]] == ["caep", "caep", "caep_layer", "caep_layer"]
    assert len(masks) == 2 * (len(pruning.METHODS) + 1)
    for mask in masks:
        counts = budget.kept_per_layer(mask.keep)
        assert (counts >= 2).all()
        if mask.method != "caep":
            assert counts.tolist() == [6, 6, 6] if mask.ratio == 0.25 else [4, 4, 4]
    output = {m.ratio: m.keep for m in masks if m.method == "output"}
    assert (output[0.25] >= output[0.5]).all()  # nested: the greedy order serves every ratio
    np.testing.assert_array_equal(next(m.keep for m in masks if m.method == "frequency" and m.ratio == 0.5),
                                  caep.layerwise_mask(olmoe_stats.score("frequency"), budget, 0.5))
    with pytest.raises(ValueError, match="caep needs dictionary"):
        pruning.pruning_masks([0.5], budget=budget, methods=["caep"])
    overlap = pruning.mask_overlap(masks[:2])
    assert overlap.iloc[0, 0] == 1.0 and 0 <= overlap.iloc[0, 1] <= 1


def test_group_limited_router_gets_only_masks_it_can_route(random_models):
    """DeepSeek-V3's tiny router (8 experts in 2 groups, top-2) accepts 4, 6 or 8 experts per layer:
    every method's mask (the merges' kept experts too) rounds up to those counts and masks the
    model; the one-at-a-time output search is refused with the reason."""
    from moe_utils.compression.calibration import calibrate
    from moe_utils.models.expert_surgery import masked_experts

    model, tok = random_models["deepseek_v3"]
    budget = caep.PruningBudget.for_model(model, min_per_layer=2)
    sizes, allowed = budget.layer_sizes, budget.allowed
    skipped = pruning.unsupported_methods(pruning.METHODS, budget)
    assert list(skipped) == ["output"] and "group-limited" in skipped["output"]
    assert pruning.unsupported_methods(pruning.METHODS, caep.PruningBudget(sizes, 2)) == {}
    stats = calibrate(model, tok, TEXTS, batch_size=3, max_length=64, keep_hidden=32, progress=False)
    rng = np.random.default_rng(0)
    dictionary = (rng.random((sum(sizes), 5)), rng.random((5, 30)))
    with pytest.raises(ValueError, match="output removes one expert at a time"):
        pruning.pruning_masks([0.5], budget=budget, stats=stats, dictionary=dictionary, model=model, progress=False)
    methods = [m for m in pruning.METHODS if m not in skipped]
    masks = pruning.pruning_masks([0.25, 0.5, 0.75], budget=budget, methods=methods,
                                  stats=stats, dictionary=dictionary, model=model, progress=False)
    for mask in masks:
        assert all(c in rule for c, rule in zip(budget.kept_per_layer(mask.keep), allowed)), mask.label
        with masked_experts(model, mask.keep):  # raises PruningError for a count the router cannot route
            pass
    at_75 = next(m for m in masks if m.method == "frequency" and m.ratio == 0.75)
    assert "group-limited routing" in at_75.note  # 2 wanted per layer, 4 kept


# ----------------------------------------------------------------------- domain restriction
def test_label_columns_and_hsdl_factors(olmoe, tmp_path):
    model, tok = olmoe
    labels = ["math" if i % 2 else "law" for i in range(len(TEXTS))]
    store = capture_routing(model, tok, TEXTS, labels=labels, out_dir=tmp_path / "s", batch_size=3, progress=False)
    tokens = pruning.label_columns(store, "math")
    assert tokens.sum() == (store.tokens["label"] == "math").sum()
    samples = pruning.label_columns(store, ["math"], granularity="sample")
    assert samples.tolist() == [label == "math" for label in labels]
    with pytest.raises(ValueError, match="not in the store"):
        pruning.label_columns(store, "physics")
    rng = np.random.default_rng(0)
    r1 = sp.random(4, len(tokens), density=0.3, random_state=1, format="csr")
    fake = SimpleNamespace(dictionaries_=[rng.random((24, 4)), rng.random((24, 3))], codes_=[r1, rng.random((3, 4))])
    D, R = pruning.hsdl_factors(fake, columns=tokens)
    np.testing.assert_array_equal(R.toarray(), r1.toarray()[:, tokens])
    D2, R2 = pruning.hsdl_factors(fake, level=2, columns=tokens)
    np.testing.assert_allclose(R2.toarray(), fake.codes_[1] @ r1.toarray()[:, tokens])
    assert D2 is fake.dictionaries_[1] or np.array_equal(D2, fake.dictionaries_[1])


# ---------------------------------------------------------------------------- evaluation
def test_evaluation_runs_group_by_limit():
    runs = pruning.evaluation_runs(["mmlu_pro_ppl", "mmlu_pro_mc", "wikitext2_ppl"], ["math", "computer science"],
                                   4, {"wikitext2_ppl": 1})
    assert runs == [{"tasks": ["mmlu_pro_ppl_math", "mmlu_pro_ppl_computer_science", "mmlu_pro_mc_math",
                               "mmlu_pro_mc_computer_science"], "limit": 4},
                    {"tasks": ["wikitext2_ppl"], "limit": 1}]
    assert pruning.evaluation_runs(["wikitext2_ppl"], [], 4, {"arc_easy": 1}) == [{"tasks": ["wikitext2_ppl"],
                                                                                    "limit": 4}]
    small = pruning.resolve_evaluation("embedded")
    assert small["tasks"] == ["blimp", "wikitext2_ppl", "mmlu_pro_ppl"] and "mmlu_pro_mc" not in small["tasks"]
    assert small["task_limits"] == pruning.SMALL_MODEL_LIMITS
    real = pruning.resolve_evaluation("allenai/OLMoE-1B-7B-0924")
    assert real["tasks"] == list(pruning.PAPER_TASKS) and real["limit"] is None


def _results():
    rows = []
    for method, ratio, seed, acc, ppl in [("unpruned", 0.0, None, 0.5, 10.0), ("caep", 0.5, None, 0.4, 20.0),
                                          ("frequency", 0.5, None, 0.45, 30.0), ("random", 0.5, 0, 0.2, 50.0),
                                          ("random", 0.5, 1, 0.3, 70.0)]:
        for task, metric, value in [("t1", "acc", acc), ("t2", "acc", acc / 2), ("wikitext2_ppl", "word_perplexity", ppl),
                                    ("wikitext2_ppl", "bits_per_byte", 1.0)]:
            rows.append(dict(method=method, ratio=ratio, seed=seed, pruned_share=ratio, task=task, metric=metric,
                             value=value, stderr=np.nan, n=4, seconds=1.0, cached=False))
    return pd.DataFrame(rows)


def test_method_ranks():
    """Accuracy: higher is better, perplexity: lower; mean rank over the tasks at one ratio."""
    rows = _results()
    summary = rows[rows["metric"].isin(["acc", "word_perplexity"])].groupby(
        ["method", "ratio", "task", "metric"], sort=False)["value"].mean().rename("mean").reset_index()
    ranks = pruning.method_ranks(summary, 0.5)
    assert ranks.index.tolist() == ["frequency", "caep", "random"]
    assert ranks["caep"] == (2 + 2 + 1) / 3  # t1, t2: second; wikitext: best


def test_save_and_load_pruning(tmp_path, olmoe_stats):
    masks = [pruning.unpruned_mask(24), pruning.PruningMask("random", 0.5, caep.random_mask(caep.PruningBudget((8,) * 3), 0.5, 3),
                                                             seed=3, note="n")]
    pruning.save_pruning(tmp_path, masks, _results(), stats=olmoe_stats, extra={"parameters": {"x": 1}})
    loaded, results, manifest = pruning.load_pruning(tmp_path)
    assert [(m.method, m.seed, m.note) for m in loaded] == [(m.method, m.seed, m.note) for m in masks]
    np.testing.assert_array_equal(loaded[1].keep, masks[1].keep)
    assert manifest["parameters"] == {"x": 1} and len(results) == len(_results())
    (tmp_path / "results.csv").write_text("tampered")
    with pytest.raises(ValueError, match="checksum"):
        pruning.load_pruning(tmp_path)
