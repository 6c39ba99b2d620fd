"""Benchmark: does the token-identity null model (moe_utils.patterns.token_null) scale to a large model's store?

On synthetic routing shaped like DeepSeek-MoE-16B's (27 MoE layers x 64 experts, top-6) with a
4,096-token vocabulary and 250 tokens per question, for growing token counts, it times

* **point**: :func:`moe_utils.patterns.token_null.coselection` from scratch (grouping, the observed
  co-selection and both expectations) plus :func:`moe_utils.patterns.token_null.explained_share`;
* **replicate**: one replicate of :func:`moe_utils.patterns.token_null.explained_share_interval` (the
  difference between 6 and 1 replicates, over 5);
* **surrogate**: :func:`moe_utils.patterns.token_null.surrogate_store`;

and the peak Python memory (tracemalloc) of the point estimate. Costs should grow linearly with
the tokens: the JSON records each time per 1,000 tokens and the ratio of the largest run's time
per token to the smallest's (``linearity``; about 1 when linear), and extrapolates the point
estimate to 600,000 tokens.

Usage::

    python bench/token_null.py                      # 20k, 40k, 80k tokens
    python bench/token_null.py --tokens 5000 10000 --out /tmp/token_null.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench._common import finish_machine_info, machine_info  # noqa: E402
from moe_utils.patterns import token_null as tn  # noqa: E402
from moe_utils.capture.store import RoutingStore  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "token_null.json"
N_LAYERS, N_EXPERTS, TOP_K, VOCAB, PER_QUESTION = 27, 64, 6, 4096, 250


def synthetic_store(n_tokens: int, seed: int = 0) -> RoutingStore:
    """Routing that depends on the token type (12 candidate experts per type and layer, 6 drawn)."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, VOCAB + 1)
    token_ids = rng.choice(VOCAB, size=n_tokens, p=popularity / popularity.sum())
    candidates = np.argsort(rng.random((VOCAB, N_LAYERS, N_EXPERTS)), axis=2)[:, :, :12].astype(np.uint8)
    picks = np.argsort(rng.random((n_tokens, N_LAYERS, 12)), axis=2)[:, :, :TOP_K]
    indices = np.take_along_axis(candidates[token_ids], picks, axis=2)
    tokens = pd.DataFrame({"sample_id": np.arange(n_tokens) // PER_QUESTION, "token_id": token_ids})
    tokens["position"] = np.arange(n_tokens) % PER_QUESTION
    tokens["token"], tokens["label"] = "", None
    manifest = {"model": {"name": "synthetic", "n_layers": N_LAYERS, "n_experts": N_EXPERTS, "top_k": TOP_K}}
    return RoutingStore(Path("synthetic"), manifest, indices, np.full(indices.shape, 1 / TOP_K, np.float32),
                        None, tokens)


def run(n_tokens: int) -> dict:
    store = synthetic_store(n_tokens)
    tracemalloc.start()
    start = time.perf_counter()
    share = tn.explained_share(tn.coselection(store))
    point = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    start = time.perf_counter()
    tn.explained_share_interval(store, n_boot=1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    tn.explained_share_interval(store, n_boot=6)
    replicate = (time.perf_counter() - start - one) / 5
    start = time.perf_counter()
    tn.surrogate_store(store, seed=0)
    surrogate = time.perf_counter() - start
    return {"n_tokens": n_tokens, "point_s": point, "replicate_s": replicate, "surrogate_s": surrogate,
            "peak_mib": peak / 2**20, "share": share["share"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[20_000, 40_000, 80_000])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    info = machine_info()
    runs = [run(n) for n in sorted(args.tokens)]
    for r in runs:
        print(f"{r['n_tokens']:>8} tokens: point {r['point_s']:.1f} s, replicate {r['replicate_s']:.1f} s, "
              f"surrogate {r['surrogate_s']:.1f} s, peak {r['peak_mib']:.0f} MiB")
    per_token = [r["point_s"] / r["n_tokens"] for r in runs]
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"n_layers": N_LAYERS, "n_experts": N_EXPERTS, "top_k": TOP_K, "vocab": VOCAB,
                  "tokens_per_question": PER_QUESTION},
        "runs": runs, "linearity": per_token[-1] / per_token[0],
        "point_s_at_600k_tokens": per_token[-1] * 600_000,
        "machine": finish_machine_info(info),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"linearity {result['linearity']:.2f}; point estimate at 600k tokens ~{result['point_s_at_600k_tokens']:.0f} s"
          f" -> {args.out}")


if __name__ == "__main__":
    main()
