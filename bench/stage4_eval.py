"""Benchmark: where one pruned model's evaluation in stage 4 spends its time, and what the BLiMP
task set-up costs before and after its two fixes.

For the embedded model and the default profile's sample sizes (``params/tiny.yaml``), it times one
lm-evaluation-harness run per task family (BLiMP pairs, WikiText-2 articles, MMLU-Pro question
perplexity) and, inside each, the model's forward calls (a hook on the model), so that
``harness_overhead = 1 - forward / total`` says how much is the harness rather than the model.
It also times building the 67 BLiMP tasks on the first ``limit`` pairs (what
:mod:`moe_utils.evaluation.harness` does) against building them on all 1,000 pairs, and one BLiMP run
with the stock Jinja ``doc_to_choice`` template against the Python function the project uses.
Wall and process CPU time are recorded: on a shared machine, CPU time is the steadier figure.

Target: stage 4 within 6 minutes on 2 CPU cores; ``projected_stage4_eval_s`` multiplies the
per-model wall time by the number of models the profile evaluates, ``projected_stage4_eval_cpu_s``
the per-model process CPU time (with ``--threads 1``, what a machine without other jobs would
take in wall time); the rest of the stage (calibration, masks, the ablation's refits) comes on top. The JSON records
``meets_target`` and never fails.

Usage::

    python bench/stage4_eval.py                      # -> bench/results/stage4_eval.json
    python bench/stage4_eval.py --out /tmp/s4.json --threads 1
"""

from __future__ import annotations

import argparse
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

import torch  # noqa: E402
import yaml  # noqa: E402

from bench._common import finish_machine_info, machine_info  # noqa: E402


def _timed(fn):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start_wall, time.process_time() - start_cpu


def main() -> None:
    from moe_utils.evaluation import harness as evaluation
    from moe_utils.compression import pruning
    from moe_utils.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=str(REPO / "params" / "tiny.yaml"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "stage4_eval.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = yaml.safe_load(Path(args.profile).read_text())
    info = machine_info()
    lm, tok = load_model("embedded")
    spec = pruning.resolve_evaluation("embedded", profile.get("eval_tasks"), profile.get("eval_limit"),
                                      profile.get("eval_task_limits"))
    runs = pruning.evaluation_runs(categories=profile["categories"], **spec)
    forward = {"s": 0.0}

    def pre(*_):
        forward["t"] = time.perf_counter()

    def post(*_):
        forward["s"] += time.perf_counter() - forward["t"]

    hooks = [lm.register_forward_pre_hook(pre), lm.register_forward_hook(post)]
    families = []
    for run in runs:
        forward["s"] = 0.0
        _, wall, cpu = _timed(lambda: evaluation.run_harness(lm, tok, run["tasks"], limit=run["limit"], batch_size=64,
                                                             max_length=profile.get("max_length"), log_samples=True,
                                                             bootstrap_iters=0))
        families.append({"tasks": run["tasks"][:3] + (["..."] if len(run["tasks"]) > 3 else []), "limit": run["limit"],
                         "wall_s": wall, "cpu_s": cpu, "forward_s": forward["s"],
                         "harness_overhead": 1 - forward["s"] / wall})
    for hook in hooks:
        hook.remove()
    limit = spec["task_limits"].get("blimp", spec["limit"])
    _, build_limited, _ = _timed(lambda: evaluation.build_tasks(["blimp"], limit=limit))
    _, build_full, _ = _timed(lambda: evaluation.build_tasks(["blimp"]))
    stock = "{{[sentence_good, sentence_bad]}}"
    original = evaluation._blimp_task

    def with_jinja(paradigm, blimp_dir, lim):
        task = original(paradigm, blimp_dir, lim)
        task.config.doc_to_choice = stock
        return task

    _, blimp_function, _ = _timed(lambda: evaluation.run_harness(lm, tok, ["blimp"], limit=limit, batch_size=64,
                                                                 bootstrap_iters=0))
    with mock.patch.object(evaluation, "_blimp_task", with_jinja):
        _, blimp_jinja, _ = _timed(lambda: evaluation.run_harness(lm, tok, ["blimp"], limit=limit, batch_size=64,
                                                                  bootstrap_iters=0))
    per_model = sum(f["wall_s"] for f in families)
    per_model_cpu = sum(f["cpu_s"] for f in families)
    n_models = 1 + len(profile["prune_ratios"]) * (len(profile["pruning_methods"]) - 1 + len(profile["random_seeds"]))
    n_models += 4 if profile.get("ablation") else 0  # the ablation's new variants at the middle ratio
    report = {
        "benchmark": "stage4_eval", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": args.profile, "families": families, "per_model_wall_s": per_model,
        "per_model_cpu_s": per_model_cpu, "models_evaluated": n_models,
        "projected_stage4_eval_s": per_model * n_models,
        # with one thread, CPU time is what a quiet machine would take in wall time
        "projected_stage4_eval_cpu_s": per_model_cpu * n_models,
        "blimp_build": {"first_limit_pairs_s": build_limited, "all_pairs_s": build_full, "limit": limit},
        "blimp_doc_to_choice": {"python_function_s": blimp_function, "stock_jinja_s": blimp_jinja},
        "target_stage4_s": 360, "meets_target": per_model * n_models <= 360,
        "meets_target_on_cpu_time": per_model_cpu * n_models <= 360,
        "machine": finish_machine_info(info),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
