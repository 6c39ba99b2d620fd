"""Benchmark: the store-only analysis at the paper's shapes (stages 02, 03 and the store-only parts of 05, 06).

Stages 02 to 06 read the routing store that stage 01 captures; this benchmark asks whether that
analysis fits a laptop at the paper's scale. It writes a synthetic routing store of each paper
shape with 604,109 tokens (the size of the paper's MMLU-Pro capture):

* ``phimoe``: Phi-3.5-MoE, 32 MoE layers x 16 experts, top-2 (N_e = 512);
* ``deepseek``: DeepSeek-MoE-16B's routed experts, 27 MoE layers x 64 experts, top-6 (N_e = 1728);

with routing drawn by :func:`bench.hsdl.synthetic_routing` (planted token types that choose alike
in every layer), questions of ``--tokens-per-question`` tokens in five MMLU-Pro categories, and
Zipf-distributed synthetic words. It then runs, on one process, the package functions the
notebooks call, timing each step and sampling the process's resident memory (RSS, every 50 ms) to
record its peak:

* stage 01 (store-only): the token-identity control (explained share with its bootstrap interval,
  by token and by token and position, and the pair table: :mod:`moe_utils.patterns.token_null`);
* stage 02: X (token columns of routing weights), the HSDL fit with the notebook's defaults,
  atom tables, hierarchy, and the Fig 6 coverage against chance (:mod:`moe_utils.patterns.cooccurrence`);
  the controls: random atoms' cross-layer share and coverage (uniform and by usage), the stability
  refits (another seed, random initial atoms, two question halves: 4 fits) and the surrogate refits
  (:mod:`moe_utils.patterns.hsdl_controls`). ``--no-refits`` leaves out the refits (4 + ``n_surrogates`` HSDL
  fits, each as long as the fit), ``--no-controls`` every control;
* stage 03: token annotation and enrichment, levels, domain similarity, domain enrichment;
* stage 05 (store-only): CAEP masks fitted on each domain and on all domains (the calibration
  baselines and the evaluations need the model and are not store-only);
* stage 06 (store-only): every routing predictor's rankings on a held-out synthetic store of
  ``--heldout-tokens`` tokens, hit counts and the bootstrap recall summary. The hidden-state
  predictor needs the model: the usage prior's rankings stand in for its input. Its cost grows
  with the held-out tokens (HSDL's masked codes, fitted per token and prefix of layers), so the
  JSON also gives seconds per held-out token and the time at the notebook's held-out size
  (``heldout_per_category = 6`` questions of each of 5 categories, ``--tokens-per-question`` each).

With ``--hsdl-steps`` below the notebook's 600 (to fit a time budget), the JSON gives the fit's
seconds per Adam step and its fixed part (initialisation, the codes of every token), from which the
full fit's time follows; ``analysis_seconds_at_notebook_settings``
is that extrapolation for the whole analysis (every fit at 600 steps, stage 6 at the notebook's
held-out size). Shapes can be run one command at a time:
cases of other shapes already in ``--out`` are kept.

Target (issue 21): each shape's analysis within 10 minutes and 8 GB. The JSON records, per shape
and step, seconds and peak RSS (GB), and ``meets_target``; it never fails on a miss.

Usage::

    OMP_NUM_THREADS=1 python bench/scale_store.py                 # both shapes -> bench/results/scale_store.json
    python bench/scale_store.py --tokens 20000 --out /tmp/s.json  # a quick run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench._common import finish_machine_info, machine_info  # noqa: E402
from bench.hsdl import synthetic_routing  # noqa: E402
from moe_utils.common.artifacts import atomic_write_json, package_versions  # noqa: E402

log = logging.getLogger("bench.scale_store")
SCHEMA = 1
SHAPES = {"phimoe": {"like": "Phi-3.5-MoE", "n_layers": 32, "n_experts": 16, "top_k": 2},
          "deepseek": {"like": "DeepSeek-MoE-16B (routed experts)", "n_layers": 27, "n_experts": 64, "top_k": 6}}
CATEGORIES = ("computer science", "law", "math", "physics", "psychology")
TARGET_SECONDS, TARGET_GB = 600.0, 8.0


# ------------------------------------------------------------------------------- measuring
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


class Recorder:
    """Times named steps and samples the process's RSS every ``interval`` seconds to get each step's peak."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.steps = interval, []
        self._peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    @contextmanager
    def step(self, stage: str, name: str):
        self._peak = _rss_bytes()
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        peak = max(self._peak, _rss_bytes())
        self.steps.append({"stage": stage, "step": name, "seconds": round(seconds, 3), "peak_rss_gb": round(peak / 1e9, 3)})
        log.info("%s %-28s %8.1f s  peak RSS %.2f GB", stage, name, seconds, peak / 1e9)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------- synthetic stores
