"""Benchmark: every stage of the default profile, and a fixed part of the test suite, alone and
beside one competing CPU-bound process (issue 21).

torch's intra-op threads spin while they wait, so on a machine whose cores are busy a stage run
with one thread per core can slow down far more than its share of the CPU (issue 21: the default
profile's stage 00 went from 85 s to more than 15 minutes beside one CPU-bound process on 2 cores).
The pipeline chooses each stage's threads from the cores free when it starts
(:mod:`moe_utils.common.threads`) and the test suite does the same for its own models
(``tests/conftest.py``). This benchmark measures both:

* **every stage** of ``--profile`` (default: the default profile), each run through the pipeline
  itself (:func:`moe_utils.pipeline.runner.run`, ``only=[stage]``, ``force=True``: its kernel, its
  notebook, its subprocesses), shortened with :data:`STAGE_OVERRIDES` so that one stage takes
  about 10 to 40 s alone on 2 idle cores (the earlier stages' artifacts come from one warm-up run
  of the whole pipeline with the same overrides, not timed);
* **the tests of** :data:`TEST_SELECTION` (the heavy paths: the conformance sweep over a few
  architectures, capture, lm-evaluation-harness evaluation, a smoke stage through papermill), one
  ``python -m pytest`` process each time; with ``--suite``, **the whole suite** instead, as
  ``make test`` runs it (about 8 minutes alone on 2 idle cores).

Each workload runs ``--rounds`` times alone and beside one competitor (a Python busy loop in
another process, started one second before so that the thread policy sees it), interleaved:
alone, beside, alone, beside, ... so that the machine's other load falls on both. The ratio is
the median beside over the median alone. ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` are removed
from the environment: the policy must see no user setting. With ``--torch-default`` each stage is
also measured with one thread per core (torch's default before the pipeline chose), for comparison.

Target (issue 21): with one competing process each stage, and the tests, take at most 2.5 times
their time alone. The JSON records the machine's load average too: on a machine shared with other
work "alone" is not idle. ``--quick`` checks that the script works in a few minutes (one round,
stages 00 and 02 and one test file); its numbers are not the benchmark's.

Usage::

    python bench/contention.py            # about 15 minutes on 2 idle cores -> bench/results/contention.json
    python bench/contention.py --quick --out /tmp/contention.json
    python bench/contention.py --stages --suite --rounds 1   # only `make test`'s suite: about 20 minutes

Rows of workloads that a run does not measure are kept from ``--out`` (each row has its own date
and rounds), so the stages and the whole suite can be measured in separate runs into one file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import finish_machine_info, machine_info  # noqa: E402
from moe_utils.common import threads  # noqa: E402
from moe_utils.common.artifacts import atomic_write_json  # noqa: E402
from moe_utils.pipeline import profiles  # noqa: E402
from moe_utils.pipeline import runner as pipeline  # noqa: E402

log = logging.getLogger("bench.contention")
SCHEMA = 2
TARGET_RATIO = 2.5
POLICY, TORCH_DEFAULT = "the pipeline's policy", "torch's default (one per core)"
#: Overrides of the default profile that shorten every stage to about 10 to 40 s alone on 2 idle cores
#: (the smoke profile's limits, on the embedded model): the model card on 40 WikiText-2 lines and
#: 5 BLiMP pairs per paradigm; 4 questions per domain; 150 HSDL steps with one surrogate refit; stage 4
#: at 50% with four methods, one random seed, 4 reference masks, one question or pair per task item;
#: stage 5 on 4 and 3 questions per domain; stage 6 on 2 held-out questions per domain.
STAGE_OVERRIDES: dict[str, object] = {
    "card_paragraphs": 40, "blimp_pairs": 5, "n_per_category": 4, "null_bootstrap": 50,
    "hsdl_steps": 150, "n_surrogates": 1, "control_draws": 200,
    "prune_ratios": [0.5], "pruning_methods": ["caep", "frequency", "reap", "random"], "random_seeds": [0],
    "reference_masks": 4, "caep_refits": {"seeds": [1], "resamples": 1}, "output_tokens": 128,
    "eval_task_limits": {"blimp": 2, "wikitext2_ppl": 2, "mmlu_pro_ppl": 1},
    "ablation": {"k1": [0.8], "sizes": [], "samples": 4, "tokens": 64},
    "domain_ppl_limit": 4, "domain_mc_limit": 3, "n_bootstrap": 200, "heldout_per_category": 2,
}
#: A fixed part of the test suite that goes through the heavy paths: the all-types conformance sweep
#: (on six architectures), routing capture, evaluation through lm-evaluation-harness, the thread policy
#: through a pipeline stage's kernel.
TEST_SELECTION = [*(f"tests/test_conformance.py::test_conformance[{model_type}]" for model_type in
                    ("olmoe", "mixtral", "qwen2_moe", "granitemoe", "deepseek_v3", "gpt_oss")),
                  "tests/test_routing.py", "tests/test_evaluation.py", "tests/test_threads.py"]
QUICK_STAGES = ["00_model_card", "02_hsdl"]
QUICK_TESTS = ["tests/test_threads.py"]
#: The test workload of ``--suite``: every test, as ``make test`` selects them (its ``pytest -q``).
SUITE: list[str] = []


def run_stage(profile: Path, stage: str, n_threads: int | None, work: Path, extra: dict) -> tuple[float, int]:
    """Seconds and threads of one forced run of ``stage`` (the stages before it already done in ``work``)."""
    overrides = {**extra, "artifacts_dir": str(work / "artifacts")}
    if n_threads is not None:
        overrides["threads"] = n_threads
    status = pipeline.run(profile, overrides, only=[stage], force=True, executed=work / "executed")
    record = next(s for s in status["stages"] if s["stage"] == stage)
    return record["seconds"], record["threads"]


def run_tests(selection: list[str]) -> tuple[float, int | None]:
    """Wall seconds of one pytest process on ``selection`` (which must pass; empty: the whole suite);
    threads are the suite's own."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the tests failed, so their time means nothing:\n{done.stdout[-3000:]}")
    return round(seconds, 1), None


