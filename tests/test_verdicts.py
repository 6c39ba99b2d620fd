"""Stage 4's verdicts (moe_utils.compression.verdicts): the primary endpoint is checked before the run and
kept out of the Holm family, secondary comparisons are Holm-adjusted, and the per-method verdicts
read the adjusted table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moe_utils.compression import verdicts
from moe_utils.compression.reference import MATCHED_REFERENCE
from moe_utils.common.stats import holm


def test_primary_is_checked_before_the_run():
    ok = verdicts.check_primary({}, ratios=[0.25, 0.5], methods=["caep", "random"], tasks=["blimp"])
    assert ok == verdicts.PRIMARY
    with pytest.raises(ValueError, match="ratio 0.5 is not among"):
        verdicts.check_primary({}, ratios=[0.25], methods=["caep"], tasks=["blimp"])
    with pytest.raises(ValueError, match="needs the task 'blimp'"):
        verdicts.check_primary({}, ratios=[0.5], methods=["caep"], tasks=["wikitext2_ppl"])
    with pytest.raises(ValueError, match="unknown keys"):
        verdicts.check_primary({"metric": "x"}, ratios=[0.5], methods=["caep"], tasks=["blimp"])


def _compared():
    rows = [  # measure, method, ratio, reference, estimate, p
        ("blimp", "caep", 0.5, MATCHED_REFERENCE, 0.03, 0.02),
        ("blimp", "caep", 0.5, "random", 0.04, 0.001),
        ("blimp", "reap", 0.5, "random", 0.05, 0.0001),
        ("blimp", "reap", 0.5, "caep", 0.01, 0.04),
        ("wikitext", "caep", 0.5, "random", 0.20, 0.0002),   # perplexity up: worse
        ("wikitext", "reap", 0.5, "random", -0.10, 0.03),
        ("wikitext", "reap", 0.5, "caep", -0.25, 0.00001),  # reap's perplexity below caep's: better
    ]
    frame = pd.DataFrame(rows, columns=["measure", "method", "ratio", "reference", "estimate", "p_value"])
    frame["low"], frame["high"] = frame["estimate"] - 0.01, frame["estimate"] + 0.01
    frame["significant"] = True
    frame["n_docs"] = 100
    return frame


def test_adjust_keeps_the_primary_out_of_the_family():
    adjusted = verdicts.adjust(_compared(), verdicts.PRIMARY)
    primary = adjusted[adjusted["role"] == "primary"]
    assert len(primary) == 1 and primary.iloc[0]["reference"] == MATCHED_REFERENCE
    assert primary.iloc[0]["p_holm"] == 0.02 and primary.iloc[0]["rejected"]
    secondary = adjusted[adjusted["role"] == "secondary"]
    np.testing.assert_allclose(secondary["p_holm"], holm(secondary["p_value"].to_numpy()))
    # 6 secondary tests: 0.04 x 1 -> running max keeps it at 0.06 (> 0.05), 0.03 x 2 = 0.06: not rejected
    assert secondary.set_index(["measure", "method", "reference"])["rejected"].to_dict() == {
        ("blimp", "caep", "random"): True, ("blimp", "reap", "random"): True, ("blimp", "reap", "caep"): False,
        ("wikitext", "caep", "random"): True, ("wikitext", "reap", "random"): False,
        ("wikitext", "reap", "caep"): True}


def test_a_method_without_its_own_allocation_is_judged_against_uniform_masks():
    compared = _compared()
    compared = compared[compared["reference"] != MATCHED_REFERENCE]
    adjusted = verdicts.adjust(compared, verdicts.PRIMARY)
    assert adjusted.loc[adjusted["role"] == "primary", "reference"].tolist() == ["random"]


def test_method_verdicts_and_findings_say_who_wins():
    adjusted = verdicts.adjust(_compared(), verdicts.PRIMARY)
    table = verdicts.method_verdicts(adjusted, 0.5)
    # caep's BLiMP verdict against random masks is its matched reference's; perplexity up is worse
    assert table.loc["caep", "vs random"] == ("better on BLiMP accuracy; worse on WikiText-2 word perplexity")
    assert table.loc["reap", "vs caep"] == "better on WikiText-2 word perplexity; no difference on BLiMP accuracy"
    ranks = pd.Series({"caep": 2.0, "random": 2.5, "reap": 1.5})  # not sorted: findings sorts them
    placed = pd.DataFrame([{"measure": "blimp", "ratio": 0.5, "method": "caep", "distribution": "matched",
                            "n_masks": 20, "percentile": 85.0}])
    found = verdicts.findings(adjusted, placed, ranks, verdicts.PRIMARY, model="embedded", ratio=0.5)
    assert "caep is better than random masks with its own per-layer allocation" in found["finding_pruning_primary"]
    assert "+3.0 points, 95% interval [+2.0, +4.0], 100 documents" in found["finding_pruning_primary"]
    assert found["finding_pruning_winner"].startswith("At 50% pruned, the best mean rank over the measures is reap's")
    assert "better than CAEP on at least one measure: reap" in found["finding_pruning_methods"]
    assert "worse than random masks on at least one: caep" in found["finding_pruning_methods"]
    assert "better than 17 of 20 random masks of its own allocation" in found["finding_pruning_reference"]
    assert found["finding_pruning_winner"].endswith("last: random (2.5).")
