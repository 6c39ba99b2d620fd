"""The status page's sections for the scale and thread benchmarks (``bench/scale_model.py``,
``bench/scale_store.py``, ``bench/contention.py``)."""

from __future__ import annotations

import json
from pathlib import Path


def _machine(result: dict) -> str:
    machine = result["machine"]
    load = machine.get("loadavg_at_start")
    return (f"{machine['cpu_count']} CPUs, torch {machine['torch']}, {machine.get('torch_threads')} torch thread(s)"
            + (f", load average {load[0]:.1f} at the start" if load else ""))


def scale_model_section(path: Path) -> list[str]:
    """Markdown lines summarising ``bench/scale_model.py``'s JSON, if it has been run and committed."""
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    model, config = result["model"], result["model"]["config"]
    shape = (f"`{model['model_type']}`, {config.get('num_hidden_layers')} layers, "
             f"{model['n_parameters'] / 1e9:.2f}B parameters in float32")
    done = "every stage completed" if result["complete"] else "the run did not complete every stage"
    peak = result["peak_rss_gb"]
    lines = ["", f"## Benchmark: every stage at the shape of `params/{result['profile']}.yaml`", "",
             f"From `bench/scale_model.py` on {result['date'][:10]} ({_machine(result)}): random weights of the "
             f"profile's declared shape ({shape}; {result['tokenizer']}), run through the pipeline with small "
             "limits (20 MMLU-Pro questions; the overrides are in the JSON). Per stage: the pipeline's run time, "
             "the peak resident memory of the stage's kernel and the processes it started, and the token "
             "positions its models processed (padding included) per second. Random routing: costs, not findings. "
             f"Target: {result['target']}; {done}, peak {peak if peak is None else f'{peak:.1f} GB'}, target "
             f"{'met' if result['meets_target'] else 'missed'}.", "",
             "| stage | seconds | threads | peak GB | token positions | tokens/s |", "|---|---|---|---|---|---|"]
    for row in result["stages"]:
        seconds = "failed" if row.get("failed") else f"{row['seconds']:.1f}"
        rate = "" if row.get("tokens_per_second") is None else f"{row['tokens_per_second']:.1f}"
        lines.append(f"| {row['stage']} | {seconds} | {row.get('threads') or ''} | {row['peak_rss_gb']:.2f} | "
                     f"{row['token_positions']:,} | {rate} |")
    notes = [f"- {note}" for note in result.get("notes", [])]
    return lines + ([""] + notes if notes else [])


def scale_store_section(path: Path) -> list[str]:
    """Markdown lines summarising ``bench/scale_store.py``'s JSON, if it has been run and committed."""
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    lines = ["", "## Benchmark: the store-only analysis at the paper's shapes", "",
             f"From `bench/scale_store.py` on {result['date'][:10]} ({_machine(result)}): synthetic routing "
             "stores of the paper's shapes, run through the package functions that stages 02, 03 and the "
             "store-only parts of 05 and 06 call. Seconds and peak resident memory (GB) per step. "
             f"Target: {result['target']}.", ""]
    for case in result["cases"]:
        if case.get("complete") is False:  # stopped before every step ran: what it measured, and why
            lines += [f"**{case['like']}** ({case['n_layers']} MoE layers x {case['n_experts']} experts, top-"
                      f"{case['top_k']}; {case['n_tokens']:,} tokens): incomplete run, {case['analysis_seconds']:.0f} s "
                      f"and a peak of {case['analysis_peak_rss_gb']:.1f} GB over the steps it finished "
                      "(target missed).", "", "| stage | step | seconds | peak GB |", "|---|---|---|---|"]
            lines += [f"| {s['stage']} | {s['step']} | {s['seconds']:.1f} | {s['peak_rss_gb']:.2f} |"
                      for s in case["steps"]]
            lines += [f"- {note}" for note in case.get("notes", [])] + [""]
            continue
        rankings = sum(s["seconds"] for s in case["steps"] if s["stage"] == "06" and s["step"].startswith("rankings"))
        at_notebook = case["analysis_seconds"] - rankings + case["rankings_seconds_at_notebook_heldout"]
        lines += [f"**{case['like']}** ({case['n_layers']} MoE layers x {case['n_experts']} experts, top-"
                  f"{case['top_k']}; {case['n_tokens']:,} tokens; stage 6 on {case['n_heldout_tokens']:,} held-out "
                  f"tokens): {case['analysis_seconds']:.0f} s in all, peak {case['analysis_peak_rss_gb']:.1f} GB, "
                  f"target {'met' if case['meets_target'] else 'missed'} (as run and at the notebook's settings). Stage 6's rankings take "
                  f"{case['rankings_seconds_per_heldout_token'] * 1000:.0f} ms per held-out token, "
                  f"{case['rankings_seconds_at_notebook_heldout'] / 60:.0f} minutes at the notebook's held-out size "
                  f"({case['notebook_heldout_tokens']:,} tokens), which brings the analysis to "
                  f"{at_notebook / 60:.0f} minutes (target {'met' if at_notebook <= 600 else 'missed'}). HSDL: {case['hsdl_steps']} steps of "
                  f"{case['hsdl_seconds_per_step']:.2f} s (the notebook's default: 600)"
                  + (f" and {case['hsdl_fit_fixed_seconds']:.0f} s per fit besides (initialisation, the codes of every "
                     "token)" if "hsdl_fit_fixed_seconds" in case else "") + ". Fig 6's counts cover "
                  f"{case['coverage_columns_counted']:,} of the tokens. "
                  + _controls(case) + _shared(case), "",
                  "| stage | step | seconds | peak GB |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['step']} | {s['seconds']:.1f} | {s['peak_rss_gb']:.2f} |" for s in case["steps"]]
        lines += [f"- {note}" for note in case.get("notes", [])]
        lines.append("")
    return lines