def write_synthetic_store(path: Path, shape: dict, n_tokens: int, tokens_per_question: int, seed: int):
    """A routing store of ``shape`` with ``n_tokens`` tokens (see the module docstring); returns it opened."""
    from moe_utils.capture.store import RoutingStore, index_dtype, write_store

    n_layers, n_experts, k = shape["n_layers"], shape["n_experts"], shape["top_k"]
    x = synthetic_routing(n_layers, n_experts, k, n_tokens=n_tokens, seed=seed).tocsc()
    x.sort_indices()
    rows = x.indices.reshape(n_tokens, n_layers * k)  # k rows per layer, layer-major
    weights = x.data.reshape(n_tokens, n_layers, k)
    del x
    indices = (rows.reshape(n_tokens, n_layers, k) % n_experts).astype(index_dtype(n_experts))
    rng = np.random.default_rng(seed + 1)
    sample = np.arange(n_tokens) // tokens_per_question
    vocabulary = np.array([f" w{i}" for i in range(5000)] + [f" {i}" for i in range(100)])
    token_id = np.minimum(rng.zipf(1.3, n_tokens) - 1, len(vocabulary) - 1)
    tokens = pd.DataFrame({"sample_id": sample, "position": np.arange(n_tokens) % tokens_per_question,
                           "token_id": token_id, "token": vocabulary[token_id],
                           "label": np.asarray(CATEGORIES)[sample % len(CATEGORIES)]})
    manifest = {"model": {"name": f"synthetic {shape['like']}", "n_experts": n_experts, "n_layers": n_layers,
                          "top_k": k},
                "data": {"categories": list(CATEGORIES)}, "fingerprint": {"synthetic_seed": seed}}
    write_store(path, manifest, {"topk_indices": indices, "topk_weights": weights.astype(np.float32)}, tokens)
    return RoutingStore.open(path)


