"""The one evaluator of stages 4 and 5 (moe_utils.compression.evaluate.evaluate_compressions) through
the real harness on the embedded model: the batched scorer equals one-at-a-time evaluation per
document, the one-at-a-time path is exactly the harness's own per-sample log of the masked (or
merged) model, and every compressed model is one verified cache entry keyed by its digest."""

from __future__ import annotations

import contextlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_utils import evaluation  # noqa: E402
from moe_utils.compression.caep import PruningBudget, random_mask  # noqa: E402
from moe_utils.compression import merging  # noqa: E402
from moe_utils.compression.evaluate import DOCUMENT_COLUMNS, evaluate_compressions  # noqa: E402
from moe_utils.compression.value import Compression  # noqa: E402
from moe_utils.compression.pruning import unpruned_mask  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DIRS = dict(blimp_dir=Path(os.environ.get("MOE_BLIMP_DIR") or SHARED / "blimp"),
            wikitext_dir=Path(os.environ.get("MOE_WIKITEXT_DIR") or SHARED / "wikitext-2"))
RUNS = [{"tasks": ["blimp_wh_island", "blimp_passive_1"], "limit": 4}, {"tasks": ["wikitext2_ppl"], "limit": 1}]
SETTINGS = dict(batch_size=16, max_length=128, **DIRS)


