"""Benchmark: what does routing capture cost on top of the model's own forward pass?

For each model, on the same MMLU-Pro prompts in the same run, this times

* **bare**: the forward passes alone, with no hooks, done exactly as
  :func:`moe_utils.capture.routing.capture_routing` does them (same tokenisation, padding, truncation,
  batching, ``use_cache=False`` and the same forward kwargs, from ``routing.forward_kwargs``);
* **capture**: :func:`moe_utils.capture.routing.capture_routing` end to end into a fresh temporary
  directory (fingerprints, hooks, copies to CPU, chunk writes, final assembly of the store);

interleaved (one warm-up of each, then bare, capture, bare, capture, ... ``--repeats`` times), and
reports the medians, the ratio of medians ``capture / bare`` (target <= 1.10), and the size of the
store: bytes per (token, layer, k) index slot (target <= 2) and the total on disk.

Results go to a JSON file (default ``bench/results/capture.json``) that the book can show.
A ratio above the target is profiled (cProfile of one capture and one bare pass), and the top
functions are recorded in the JSON.

Usage::

    python bench/capture.py                 # embedded + random:olmoe-100m, 8 prompts x 5 domains
    python bench/capture.py --quick         # seconds: random:olmoe, 2 prompts x 5 domains, 1 repeat
    python bench/capture.py --models embedded --repeats 5 --out /tmp/capture.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as _dt
import io
import json
import logging
import os
import pstats
import random
import statistics
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
from moe_utils.evaluation.data import MMLU_PRO_ENV, PAPER_CATEGORIES, load_prompts  # noqa: E402
from moe_utils.models.loading import load_model, model_summary  # noqa: E402
from moe_utils.capture.routing import forward_kwargs, capture_routing  # noqa: E402

log = logging.getLogger("bench.capture")

DEFAULT_OUT = REPO / "bench" / "results" / "capture.json"
DEFAULT_MODELS = ("embedded", "random:olmoe-100m")
QUICK_MODELS = ("random:olmoe",)
#: Where the project's Makefile finds a local MMLU-Pro copy when nothing else is given.
SHARED_MMLU_PRO = REPO.parent / "shared" / "data" / "mmlu_pro"
TARGET_RATIO = 1.10
TARGET_SLOT_BYTES = 2.0
SCHEMA = "moe-bench-capture/1"


# ----------------------------------------------------------------------------------- inputs
def resolve_data_dir(arg: str | None) -> Path:
    """``--data-dir``, else ``$MOE_MMLU_PRO_DIR``, else ``../shared/data/mmlu_pro``; must exist."""
    candidates = [("--data-dir", arg), (f"${MMLU_PRO_ENV}", os.environ.get(MMLU_PRO_ENV) or None),
                  ("the shared copy", str(SHARED_MMLU_PRO))]
    for source, value in candidates:
        if value is None:
            continue
        path = Path(value).expanduser()
        if path.is_dir() and any(path.glob("test-*.parquet")):
            return path
        if source != "the shared copy":
            raise SystemExit(
                f"error: MMLU-Pro directory from {source} ({path}) does not exist or holds no "
                f"test-*.parquet; point --data-dir or ${MMLU_PRO_ENV} at a local MMLU-Pro parquet export."
            )
    raise SystemExit(
        f"error: no local MMLU-Pro data found. The benchmark needs the TIGER-Lab/MMLU-Pro parquet "
        f"export (test-*.parquet): pass --data-dir DIR or set ${MMLU_PRO_ENV}=DIR "
        f"(looked for {SHARED_MMLU_PRO} too). It never downloads data by itself."
    )


def batches_of(n: int, batch_size: int) -> list[np.ndarray]:
    """The batches capture_routing forms (no shard): contiguous runs of ``batch_size`` texts."""
    positions = np.arange(n)
    return [positions[i : i + batch_size] for i in range(0, n, batch_size)]


def token_counts(tokenizer, texts, *, batch_size: int, max_length: int) -> dict:
    """Real and padded token counts of the batches, tokenised exactly as capture does."""
    real = padded = 0
    longest = 0
    for ids in batches_of(len(texts), batch_size):
        enc = tokenizer([texts[i] for i in ids], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        real += int(enc["attention_mask"].sum())
        padded += enc["attention_mask"].numel()
        longest = max(longest, enc["attention_mask"].shape[1])
    return {"n_tokens": real, "n_token_slots_padded": padded, "longest_batch": longest}


# ---------------------------------------------------------------------------------- timings
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_pass(model, tokenizer, texts, *, batch_size: int, max_length: int) -> float:
    """The forward passes of a capture without anything else: tokenise, pad, run, drop the output.

    Returns the seconds spent inside the model calls (timed around them, with no hooks).
    """
    device = next(model.parameters()).device
    kwargs = forward_kwargs(model)
    forward_s = 0.0
    with torch.no_grad():
        for ids in batches_of(len(texts), batch_size):
            enc = tokenizer([texts[i] for i in ids], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            t0 = time.perf_counter()
            model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                  use_cache=False, **kwargs)
            _sync(device)
            forward_s += time.perf_counter() - t0
    return forward_s


@contextlib.contextmanager
def forward_timer(model):
    """Sum the seconds spent in ``model``'s top-level forward calls (two hooks on the model itself,
    none on its routers: microseconds per batch), so that capture's own cost can be told apart
    from the forward pass, whose speed swings with the machine's load."""
    device = next(model.parameters()).device
    total = [0.0]
    start: list[float] = []

    def pre(_module, _args, _kwargs):
        start.append(time.perf_counter())

    def post(_module, _args, _kwargs, _output):
        _sync(device)
        total[0] += time.perf_counter() - start.pop()

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


