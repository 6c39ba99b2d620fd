"""What the token-identity controls of stages 3 and 6 and Fig 7's intervals add to a run (issue 22).

Times, on the artifacts of a finished run (default ``artifacts/tiny``: stage 1's store, stage 2's
HSDL, stage 6's held-out store), each analysis these controls added, beside an existing analysis of
the same stage as the scale: the Mantel-Haenszel enrichment of both HSDL levels (beside the
question-level test), Fig 7's question bootstrap and split halves with their figure, the token-id and
naive Bayes rankings for three horizons (beside first-order affinity) and the cache simulation of
two more prefetchers (beside one strategy). Target: all of it under 10 seconds of CPU, far inside
the 2 minutes the issue allows. Writes ``bench/results/controls_cost.json``.

    .venv/bin/python bench/controls_cost.py [--artifacts artifacts/tiny]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _common import finish_machine_info, machine_info
from moe_utils.patterns import annotation
from moe_utils.stages import annotation as annotation_report
from moe_utils.prediction import expert_cache
from moe_utils.common import plotting
from moe_utils.prediction import routing_prediction as rp
from moe_utils.patterns.hsdl import HSDL
from moe_utils.stages import stage_paths
from moe_utils.capture.store import RoutingStore

TARGET_CPU_S = 10.0


def timed(run) -> tuple[object, dict]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = run()
    return out, {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", default="artifacts/tiny")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "controls_cost.json")
    args = parser.parse_args(argv)
    paths = stage_paths(args.artifacts)
    info = machine_info()
    store, hsdl = RoutingStore.open(paths.store), HSDL.load(paths.hsdl)
    held = RoutingStore.open(paths.prediction / "heldout_store")
    tokens = annotation.token_table(store, hsdl)
    added, scale = {}, {}
    for level in range(1, len(hsdl.dictionaries_) + 1):
        atoms, n_atoms = tokens[f"atom_{level}"].to_numpy(), hsdl.dictionaries_[level - 1].shape[1]
        added[f"stage3_mantel_haenszel_level{level}"] = timed(lambda: annotation.enrichment(
            atoms, tokens["label"], n_atoms, strata=tokens["token_id"], unit="token_type"))[1]
        scale[f"stage3_question_test_level{level}"] = timed(lambda: annotation.enrichment(
            atoms, tokens["label"], n_atoms, sample_ids=tokens["sample_id"], unit="sample"))[1]
    (pairs, within, _), added["stage3_fig7_bootstrap_and_split_half"] = timed(
        lambda: annotation_report.similarity_intervals(store, n_boot=1000))
    added["stage3_fig7_interval_figure"] = timed(lambda: plotting.domain_similarity_intervals(pairs, within))[1]
    fit, test, k, n_experts = np.asarray(store.topk_indices), np.asarray(held.topk_indices), held.top_k, held.n_experts
    added["stage6_token_id_rankings"] = timed(lambda: [rp.token_rankings(
        fit, store.tokens["token_id"], held.tokens["token_id"], n_experts, h, 2 * k) for h in (1, 2, 3)])[1]
    bayes, added["stage6_naive_bayes_rankings"] = timed(
        lambda: [rp.bayes_rankings(fit, test, n_experts, h, 2 * k) for h in (1, 2, 3)])
    scale["stage6_affinity_rankings"] = timed(
        lambda: [rp.affinity_rankings(fit, test, n_experts, h, 2 * k) for h in (1, 2, 3)])[1]
    layers, sizes = np.arange(1, held.n_layers), range(k, n_experts + 1)
    _, one = timed(lambda: expert_cache.compare(test, {"LRU alone": None}, layers, sizes, n_experts))
    _, three = timed(lambda: expert_cache.compare(test, {"LRU alone": None, "a": bayes[0][:, :, :k],
                                                         "b": bayes[0][:, :, :k]}, layers, sizes, n_experts))
    added["stage6_cache_two_more_strategies"] = {key: three[key] - one[key] for key in one}
    scale["stage6_cache_one_strategy"] = one
    total = {key: sum(v[key] for v in added.values()) for key in ("cpu_s", "wall_s")}
    report = {"artifacts": args.artifacts, "n_tokens": store.n_tokens, "n_heldout_tokens": held.n_tokens,
              "added": added, "existing_for_scale": scale, "total_added": total, "target_cpu_s": TARGET_CPU_S,
              "meets_target": total["cpu_s"] <= TARGET_CPU_S, "machine": finish_machine_info(info)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({"total_added": total, "meets_target": report["meets_target"]}))
    return report


if __name__ == "__main__":
    main()