def _shared(case: dict) -> str:
    """Whether other work shared the machine during the case (its load averages, per CPU)."""
    if "loadavg_at_start" not in case:
        return ""
    load = max(case["loadavg_at_start"][0], case["loadavg_at_end"][0])
    if load < 0.5 * case["cpu_count"]:
        return f" The machine was otherwise idle (1-minute load average up to {load:.1f}, {case['cpu_count']} CPUs)."
    return (f" The machine was shared with other work during this run (1-minute load average up to {load:.1f} on "
            f"{case['cpu_count']} CPUs), so times are longer than on an idle machine.")


def _controls(case: dict) -> str:
    """What the case ran of the controls of stages 1 and 2, and the time at the notebook's settings."""
    if not case.get("controls"):
        return "The controls of stages 1 and 2 were not part of this run."
    ran = ("with the controls of stages 1 and 2" + (f" and their {case['n_hsdl_fits'] - 1} HSDL refits"
                                                    if case["refits"] else ", without the HSDL refits"))
    minutes = case["analysis_seconds_at_notebook_settings"] / 60
    n_fits = 5 + case["n_surrogates"]  # the fit, 4 stability refits and the surrogate refits
    fits = n_fits * (case.get("hsdl_fit_fixed_seconds", 0.0) + case["hsdl_seconds_per_step"] * 600) / 60
    return (f"The run is {ran}; with every HSDL fit (the refits included) at 600 steps and stage 6 at the notebook's held-out size it "
            f"would take about {minutes:.0f} minutes (extrapolated from the measured rates): {fits:.0f} minutes for the "
            f"{n_fits} HSDL fits, {minutes - fits:.0f} for everything else.")


def contention_section(path: Path) -> list[str]:
    """Markdown lines summarising ``bench/contention.py``'s JSON, if it has been run and committed: one
    row per stage of the default profile and one for the tests, alone and beside a competitor."""
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    if result.get("schema", 1) < 2:  # one stage, before every stage was measured: its rows name the stage
        result = {**result, "profile": "params/tiny.yaml", "meets_target": False,
                  "rows": [{**row, "workload": result["workload"]} for row in result["settings"]]}
    parameters = result["parameters"]
    quick = " **A `--quick` check, not the benchmark's numbers.**" if result.get("quick") else ""
    lines = ["", "## Benchmark: every stage and the tests beside a competing process", "",
             f"From `bench/contention.py` ({_machine(result)}): each stage of `{result['profile']}`, shortened (the "
             "overrides are in the JSON), and the tests (a selection of the heavy paths, and the whole suite as "
             "`make test` runs it), alone and beside one CPU-bound process, interleaved; medians over the rounds. "
             f"Target: {result['target']}; {'met' if result['meets_target'] else 'missed'} with the pipeline's "
             "thread policy (`moe_utils.common.threads`). \"Alone\" means without the added competitor: other "
             f"work on a shared machine (its load average above) runs in every case.{quick}", "",
             "| workload | threads | measured | rounds | alone (s) | beside a competitor (s) | ratio | target met |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        met = "yes" if row["meets_target"] else "no"
        when, rounds = row.get("date", result["date"])[:10], row.get("rounds", parameters["rounds"])
        lines.append(f"| {row['workload']} | {row['setting']}: {row['threads']} | {when} | {rounds} | "
                     f"{row['alone_seconds']:.1f} | {row['contended_seconds']:.1f} | {row['ratio']:.2f} | {met} |")
    return lines
