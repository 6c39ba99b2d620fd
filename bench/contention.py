"""Benchmark: a stage alone and beside one competing CPU-bound process, under two thread settings.

torch's intra-op threads spin while they wait, so on a machine whose cores are busy a stage run
with one thread per core can slow down far more than its share of the CPU (issue 21: the default
profile's stage 00 went from 85 s to more than 15 minutes beside one CPU-bound process on 2 cores).
This benchmark runs one real stage through the pipeline (:func:`moe_utils.pipeline.runner.run`, stage
``--stage`` of ``--profile``, default the default profile's model card, shortened with ``--set``:
the embedded model, its perplexity and BLiMP through lm-evaluation-harness) four times:

* threads = the number of cores (torch's default before the pipeline chose), alone and beside
  one competitor (a Python busy loop in another process);
* the pipeline's policy (:mod:`moe_utils.common.threads`; ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``
  unset), alone and beside the competitor.

Each run starts after the previous one has ended and the competitor is stopped between pairs, so
the ratios (beside / alone) compare runs of one session on one machine. Target (issue 21): with
one competing process a stage takes at most 2.5 times its time alone. The JSON records the
machine's load average too: on a machine shared with other work "alone" is not idle.

Usage::

    python bench/contention.py                    # -> bench/results/contention.json
    python bench/contention.py --rounds 2 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import finish_machine_info, machine_info  # noqa: E402
from moe_utils.pipeline import profiles
from moe_utils.pipeline import runner as pipeline  # noqa: E402
from moe_utils.common import threads  # noqa: E402
from moe_utils.common.artifacts import atomic_write_json  # noqa: E402

log = logging.getLogger("bench.contention")
SCHEMA = 1
TARGET_RATIO = 2.5


def run_stage(profile: Path, stage: str, n_threads: int | None, work: Path, extra: dict) -> tuple[float, int]:
    """Seconds and threads of one forced run of ``stage`` (the stages before it already done in ``work``)."""
    overrides = {**extra, "artifacts_dir": str(work / "artifacts")}
    if n_threads is not None:
        overrides["threads"] = n_threads
    start = time.perf_counter()
    status = pipeline.run(profile, overrides, only=[stage], force=True, executed=work / "executed")
    elapsed = time.perf_counter() - start
    record = next(s for s in status["stages"] if s["stage"] == stage)
    log.info("%s threads=%s: %.1f s (stage %.1f s, %s threads)", stage, n_threads, elapsed, record["seconds"],
             record["threads"])
    return record["seconds"], record["threads"]


def competitor() -> subprocess.Popen:
    """One CPU-bound process: a Python busy loop."""
    return subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=pipeline.DEFAULT_PROFILE)
    parser.add_argument("--set", dest="overrides", action="append", default=["blimp_pairs=5", "card_paragraphs=40"],
                        metavar="KEY=VALUE", help="profile overrides (default: a shorter model card: 5 BLiMP "
                        "pairs per paradigm, 40 WikiText-2 lines)")
    parser.add_argument("--stage", default="00_model_card")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (the median is reported)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "contention.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in threads.ENV_VARS:  # the policy must see no user setting
        os.environ.pop(name, None)
    extra = profiles.parse_overrides(args.overrides)
    machine = machine_info()
    cores = threads.available_cores()
    settings = {"torch's default (one per core)": cores, "the pipeline's policy": None}
    times = {(name, busy): [] for name in settings for busy in (False, True)}
    chosen = {}
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        work = Path(tmp)
        run_stage(args.profile, args.stage, 1, work, extra)  # warm-up: caches, compiled kernels
        for _ in range(args.rounds):
            for name, n_threads in settings.items():
                for busy in (False, True):
                    other = competitor() if busy else None
                    try:
                        if busy:
                            time.sleep(1.0)  # let the competitor take its core
                        seconds, used = run_stage(args.profile, args.stage, n_threads, work, extra)
                    finally:
                        if other is not None:
                            other.kill()
                            other.wait()
                    times[(name, busy)].append(seconds)
                    chosen[(name, busy)] = used
    import statistics

    rows = []
    for name in settings:
        alone, contended = (statistics.median(times[(name, b)]) for b in (False, True))
        rows.append({"setting": name, "threads": f"alone {chosen[(name, False)]}, beside {chosen[(name, True)]}",
                     "alone_seconds": alone, "contended_seconds": contended, "ratio": contended / alone,
                     "all_seconds": {"alone": times[(name, False)], "contended": times[(name, True)]},
                     "meets_target": contended / alone <= TARGET_RATIO})
    report = {"schema": SCHEMA, "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "machine": finish_machine_info(machine),
              "workload": f"stage {args.stage} of {args.profile.relative_to(REPO) if args.profile.is_relative_to(REPO) else args.profile}",
              "parameters": {"rounds": args.rounds, "cores": cores, "overrides": extra},
              "target": f"beside one CPU-bound process, at most {TARGET_RATIO} times the time alone",
              "settings": rows}
    atomic_write_json(args.out, report)
    log.info("wrote %s", args.out)
    for row in rows:
        log.info("%s: alone %.1f s, beside %.1f s, ratio %.2f", row["setting"], row["alone_seconds"],
                 row["contended_seconds"], row["ratio"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
