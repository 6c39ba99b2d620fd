"""Tests of moe_utils.evaluation.harness: the real lm-evaluation-harness on a tiny in-memory MoE, offline.

Model: ``$MOE_TEST_MODEL_DIR`` or else the shipped embedded model. Data: the offline copies in
``../shared/data`` (or ``$MOE_MMLU_PRO_DIR`` / ``$MOE_WIKITEXT_DIR``).
"""

from __future__ import annotations

import math
import os

# Before anything imports huggingface_hub / datasets: without these a Hub lookup retries ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lm_eval.tasks.leaderboard.mmlu_pro.utils import doc_to_text as stock_doc_to_text  # noqa: E402

from moe_utils.evaluation import harness as evaluation  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MMLU_PRO_DIR = Path(os.environ.get("MOE_MMLU_PRO_DIR") or SHARED / "mmlu_pro")
WIKITEXT_DIR = Path(os.environ.get("MOE_WIKITEXT_DIR") or SHARED / "wikitext-2")
LIMIT = 2
TASKS = ["mmlu_pro_mc_math", "mmlu_pro_ppl_math", "mmlu_pro_ppl_law", "wikitext2_ppl"]
PPL_METRICS = {"word_perplexity", "byte_perplexity", "bits_per_byte"}


def _model_dir() -> Path:
    from moe_utils.models.tiny_moe import EMBEDDED_DIR

    return Path(os.environ.get("MOE_TEST_MODEL_DIR") or EMBEDDED_DIR)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 7M-parameter model gains nothing from intra-op threads, and on a busy machine (a training
    job on the other core) two threads make each forward pass ~25x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _model_dir()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _run(model, tokenizer, tasks=TASKS, **kwargs):
    return evaluation.evaluate(
        model, tokenizer, tasks, limit=LIMIT, data_dir=MMLU_PRO_DIR, wikitext_dir=WIKITEXT_DIR,
        batch_size=8, **kwargs,
    )


@pytest.fixture(scope="module")
def table(model_and_tokenizer):
    return _run(*model_and_tokenizer)


def test_table_layout_and_values(table):
    assert list(table.columns) == ["task", "metric", "value", "stderr", "n"]
    expected = {("mmlu_pro_mc_math", "acc")} | {
        (t, m) for t in ("mmlu_pro_ppl_math", "mmlu_pro_ppl_law", "wikitext2_ppl") for m in PPL_METRICS
    }
    assert set(zip(table["task"], table["metric"])) == expected
    assert len(table) == len(expected)
    assert (table["n"] == LIMIT).all()

    acc = table[table["metric"] == "acc"].iloc[0]
    assert 0.0 <= acc["value"] <= 1.0
    assert np.isfinite(acc["stderr"])  # closed-form stderr for accuracy

    ppl = table[table["metric"].isin(PPL_METRICS)]
    assert np.isfinite(ppl["value"]).all()
    assert (ppl["value"] > 0).all()
    perplexities = ppl[ppl["metric"] != "bits_per_byte"]["value"]
    assert (perplexities > 1).all()
    assert ppl["stderr"].isna().all()
    for task, rows in ppl.groupby("task"):
        values = dict(zip(rows["metric"], rows["value"]))
        assert values["bits_per_byte"] == pytest.approx(math.log2(values["byte_perplexity"]), rel=1e-9)


def test_same_call_twice_gives_same_values(table, model_and_tokenizer):
    again = _run(*model_and_tokenizer)
    pd.testing.assert_frame_equal(table, again)