def _merge(keep: np.ndarray, per_layer: int) -> Compression:
    """Each pruned expert merged into the kept expert just before it (usage weights 1 and 2)."""
    groups = []
    for layer in range(len(keep) // per_layer):
        row = keep[layer * per_layer:(layer + 1) * per_layer]
        kept = np.flatnonzero(row)
        owner = {e: kept[kept <= e].max() if (kept <= e).any() else kept[0] for e in range(per_layer)}
        groups.append([[int(k)] + [e for e in range(per_layer) if owner[e] == k and e != k] for k in kept])
    return Compression("hc_smoe", 0.5, keep, groups=groups, weights=np.where(keep, 2.0, 1.0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moe_utils.models.loading import load_model

    if not DIRS["blimp_dir"].is_dir() or not DIRS["wikitext_dir"].is_dir():
        pytest.skip("no local BLiMP / WikiText-2")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model("embedded")
    budget = PruningBudget((16,) * 6, 2)
    keep = random_mask(budget, 0.5, 0)
    compressions = [unpruned_mask(96), *(Compression("random", 0.5, random_mask(budget, 0.5, s), seed=s)
                                         for s in (0, 1, 2)), _merge(keep, 16)]
    cache = tmp_path_factory.mktemp("cache")
    batched = evaluate_compressions(model, tok, compressions, RUNS, cache_dir=cache, group_size=2, progress=False,
                                    **SETTINGS)
    warm = evaluate_compressions(model, tok, compressions, RUNS, cache_dir=cache, group_size=2, progress=False,
                                 **SETTINGS)
    alone = evaluate_compressions(model, tok, compressions, RUNS, cache_dir=None, batch_masks=False,
                                  progress=False, **SETTINGS)
    yield model, tok, compressions, cache, batched, warm, alone
    torch.set_num_threads(before)


def test_batched_scores_equal_one_at_a_time(setup):
    *_, compressions, _, (results, docs), _, (results1, docs1) = setup
    assert list(docs.columns) == list(DOCUMENT_COLUMNS) and list(docs1.columns) == list(DOCUMENT_COLUMNS)
    assert len(docs) == len(compressions) * (2 * 4 + 1)
    pd.testing.assert_frame_equal(docs.drop(columns=["loglikelihood", "margin"]),
                                  docs1.drop(columns=["loglikelihood", "margin"]))
    np.testing.assert_allclose(docs["loglikelihood"], docs1["loglikelihood"], rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(docs["margin"], docs1["margin"], atol=1e-3, equal_nan=True)
    by_model = docs.groupby("digest", sort=False)["margin"].apply(lambda m: m.dropna().round(3).tolist())
    assert by_model.map(tuple).nunique() == len(compressions)  # every compression scored differently
    np.testing.assert_allclose(results["value"], results1["value"], rtol=1e-5, equal_nan=True)


def test_one_at_a_time_is_exactly_the_harness_log_of_the_compressed_model(setup):
    model, tok, compressions, *_, (_, docs1) = setup
    merged = compressions[-1]
    with merging.applied(model, merged):
        raw = evaluation.run_harness(model, tok, RUNS[0]["tasks"], limit=4, log_samples=True, bootstrap_iters=0,
                                     **SETTINGS)
    own = docs1[(docs1["digest"] == merged.digest) & docs1["task"].str.startswith("blimp_")]
    pd.testing.assert_frame_equal(own[list(evaluation.SAMPLE_COLUMNS)].reset_index(drop=True),
                                  evaluation.sample_table(raw), check_exact=True)


def test_requests_built_once_give_exactly_the_runs_that_build_them_afresh(setup):
    """Several masks scored through the harness with their requests built once (the evaluator's path)
    give exactly the per-document log and metrics of runs whose harness builds every request anew,
    on single tasks, a rolling-perplexity task and a group."""
    from moe_utils.evaluation.multi_mask import MultiMaskLM

    model, tok, compressions, *_ = setup
    mmlu_pro = Path(os.environ.get("MOE_MMLU_PRO_DIR") or SHARED / "mmlu_pro")
    tasks = [*RUNS[0]["tasks"], "wikitext2_ppl"] + (["mmlu_pro_mc"] if mmlu_pro.is_dir() else [])
    build = dict(limit=2, wikitext_words=40, categories=["law"], data_dir=mmlu_pro if mmlu_pro.is_dir() else None,
                 **DIRS)
    keeps = [c.keep for c in compressions[:3]]

    def runs(reuse: bool) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
        lm = MultiMaskLM(model, tok, keeps, batch_size=16, max_length=128)
        prepared = evaluation.harness_tasks(tasks, **build)
        out, instances = [], []
        with evaluation.requests_reused(prepared[0]) if reuse else contextlib.nullcontext():
            for index in range(len(keeps)):
                lm.select(index)
                raw = evaluation.run_harness(model, tok, tasks, limit=2, num_fewshot=1, log_samples=True,
                                             bootstrap_iters=0, lm=lm, prepared=prepared if reuse else
                                             evaluation.harness_tasks(tasks, **build))
                out.append((evaluation.results_table(raw), evaluation.sample_table(raw)))
                if reuse:
                    instances.append([id(i) for spec in prepared[0] for task in _leaves(spec) for i in task.instances])
        assert all(ids == instances[0] for ids in instances)  # the same requests every run
        return out

    reused, fresh = runs(True), runs(False)
    assert {t for _, docs in reused for t in docs["task"]} >= {*RUNS[0]["tasks"], "wikitext2_ppl"}
    assert reused[0][1]["margin"].round(4).tolist() != reused[1][1]["margin"].round(4).tolist()  # masks differ
    for (table, docs), (table1, docs1) in zip(reused, fresh):
        pd.testing.assert_frame_equal(docs, docs1, check_exact=True)
        pd.testing.assert_frame_equal(table, table1, check_exact=True)


def test_the_harness_draws_no_progress_bars(setup, capfd):
    """A run of the harness writes no bars of its own (a stage shows one for its whole loop), while a
    bar outside the run still draws."""
    from tqdm import tqdm

    model, tok, *_ = setup
    evaluation.run_harness(model, tok, ["blimp_wh_island", "wikitext2_ppl"], limit=1, log_samples=True,
                           bootstrap_iters=0, wikitext_words=20, **SETTINGS)
    assert "|" not in capfd.readouterr().err
    for _ in tqdm(range(2), desc="the stage's own"):
        pass
    assert "the stage's own" in capfd.readouterr().err


def _leaves(spec) -> list:
    return spec.get_all_tasks() if hasattr(spec, "get_all_tasks") else [spec] if hasattr(spec, "instances") else []


def test_every_compressed_model_is_one_cache_entry_read_back_exactly(setup):
    *_, compressions, cache, (results, docs), (results2, docs2), _ = setup
    assert not results["cached"].any() and results2["cached"].all()
    pd.testing.assert_frame_equal(docs, docs2, check_exact=True)
    pd.testing.assert_frame_equal(results.drop(columns=["cached"]), results2.drop(columns=["cached"]),
                                  check_exact=True)
    entries = sorted(cache.glob("eval-*/manifest.json"))
    assert len(entries) == len(compressions) * len(RUNS)
    described = [json.loads(p.read_text())["describe"] for p in entries]
    assert sorted(d["method"] for d in described) == sorted(c.method for c in compressions for _ in RUNS)
    # a merge keeps the same experts as the random mask of seed 0 but is its own entry and its own scores
    same_keep = docs[docs["seed"] == 0]["margin"].to_numpy()
    merged = docs[docs["method"] == "hc_smoe"]["margin"].to_numpy()
    assert np.array_equal(compressions[1].keep, compressions[-1].keep) and not np.allclose(same_keep, merged,
                                                                                           equal_nan=True)


def test_duplicates_are_evaluated_once_and_keep_their_names(setup, tmp_path):
    model, tok, compressions, *_ = setup
    twin = Compression("frequency", 0.5, compressions[1].keep.copy())
    results, docs = evaluate_compressions(model, tok, [compressions[1], twin], RUNS[:1], cache_dir=tmp_path,
                                          progress=False, **SETTINGS)
    assert len(list(tmp_path.glob("eval-*"))) == 1
    assert docs.groupby("method").size().to_dict() == {"frequency": 8, "random": 8}
    np.testing.assert_array_equal(docs[docs["method"] == "frequency"]["margin"], docs[docs["method"] == "random"]["margin"])


def test_a_damaged_entry_is_recomputed(setup, tmp_path):
    model, tok, compressions, *_ = setup
    first = evaluate_compressions(model, tok, compressions[:1], RUNS[:1], cache_dir=tmp_path, progress=False,
                                  **SETTINGS)[1]
    (entry,) = tmp_path.glob("eval-*")
    parquet = entry / "documents.parquet"
    parquet.write_bytes(parquet.read_bytes()[:-3] + b"xyz")
    results, again = evaluate_compressions(model, tok, compressions[:1], RUNS[:1], cache_dir=tmp_path,
                                           progress=False, **SETTINGS)
    assert not results["cached"].any()
    pd.testing.assert_frame_equal(first, again)
