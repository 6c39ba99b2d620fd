"""Benchmark: what does real expert removal buy? Size, memory and speed of pruned models.

The paper reports parameter counts of pruned models but no memory or speed (its section 5). For
each model, at each removal ratio (default 25, 50, 75 % of the routed experts of every MoE layer,
the same count in each layer, experts drawn at random with a fixed seed), this removes the experts
with :func:`moe_utils.models.expert_surgery.remove_experts` and measures, against the original model in
the same run:

* **parameters**: the count must fall by exactly the pruned share of the routed-expert weights
  (expert tensors and router rows), computed here from the tensors' shapes;
* **checkpoint size**: bytes on disk of ``save_pretrained`` (safetensors);
* **memory**: resident memory of a fresh process after it loads the checkpoint, and its peak while
  loading and running one batch (last position's logits only), less its resident memory before
  loading (libraries and the model's code imported; the kernel's peak mark is reset at that
  point); on CUDA, ``torch.cuda.max_memory_allocated`` too;
* **throughput**: tokens/s of a full forward pass (all logits, as perplexity needs) over the same
  WikiText-2 test windows (repeated until a pass of the original lasts ``--min-pass-seconds``),
  original and pruned models interleaved (one warm-up each, then ``--repeats`` rounds in
  rotating order); ratios of medians, on process CPU time when one thread
  runs on a CPU (the time other jobs hold a shared machine's cores is not counted), else on wall
  time;
* **exactness**: max |logits| difference between the removed model and the original under
  :func:`moe_utils.models.expert_surgery.masked_experts` on the first batch (must be <= 1e-5).

Targets (from the issue): parameters fall by exactly the pruned share, throughput no lower than the
original (``--speed-tolerance``, default 2 %, allows for timing noise). Pruning keeps top-k, so the work per token is unchanged: the throughput target only asks
that removal costs nothing. The JSON records ``meets_targets`` and never fails on a miss.

Usage::

    OMP_NUM_THREADS=1 python bench/pruning.py --threads 1   # embedded + random:olmoe-100m -> bench/results/pruning.json
    python bench/pruning.py --quick                          # seconds: random:olmoe, 1 repeat
    python bench/pruning.py --models embedded --ratios 0.5 --repeats 5 --out /tmp/pruning.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import finish_machine_info, machine_info  # noqa: E402
from moe_utils.models.expert_surgery import experts_per_layer, masked_experts, remove_experts  # noqa: E402
from moe_utils.models.loading import load_model, model_summary, moe_layers  # noqa: E402
from moe_utils.common.artifacts import atomic_write_json  # noqa: E402
from moe_utils.evaluation.wikitext import WIKITEXT_ENV, load_wikitext  # noqa: E402

log = logging.getLogger("bench.pruning")

DEFAULT_OUT = REPO / "bench" / "results" / "pruning.json"
DEFAULT_MODELS = ("embedded", "random:olmoe-100m")
QUICK_MODELS = ("random:olmoe",)
DEFAULT_RATIOS = (0.25, 0.5, 0.75)
SHARED_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
EXACT_TOL = 1e-5
SCHEMA = "moe-bench-pruning/1"


# ----------------------------------------------------------------------------------- inputs
def token_windows(tokenizer, data_dir: Path | None, n_windows: int, length: int) -> torch.Tensor:
    """``(n_windows, length)`` token ids: consecutive windows of the WikiText-2 test split (no padding)."""
    if data_dir is None and not os.environ.get(WIKITEXT_ENV) and SHARED_WIKITEXT.is_dir():
        data_dir = SHARED_WIKITEXT
    ids = tokenizer(load_wikitext("test", data_dir), return_tensors="pt")["input_ids"][0]
    needed = n_windows * length
    if ids.numel() < needed:
        raise SystemExit(f"error: WikiText-2 test has {ids.numel()} tokens, fewer than {n_windows} x {length}")
    return ids[:needed].reshape(n_windows, length)


def uniform_keep(model, ratio: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per MoE layer, a random set of ``E - round(ratio * E)`` kept experts (never fewer than top-k)."""
    keep = []
    for layer in moe_layers(model):
        n_keep = max(layer.top_k, layer.num_experts - round(ratio * layer.num_experts))
        keep.append(np.sort(rng.choice(layer.num_experts, size=n_keep, replace=False)))
    return keep


# ------------------------------------------------------------------------------- measures
def routed_expert_params(model) -> list[int]:
    """Parameters one routed expert holds in each MoE layer: its rows of the expert tensors and router."""
    return [sum(t.numel() // t.shape[0] for t in (*layer.experts.parameters(recurse=False),
                                                   *layer.router.parameters(recurse=False)))
            for layer in moe_layers(model)]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoint_bytes(model, directory: Path) -> int:
    """Save with ``save_pretrained`` (safetensors) and return the bytes on disk of the directory."""
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def forward(model, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch, use_cache=False).logits