def capture_pass(model, tokenizer, texts, labels, *, batch_size: int, max_length: int,
                 record_probs: bool, tmp_root: str | None) -> tuple[float, float, float, dict]:
    """One end-to-end capture into a fresh temp dir: (wall s, cpu s, forward s, store facts)."""
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="bench-capture-", dir=tmp_root) as tmp:
        out_dir = Path(tmp) / "store"
        _sync(device)
        with forward_timer(model) as forward_s:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            capture_routing(model, tokenizer, texts, labels=labels, out_dir=out_dir, batch_size=batch_size,
                            max_length=max_length, record_probs=record_probs, progress=False)
            _sync(device)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        facts = store_facts(out_dir)
    return wall, cpu, forward_s[0], facts


def timed_bare(model, tokenizer, texts, *, batch_size: int, max_length: int) -> tuple[float, float, float]:
    """(wall s, cpu s, forward s) of one bare pass."""
    device = next(model.parameters()).device
    _sync(device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    forward_s = bare_pass(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return time.perf_counter() - wall0, time.process_time() - cpu0, forward_s


def store_facts(out_dir: Path) -> dict:
    """Sizes of a finished store; the index slot size comes from topk_indices.npy's array."""
    indices = np.load(out_dir / "topk_indices.npy", mmap_mode="r")
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    manifest = json.loads((out_dir / "manifest.json").read_text())
    n_tokens, n_layers, k = indices.shape
    slots = int(indices.size)
    return {
        "n_tokens": int(n_tokens),
        "n_layers": int(n_layers),
        "top_k": int(k),
        "n_index_slots": slots,
        "index_dtype": str(indices.dtype),
        # array bytes / elements: what each (token, layer, k) slot costs in memory and on disk
        "index_bytes_per_slot": float(indices.nbytes / slots) if slots else None,
        # the .npy file size / elements (adds the ~128-byte header; tends to the above for big stores)
        "index_file_bytes_per_slot": float(files["topk_indices.npy"] / slots) if slots else None,
        "file_bytes": files,
        "store_bytes": int(sum(files.values())),
        "store_bytes_per_token": float(sum(files.values()) / n_tokens) if n_tokens else None,
        # sha256 over the routers' weights (capture's own fingerprint): which weights were benchmarked
        "router_fingerprint": manifest["fingerprint"]["model"],
    }


def summarise(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


# -------------------------------------------------------------------------------- profiling
def _short_path(filename: str) -> str:
    parts = Path(filename).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1:])
    try:
        return str(Path(filename).resolve().relative_to(REPO))
    except ValueError:
        return filename


def _profile_rows(stats: pstats.Stats, sort: str, limit: int) -> list[dict]:
    stats.sort_stats(sort)
    rows = []
    for func in stats.fcn_list[:limit]:  # type: ignore[attr-defined]
        _cc, nc, tt, ct, _callers = stats.stats[func]  # type: ignore[attr-defined]
        filename, line, name = func
        rows.append({"function": f"{_short_path(filename)}:{line}({name})", "ncalls": nc,
                     "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)})
    return rows


#: Steps of a capture, as (label, file suffix, function name); their cumulative times are read from
#: the profile. cProfile's cumtime counts a recursive or re-entered function once, at its outermost call.
CAPTURE_STEPS = (
    ("model forward (torch modules)", "torch/nn/modules/module.py", "_wrapped_call_impl"),
    ("tokenisation", "transformers/tokenization_utils_base.py", "__call__"),
    ("_capture_batch (forward + tokenisation + routing to CPU)", "moe_utils/capture/routing.py", "_capture_batch"),
    ("router hooks", "moe_utils/capture/routing.py", "hook"),
    ("router_fingerprint", "moe_utils/capture/routing.py", "router_fingerprint"),
    ("_texts_fingerprint", "moe_utils/capture/routing.py", "_texts_fingerprint"),
    ("model_summary", "moe_utils/models/loading.py", "model_summary"),
    ("chunk writes (np.savez)", "numpy/lib/_npyio_impl.py", "savez"),
    ("chunk reads (np.load)", "numpy/lib/_npyio_impl.py", "load"),
    ("token decoding (tokenizer.decode)", "transformers/tokenization_utils_base.py", "decode"),
    ("package_versions (importlib.metadata)", "moe_utils/capture/store.py", "package_versions"),
    ("write_store (npy + parquet + sha256 + fsync)", "moe_utils/capture/store.py", "write_store"),
    ("  sha256_file", "moe_utils/capture/store.py", "sha256_file"),
    ("fsync (all files)", "~", "<built-in method posix.fsync>"),
    ("  tokens.to_parquet", "pandas/core/frame.py", "to_parquet"),
    ("RoutingStore.open (verify checksums, read parquet)", "moe_utils/capture/store.py", "open"),
    ("shutil.rmtree (.partial)", "shutil.py", "rmtree"),
)


def _cumtime(stats: pstats.Stats, suffix: str, name: str) -> float:
    total = 0.0
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in entries:
        if func == name and filename.replace("\\", "/").endswith(suffix):
            total += ct
    return total


def profile_capture(model, tokenizer, texts, labels, *, batch_size: int, max_length: int,
                    record_probs: bool, tmp_root: str | None, limit: int = 25) -> dict:
    """cProfile one capture and one bare pass: top functions of each and a step breakdown of the capture."""
    result = {}
    for what in ("capture", "bare"):
        profiler = cProfile.Profile()
        if what == "capture":
            with tempfile.TemporaryDirectory(prefix="bench-capture-", dir=tmp_root) as tmp:
                profiler.enable()
                capture_routing(model, tokenizer, texts, labels=labels, out_dir=Path(tmp) / "store",
                                batch_size=batch_size, max_length=max_length, record_probs=record_probs,
                                progress=False)
                profiler.disable()
        else:
            profiler.enable()
            bare_pass(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
            profiler.disable()
        stats = pstats.Stats(profiler, stream=io.StringIO())
        result[what] = {
            "total_s": round(stats.total_tt, 4),  # type: ignore[attr-defined]
            "by_cumtime": _profile_rows(stats, "cumulative", limit),
            "by_tottime": _profile_rows(stats, "tottime", limit),
        }
        if what == "capture":
            result["capture_steps_s"] = {label: round(_cumtime(stats, suffix, name), 4)
                                         for label, suffix, name in CAPTURE_STEPS}
        else:
            result["bare_steps_s"] = {label: round(_cumtime(stats, suffix, name), 4)
                                      for label, suffix, name in CAPTURE_STEPS[:2]}
    result["note"] = ("cProfile adds per-call overhead, so profiled times exceed the timed ones; compare "
                      "the steps with each other and with the bare pass's, not with the medians")
    return result


# ------------------------------------------------------------------------------------ bench
def bench_model(name: str, texts, labels, args) -> dict:
    log.info("loading %s", name)
    model, tokenizer = load_model(name, device=args.device)
    device = next(model.parameters()).device
    counts = token_counts(tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length)
    summary = model_summary(model)
    opts = dict(batch_size=args.batch_size, max_length=args.max_length)
    cap_opts = dict(opts, record_probs=args.record_probs, tmp_root=args.tmp_dir)

    log.info("%s: warm-up (bare, capture)", name)
    warm_bare = timed_bare(model, tokenizer, texts, **opts)
    warm_cap = capture_pass(model, tokenizer, texts, labels, **cap_opts)

    bare: dict[str, list[float]] = {"wall": [], "cpu": [], "forward": []}
    cap: dict[str, list[float]] = {"wall": [], "cpu": [], "forward": []}
    facts = warm_cap[3]
    for r in range(args.repeats):
        for key, value in zip(("wall", "cpu", "forward"), timed_bare(model, tokenizer, texts, **opts)):
            bare[key].append(value)
        *timings, facts = capture_pass(model, tokenizer, texts, labels, **cap_opts)
        for key, value in zip(("wall", "cpu", "forward"), timings):
            cap[key].append(value)
        log.info("%s: repeat %d/%d  bare %.3fs  capture %.3fs  (x%.3f; outside the forward: bare %.3fs, "
                 "capture %.3fs)", name, r + 1, args.repeats, bare["wall"][-1], cap["wall"][-1],
                 cap["wall"][-1] / bare["wall"][-1], bare["wall"][-1] - bare["forward"][-1],
                 cap["wall"][-1] - cap["forward"][-1])

    if facts["n_tokens"] != counts["n_tokens"]:
        raise RuntimeError(f"{name}: the store holds {facts['n_tokens']} tokens, "
                           f"the inputs {counts['n_tokens']}")
    bare_med, cap_med = statistics.median(bare["wall"]), statistics.median(cap["wall"])
    ratio = cap_med / bare_med
    bare_outside = [w - f for w, f in zip(bare["wall"], bare["forward"])]
    cap_outside = [w - f for w, f in zip(cap["wall"], cap["forward"])]
    own_s = statistics.median(cap_outside) - statistics.median(bare_outside)
    slot_bytes = facts["index_bytes_per_slot"]
    result = {
        "model": name,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "architecture": summary,
        "forward_kwargs": forward_kwargs(model),
        **counts,
        "timings_s": {
            "warmup": {"bare": warm_bare[0], "capture": warm_cap[0]},
            "bare": summarise(bare["wall"]),
            "capture": summarise(cap["wall"]),
            "per_repeat_ratio": [c / b for b, c in zip(bare["wall"], cap["wall"])],
            "bare_forward": summarise(bare["forward"]),
            "capture_forward": summarise(cap["forward"]),
            "bare_outside_forward": summarise(bare_outside),
            "capture_outside_forward": summarise(cap_outside),
            "bare_cpu": summarise(bare["cpu"]),
            "capture_cpu": summarise(cap["cpu"]),
        },
        "tokens_per_s": {"bare": counts["n_tokens"] / bare_med, "capture": counts["n_tokens"] / cap_med},
        "overhead": {
            "ratio": ratio,  # median capture time / median bare time: the benchmark's headline
            "target": args.target_ratio,
            "meets_target": bool(ratio <= args.target_ratio),
            "extra_s": cap_med - bare_med,
            "extra_ms_per_1k_tokens": (cap_med - bare_med) * 1e6 / counts["n_tokens"],
            # Capture's own cost: its time outside the model's forward calls, less the bare pass's
            # (tokenisation, loop). Insensitive to how fast the forward happened to run, so the ratio
            # it implies is the steadier figure on a loaded machine.
            "own_s": own_s,
            "own_ms_per_1k_tokens": own_s * 1e6 / counts["n_tokens"],
            "ratio_from_own_time": (bare_med + own_s) / bare_med,
            "forward_ratio": statistics.median(cap["forward"]) / statistics.median(bare["forward"]),
            "ratio_cpu": statistics.median(cap["cpu"]) / statistics.median(bare["cpu"]),
        },
        "store": {
            **facts,
            "target_index_bytes_per_slot": args.target_slot_bytes,
            "meets_target": bool(slot_bytes is not None and slot_bytes <= args.target_slot_bytes),
        },
        "meets_targets": bool(ratio <= args.target_ratio and slot_bytes is not None
                              and slot_bytes <= args.target_slot_bytes),
    }
    if args.profile == "always" or (args.profile == "auto" and ratio > args.target_ratio):
        log.info("%s: profiling one capture and one bare pass (ratio %.3f)", name, ratio)
        result["profile"] = profile_capture(model, tokenizer, texts, labels, **cap_opts)
    del model
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/capture.py",
        description="Time routing capture (moe_utils.capture.routing.capture_routing) against the bare forward "
                    "pass it rides on, on MMLU-Pro prompts, and size the routing store. Writes JSON.",
    )
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"models for moe_utils.models.loading.load_model (default {' '.join(DEFAULT_MODELS)}; "
                             f"with --quick {' '.join(QUICK_MODELS)})")
    parser.add_argument("--categories", nargs="+", default=list(PAPER_CATEGORIES),
                        help="MMLU-Pro categories (default: the paper's five)")
    parser.add_argument("--n-per-category", type=int, default=None,
                        help="prompts per category (default 8; 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0,
                        help="prompt sampling and torch/numpy seeds (default 0)")
    parser.add_argument("--data-dir", default=None,
                        help=f"local MMLU-Pro parquet directory (else ${MMLU_PRO_ENV}, "
                             f"else {SHARED_MMLU_PRO})")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    parser.add_argument("--max-length", type=int, default=256,
                        help="tokens per text; longer texts are truncated (default 256)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed (bare, capture) pairs after one warm-up of each "
                             "(default 3; 1 with --quick)")
    parser.add_argument("--record-probs", action="store_true",
                        help="capture full routing probabilities too (capture_routing's record_probs)")
    parser.add_argument("--device", default=None, help="torch device (default: load_model's choice)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before timing (default: leave torch's default); "
                             "on a busy machine fewer threads than cores avoids OpenMP stalls")
    parser.add_argument("--tmp-dir", default=None,
                        help="where the temporary stores are written (default: the system temp dir)")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="cProfile a capture and a bare pass: when the ratio misses the target "
                             "(auto, the default), always, or never")
    parser.add_argument("--target-ratio", type=float, default=TARGET_RATIO,
                        help=f"largest acceptable capture/bare time ratio (default {TARGET_RATIO})")
    parser.add_argument("--target-slot-bytes", type=float, default=TARGET_SLOT_BYTES,
                        help="largest acceptable bytes per (token, layer, k) index slot "
                             f"(default {TARGET_SLOT_BYTES:g})")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)}; with --quick "
                             "bench/results/capture-quick.json)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test in seconds: random:olmoe, 2 prompts per category, 1 repeat")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each repeat")
    args = parser.parse_args(argv)
    args.models = args.models or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    if args.n_per_category is None:
        args.n_per_category = 2 if args.quick else 8
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.out is None:
        args.out = DEFAULT_OUT.with_name("capture-quick.json") if args.quick else DEFAULT_OUT
    if args.repeats < 1 or args.batch_size < 1 or args.max_length < 1 or args.n_per_category < 1:
        parser.error("--repeats, --batch-size, --max-length and --n-per-category must be >= 1")
    return args


