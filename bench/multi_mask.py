"""Benchmark: scoring K pruned models in shared forward passes against scoring them one at a time.

Stage 4 evaluates one small model under many keep-masks (issue 24: 8 methods x 3 ratios and at
least 20 random masks per ratio in two families, about 150 masked models of the embedded model).
This times :func:`moe_utils.compression.evaluate.evaluate_compressions` on the embedded model with
the default profile's runs (``params/tiny.yaml``: BLiMP pairs, WikiText-2 articles, MMLU-Pro
question perplexity), with random 50% masks and no cache:

* ``alone``: the plain harness model, one masked model at a time (``batch_masks=False``, how
  stages 4 and 5 evaluated before);
* ``batched K``: :class:`moe_utils.evaluation.multi_mask.MultiMaskLM`, K masks per forward pass, the
  harness's tasks built once per group of K.

With ``--scale s`` every task limit of the profile is divided by ``s`` (at least 1 document), so
that K = 32 fits a short run; one masked model is then also scored one at a time on the full
profile (``alone_full``), and the projection multiplies that time by each configuration's per-mask
time relative to ``alone`` at the reduced size.

The configurations are interleaved in one process (``--rounds`` rounds, each running every
configuration once, in turn), so machine load affects them alike; per-mask wall and process CPU
time are the medians over rounds, and ``forward_share`` is the share of the wall time spent in the
model's forward calls (the rest is the harness: requests, ``process_results``, aggregation).
``projected_stage4_eval_s`` is issue 24's evaluation load at these per-mask times: the pruned
variants batched at the largest K, the merged models one at a time (a merge has its own weights).

Usage::

    python bench/multi_mask.py                      # -> bench/results/multi_mask.json
    python bench/multi_mask.py --ks 1 8 --rounds 1 --out /tmp/mm.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from bench._common import finish_machine_info, machine_info  # noqa: E402

#: Issue 24's evaluation load: 8 methods x 3 ratios (2 of them merging methods), >= 20 random masks
#: per ratio in two families (uniform per layer, allocation-matched), and the unpruned model.
ISSUE24 = {"methods": 8, "merging_methods": 2, "ratios": 3, "random_per_ratio_and_family": 20, "random_families": 2}


def main() -> None:
    from moe_utils.compression import pruning
    from moe_utils.compression.caep import PruningBudget, random_mask
    from moe_utils.compression.evaluate import evaluate_compressions
    from moe_utils.compression.value import Compression
    from moe_utils.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=str(REPO / "params" / "tiny.yaml"))
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--alone", type=int, default=2, help="masks scored one at a time per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="divide every task limit by this")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "multi_mask.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    profile = yaml.safe_load(Path(args.profile).read_text())
    info = machine_info()
    model, tok = load_model("embedded")
    spec = pruning.resolve_evaluation("embedded", profile.get("eval_tasks"), profile.get("eval_limit"),
                                      profile.get("eval_task_limits"))
    full_runs = pruning.evaluation_runs(categories=profile["categories"], **spec)
    runs = [{**run, "limit": max(1, int(run["limit"] / args.scale))} if run.get("limit") else run for run in full_runs]
    settings = dict(batch_size=profile.get("eval_batch_size", 64), num_fewshot=profile.get("eval_num_fewshot"),
                    categories=profile["categories"])
    budget = PruningBudget((16,) * 6, 2)
    forward = {"s": 0.0}

    def pre(*_):
        forward["t"] = time.perf_counter()

    def post(*_):
        forward["s"] += time.perf_counter() - forward["t"]

    hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    configs = [("alone", args.alone, False)] + [(f"batched {k}", k, True) for k in args.ks]
    timings: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    seed = 0
    for _ in range(args.rounds):
        for name, k, batched in configs:
            masks = [Compression("random", 0.5, random_mask(budget, 0.5, seed + i), seed=seed + i) for i in range(k)]
            seed += k
            forward["s"] = 0.0
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            evaluate_compressions(model, tok, masks, runs, cache_dir=None, batch_masks=batched, group_size=max(k, 1),
                                  progress=False, **settings)
            wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
            timings[name].append({"masks": k, "wall_s": wall, "cpu_s": cpu, "forward_s": forward["s"]})
            print(f"{name}: {wall / k:.2f} s per mask ({cpu / k:.2f} s CPU)", flush=True)
    alone_full = None
    if args.scale != 1:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        evaluate_compressions(model, tok, [Compression("random", 0.5, random_mask(budget, 0.5, seed), seed=seed)],
                              full_runs, cache_dir=None, batch_masks=False, progress=False, **settings)
        alone_full = {"wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu}
    for hook in hooks:
        hook.remove()

    def summary(name: str) -> dict:
        rows = timings[name]
        return {"masks": rows[0]["masks"], "rounds": len(rows),
                "per_mask_wall_s": statistics.median(r["wall_s"] / r["masks"] for r in rows),
                "per_mask_cpu_s": statistics.median(r["cpu_s"] / r["masks"] for r in rows),
                "forward_share": statistics.median(r["forward_s"] / r["wall_s"] for r in rows), "runs": rows}

    results = {name: summary(name) for name, _, _ in configs}
    alone = results["alone"]
    for name, k, _ in configs[1:]:
        results[name]["speedup_wall"] = alone["per_mask_wall_s"] / results[name]["per_mask_wall_s"]
        results[name]["speedup_cpu"] = alone["per_mask_cpu_s"] / results[name]["per_mask_cpu_s"]
    best = results[f"batched {max(args.ks)}"]
    single = results["batched 1"] if 1 in args.ks else alone
    # per-mask seconds at the profile's full size: alone_full scaled by each configuration's ratio to alone
    full = {"wall": 1.0, "cpu": 1.0} if alone_full is None else {
        "wall": alone_full["wall_s"] / alone["per_mask_wall_s"], "cpu": alone_full["cpu_s"] / alone["per_mask_cpu_s"]}
    n_merged = ISSUE24["merging_methods"] * ISSUE24["ratios"]
    n_pruned = ((ISSUE24["methods"] - ISSUE24["merging_methods"] - 1) * ISSUE24["ratios"] + 1
                + ISSUE24["ratios"] * ISSUE24["random_per_ratio_and_family"] * ISSUE24["random_families"])
    projection = {"pruned_models": n_pruned, "merged_models": n_merged,
                  "batched_s": full["wall"] * (n_pruned * best["per_mask_wall_s"] + n_merged * single["per_mask_wall_s"]),
                  "batched_cpu_s": full["cpu"] * (n_pruned * best["per_mask_cpu_s"] + n_merged * single["per_mask_cpu_s"]),
                  "one_at_a_time_s": full["wall"] * (n_pruned + n_merged) * alone["per_mask_wall_s"],
                  "one_at_a_time_cpu_s": full["cpu"] * (n_pruned + n_merged) * alone["per_mask_cpu_s"]}
    out = {"benchmark": "multi_mask", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "model": "embedded", "profile": str(Path(args.profile).relative_to(REPO)) if Path(args.profile).is_relative_to(REPO)
           else args.profile, "runs": [{"tasks": r["tasks"][:3] + (["..."] if len(r["tasks"]) > 3 else []),
                                         "limit": r.get("limit")} for r in runs],
           "scale": args.scale, "alone_full": alone_full,
           "settings": {k: v for k, v in settings.items() if k != "categories"}, "configurations": results,
           "issue24_load": ISSUE24, "projected_stage4_eval": projection,
           "target_stage4_s": 480, "meets_target_on_cpu_time": projection["batched_cpu_s"] < 480,
           "machine": finish_machine_info(info)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("configurations", "machine")}, indent=1))


if __name__ == "__main__":
    main()