def timed_pass(model, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(wall, process CPU) seconds for one forward pass over every batch (synchronised on CUDA)."""
    device = next(model.parameters()).device
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for batch in batches:
        forward(model, batch.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall0, time.process_time() - cpu0


def memory_probe(path: Path, args) -> dict:
    """Peak memory of a fresh process that loads ``path`` and runs one batch (see :func:`probe_main`)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(path), "--batch-size",
           str(args.batch_size), "--max-length", str(args.max_length)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.device is not None:
        cmd += ["--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {path} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_bytes(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def probe_main(args) -> int:
    """``--probe DIR``: in this fresh process, load the checkpoint and run one batch; print memory as JSON.

    After the imports the kernel's peak-RSS mark is reset to the current RSS (``/proc/self/clear_refs``),
    so the reported peak is that of loading and running the model alone, not of importing libraries.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from moe_utils.models.expert_surgery import load_pruned

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(args.probe))]  # import the model's code now
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to VmRSS (Linux >= 4.0)
    before = _status_bytes("VmRSS")
    model = load_pruned(args.probe, device=device)
    loaded = _status_bytes("VmRSS")
    batch = torch.randint(0, model.config.vocab_size, (args.batch_size, args.max_length), device=device)
    with torch.no_grad():  # last position's logits only: the peak is the model's, not a (B, T, vocab) tensor's
        model(input_ids=batch, use_cache=False, logits_to_keep=1)
    result = {"rss_before_load": before, "rss_after_load": loaded, "rss_peak": _status_bytes("VmHWM"),
              "cuda_max_allocated": None}
    result["rss_loaded_above_imports"] = loaded - before
    result["rss_peak_above_imports"] = result["rss_peak"] - before
    if device.type == "cuda":
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------ bench
def bench_model(name: str, args, tmp_root: Path) -> dict:
    log.info("loading %s", name)
    original, tokenizer = load_model(name, device=args.device)
    device = next(original.parameters()).device
    windows = token_windows(tokenizer, args.data_dir, args.n_windows, args.max_length)
    batches = list(windows.split(args.batch_size))
    n_tokens = int(windows.numel())
    per_expert = routed_expert_params(original)
    routed_total = int(np.dot(per_expert, experts_per_layer(original)))
    rng = np.random.default_rng(args.seed)

    variants = {"original": original}
    facts: dict[str, dict] = {"original": {"ratio": 0.0, "experts_per_layer": experts_per_layer(original),
                                           "n_params": n_params(original), "routed_params": routed_total}}
    for ratio in args.ratios:
        label = f"{ratio:.0%}"
        keep = uniform_keep(original, ratio, rng)
        with masked_experts(original, keep):
            masked = forward(original, batches[0].to(device))
        pruned = remove_experts(copy.deepcopy(original), keep)
        diff = float((forward(pruned, batches[0].to(device)) - masked).abs().max())
        removed = [layer.num_experts - len(k) for layer, k in zip(moe_layers(original), keep)]
        removed_params = int(np.dot(removed, per_expert))
        expected = n_params(original) - removed_params
        variants[label] = pruned
        facts[label] = {
            "ratio": ratio, "experts_per_layer": experts_per_layer(pruned),
            "experts_removed": int(sum(removed)), "n_params": n_params(pruned), "n_params_expected": expected,
            "params_exact": n_params(pruned) == expected, "max_abs_diff_vs_masked": diff,
            "expert_share_removed": sum(removed) / sum(layer.num_experts for layer in moe_layers(original)),
            "routed_param_share_removed": (n_params(original) - n_params(pruned)) / routed_total,
        }
        log.info("%s %s: %d -> %d parameters (expected %d), |removed - masked| = %.2e", name, label,
                 n_params(original), n_params(pruned), expected, diff)

    for label, model in variants.items():
        path = tmp_root / f"{name.replace(':', '_').replace('/', '_')}-{label.rstrip('%')}"
        facts[label]["checkpoint_bytes"] = checkpoint_bytes(model, path)
        facts[label]["memory"] = memory_probe(path, args)
        log.info("%s %s: checkpoint %.1f MiB, peak RSS above imports %.1f MiB", name, label,
                 facts[label]["checkpoint_bytes"] / 2**20, facts[label]["memory"]["rss_peak_above_imports"] / 2**20)

    labels = list(variants)
    times: dict[str, dict[str, list[float]]] = {label: {"wall": [], "cpu": []} for label in labels}
    warm_wall = [timed_pass(variants[label], batches)[0] for label in labels]  # warm-up
    # A pass repeats the windows until it lasts about --min-pass-seconds for the original model, so
    # that a small model's timings are not lost in the noise; every model runs the same tokens.
    loops = max(1, math.ceil(args.min_pass_seconds / warm_wall[0]))
    batches = batches * loops
    n_tokens *= loops
    for r in range(args.repeats):
        order = labels[r % len(labels):] + labels[:r % len(labels)]  # rotate: no variant always runs first
        for label in order:
            for key, value in zip(("wall", "cpu"), timed_pass(variants[label], batches)):
                times[label][key].append(value)
        log.info("%s: repeat %d/%d %s", name, r + 1, args.repeats,
                 "  ".join(f"{label} {times[label]['wall'][-1]:.2f}s" for label in labels))

    # One thread on a CPU: process CPU time does not count the time other jobs hold the cores, so it
    # is the steadier basis on a shared machine; otherwise (threads spin-wait, GPUs) wall time.
    basis = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    medians = {label: {key: statistics.median(values) for key, values in t.items()} for label, t in times.items()}
    base = facts["original"]
    pruned_rows = []
    for label in labels[1:]:
        row, ratio = facts[label], {key: medians["original"][key] / medians[label][key] for key in ("wall", "cpu")}
        memory, base_memory = row["memory"], base["memory"]
        row.update({
            "label": label,
            "param_ratio": row["n_params"] / base["n_params"],
            "checkpoint_ratio": row["checkpoint_bytes"] / base["checkpoint_bytes"],
            "loaded_memory_ratio": memory["rss_loaded_above_imports"] / base_memory["rss_loaded_above_imports"],
            "peak_memory_ratio": memory["rss_peak_above_imports"] / base_memory["rss_peak_above_imports"],
            "timings_s": {key: {"values": times[label][key], "median": medians[label][key]} for key in ("wall", "cpu")},
            "tokens_per_s": n_tokens / medians[label]["wall"],
            "tokens_per_cpu_s": n_tokens / medians[label]["cpu"],
            "speed_ratio_wall": ratio["wall"], "speed_ratio_cpu": ratio["cpu"],
            # pruned over original throughput, ratio of medians, on the basis named in the report
            "speed_ratio": ratio[basis],
            "tokens_per_s_on_basis": n_tokens / medians[label][basis],
            "per_repeat_speed_ratio": [b / t for b, t in zip(times["original"][basis], times[label][basis])],
        })
        row["meets_targets"] = bool(row["params_exact"] and row["speed_ratio"] >= 1 - args.speed_tolerance
                                    and row["max_abs_diff_vs_masked"] <= EXACT_TOL)
        if base_memory["cuda_max_allocated"]:
            row["cuda_memory_ratio"] = memory["cuda_max_allocated"] / base_memory["cuda_max_allocated"]
        pruned_rows.append(row)
    base.update({"timings_s": {key: {"values": times["original"][key], "median": medians["original"][key]}
                               for key in ("wall", "cpu")},
                 "tokens_per_s": n_tokens / medians["original"]["wall"],
                 "tokens_per_cpu_s": n_tokens / medians["original"]["cpu"],
                 "tokens_per_s_on_basis": n_tokens / medians["original"][basis]})
    return {
        "model": name, "device": str(device), "dtype": str(next(original.parameters()).dtype).replace("torch.", ""),
        "architecture": model_summary(original), "routed_params_per_expert": per_expert,
        "n_tokens": n_tokens, "passes_over_windows": loops, "speed_basis": basis,
        "original": base, "pruned": pruned_rows,
        "meets_targets": all(row["meets_targets"] for row in pruned_rows),
    }


# --------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/pruning.py",
        description="Parameters, checkpoint size, peak memory and tokens/s of models with experts removed "
                    "(moe_utils.models.expert_surgery.remove_experts) against the original, in one run. Writes JSON.",
    )
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"models for load_model (default {' '.join(DEFAULT_MODELS)}; with --quick "
                             f"{' '.join(QUICK_MODELS)})")
    parser.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS),
                        help="shares of each layer's routed experts to remove (default 0.25 0.5 0.75)")
    parser.add_argument("--n-windows", type=int, default=None,
                        help="WikiText-2 test windows timed per pass (default 16; 4 with --quick)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--min-pass-seconds", type=float, default=1.0,
                        help="a timed pass repeats the windows until it lasts about this long for the original "
                             "(default 1.0)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds after one warm-up of each model (default 5; 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="which experts are removed (default 0)")
    parser.add_argument("--speed-tolerance", type=float, default=0.02,
                        help="a speed ratio down to 1 - this counts as 'no lower' (timing noise; default 0.02)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"WikiText-2 directory (else ${WIKITEXT_ENV}, else {SHARED_WIKITEXT})")
    parser.add_argument("--device", default=None, help="torch device (default: load_model's choice)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice); use 1 on a busy machine")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where checkpoints are written (default: system temp)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default bench/results/pruning.json; with --quick pruning-quick.json)")
    parser.add_argument("--quick", action="store_true", help="smoke test in seconds: random:olmoe, 1 repeat")
    parser.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)  # internal: memory probe
    args = parser.parse_args(argv)
    args.models = args.models or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    args.n_windows = args.n_windows or (4 if args.quick else 16)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.out = args.out or DEFAULT_OUT.with_name("pruning-quick.json" if args.quick else "pruning.json")
    if not all(0 < r < 1 for r in args.ratios):
        parser.error("--ratios must lie strictly between 0 and 1")
    if min(args.n_windows, args.max_length, args.batch_size, args.repeats) < 1:
        parser.error("--n-windows, --max-length, --batch-size and --repeats must be >= 1")
    return args


def human_summary(report: dict) -> str:
    lines = [f"pruning benchmark: {report['parameters']['repeats']} repeats (median; speed on "
             f"{report['models'][0]['speed_basis']} time), "
             f"{report['machine']['cpu_count']} CPUs, {report['machine']['torch_threads']} torch threads"]
    header = (f"{'model':<20}{'removed':>8}{'params':>9}{'exact':>7}{'ckpt':>8}{'loaded':>8}{'peak':>8}"
              f"{'tok/s':>9}{'speed':>8}  targets")
    lines += [header, "-" * len(header)]
    for m in report["models"]:
        lines.append(f"{m['model']:<20}{'0%':>8}{1:>9.3f}{'':>7}{1:>8.3f}{1:>8.3f}{1:>8.3f}"
                     f"{m['original']['tokens_per_s_on_basis']:>9.0f}{1:>8.3f}")
        for row in m["pruned"]:
            lines.append(f"{'':<20}{row['label']:>8}{row['param_ratio']:>9.3f}{str(row['params_exact']):>7}"
                         f"{row['checkpoint_ratio']:>8.3f}{row['loaded_memory_ratio']:>8.3f}"
                         f"{row['peak_memory_ratio']:>8.3f}"
                         f"{row['tokens_per_s_on_basis']:>9.0f}{row['speed_ratio']:>8.3f}  "
                         f"{'ok' if row['meets_targets'] else 'MISSED'}")
    lines.append("params, ckpt (bytes on disk), loaded and peak (memory of a fresh process): pruned / original; "
                 "tok/s and speed on the basis above "
                 "(cpu: tokens per second of process CPU time): pruned / original")
    lines.append(f"written: {report['out']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe is not None:
        return probe_main(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = _dt.datetime.now(_dt.timezone.utc)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-pruning-", dir=args.tmp_dir) as tmp:
        results = [bench_model(name, args, Path(tmp)) for name in args.models]
    finish_machine_info(machine)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    report = {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "duration_s": (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "parameters": {
            "models": args.models, "ratios": args.ratios, "n_windows": args.n_windows,
            "max_length": args.max_length, "batch_size": args.batch_size, "repeats": args.repeats,
            "min_pass_seconds": args.min_pass_seconds,
            "seed": args.seed, "quick": args.quick, "threads": torch.get_num_threads(),
            "speed_tolerance": args.speed_tolerance,
            "masks": "per MoE layer, E - round(ratio * E) experts kept (at least top-k), drawn at random",
            "timing": "full forward (all logits, use_cache=False) over the windows; one warm-up per model, "
                      "then rounds in rotating order; medians of wall and of process CPU time; speed ratios on "
                      "CPU time when one thread runs on a CPU (other jobs' time on the cores is not counted), "
                      "else on wall time",
            "memory": "RSS of a fresh process after loading the checkpoint, and its peak RSS while loading "
                      "and running one batch (logits_to_keep=1), each less its RSS before loading",
            "targets": "parameters fall by exactly the pruned share of routed-expert weights; pruned "
                       f"tokens/s >= original (within speed_tolerance); removed equals masked within {EXACT_TOL:g}",
        },
        "inputs": {"dataset": "WikiText-2 (raw) test split, consecutive windows"},
        "models": results,
        "meets_targets": all(r["meets_targets"] for r in results),
        "out": str(out),
    }
    atomic_write_json(out, report)
    print(human_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
