"""Benchmark: forward-pass speed at each profile's declared shape on this machine's CPU (issue 21).

A profile's ``about.time`` must come from measured rates, not from an assumed throughput. Most
profiles' models do not fit this machine's memory whole in float32, but their decoder layers are
alike, so this measures the model a few layers at a time: for each profile of ``params/`` whose
``about`` block declares ``model_type`` and ``config``, it builds the model type's own config with
the declared shape but ``a`` and then ``a + d`` decoder layers (``a = first_k_dense_replace + 1``,
so that the added layers are MoE layers; ``d = --added-layers``, default 2), random weights in float32, and times a forward pass of
``--batch`` x ``--length`` random token ids with one torch thread, in CPU seconds of this process
(median of ``--repeats`` after one warm-up): on a shared machine, CPU time leaves out the time
other jobs hold the core, so the rate is that of one free core. The whole model's seconds per token are then
``t(a) + (L - a) x (t(a + d) - t(a)) / d``: measured per-layer cost, extrapolated over the layer count
(stated as such in the JSON). When the ``a + d``-layer model needs more than ``--max-gb`` of weights,
its embeddings and LM head are measured apart (``"method": "head apart"`` in the JSON): the layers
are timed in models with a vocabulary of :data:`SMALL_VOCAB` tokens, and the LM head at the
declared vocabulary as one (tokens x hidden) @ (hidden x vocab) product, in CPU seconds per token
too, added to the whole model's cost. Profiles whose layers alone still need more than
``--max-gb`` are skipped and listed. Writes ``bench/results/profile_rates.json``.

Usage::

    OMP_NUM_THREADS=1 python bench/profile_rates.py                    # every declared profile that fits
    python bench/profile_rates.py --profiles granite olmoe
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench._common import finish_machine_info, machine_info  # noqa: E402
from moe_utils.common.artifacts import atomic_write_json  # noqa: E402

SCHEMA = 1
#: The vocabulary of the models whose layers are timed apart from their embeddings and LM head.
SMALL_VOCAB = 256


def config_for(about: dict, n_layers: int, vocab_size: int | None = None):
    """The profile's config (its model type's own config class) with ``n_layers`` decoder layers (and
    ``vocab_size`` tokens, if given)."""
    from transformers import AutoConfig

    from moe_utils.models.deepseek_moe import REMOTE_MODEL_TYPE, port_config

    fields = {**about["config"], "num_hidden_layers": n_layers, **({"vocab_size": vocab_size} if vocab_size else {})}
    if about["model_type"] == REMOTE_MODEL_TYPE:
        return port_config({**fields, "model_type": REMOTE_MODEL_TYPE})
    return AutoConfig.for_model(about["model_type"], **fields)


def _model_class(about: dict):
    from transformers import AutoModelForCausalLM

    from moe_utils.models.deepseek_moe import REMOTE_MODEL_TYPE, DeepseekMoeForCausalLM

    if about["model_type"] == REMOTE_MODEL_TYPE:
        return DeepseekMoeForCausalLM._from_config
    return AutoModelForCausalLM.from_config


def n_parameters(about: dict, n_layers: int, vocab_size: int | None = None) -> int:
    """Parameters of the model with ``n_layers`` layers, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = _model_class(about)(config_for(about, n_layers, vocab_size))
    return sum(p.numel() for p in model.parameters())


def _median_cpu_seconds(run, repeats: int) -> float:
    """Median CPU seconds of this process over ``repeats`` calls of ``run`` after one warm-up."""
    times = []
    for _ in range(repeats + 1):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times[1:])


def seconds_per_token(about: dict, n_layers: int, args, vocab_size: int | None = None) -> float:
    """Median seconds per token of a forward pass of the ``n_layers``-layer model (random weights, float32)."""
    torch.manual_seed(0)
    model = _model_class(about)(config_for(about, n_layers, vocab_size)).to(torch.float32).eval()
    ids = torch.randint(0, vocab_size or about["config"]["vocab_size"], (args.batch, args.length))
    with torch.no_grad():
        seconds = _median_cpu_seconds(lambda: model(input_ids=ids), args.repeats)
    return seconds / ids.numel()  # the model is freed on return


