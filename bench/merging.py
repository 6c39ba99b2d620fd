"""Benchmark: what the merging baselines (HC-SMoE, M-SMoE) add to stage 4's time on the embedded model.

Stage 4 gains, per merging method and ratio, one more model to evaluate, plus the cost of building
the merges: the calibration pass keeping 512 block inputs per layer (``output_tokens``), each
expert's mean output (HC-SMoE) or the router's logits (M-SMoE) on them, and the clustering. This
script times, in one process on WikiText-2 train windows: the calibration pass with and without
kept hidden states; building every mask of the default profile's pruning methods and of the two
merging methods at its ratios; and one WikiText-2 evaluation of a pruned model (frequency) and of
a merged one (HC-SMoE, M-SMoE), whose ratio says what writing the merged weights costs. Wall and
process CPU time are recorded (CPU time is the steadier figure on a shared machine).

Usage::

    python bench/merging.py                 # -> bench/results/merging.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
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
from moe_utils.compression import caep, calibration, pruning  # noqa: E402
from moe_utils.compression import merging  # noqa: E402
from moe_utils.evaluation.harness import run_harness  # noqa: E402
from moe_utils.models.loading import load_model  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "merging.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    profile = yaml.safe_load((REPO / "params" / "tiny.yaml").read_text())
    ratios, methods = profile["prune_ratios"], profile["pruning_methods"]
    merges = [m for m in methods if m in ("hc_smoe", "m_smoe")]
    prunes = [m for m in methods if m not in merges and m not in ("caep", "caep_layer")]  # CAEP needs stage 2
    model, tok = load_model("embedded")
    texts = calibration.calibration_texts(tok, "wikitext", n_samples=32, n_tokens=256, seed=0)
    budget = caep.PruningBudget.for_model(model)
    result = {"model": "embedded", "ratios": ratios, "calibration_texts": "32 WikiText-2 train windows of 256 tokens"}
    _, result["calibration_plain"] = timed(lambda: calibration.calibrate(model, tok, texts, max_length=256,
                                                                         progress=False))
    stats, result["calibration_hidden_512"] = timed(lambda: calibration.calibrate(
        model, tok, texts, max_length=256, keep_hidden=profile["output_tokens"], progress=False))
    masks, result["build_pruning"] = timed(lambda: pruning.pruning_masks(ratios, budget=budget, methods=prunes,
                                                                         stats=stats, model=model, progress=False))
    result["build_pruning"]["methods"] = prunes
    merged, result["build_merging"] = timed(lambda: pruning.pruning_masks(ratios, budget=budget, methods=merges,
                                                                          stats=stats, model=model, progress=False))
    result["build_merging"]["methods"] = merges

    def evaluate(compression):
        with merging.applied(model, compression):
            return run_harness(model, tok, ["wikitext2_ppl"], limit=4, batch_size=64)

    evaluations = {}
    for c in [next(m for m in masks if m.method == "frequency"), *[m for m in merged if m.ratio == ratios[-1]]]:
        _, evaluations[c.method] = timed(lambda c=c: evaluate(c))
    result["evaluation_wikitext2_4_articles"] = evaluations
    result["merged_over_pruned_eval_cpu"] = {m: round(v["cpu_s"] / evaluations["frequency"]["cpu_s"], 3)
                                             for m, v in evaluations.items() if m != "frequency"}
    result["added_models"] = len(merges) * len(ratios)
    result["machine"] = finish_machine_info(info)
    result["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