# ------------------------------------------------------------------------------- the stages
def run_shape(name: str, shape: dict, args, work: Path) -> dict:
    from moe_utils.patterns import annotation
    from moe_utils.stages import annotation as annotation_report
    from moe_utils.compression import caep
    from moe_utils.compression import domains
    from moe_utils.patterns import hsdl_controls
    from moe_utils.stages import hsdl as hsdl_report
    from moe_utils.compression import pruning
    from moe_utils.patterns import token_null as tn
    from moe_utils.patterns.cooccurrence import Cooccurrence
    from moe_utils.prediction import routing_prediction as rp
    from moe_utils.patterns.expert_matrix import expert_matrix
    from moe_utils.patterns.hsdl import HSDL

    recorder, notes = Recorder(), []
    started, load_start = _dt.datetime.now().isoformat(timespec="seconds"), list(os.getloadavg())
    try:
        with recorder.step("01", "write synthetic store"):
            store = write_synthetic_store(work / name / "store", shape, args.tokens, args.tokens_per_question, 0)
            heldout = write_synthetic_store(work / name / "heldout", shape, args.heldout_tokens,
                                            args.tokens_per_question, 1)
        if args.controls:
            with recorder.step("01", "token-identity control"):
                shared: dict = {}  # as stage 1's token_control: what the three calls have in common, once
                tn.explained_share_interval(store, n_boot=args.null_bootstrap, seed=0, shared=shared)
                tn.explained_share_interval(store, n_boot=args.null_bootstrap, seed=0,
                                            strata=tn.token_position_strata(store), shared=shared)
                tn.pair_table(tn.coselection(store, seed=0, shared=shared), n=10)
                del shared
        with recorder.step("02", "expert matrix"):
            X = expert_matrix(store, granularity="token", value="weight")
        with recorder.step("02", "HSDL fit"):
            model = HSDL(levels=[1.0, 2.0], n_steps=args.hsdl_steps, batch_size=512,
                         layout=(store.n_layers, store.n_experts), random_state=0).fit(X)
        optimisation, steps_run = model.fit_seconds_, model.n_steps_  # the Adam steps alone
        with recorder.step("02", "atoms and hierarchy"):
            tables, _, _ = hsdl_report.atom_sizes(model, 0.5)
            hsdl_report.top_atoms(tables)
            try:
                hsdl_report.hierarchy_summary(model, min_share=0.1)
            except RuntimeError as error:  # a quality check of the fit, not a cost: recorded, not fatal
                notes.append(f"hierarchy: {error}")
        with recorder.step("02", "coverage against chance"):
            selected = expert_matrix(store, granularity="token", value="binary")
            counted = Cooccurrence(selected)
            observed, _, coverage = hsdl_report.coverage_against_chance(tables, counted, random_state=0)
        if args.controls:
            with recorder.step("02", "chance atoms (cross-layer, coverage)"):
                usage = np.asarray(selected.sum(axis=1)).ravel()
                live_sizes = hsdl_report.live_atoms(tables)["n_experts"].to_numpy()
                for weights in (None, usage):
                    hsdl_controls.cross_layer_chance(live_sizes, (store.n_layers, store.n_experts),
                                                     n_draws=args.control_draws, weights=weights, seed=0)
                    hsdl_controls.coverage_chance(live_sizes, counted, percents=hsdl_report.COVERAGE_PERCENTS,
                                                  n_draws=args.control_draws, weights=weights, seed=0)
            if args.refits:
                with recorder.step("02", "stability refits (3 comparisons, 4 fits)"):
                    hsdl_controls.stability(model, X, store.tokens["sample_id"].to_numpy(), 0.5, seed=0)
                with recorder.step("02", f"surrogate refits ({args.n_surrogates})"):
                    hsdl_controls.surrogate_fits(model, store, 0.5, n_surrogates=args.n_surrogates, seed=0)
        del selected, counted
        with recorder.step("02", "save"):
            model.save(work / name / "hsdl", extra=hsdl_report.artifact_extra(store, X, granularity="token",
                                                                              value="weight"))
            model = HSDL.load(work / name / "hsdl")
        with recorder.step("03", "annotate tokens"):
            result = annotation.annotate(store, model, None, alpha=0.01, correction="bh", threshold=0.5)
        with recorder.step("03", "levels and hierarchy"):
            annotation_report.levels_table(result)
            top_level1 = annotation_report.most_explaining(result.level(1), 20)["atom"].tolist()
            annotation_report.hierarchy_findings(result, model, top_level1, min_share=0.1)
        with recorder.step("03", "domain similarity"):
            annotation_report.domain_summary(store)
        with recorder.step("03", "domain enrichment"):
            annotation_report.enrichment_summary(result.level(1), sorted(CATEGORIES), correction="bh", n=20)
        del result
        budget = caep.PruningBudget(layer_sizes=(store.n_experts,) * store.n_layers, min_per_layer=store.top_k)
        with recorder.step("05", "CAEP masks per domain"):
            domains.domain_masks(model, store, CATEGORIES, ratio=0.5, methods=["caep"], budget=budget,
                                 threshold_ratio=0.9)
            caep.caep(*pruning.hsdl_factors(model, level=1), 0.9, 0.5, budget=budget)
        fit_topk, test_topk = np.asarray(store.topk_indices), np.asarray(heldout.topk_indices)
        horizons, n_ranked = [1, 2, 3], min(2 * store.top_k, store.n_experts)
        with recorder.step("06", "rankings (every predictor)"):
            stand_in = {h: rp.prior_rankings(fit_topk, len(test_topk), store.n_experts, h, n_ranked) for h in horizons}
            ranked = rp.all_rankings(fit_topk, test_topk, store.n_experts, horizons, n_ranked, hsdl=model,
                                     hidden=stand_in, x=expert_matrix(heldout, "token", "weight"),
                                     n_steps=args.inference_steps, fit_token_ids=store.tokens["token_id"],
                                     token_ids=heldout.tokens["token_id"])
        with recorder.step("06", "hits and recall summary"):
            m_values = sorted({store.top_k, n_ranked})
            hits = {p: {m: rp.hit_counts(r, test_topk, m) for m in m_values} for p, r in ranked[1].items()}
            rp.recall_summary(hits, heldout.tokens["sample_id"].to_numpy(), np.arange(1, store.n_layers),
                              store.top_k, confidence=0.95, n_boot=1000)
    finally:
        recorder.close()
    analysis = [s for s in recorder.steps if s["step"] != "write synthetic store"]
    rankings = next(s["seconds"] for s in recorder.steps if s["step"].startswith("rankings"))
    notebook_heldout = 6 * len(CATEGORIES) * args.tokens_per_question
    total = sum(s["seconds"] for s in analysis)
    peak = max(s["peak_rss_gb"] for s in analysis)
    fit = next(s["seconds"] for s in recorder.steps if s["step"] == "HSDL fit")
    n_fits = 1 + (4 + args.n_surrogates if args.controls and args.refits else 0)
    # a fit is its Adam steps plus a fixed part (initialisation, the codes of every token); every fit at the
    # notebook's 600 steps (the 4 + n_surrogates refits, run or not, take the fit's settings: each refit run
    # is counted as one fit's time, and what the refit steps spend besides, building the surrogate stores and
    # comparing the fits, is kept) and stage 6 at its held-out size
    per_step, fixed = optimisation / steps_run, fit - optimisation
    at_notebook = (total - n_fits * fit + (5 + args.n_surrogates) * (fixed + per_step * 600)
                   - rankings + rankings / args.heldout_tokens * notebook_heldout)
    return {"shape": name, **shape, "n_tokens": args.tokens, "n_heldout_tokens": args.heldout_tokens,
            "hsdl_steps": args.hsdl_steps, "hsdl_steps_run": steps_run, "hsdl_seconds_per_step": per_step,
            "hsdl_fit_fixed_seconds": fixed,
            "inference_steps": args.inference_steps,
            "n_experts_total": shape["n_layers"] * shape["n_experts"], "steps": recorder.steps,
            "analysis_seconds": round(total, 1), "analysis_peak_rss_gb": peak,
            "coverage_columns_counted": int(observed["n_columns"].iloc[0]), "coverage": coverage, "notes": notes,
            "rankings_seconds_per_heldout_token": rankings / args.heldout_tokens,
            "rankings_seconds_at_notebook_heldout": round(rankings / args.heldout_tokens * notebook_heldout, 1),
            "notebook_heldout_tokens": notebook_heldout,
            "controls": args.controls, "refits": bool(args.controls and args.refits), "n_hsdl_fits": n_fits,
            "null_bootstrap": args.null_bootstrap, "control_draws": args.control_draws,
            "n_surrogates": args.n_surrogates,
            "analysis_seconds_at_notebook_settings": round(at_notebook, 1),
            "started": started, "loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg()),
            "cpu_count": os.cpu_count(),
            "meets_target": bool(total <= TARGET_SECONDS and at_notebook <= TARGET_SECONDS and peak <= TARGET_GB)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["phimoe", "deepseek"])
    parser.add_argument("--tokens", type=int, default=604_109)
    parser.add_argument("--heldout-tokens", type=int, default=1_000,
                        help="tokens of the held-out store of stage 6 (its HSDL inference grows with the tokens, "
                             "the prefixes of layers and the dictionary's non-zeros: the JSON gives the rate per token)")
    parser.add_argument("--tokens-per-question", type=int, default=216)
    parser.add_argument("--hsdl-steps", type=int, default=600, help="HSDL steps (the notebook's default)")
    parser.add_argument("--inference-steps", type=int, default=100, help="stage 6's hsdl_inference_steps")
    parser.add_argument("--no-controls", dest="controls", action="store_false",
                        help="leave out the controls of stages 1 and 2 (token identity, chance atoms, refits)")
    parser.add_argument("--no-refits", dest="refits", action="store_false",
                        help="leave out stage 2's HSDL refits (stability and surrogates): 4 + n_surrogates fits")
    parser.add_argument("--null-bootstrap", type=int, default=200, help="stage 1's null_bootstrap (the default)")
    parser.add_argument("--control-draws", type=int, default=1000, help="stage 2's control_draws (the default)")
    parser.add_argument("--n-surrogates", type=int, default=3, help="stage 2's n_surrogates (the default)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the stores go (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale_store.json")
    args = parser.parse_args(argv)
    if min(args.tokens, args.heldout_tokens, args.tokens_per_question) < 1:
        parser.error("--tokens, --heldout-tokens and --tokens-per-question must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    machine = machine_info()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="scale_store-"))
    # cases of other shapes already in --out are kept: shapes can be run one command at a time
    kept = json.loads(args.out.read_text()).get("cases", []) if args.out.is_file() else []
    cases = [c for c in kept if c.get("shape") not in args.shapes]
    try:
        for name in args.shapes:
            cases.append(run_shape(name, SHAPES[name], args, work))
            shutil.rmtree(work / name, ignore_errors=True)
            write_report(args, machine, cases)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def write_report(args, machine: dict, cases: list[dict]) -> None:
    report = {
        "schema": SCHEMA, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {**finish_machine_info(dict(machine)), "max_rss_gb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
            "versions": package_versions(("torch", "numpy", "scipy"))},
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target": f"each shape's store-only analysis within {TARGET_SECONDS / 60:.0f} minutes and {TARGET_GB:.0f} GB",
        "cases": cases, "meets_targets": all(c["meets_target"] for c in cases),
    }
    atomic_write_json(args.out, report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    raise SystemExit(main())
