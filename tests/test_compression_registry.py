"""The compression registry (moe_utils.compression.registry): today's masks reproduced bit for bit
from masks recorded with the code before the registry (tests/data/record_masks.py), the derived
lists and checks, and the digest every evaluation key uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_utils.compression import caep, domains, pruning
from moe_utils.compression import registry
from moe_utils.compression.value import Compression

from .data.record_masks import METHODS as RECORDED, RATIOS, case

RECORD = Path(__file__).parent / "data" / "masks_before_registry.npz"


@pytest.mark.parametrize("name", ["embedded", "random:olmoe"])
def test_registry_reproduces_the_recorded_masks(name):
    model, budget, stats, dictionary = case(name)
    masks = pruning.pruning_masks(RATIOS, budget=budget, methods=RECORDED, stats=stats, dictionary=dictionary,
                                  seeds=(0, 1), model=model, progress=False)
    with np.load(RECORD) as recorded:
        expected = {k: recorded[k] for k in recorded.files if k.startswith(name + "|")}
    got = {f"{name}|{m.method}|{m.ratio}|{m.seed}": m.keep for m in masks}
    assert sorted(got) == sorted(expected)
    for key, keep in expected.items():
        np.testing.assert_array_equal(got[key], keep, err_msg=key)


def test_derived_lists_and_checks():
    assert pruning.METHODS == registry.names()
    assert registry.names("merge") == ("hc_smoe", "m_smoe")
    assert set(registry.calibrated("prune")) == set(domains.BASELINES) == {"frequency", "router_weight", "ean",
                                                                             "reap", "output"}
    assert registry.keep_hidden(["caep", "frequency"], 512) == 0
    assert registry.keep_hidden(["caep", "hc_smoe"], 512) == 512
    assert registry.needs_stats(["reap"]) and not registry.needs_stats(["caep", "random"])
    with pytest.raises(ValueError, match="unknown pruning method"):
        registry.check_methods(["caep", "magic"])
    grouped = caep.PruningBudget((8, 8), 2, ((4, 6, 8), (4, 6, 8)))
    assert list(registry.unsupported(registry.names(), grouped)) == ["output"]
    with pytest.raises(ValueError, match="hc_smoe needs stats with kept hidden states and model"):
        registry.build(["hc_smoe"], [0.5], registry.Inputs(budget=caep.PruningBudget((8, 8), 2)))


def test_check_built_uses_the_declared_exactness():
    budget = caep.PruningBudget((4, 4), 1)
    uneven = np.array([1, 1, 1, 0, 1, 0, 0, 0], dtype=bool)  # 3 + 1 kept: not the quota 2 + 2
    registry.check_built([Compression("caep", 0.5, uneven)], budget)  # CAEP is global: not exact
    with pytest.raises(AssertionError, match="not the quota"):
        registry.check_built([Compression("frequency", 0.5, uneven)], budget)
    with pytest.raises(AssertionError, match="overlap"):
        registry.check_built([Compression("hc_smoe", 0.5, np.array([1, 1, 0, 0] * 2, dtype=bool),
                                          groups=[[[0, 2], [1, 2]], [[0, 2], [1, 3]]], weights=np.ones(8))], budget)


def test_digest_tells_a_merge_from_the_pruning_with_the_same_kept_experts():
    keep = np.array([1, 0, 1, 0], dtype=bool)
    a, b = Compression("frequency", 0.5, keep), Compression("reap", 0.5, keep.copy())
    assert a.digest == b.digest  # same model: one evaluation serves both
    merged = Compression("hc_smoe", 0.5, keep, groups=[[[0, 1], [2, 3]]], weights=np.ones(4))
    assert merged.digest != a.digest
    assert merged.digest != Compression("hc_smoe", 0.5, keep, groups=[[[0, 3], [2, 1]]], weights=np.ones(4)).digest
    assert merged.digest != Compression("hc_smoe", 0.5, keep, groups=[[[0, 1], [2, 3]]],
                                        weights=np.array([1, 2, 1, 1.0])).digest
    run = {"tasks": ["blimp"], "limit": 2}
    assert pruning.evaluation_key(a, run, {}, {"m": 1}) == pruning.evaluation_key(keep, run, {}, {"m": 1})
    assert pruning.evaluation_key(merged, run, {}, {"m": 1}) != pruning.evaluation_key(keep, run, {}, {"m": 1})