def head_seconds_per_token(about: dict, args) -> float:
    """Median seconds per token of the LM head at the declared vocabulary: (tokens x hidden) @ (hidden x vocab)."""
    torch.manual_seed(0)
    hidden, vocab = about["config"]["hidden_size"], about["config"]["vocab_size"]
    states, weight = torch.randn(args.batch * args.length, hidden), torch.randn(vocab, hidden)
    with torch.no_grad():
        seconds = _median_cpu_seconds(lambda: torch.nn.functional.linear(states, weight), args.repeats)
    return seconds / len(states)


def measure(name: str, about: dict, args) -> dict:
    first = about["config"].get("first_k_dense_replace", 0) + 1
    total_layers = about["config"]["num_hidden_layers"]
    more = args.added_layers
    weights_gb = n_parameters(about, first + more) * 4 / 1e9
    row = {"profile": name, "model_type": about["model_type"], "n_layers": total_layers,
           "n_parameters": n_parameters(about, total_layers), "measured_layers": [first, first + more],
           "measured_weights_gb": round(weights_gb, 2), "date": _dt.datetime.now().isoformat(timespec="seconds")}
    vocab, head, method = None, 0.0, "whole"
    if weights_gb > args.max_gb:
        vocab, method = SMALL_VOCAB, "head apart"
        weights_gb = n_parameters(about, first + more, vocab) * 4 / 1e9
        row["measured_weights_gb"] = round(weights_gb, 2)
        if weights_gb > args.max_gb:
            return {**row, "skipped": f"{first + more} layers need {weights_gb:.1f} GB of float32 weights even "
                                      f"with a {SMALL_VOCAB}-token vocabulary (> --max-gb)"}
        head = head_seconds_per_token(about, args)
    t_a = seconds_per_token(about, first, args, vocab)
    t_b = seconds_per_token(about, first + more, args, vocab)
    per_layer = max(t_b - t_a, 0.0) / more
    whole = head + t_a + (total_layers - first) * per_layer
    apart = f"LM head apart {head * 1e3:.2f} ms, " if vocab else ""
    print(f"{name}: {t_a * 1e3:.2f} ms/token with {first} layers, {per_layer * 1e3:.2f} ms per more layer, "
          f"{apart}{1 / whole:.1f} tokens/s for all {total_layers}", flush=True)
    extra = {"head_seconds_per_token": head, "small_vocab": vocab} if vocab else {}
    return {**row, "method": method, "seconds_per_token_measured": [t_a, t_b], **extra,
            "seconds_per_layer_per_token": per_layer, "seconds_per_token_whole_model": whole,
            "tokens_per_second": 1 / whole, "whole_model": "extrapolated from the measured layers"
            + (" (at a small vocabulary), plus the LM head measured apart" if vocab else "")}


def main(argv=None) -> int:
    from moe_utils.pipeline.runner import PROFILES, load_about

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", help="profile names (default: every profile with about.config)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--added-layers", type=int, default=2, help="layers added to the smallest model (d)")
    parser.add_argument("--max-gb", type=float, default=7.0, help="largest float32 weights to build")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "profile_rates.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # CPU time measures one thread's work
    names = args.profiles or [p.stem for p in sorted(PROFILES.glob("*.yaml"))]
    machine = machine_info()
    # rows of other profiles already in --out are kept: profiles can be measured one command at a time
    kept = json.loads(args.out.read_text()).get("profiles", []) if args.out.is_file() else []
    rows = [row for row in kept if row["profile"] not in names]
    for name in names:
        about = load_about(PROFILES / f"{name}.yaml")
        if about and "config" in about:
            rows.append(measure(name, about, args))
            atomic_write_json(args.out, {
                "schema": SCHEMA, "date": _dt.datetime.now().isoformat(timespec="seconds"),
                "machine": finish_machine_info(dict(machine)), "parameters": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "profiles": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
