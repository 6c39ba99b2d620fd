"""Benchmark: every stage of the pipeline at a real model's shape, with random weights (issue 21).

For a profile of ``params/`` whose ``about`` block declares its model's shape (``model_type`` and
``config``, e.g. ``params/granite.yaml``: granitemoe, 24 MoE layers x 32 experts, top-8, 1.33B
parameters), this

1. builds a model of exactly that shape from the model type's own transformers config class, with
   random weights (seeded), in float32, and saves it with a byte-level tokenizer
   (:func:`moe_utils.models.tiny_configs.byte_tokenizer`: no download) as a local safetensors checkpoint;
2. runs the pipeline itself on it (``python -m moe_utils.pipeline --profile <profile> --set
   model=<that folder> ...``, no book) with :data:`SMALL_LIMITS`: 20 MMLU-Pro questions (4 of each
   of the paper's five domains) and small evaluation limits, so that every stage runs, through the
   same notebooks and code as a real run, in an hour or so on 2 cores;
3. records for each stage: its run time (the pipeline's own figure), the threads the pipeline chose,
   the peak resident memory of the stage's kernel and the processes it started (the larger of the
   sum of their RSS, sampled every 0.25 s, and the largest one's own peak ``VmHWM``, both from
   ``/proc``: Linux only; RSS counts the pages of the safetensors file the weights are mapped
   from), and the token positions the stage's models
   processed (padding included; counted by a forward pre-hook on token embeddings that
   ``bench/token_meter/sitecustomize.py`` installs in every kernel) and so its tokens per second.

Target (issue 21): every stage completes with peak memory under 8 GB. The byte tokenizer gives
about four times as many tokens per text as the model's own would: tokens per second are the
figure to scale by, not the stage times. Random routing carries no finding; this measures costs.

Usage::

    python bench/scale_model.py --profile params/granite.yaml          # -> bench/results/scale_model.json
    python bench/scale_model.py --only 02_hsdl 03_annotation           # re-run stages, keep the others' rows
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(REPO))

from bench._common import finish_machine_info, machine_info  # noqa: E402
from moe_utils.common.artifacts import atomic_write_json  # noqa: E402

SCHEMA = 1
TARGET_GB = 8.0
TOKEN_METER = Path(__file__).resolve().parent / "token_meter"
#: Overrides of the profile: 20 questions, small evaluation limits, fewer refits and draws (stage 4: no CAEP refits,
#: 4 reference masks per allocation, the primary endpoint on the one task evaluated). Stage 5's heatmaps read bits
#: per byte: random weights answer one question per domain right only by chance, and a relative change of an
#: accuracy of 0 does not exist (stage 5 stops with that error); both metrics' evaluations run either way.
SMALL_LIMITS: dict[str, object] = {
    "domain_metric": "bits_per_byte",
    "n_per_category": 4, "card_paragraphs": 12, "blimp_pairs": 1, "null_bootstrap": 50,
    "hsdl_steps": 300, "n_surrogates": 1, "control_draws": 200,
    "prune_ratios": [0.5], "pruning_methods": ["caep", "frequency", "reap", "random"], "random_seeds": [0],
    "primary_endpoint": {"measure": "mmlu_pro"}, "reference_masks": 4, "caep_refits": {},
    "calibration_samples": 4, "output_tokens": 128, "eval_tasks": ["mmlu_pro_ppl"], "eval_limit": 1,
    "eval_task_limits": {}, "ablation": {"k1": [0.8], "sizes": [], "samples": 8, "tokens": 256},
    "domain_ppl_limit": 2, "domain_mc_limit": 1, "n_bootstrap": 200, "heldout_per_category": 1,
}


# ------------------------------------------------------------------------------- the model
def build_model(about: dict, folder: Path, seed: int = 0) -> dict:
    """Random weights of the shape ``about`` declares, saved in ``folder`` (reused when its config matches)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_utils.models.tiny_configs import byte_tokenizer

    config = AutoConfig.for_model(about["model_type"], **about["config"])
    marker = folder / "scale_model.json"
    wanted = {"model_type": about["model_type"], "config": about["config"], "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()).get("wanted") == wanted:
        return json.loads(marker.read_text())["info"]
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    del model
    info = {"model_type": about["model_type"], "config": about["config"], "n_parameters": n_params,
            "declared_total_b": about.get("parameters", {}).get("total_b"),
            "checkpoint_gb": round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9, 3),
            "build_seconds": round(time.perf_counter() - start, 1), "seed": seed}
    atomic_write_json(marker, {"wanted": wanted, "info": info})
    return info


# ------------------------------------------------------------------------------- measuring
def _process_table() -> dict[int, tuple[int, int]]:
    """``{pid: (parent pid, RSS bytes)}`` of every process readable in ``/proc``."""
    page, table = resource.getpagesize(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{entry}/statm") as handle:
                rss = int(handle.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), rss)
    return table


