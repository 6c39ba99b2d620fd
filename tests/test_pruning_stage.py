"""Stage 4's glue (moe_utils.stages.pruning): the CAEP step table against caep() itself, and the
findings sentences built from given comparisons (numbers and verdicts read from the tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe_utils.compression import caep
from moe_utils.stages import pruning as pruning_stage
from moe_utils.compression.pruning import PruningMask


def test_caep_steps_match_algorithm_1():
    rng = np.random.default_rng(0)
    D, R = rng.random((12, 5)), rng.random((5, 40))
    budget = caep.PruningBudget((4, 4, 4), 2)
    steps = pruning_stage.caep_steps(D, R, [0.25, 0.5], threshold_ratio=0.9, budget=budget)
    for row, ratio in zip(steps.itertuples(index=False), [0.25, 0.5]):
        result = caep.caep(D, R, 0.9, ratio, budget=budget)
        assert row[steps.columns.get_loc("kept by Algorithm 1")] == result.algorithm_keep.sum()
        assert row[steps.columns.get_loc("per layer, guarded")] == " ".join(
            map(str, budget.kept_per_layer(result.keep)))
    assert "restored for the router's groups" not in steps.columns  # no group-limited router


def _compared(rows):
    return pd.DataFrame(rows, columns=["measure", "method", "ratio", "reference", "estimate", "low", "high", "se",
                                       "mde", "significant", "n_docs"])


def test_findings_read_the_tables():
    scores = pd.DataFrame({"measure": "blimp", "method": ["unpruned", "caep", "random"], "ratio": [0.0, 0.5, 0.5],
                           "estimate": [0.60, 0.55, 0.57], "low": [0.58, 0.53, 0.55], "high": [0.62, 0.57, 0.59],
                           "n_docs": 1340, "n_seeds": [1, 1, 3]})
    variants = pd.DataFrame({"factor": ["reference", "threshold k1"], "setting": ["as in Table 1", "k1 0.8"],
                             "mask": [PruningMask("caep [reference]", 0.5, np.ones(4, bool)),
                                      PruningMask("caep [k1 0.8]", 0.5, np.ones(4, bool))]})
    compared = _compared([
        ["blimp", "caep", 0.5, "random", -0.02, -0.035, -0.005, 0.008, 0.022, True, 1340],
        ["blimp", "caep [reference]", 0.5, "random", -0.02, -0.035, -0.005, 0.008, 0.022, True, 1340],
        ["blimp", "caep [k1 0.8]", 0.5, "random", 0.004, -0.01, 0.018, 0.007, 0.02, False, 1340],
        ["blimp", "caep_layer", 0.5, "random", -0.001, -0.015, 0.012, 0.007, 0.02, False, 1340],
    ])
    out = pruning_stage.findings("embedded", scores, compared, variants, ["blimp"], 0.5)
    assert "60.0% unpruned" in out["finding_pruning_blimp"] and "CAEP 55.0%" in out["finding_pruning_blimp"]
    assert "-2.0 points [-3.5, -0.5]" in out["finding_pruning_vs_random"]
    assert "2.1 points" in out["finding_pruning_mde"]  # median of caep 2.2 and caep_layer 2.0, variants left out
    verdict = out["finding_pruning_ablation"]
    assert "reference CAEP -2.0 points [-3.5, -0.5]" in verdict
    assert "best single change 'threshold k1: k1 0.8' +0.4 points [-1.0, +1.8]" in verdict
    assert "(0 of 3 variants better than random, 1 worse)" in verdict


def test_verdict_against_random_masks_by_hand():
    def row(measure, estimate, low, high, method="caep", reference="random"):
        return {"method": method, "measure": measure, "reference": reference, "estimate": estimate, "low": low,
                "high": high}

    compared = pd.DataFrame([row("blimp", 0.02, 0.01, 0.03), row("wikitext", 0.05, 0.01, 0.09),
                             row("mmlu_pro", -0.01, -0.03, 0.01), row("blimp", -0.5, -0.6, -0.4, method="reap")])
    verdict = pruning_stage.verdict_vs_random(compared, ["blimp", "wikitext", "mmlu_pro"], "50%")
    # BLiMP accuracy higher (better); WikiText perplexity higher (worse); MMLU-Pro's interval holds 0
    assert verdict == ("At 50% pruned, CAEP is better than random masks on BLiMP accuracy; worse than random masks "
                       "on WikiText-2 word perplexity; not distinguishable from random masks on MMLU-Pro question "
                       "bits per byte.")
    level = pruning_stage.verdict_vs_random(compared.iloc[[2]], ["mmlu_pro"], "25%")
    assert level == "At 25% pruned, CAEP cannot be told apart from random masks on any measure."
    assert pruning_stage.verdict_vs_random(compared.iloc[:0], ["blimp"], "25%").startswith("CAEP was not compared")
    # after Holm's correction the interval alone no longer decides: WikiText-2's difference is not rejected
    holm = compared.assign(rejected=[True, False, False, True])
    assert pruning_stage.verdict_vs_random(holm, ["blimp", "wikitext", "mmlu_pro"], "50%") == (
        "At 50% pruned, CAEP is better than random masks on BLiMP accuracy; not distinguishable from random masks on "
        "WikiText-2 word perplexity, MMLU-Pro question bits per byte (secondary comparisons, Holm-corrected).")


def test_the_page_names_the_described_methods_a_profile_leaves_out():
    text = pruning_stage.not_run(["caep", "reap", "random", "weight_norm"], {})
    assert text.startswith("**Methods run:** caep, reap, random, weight_norm.")
    assert "not run by this profile** (its `pruning_methods`): caep_layer, frequency, router_weight, ean, output, " \
           "hc_smoe, m_smoe;" in text
    assert "not run" not in pruning_stage.not_run(list(pruning_stage.DESCRIBED), {})
    skipped = pruning_stage.not_run(list(pruning_stage.DESCRIBED), {"output": "removes one expert at a time"})
    assert "output" not in skipped.split("**Methods run:**")[1].split(".")[0] and "not run by" not in skipped
    from moe_utils.compression import registry

    assert set(pruning_stage.DESCRIBED) <= set(registry.names())  # the page describes registered methods only
