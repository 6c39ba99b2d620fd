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
(stated as such in the JSON). Profiles whose ``a + d``-layer model needs more than ``--max-gb`` of
weights are skipped and listed. Writes ``bench/results/profile_rates.json``.

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


def config_for(about: dict, n_layers: int):
    """The profile's config (its model type's own config class) with ``n_layers`` decoder layers."""
    from transformers import AutoConfig

    from moe_utils.models.deepseek_moe import REMOTE_MODEL_TYPE, port_config

    fields = {**about["config"], "num_hidden_layers": n_layers}
    if about["model_type"] == REMOTE_MODEL_TYPE:
        return port_config({**fields, "model_type": REMOTE_MODEL_TYPE})
    return AutoConfig.for_model(about["model_type"], **fields)


def _model_class(about: dict):
    from transformers import AutoModelForCausalLM

    from moe_utils.models.deepseek_moe import REMOTE_MODEL_TYPE, DeepseekMoeForCausalLM

    if about["model_type"] == REMOTE_MODEL_TYPE:
        return DeepseekMoeForCausalLM._from_config
    return AutoModelForCausalLM.from_config


def n_parameters(about: dict, n_layers: int) -> int:
    """Parameters of the model with ``n_layers`` layers, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = _model_class(about)(config_for(about, n_layers))
    return sum(p.numel() for p in model.parameters())


def seconds_per_token(about: dict, n_layers: int, args) -> float:
    """Median seconds per token of a forward pass of the ``n_layers``-layer model (random weights, float32)."""
    torch.manual_seed(0)
    model = _model_class(about)(config_for(about, n_layers)).to(torch.float32).eval()
    ids = torch.randint(0, about["config"]["vocab_size"], (args.batch, args.length))
    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            start = time.process_time()
            model(input_ids=ids)
            times.append(time.process_time() - start)
    del model
    return statistics.median(times[1:]) / ids.numel()


def measure(name: str, about: dict, args) -> dict:
    first = about["config"].get("first_k_dense_replace", 0) + 1
    total_layers = about["config"]["num_hidden_layers"]
    more = args.added_layers
    weights_gb = n_parameters(about, first + more) * 4 / 1e9
    row = {"profile": name, "model_type": about["model_type"], "n_layers": total_layers,
           "n_parameters": n_parameters(about, total_layers), "measured_layers": [first, first + more],
           "measured_weights_gb": round(weights_gb, 2)}
    if weights_gb > args.max_gb:
        return {**row, "skipped": f"{first + more} layers need {weights_gb:.1f} GB of float32 weights (> --max-gb)"}
    t_a = seconds_per_token(about, first, args)
    t_b = seconds_per_token(about, first + more, args)
    per_layer = max(t_b - t_a, 0.0) / more
    whole = t_a + (total_layers - first) * per_layer
    print(f"{name}: {t_a * 1e3:.2f} ms/token with {first} layers, {per_layer * 1e3:.2f} ms per more layer, "
          f"{1 / whole:.1f} tokens/s for all {total_layers}", flush=True)
    return {**row, "seconds_per_token_measured": [t_a, t_b], "seconds_per_layer_per_token": per_layer,
            "seconds_per_token_whole_model": whole, "tokens_per_second": 1 / whole,
            "whole_model": "extrapolated from the measured layers"}


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