def test_mc_prompt_is_leaderboard_format_with_stripped_options():
    (task,) = evaluation.build_tasks(["mmlu_pro_mc_math"], data_dir=MMLU_PRO_DIR)
    raw = pd.read_parquet(MMLU_PRO_DIR / "test-00000-of-00001.parquet")
    raw = raw[raw["category"] == "math"].reset_index(drop=True)
    padded = [i for i, opts in enumerate(raw["options"]) if any(o != o.strip() for o in opts)]
    assert padded, "the export is expected to have options with stray whitespace"
    docs = task.test_docs()
    for i in (0, padded[0]):
        row, doc = raw.iloc[i], docs[i]
        assert doc["question_id"] == row["question_id"]
        # Independent truth: the stock leaderboard_mmlu_pro prompt function, on the cleaned question.
        expected = stock_doc_to_text({"question": row["question"].strip(),
                                      "options": [o.strip() for o in row["options"]]})
        assert task.doc_to_text(doc) == expected
        assert task.doc_to_choice(doc) == list("ABCDEFGHIJ"[: len(row["options"])])
        assert task.doc_to_target(doc) == row["answer"]
    assert task.config.target_delimiter == " "  # choices are scored as " A", " B", ...

    # 5-shot context: the category's validation questions with their answers, then the question.
    val = pd.read_parquet(MMLU_PRO_DIR / "validation-00000-of-00001.parquet")
    val = val[val["category"] == "math"]
    assert task.config.num_fewshot == 5 and len(val) == 5
    shots = "".join(
        stock_doc_to_text({"question": r["question"].strip(), "options": [o.strip() for o in r["options"]]})
        + f" {r['answer']}\n\n"
        for _, r in val.iterrows()
    )
    assert task.fewshot_context(doc=docs[0], num_fewshot=5) == shots + task.doc_to_text(docs[0])


def test_answer_letter_is_trusted():
    (task,) = evaluation.build_tasks(["mmlu_pro_mc_chemistry"], data_dir=MMLU_PRO_DIR)
    (doc,) = [d for d in task.test_docs() if d["question_id"] == 3983]  # answer 'C', answer_index 1
    assert task.doc_to_target(doc) == "C"
    assert doc["answer_index"] == 2


@pytest.mark.parametrize(
    "tasks, categories",
    [(["mmlu_pro_mc_astrology"], None), (["mmlu_pro_ppl_astrology"], None),
     (["mmlu_pro_mc"], ["math", "astrology"])],
)
def test_unknown_category_raises(model_and_tokenizer, tasks, categories):
    with pytest.raises(ValueError, match=r"unknown MMLU-Pro category 'astrology'.*computer_science"):
        evaluation.evaluate(*model_and_tokenizer, tasks, categories=categories, data_dir=MMLU_PRO_DIR)


def test_categories_restrict_groups():
    tasks = evaluation.build_tasks(["mmlu_pro_mc", "mmlu_pro_ppl"], data_dir=MMLU_PRO_DIR,
                                   categories=["computer science", "law"])
    group, *ppl = tasks
    assert group.child_names == ["mmlu_pro_mc_computer_science", "mmlu_pro_mc_law"]
    assert [t.task_name for t in ppl] == ["mmlu_pro_ppl_computer_science", "mmlu_pro_ppl_law"]


def _first_article(text: str) -> str:
    lines = text.splitlines(keepends=True)
    titles = [i for i, line in enumerate(lines)
              if line.startswith(" = ") and not line.startswith(" = = ") and line.rstrip().endswith(" =")]
    return "".join(lines[titles[0]:titles[1]])


