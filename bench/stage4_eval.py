"""Benchmark: what scoring one more random mask costs in stage 4's evaluation, before and after
the harness's requests are built once per run.

Stage 4 scores about 150 masked variants of the embedded model, most of them the random-mask
reference distributions on BLiMP (``params/tiny.yaml``: 20 masks per ratio and allocation, 10 pairs
per paradigm, 67 paradigm tasks). This times :func:`moe_utils.compression.evaluate.evaluate_compressions`
on ``--masks`` random 50% masks on that BLiMP run, in three configurations, interleaved round by
round in one process so that a shared machine's load falls on all of them alike:

``rebuilt, 8192``  the evaluator as it was: the harness builds every task's requests anew for every
                   mask (its own default), 8,192-token forward passes;
``once, 8192``     the requests built once per run (:func:`moe_utils.evaluation.harness.requests_reused`);
``once, 2048``     and 2,048-token passes (the default now, :data:`moe_utils.evaluation.multi_mask.MAX_TOKENS`).

Per configuration: wall and process CPU time per mask, and the share of it in the shared forward
passes (``MultiMaskLM._score``); the rest is the harness (requests, process_results, aggregation,
logging). With ``--threads 1`` (the default) CPU time is what an idle core would take in wall time:
on a shared machine it is the steadier figure, and the ratios between configurations are the
result. The scores of every configuration are checked equal (documents' correctness exactly,
log-likelihoods to float rounding). The JSON never fails on a target.

Usage::

    python bench/stage4_eval.py                       # -> bench/results/stage4_eval.json
    python bench/stage4_eval.py --masks 4 --rounds 1 --out /tmp/s4.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from bench._common import finish_machine_info, machine_info  # noqa: E402

#: name -> (requests built once, tokens per forward pass)
CONFIGURATIONS = {"rebuilt, 8192": (False, 8192), "once, 8192": (True, 8192), "once, 2048": (True, 2048)}


def main() -> None:
    from moe_utils.compression import evaluate as compression_evaluate
    from moe_utils.compression.caep import PruningBudget, random_mask
    from moe_utils.compression.value import Compression
    from moe_utils.evaluation import multi_mask
    from moe_utils.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=str(REPO / "params" / "tiny.yaml"))
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "stage4_eval.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    profile = yaml.safe_load(Path(args.profile).read_text())
    info = machine_info()
    model, tokenizer = load_model("embedded")
    budget = PruningBudget((16,) * 6, 2)
    masks = [Compression("random", 0.5, random_mask(budget, 0.5, 1000 + s), seed=1000 + s) for s in range(args.masks)]
    run = {"tasks": ["blimp"], "limit": profile["eval_task_limits"]["blimp"]}
    settings = dict(batch_size=profile["eval_batch_size"], max_length=profile["max_length"],
                    num_fewshot=profile["eval_num_fewshot"])
    forward = {"wall": 0.0, "cpu": 0.0}
    score = multi_mask.MultiMaskLM._score

    def timed_score(self, keys):
        wall, cpu = time.perf_counter(), time.process_time()
        score(self, keys)
        forward["wall"] += time.perf_counter() - wall
        forward["cpu"] += time.process_time() - cpu

    rounds: dict[str, list[dict]] = {name: [] for name in CONFIGURATIONS}
    documents = {}
    with mock.patch.object(multi_mask.MultiMaskLM, "_score", timed_score):
        for _ in range(args.rounds):
            for name, (once, max_tokens) in CONFIGURATIONS.items():
                forward.update(wall=0.0, cpu=0.0)
                rebuilt = mock.patch.object(compression_evaluate.evaluation, "requests_reused",
                                            lambda specs: contextlib.nullcontext())
                wall, cpu = time.perf_counter(), time.process_time()
                with contextlib.nullcontext() if once else rebuilt:
                    _, docs = compression_evaluate.evaluate_compressions(
                        model, tokenizer, masks, [run], cache_dir=None, group_size=len(masks), max_tokens=max_tokens,
                        progress=False, **settings)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                documents[name] = docs
                rounds[name].append({"wall_s": wall, "cpu_s": cpu, "forward_wall_s": forward["wall"],
                                     "forward_cpu_s": forward["cpu"]})
    first = documents[next(iter(CONFIGURATIONS))]
    for docs in documents.values():
        assert docs["correct"].equals(first["correct"]), "the configurations scored the pairs differently"
        np.testing.assert_allclose(docs["loglikelihood"], first["loglikelihood"], rtol=1e-5, equal_nan=True)
    n = len(masks)
    summary = {}
    for name, runs in rounds.items():
        cpu = float(np.median([r["cpu_s"] for r in runs])) / n
        forward_cpu = float(np.median([r["forward_cpu_s"] for r in runs])) / n
        summary[name] = {"per_mask_wall_s": float(np.median([r["wall_s"] for r in runs])) / n,
                         "per_mask_cpu_s": cpu, "per_mask_forward_cpu_s": forward_cpu,
                         "per_mask_harness_cpu_s": cpu - forward_cpu, "rounds": runs}
    before, after = summary["rebuilt, 8192"], summary["once, 2048"]
    report = {
        "benchmark": "stage4_eval", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": Path(args.profile).name, "run": run, "settings": settings, "masks": n, "rounds": args.rounds,
        "configurations": summary,
        "cpu_per_mask_after_over_before": after["per_mask_cpu_s"] / before["per_mask_cpu_s"],
        "wall_per_mask_after_over_before": after["per_mask_wall_s"] / before["per_mask_wall_s"],
        "harness_cpu_per_mask_after_over_before": after["per_mask_harness_cpu_s"] / before["per_mask_harness_cpu_s"],
        "machine": finish_machine_info(info),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