def competitor() -> subprocess.Popen:
    """One CPU-bound process: a Python busy loop."""
    return subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])


def interleaved(name: str, measure: Callable[[], tuple[float, int | None]], rounds: int) -> dict:
    """``measure()`` ``rounds`` times alone and beside a competitor, alternating; one row of the report."""
    times, used = {False: [], True: []}, {}
    for _ in range(rounds):
        for busy in (False, True):
            other = competitor() if busy else None
            try:
                if busy:
                    time.sleep(1.0)  # let the competitor take its core before the policy looks
                seconds, n_threads = measure()
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
            times[busy].append(seconds)
            used.setdefault(busy, set()).add(n_threads)
            log.info("%s %s: %.1f s (%s thread(s))", name, "beside" if busy else "alone", seconds, n_threads)
    alone, beside = statistics.median(times[False]), statistics.median(times[True])

    def shown(values: set) -> str:
        return "/".join(sorted(str(v) for v in values)) if None not in values else "the suite's own"

    return {"threads": f"alone {shown(used[False])}, beside {shown(used[True])}", "alone_seconds": alone,
            "contended_seconds": beside, "ratio": round(beside / alone, 3),
            "all_seconds": {"alone": times[False], "contended": times[True]},
            "meets_target": beside / alone <= TARGET_RATIO}


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """``rows`` after the rows already in ``path`` (a previous run's JSON) of the workloads and settings
    this run did not measure, which keep their own date and rounds; a missing file keeps nothing."""
    previous = json.loads(path.read_text()) if path.is_file() else {}
    stamp = {"date": previous.get("date"), "rounds": previous.get("parameters", {}).get("rounds")}
    kept = [{**stamp, **row} for row in previous.get("rows", [])]  # rows of older files: the file's date and rounds
    measured = {(row["workload"], row["setting"]) for row in rows}
    return [row for row in kept if (row["workload"], row["setting"]) not in measured] + rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=pipeline.DEFAULT_PROFILE)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more profile overrides, after STAGE_OVERRIDES")
    parser.add_argument("--stages", nargs="*", metavar="STAGE", help="only these stages (default: every stage; "
                        "none given: no stage)")
    parser.add_argument("--no-tests", action="store_true", help="skip the test-suite workload")
    parser.add_argument("--suite", action="store_true", help="the test workload is the whole suite, as `make test` "
                        "runs it, instead of TEST_SELECTION")
    parser.add_argument("--rounds", type=int, default=2, help="alone/beside pairs per workload (default 2)")
    parser.add_argument("--torch-default", action="store_true",
                        help="also measure each stage with one thread per core (torch's default)")
    parser.add_argument("--quick", action="store_true", help=f"check that it works: one round, stages "
                        f"{' and '.join(QUICK_STAGES)}, {' '.join(QUICK_TESTS)}")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "contention.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in threads.ENV_VARS:  # the policy must see no user setting
        os.environ.pop(name, None)
    extra = {**STAGE_OVERRIDES, **profiles.parse_overrides(args.overrides)}
    every = [stage.name for stage in pipeline.discover_stages()]
    stages = args.stages if args.stages is not None else (QUICK_STAGES if args.quick else every)
    if unknown := sorted(set(stages) - set(every)):
        parser.error(f"no stage {unknown}; the stages are {', '.join(every)}")
    selection = QUICK_TESTS if args.quick else SUITE if args.suite else TEST_SELECTION
    rounds = 1 if args.quick else args.rounds
    machine, cores = machine_info(), threads.available_cores()
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        work = Path(tmp)
        stages_needed = every[:every.index(max(stages, key=every.index)) + 1] if stages else []
        if stages_needed:
            log.info("warm-up: every stage up to %s once (not timed)", stages_needed[-1])
            pipeline.run(args.profile, {**extra, "artifacts_dir": str(work / "artifacts")},
                         only=stages_needed, executed=work / "executed")
        for stage in stages:
            settings = {POLICY: None, **({TORCH_DEFAULT: cores} if args.torch_default else {})}
            for setting, n_threads in settings.items():
                row = interleaved(f"{stage} ({setting})",
                                  lambda: run_stage(args.profile, stage, n_threads, work, extra), rounds)
                rows.append({"workload": f"stage {stage}", "setting": setting, **row})
    if not args.no_tests:
        row = interleaved("tests", lambda: run_tests(selection), rounds)
        name = "tests: the whole suite (make test)" if selection is SUITE else "tests: pytest " + " ".join(selection)
        rows.append({"workload": name, "setting": POLICY, **row})
    today = _dt.datetime.now().isoformat(timespec="seconds")
    rows = merge_rows(args.out, [{**row, "date": today, "rounds": rounds} for row in rows])
    policy_rows = [r for r in rows if r["setting"] == POLICY]
    profile = args.profile.relative_to(REPO) if args.profile.is_relative_to(REPO) else args.profile
    report = {"schema": SCHEMA, "date": today,
              "machine": finish_machine_info(machine), "profile": str(profile), "quick": args.quick,
              "parameters": {"rounds": rounds, "cores": cores, "overrides": extra, "tests": selection,
                             "competitor": "python -c 'while True: pass'"},
              "seconds": round(time.perf_counter() - started, 1),
              "target": f"beside one CPU-bound process, at most {TARGET_RATIO} times the time alone",
              "rows": rows, "meets_target": all(r["meets_target"] for r in policy_rows)}
    atomic_write_json(args.out, report)
    log.info("wrote %s", args.out)
    for row in rows:
        log.info("%s, %s: alone %.1f s, beside %.1f s, ratio %.2f", row["workload"], row["setting"],
                 row["alone_seconds"], row["contended_seconds"], row["ratio"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