@torch.no_grad()
def test_wikitext_word_perplexity_matches_direct_computation(model_and_tokenizer):
    """The harness's rolling word perplexity equals sum(token NLL) / words computed here by hand."""
    model, tokenizer = model_and_tokenizer
    window = 512
    table = evaluation.evaluate(model, tokenizer, ["wikitext2_ppl"], limit=1, max_length=window,
                                wikitext_dir=WIKITEXT_DIR)
    assert list(table.columns) == ["task", "metric", "value", "stderr", "n"]
    assert set(table["metric"]) == PPL_METRICS and (table["task"] == "wikitext2_ppl").all()
    assert (table["n"] == 1).all()
    got = dict(zip(table["metric"], table["value"]))
    assert all(np.isfinite(v) for v in got.values())
    assert got["word_perplexity"] > 1 and got["byte_perplexity"] > 1

    doc = _first_article((WIKITEXT_DIR / "test.txt").read_text(encoding="utf-8"))
    ids = tokenizer.encode(doc, add_special_tokens=False)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    full = torch.tensor([prefix] + ids)
    assert len(ids) > 2 * window  # several windows, the last one partial
    # Score the tokens in blocks of `window`; each block sees the `window` inputs ending at it.
    nll = 0.0
    for start in range(0, len(ids), window):
        end = min(start + window, len(ids))
        lo = max(0, end - window)
        logits = model(input_ids=full[lo:end][None]).logits[0].double()
        targets = full[lo + 1:end + 1]
        token_nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        nll += token_nll[-(end - start):].sum().item()
    words = sum(len(line.split()) + 1 for line in doc.split("\n") if line.strip())
    assert got["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-3)
    assert got["byte_perplexity"] == pytest.approx(math.exp(nll / len(doc.encode("utf-8"))), rel=1e-3)


def test_batches_whose_logits_would_be_too_large_are_split_without_changing_the_scores(model_and_tokenizer,
                                                                                    monkeypatch, caplog):
    """A real vocabulary makes a batch's logits large (granite: 16 windows of 512 tokens are 1.6 GB): the
    harness then runs fewer rows at once, and scores the same."""
    from moe_utils.evaluation import wikitext

    model, tokenizer = model_and_tokenizer
    vocab = model.get_output_embeddings().weight.shape[0]
    kwargs = dict(limit=1, max_length=256, wikitext_dir=WIKITEXT_DIR, batch_size=8)
    with caplog.at_level("INFO", logger=evaluation.__name__):
        full = evaluation.evaluate(model, tokenizer, ["wikitext2_ppl"], **kwargs)
        monkeypatch.setattr(wikitext, "LOGIT_ENTRIES", 3 * 256 * vocab)  # room for 3 windows, not 8
        capped = evaluation.evaluate(model, tokenizer, ["wikitext2_ppl"], **kwargs)
    sizes = [line.rsplit("batch_size=", 1)[1].rstrip(")") for line in caplog.messages if "batch_size=" in line]
    assert sizes == ["8", "3"]
    assert wikitext.logit_batch_size(model, 2, 256) == 2 and wikitext.logit_batch_size(model, 8, 10**9) == 1
    pd.testing.assert_frame_equal(full, capped, rtol=1e-5)


def test_article_opening_keeps_whole_lines_up_to_the_word_count():
    article = " = Title = \n\n one two three \n four five \n six seven eight nine \n"
    assert evaluation.article_opening(article, None) == article
    # the title line counts too ("=", "Title", "="): three words
    assert evaluation.article_opening(article, 3) == " = Title = \n"
    assert evaluation.article_opening(article, 4) == " = Title = \n\n one two three \n"
    assert evaluation.article_opening(article, 7) == " = Title = \n\n one two three \n four five \n"
    assert evaluation.article_opening(article, 1000) == article
    with pytest.raises(ValueError, match="positive"):
        evaluation.article_opening(article, 0)


@torch.no_grad()
def test_wikitext_openings_are_scored_on_the_opening_text(model_and_tokenizer):
    """With ``wikitext_words`` the harness scores each article's opening: its byte count is the
    opening's, and the opening's perplexity differs from the whole article's."""
    model, tokenizer = model_and_tokenizer
    whole = evaluation.run_harness(model, tokenizer, ["wikitext2_ppl"], limit=2, max_length=256,
                                   wikitext_dir=WIKITEXT_DIR, log_samples=True, bootstrap_iters=0)
    opening = evaluation.run_harness(model, tokenizer, ["wikitext2_ppl"], limit=2, max_length=256,
                                     wikitext_dir=WIKITEXT_DIR, log_samples=True, bootstrap_iters=0,
                                     wikitext_words=50)
    docs = evaluation.wikitext_documents((WIKITEXT_DIR / "test.txt").read_text(encoding="utf-8"))[:2]
    got = evaluation.sample_table(opening)
    assert list(got["n_bytes"]) == [len(evaluation.article_opening(d, 50).encode("utf-8")) for d in docs]
    assert (got["n_bytes"] < evaluation.sample_table(whole)["n_bytes"]).all()