def _high_water(pid: int) -> int:
    """The process's peak resident memory so far (``VmHWM``, bytes): catches peaks between samples."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    """Every process below ``root`` in ``table`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


class StageMeter:
    """Samples the RSS of the pipeline's child processes (the stage kernels and what they start)
    and attributes each sample to the stage running at the time."""

    def __init__(self, root: int, interval: float = 0.25):
        self.root, self.interval, self.stage = root, interval, None
        self.peaks: dict[str, int] = {}
        self.pids: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            stage = self.stage
            if stage is None:
                continue
            table = _process_table()
            below = descendants(self.root, table)
            self.pids.setdefault(stage, set()).update(below)
            self.peaks[stage] = max(self.peaks.get(stage, 0), sum(table[p][1] for p in below),
                                    max((_high_water(p) for p in below), default=0))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def stage_tokens(token_dir: Path, pids: set[int]) -> int:
    """Token positions the processes ``pids`` counted (``bench/token_meter``)."""
    total = 0
    for pid in pids:
        path = token_dir / f"{pid}.tokens"
        if path.is_file():
            total += int(path.read_text() or 0)
    return total


# ------------------------------------------------------------------------------- the run
def pipeline_command(args, model_dir: Path) -> list[str]:
    """The pipeline's command line: the profile with :data:`SMALL_LIMITS`, the model and artifacts
    folders, then ``args.set`` (later overrides win), one ``--set KEY=VALUE`` each."""
    overrides = {**SMALL_LIMITS, "model": str(model_dir), "artifacts_dir": str(args.artifacts_dir)}
    command = [sys.executable, "-m", "moe_utils.pipeline", "--profile", str(args.profile), "--no-book"]
    for item in [f"{key}={json.dumps(value)}" for key, value in overrides.items()] + list(args.set or []):
        command += ["--set", item]
    return command + (["--only", *args.only] if args.only else [])


def run_pipeline(args, model_dir: Path, token_dir: Path, on_stage) -> int:
    """Run the pipeline on ``model_dir``; calls ``on_stage(name, seconds, threads, meter)`` when each
    stage finishes (from the pipeline's log lines)."""
    command = pipeline_command(args, model_dir)
    env = {**os.environ, "MOE_BENCH_TOKEN_DIR": str(token_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TOKEN_METER), os.environ.get("PYTHONPATH")]))}
    print("$", " ".join(command), flush=True)
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    meter, threads = StageMeter(child.pid), None
    try:
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if match := re.search(r"(\d\d_\w+): running", line):
                meter.stage, threads = match[1], None
            elif match := re.search(r"(\d\d_\w+): (\d+) thread\(s\)", line):
                threads = int(match[2])
            elif (match := re.search(r"(\d\d_\w+): done in ([\d.]+) s", line)) and meter.stage == match[1]:
                meter.stage = None
                on_stage(match[1], float(match[2]), threads, meter)
        returncode = child.wait()
        if meter.stage is not None:  # the stage that failed: its peak so far, no time
            on_stage(meter.stage, None, threads, meter)
        return returncode
    finally:
        meter.close()
        if child.poll() is None:
            child.terminate()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=REPO / "params" / "granite.yaml")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where the random checkpoint goes (default: a folder under the system's temp dir)")
    parser.add_argument("--artifacts-dir", type=Path, default=None, help="the run's artifacts_dir "
                        "(default: artifacts/scale-<profile>)")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages; rows of the others "
                        "already in --out are kept")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="more pipeline overrides")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale_model.json")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT", help="what the numbers need said "
                        "(e.g. the machine was shared), kept in the JSON and shown on the status page; without "
                        "it, the notes already in --out are kept")
    args = parser.parse_args(argv)
    from moe_utils.pipeline.runner import load_about

    about = load_about(args.profile)
    if not about or "config" not in about:
        parser.error(f"{args.profile} declares no shape: its about block needs model_type and config")
    name = args.profile.stem
    args.artifacts_dir = args.artifacts_dir or REPO / "artifacts" / f"scale-{name}"
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / f"moe-scale-model-{name}"
    machine = machine_info()
    model = build_model(about, model_dir)
    print(f"model: {model}", flush=True)
    kept = json.loads(args.out.read_text()) if args.out.is_file() else {}
    stages = {s["stage"]: s for s in kept.get("stages", [])} if kept.get("profile") == name else {}
    args.note = args.note or (kept.get("notes", []) if kept.get("profile") == name else [])
    token_dir = Path(tempfile.mkdtemp(prefix="scale-model-tokens-"))

    def on_stage(stage: str, seconds: float | None, threads: int | None, meter: StageMeter) -> None:
        tokens = stage_tokens(token_dir, meter.pids.get(stage, set()))
        stages[stage] = {"stage": stage, "seconds": seconds, "threads": threads,
                         "peak_rss_gb": round(meter.peaks.get(stage, 0) / 1e9, 3), "token_positions": tokens,
                         "tokens_per_second": round(tokens / seconds, 1) if tokens and seconds else None,
                         "failed": seconds is None,
                         "finished": _dt.datetime.now().isoformat(timespec="seconds")}
        write(args, name, machine, model, stages, about, complete=False)

    returncode = run_pipeline(args, model_dir, token_dir, on_stage)
    from moe_utils.pipeline.runner import discover_stages

    every = {stage.name for stage in discover_stages()}
    write(args, name, machine, model, stages, about, complete=returncode == 0 and every <= set(stages))
    return returncode


def write(args, name: str, machine: dict, model: dict, stages: dict, about: dict, *, complete: bool) -> None:
    rows = [stages[k] for k in sorted(stages)]
    peak = max((r["peak_rss_gb"] for r in rows), default=None)
    report = {
        "schema": SCHEMA, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": finish_machine_info(dict(machine)), "profile": name, "model": model,
        "summary": about["summary"], "overrides": SMALL_LIMITS, "extra_overrides": args.set or [],
        "tokenizer": "byte-level (257 tokens), not the model's own",
        "target": f"every stage completes with peak memory under {TARGET_GB:.0f} GB",
        "stages": rows, "peak_rss_gb": peak, "complete": complete, "notes": args.note,
        "meets_target": bool(complete and peak is not None and peak < TARGET_GB),
    }
    atomic_write_json(args.out, report)


if __name__ == "__main__":
    raise SystemExit(main())
