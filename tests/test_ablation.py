"""The CAEP ablation (moe_utils.compression.ablation) on a tiny random OLMoE: one setting changed per variant,
each variant equal to CAEP called directly with that setting, refits cached."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moe_utils.compression import ablation, caep
from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.patterns.hsdl import HSDL
from moe_utils.compression.pruning import hsdl_factors
from moe_utils.capture.routing import capture_routing
from moe_utils.stages import pruning as pruning_stage

from .conftest import TEXTS

FAST = dict(n_steps=30, batch_size=64, random_state=0)


@pytest.fixture(scope="module")
def fitted(olmoe, tmp_path_factory):
    model, tok = olmoe
    store = capture_routing(model, tok, TEXTS, out_dir=tmp_path_factory.mktemp("store"), progress=False)
    X = expert_matrix(store)
    hsdl = HSDL(levels=[1.0, 0.5], layout=(store.n_layers, store.n_experts), **FAST).fit(X)
    return model, tok, store, X, hsdl


def test_variants_change_one_setting_each(fitted, tmp_path):
    model, tok, store, X, hsdl = fitted
    sizes = [store.n_experts] * store.n_layers
    other = ablation.routing_matrix(model, tok, TEXTS[::-1][:4], cache_dir=tmp_path, max_length=32)
    rows = ablation.caep_variants(hsdl, X, 0.5, budget=caep.PruningBudget(tuple(sizes), store.top_k), threshold_ratio=0.9,
                                  k1_values=(0.7, 0.9), size_values=(0.5, 1.0), other_X=("other text", other),
                                  cache_dir=tmp_path)
    assert list(rows["factor"]) == ["reference", "calibration text", "HSDL level", "dictionary size", "threshold k1"]
    # k1 0.9 and size 1.0 are the reference's own settings: not repeated
    assert rows["mask"].map(lambda m: m.method).is_unique

    def direct(D, R, k1):
        return caep.caep(D, R, k1, 0.5, budget=caep.PruningBudget(tuple(sizes), store.top_k)).keep

    by_factor = dict(zip(rows["factor"], rows["mask"]))
    np.testing.assert_array_equal(by_factor["reference"].keep, direct(*hsdl_factors(hsdl, level=1), 0.9))
    np.testing.assert_array_equal(by_factor["HSDL level"].keep, direct(*hsdl_factors(hsdl, level=2), 0.9))
    np.testing.assert_array_equal(by_factor["threshold k1"].keep, direct(*hsdl_factors(hsdl, level=1), 0.7))
    for mask in rows["mask"]:
        assert (caep.PruningBudget(tuple(sizes)).kept_per_layer(mask.keep) >= store.top_k).all() and mask.ratio == 0.5
    # the refits are cached: the same inputs read the same dictionary back
    small = ablation.refit(X, hsdl, [0.5], tmp_path)
    assert small.level_sizes_ == [hsdl.level_sizes_[0] // 2]
    np.testing.assert_array_equal(by_factor["dictionary size"].keep, direct(*hsdl_factors(small, level=1), 0.9))
    assert len(list(tmp_path.glob("hsdl-*"))) == 2  # one per refit: size 0.5 and the other text
    # the other text's routing differs from the stage-1 routing it replaces
    assert other.shape[0] == X.shape[0] and other.shape[1] != X.shape[1]


def test_ablation_table_reads_the_comparisons(fitted, tmp_path):
    _, _, store, X, hsdl = fitted
    sizes = [store.n_experts] * store.n_layers
    rows = ablation.caep_variants(hsdl, X, 0.5, budget=caep.PruningBudget(tuple(sizes), store.top_k), threshold_ratio=0.9,
                                  k1_values=(0.7,), size_values=(), cache_dir=tmp_path)
    methods = [m.method for m in rows["mask"]] + ["caep_layer"]
    compared = pd.DataFrame({"measure": "blimp", "method": methods, "ratio": 0.5, "reference": "random",
                             "estimate": [-0.02, 0.01, 0.0, -0.03][:len(methods)],
                             "low": [-0.03, 0.005, -0.01, -0.05][:len(methods)],
                             "high": [-0.01, 0.02, 0.01, -0.01][:len(methods)],
                             "significant": [True, True, False, True][:len(methods)]})
    table = pruning_stage.ablation_table(rows, compared, ["blimp"])
    assert list(table["factor"]) == ["reference", "HSDL level", "threshold k1", "scope"]
    assert table["BLiMP accuracy: vs random"].iloc[0] == "-2.0 [-3.0, -1.0]*"
