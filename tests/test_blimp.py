"""Tests of BLiMP through lm-evaluation-harness (moe_utils.evaluation.blimp, moe_utils.evaluation.harness): the harness's
per-pair verdicts against summed log-probabilities computed here by hand, on the embedded model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_utils.evaluation import blimp, harness as evaluation  # noqa: E402

BLIMP_DIR = Path(os.environ.get("MOE_BLIMP_DIR") or Path(__file__).resolve().parents[1].parent / "shared/data/blimp")
PARADIGMS = ["anaphor_gender_agreement", "wh_island"]
LIMIT = 6


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_utils.models.tiny_moe import EMBEDDED_DIR

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(EMBEDDED_DIR), AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    torch.set_num_threads(before)


@torch.no_grad()
def _summed_logprob(model, tokenizer, sentence: str) -> float:
    """log P(" " + sentence | end-of-text token), token by token, independently of the harness."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([prefix] + tokenizer.encode(" " + sentence, add_special_tokens=False))
    logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
    return float(logp[torch.arange(len(ids) - 1), ids[1:]].sum())


def test_harness_verdicts_match_summed_log_probabilities(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    tasks = [blimp.task_name(p) for p in PARADIGMS]
    results = evaluation.run_harness(model, tokenizer, tasks, limit=LIMIT, batch_size=4, log_samples=True,
                                     bootstrap_iters=0, blimp_dir=BLIMP_DIR)
    pairs = blimp.pair_table(evaluation.sample_table(results), BLIMP_DIR)
    assert len(pairs) == LIMIT * len(PARADIGMS)
    assert list(pairs["paradigm"].unique()) == sorted(PARADIGMS)
    for paradigm, group in pairs.groupby("paradigm"):
        data = blimp.load_paradigm(paradigm, BLIMP_DIR).head(LIMIT)
        margins = np.array([_summed_logprob(model, tokenizer, g) - _summed_logprob(model, tokenizer, b)
                            for g, b in zip(data["sentence_good"], data["sentence_bad"])])
        np.testing.assert_allclose(group["margin"].to_numpy(), margins, atol=2e-3)
        np.testing.assert_array_equal(group["correct"].to_numpy(), (margins > 0).astype(float))
    table = evaluation.results_table(results)
    acc = table[table["metric"] == "acc"].set_index("task")["value"]
    by_task = pairs.groupby("task")["correct"].mean()
    np.testing.assert_allclose(acc[by_task.index], by_task)


def test_group_expands_to_the_67_stock_paradigms():
    specs = evaluation.build_tasks(["blimp"], blimp_dir=BLIMP_DIR)
    assert len(specs) == 67 == len(blimp.paradigms())
    assert {s.config.task for s in specs} == {f"blimp_{p}" for p in blimp.paradigms()}
    fields = blimp.paradigm_fields(BLIMP_DIR)
    assert set(fields) == {"morphology", "syntax", "semantics", "syntax_semantics"}


def test_macro_accuracy_by_hand():
    pairs = pd.DataFrame({"paradigm": ["a"] * 4 + ["b"] * 2, "field": ["syntax"] * 4 + ["semantics"] * 2,
                          "correct": [1, 1, 1, 0, 0, 1]})
    got = blimp.macro_accuracy(pairs)
    assert got["all"] == pytest.approx((0.75 + 0.5) / 2)  # not the pooled 4/6
    assert got["syntax"] == pytest.approx(0.75) and got["semantics"] == pytest.approx(0.5)


def test_unknown_paradigm_and_missing_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown BLiMP paradigm"):
        blimp.task_name("not_a_paradigm")
    with pytest.raises(FileNotFoundError, match="MOE_BLIMP_DIR"):
        blimp.load_paradigm("wh_island", tmp_path)