def human_summary(report: dict) -> str:
    lines = [f"capture benchmark: {report['inputs']['n_texts']} MMLU-Pro prompts, batch "
             f"{report['parameters']['batch_size']}, max_length {report['parameters']['max_length']}, "
             f"{report['parameters']['repeats']} repeats (median), {report['machine']['cpu_count']} CPUs, "
             f"{report['machine']['torch_threads']} torch threads"]
    header = f"{'model':<22}{'tokens':>8}{'bare tok/s':>12}{'capture tok/s':>15}{'ratio':>8}{'own':>8}" \
             f"{'B/slot':>8}{'store':>11}  targets"
    lines += [header, "-" * len(header)]
    for m in report["models"]:
        ok = "ok" if m["meets_targets"] else (
            "MISSED " + ", ".join(t for t, met in (("ratio", m["overhead"]["meets_target"]),
                                                   ("slot bytes", m["store"]["meets_target"])) if not met))
        lines.append(f"{m['model']:<22}{m['n_tokens']:>8}{m['tokens_per_s']['bare']:>12.0f}"
                     f"{m['tokens_per_s']['capture']:>15.0f}{m['overhead']['ratio']:>8.3f}"
                     f"{m['overhead']['ratio_from_own_time']:>8.3f}"
                     f"{m['store']['index_bytes_per_slot']:>8.2f}"
                     f"{m['store']['store_bytes'] / 1024:>9.1f}KiB  {ok}")
    lines.append("ratio: median capture / median bare time; own: the ratio implied by capture's time "
                 "outside the forward calls (steadier on a loaded machine)")
    lines.append(f"targets: capture/bare <= {report['parameters']['target_ratio']:.2f}, "
                 f"index bytes per (token, layer, k) slot <= {report['parameters']['target_slot_bytes']:g}")
    if report["parameters"]["quick"]:
        lines.append("--quick is a smoke test: on a 200k-parameter model capture's fixed per-call costs "
                     "dominate, so its ratio says nothing about real captures")
    lines.append(f"written: {report['out']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    data_dir = resolve_data_dir(args.data_dir)
    texts, labels, questions = load_prompts(args.categories, args.n_per_category, args.seed, data_dir)
    started = _dt.datetime.now(_dt.timezone.utc)
    machine = machine_info()
    results = []
    for name in args.models:
        torch.manual_seed(args.seed)
        results.append(bench_model(name, texts, labels, args))
    finish_machine_info(machine)

    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    report = {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "duration_s": (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "parameters": {
            "models": args.models, "batch_size": args.batch_size, "max_length": args.max_length,
            "repeats": args.repeats, "warmup": 1, "order": "warm-up bare, warm-up capture, then "
            "(bare, capture) x repeats", "statistic": "median", "record_probs": args.record_probs,
            "seed": args.seed, "quick": args.quick, "threads": torch.get_num_threads(),
            "target_ratio": args.target_ratio,
            "target_slot_bytes": args.target_slot_bytes,
            "bare_pass": "tokenise + pad + forward(use_cache=False, routing.forward_kwargs) per batch, "
                         "no hooks, under torch.no_grad",
            "capture_pass": "capture_routing(progress=False) into a fresh temp dir, end to end; two timing "
                            "hooks on the top-level model (none on the routers) split off the forward time",
        },
        "inputs": {
            "dataset": "TIGER-Lab/MMLU-Pro (test split)", "data_dir": str(data_dir),
            "categories": list(args.categories), "n_per_category": args.n_per_category,
            "n_texts": len(texts), "question_ids": [int(q) for q in questions["question_id"]],
        },
        "models": results,
        "meets_targets": all(r["meets_targets"] for r in results),
        "out": str(out),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    print(human_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
