"""The book's status page: what produced the pages of a build (profile, commit, machine, each
stage's run time, threads and parameters, package versions) and the committed benchmark results
(``bench/results/``), written by the pipeline at the end of its run (:func:`write_status_page`)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import yaml

from moe_utils.common.artifacts import atomic_write_bytes
from moe_utils.common.markup import code_span
from moe_utils.common.project import BENCH_RESULTS
from moe_utils.models.conformance import CHECKS, MERGING_CHECKS
from moe_utils.pipeline import scale_report


def capture_benchmark_section(path: Path) -> list[str]:
    """Markdown lines summarising ``bench/capture.py``'s JSON, if it has been run and committed."""
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    lines = ["", "## Benchmark: capture overhead", "",
             f"From `{result['command']}` on {result['created'][:10]} ({result['machine']['cpu_count']} CPUs, "
             f"torch {result['machine']['torch']}): the same {result['inputs']['n_texts']} MMLU-Pro prompts, "
             "bare forward pass versus `capture_routing`, medians of interleaved repeats. Targets: ratio "
             "<= 1.10, at most 2 bytes per (token, layer, k) index slot.", "",
             "The second ratio counts only the time capture spends outside the model's forward calls, "
             "which is steadier on a shared machine.", "",
             "| model | tokens | bare tok/s | capture tok/s | time ratio | ratio from own time | index bytes/slot "
             "| targets met |",
             "|---|---|---|---|---|---|---|---|"]
    for model in result["models"]:
        lines.append(
            f"| `{model['model']}` | {model['n_tokens']} | {model['tokens_per_s']['bare']:.0f} | "
            f"{model['tokens_per_s']['capture']:.0f} | {model['overhead']['ratio']:.3f} | "
            f"{model['overhead']['ratio_from_own_time']:.3f} | "
            f"{model['store']['index_bytes_per_slot']:.0f} | {'yes' if model['meets_targets'] else 'no'} |")
    return lines


def pruning_benchmark_section(path: Path) -> list[str]:
    """Markdown lines summarising ``bench/pruning.py``'s JSON, if it has been run and committed."""
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    lines = ["", "## Benchmark: expert removal", "",
             f"From `{result['command']}` on {result['created'][:10]} ({result['machine']['cpu_count']} CPUs, "
             f"torch {result['machine']['torch']}): models with experts removed by "
             "`moe_utils.models.expert_surgery.remove_experts` against the original, in the same run. Ratios are "
             "pruned / original: parameters, `save_pretrained` bytes on disk, resident memory of a fresh "
             "process after loading and at its peak while running one batch, and tokens/s of a full forward "
             f"pass (medians of {result['parameters']['repeats']} interleaved rounds; per second of process CPU "
             "time when one thread runs on a CPU, which leaves out other jobs' time on a shared machine). "
             "Targets: parameters fall by exactly the removed experts' weights, tokens/s no lower than the "
             f"original's (within {result['parameters']['speed_tolerance']:.0%} for timing noise), removed "
             "model equal to the masked one.", "",
             "| model | experts removed | parameters | exact | checkpoint | memory loaded | memory peak "
             "| tokens/s | speed ratio | targets met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model in result["models"]:
        lines.append(f"| `{model['model']}` ({model['original']['n_params']:,} parameters) | none | 1 | | 1 | 1 | "
                     f"1 | {model['original']['tokens_per_s_on_basis']:.0f} | 1 | |")
        for row in model["pruned"]:
            lines.append(
                f"| | {row['label']} | {row['param_ratio']:.3f} | {'yes' if row['params_exact'] else 'no'} | "
                f"{row['checkpoint_ratio']:.3f} | {row['loaded_memory_ratio']:.3f} | "
                f"{row['peak_memory_ratio']:.3f} | {row['tokens_per_s_on_basis']:.0f} | {row['speed_ratio']:.3f} | "
                f"{'yes' if row['meets_targets'] else 'no'} |")
    return lines


def _cell(text: str) -> str:
    """Model or library text made safe for a Markdown table cell: HTML-escaped, pipes and newlines removed."""
    return html.escape(" ".join(str(text).split())).replace("|", "\\|")


def conformance_section(path: Path) -> list[str]:
    """Markdown lines showing the conformance table of ``python -m moe_utils.models.conformance``."""
    if not path.is_file():
        return []
    columns = (*CHECKS, *MERGING_CHECKS)
    result = json.loads(path.read_text())
    total = result["summary"]
    lines = ["", "## Conformance: every MoE causal LM of transformers", "",
             f"From `python -m moe_utils.models.conformance` with transformers {result['transformers']}, re-checked by "
             "`tests/test_conformance.py` on every `make test`: each MoE causal-LM type that transformers ships "
             "(its causal-LM auto mapping, filtered to modeling code that defines an experts class), built tiny "
             "from its own config class with random weights. Each check is against an independent truth: the "
             "experts the block actually ran for every real token of a padded batch (capture); no pruned "
             "expert ever reaching the experts module (masking); masked against physically removed logits, "
             "max |diff| <= 1e-5 (removal), and after `save_pruned` / `load_pruned` (reload); per-expert "
             "outputs recombined with the routing weights against the experts module's own output "
             f"(calibration). **{total['n_passing']} of {total['n_buildable']} buildable types pass every "
             f"check** ({total['share_passing']:.0%}); {total['n_types'] - total['n_buildable']} types cannot be "
             "built tiny from their default config. Merging (experts merged into kept ones with aligned "
             "neurons: applied in place, compressed and reloaded give the same logits) passes on "
             f"{total.get('n_merging', 0)} of the {total['n_passing']}. Random routers carry no learned collaboration: this "
             "table says the code reads and prunes these models exactly, not what their experts do.", "",
             "| model type | status | found by | E | k | scoring | " + " | ".join(columns) + " | reason |",
             "|" + "---|" * (7 + len(columns))]
    for row in result["rows"]:
        checks = [("pass" if row.get(c) == "pass" else "not run" if row.get(c) == "not run" else "fail")
                  if c in row else "" for c in columns]
        failures = "; ".join(f"{c}: {row[c]}" for c in columns if str(row.get(c, "")).startswith("fail"))
        lines.append("| " + " | ".join(_cell(v) for v in (
            f"`{row['model_type']}`", row["status"], row.get("found_by", ""), row.get("n_experts", ""),
            row.get("top_k", ""), row.get("scoring", ""), *checks, row.get("reason", failures))) + " |")
    return lines


def about_section(about: dict | None) -> list[str]:
    """Markdown lines showing the profile's ``about`` block (nothing if it has none)."""
    if not about:
        return []
    lines = ["", "## The profile", "", about["summary"], "", f"- **Architecture:** `{about['model_type']}`"]
    if "parameters" in about:
        def count(billions: float) -> str:
            return f"{billions:g}B" if billions >= 1 else f"{billions * 1000:.3g}M"

        lines.append(f"- **Parameters:** {count(about['parameters']['total_b'])} in all, "
                     f"{count(about['parameters']['active_b'])} used per token")
    lines += [f"- **Hardware:** {about['hardware']}", f"- **Time:** {about['time']}"]
    lines += [f"- **{label}:** {about[key]}" for key, label in (("paper", "The paper's setting"), ("notes", "Notes"))
              if key in about]
    return lines


def write_status_page(status: dict, path: Path) -> None:
    """The book's status page: each stage's run time and parameters, versions, commit, machine."""
    lines = [
        "# Status of this build", "",
        "*What produced the pages of this book: generated by the pipeline at the end of its run.*", "",
        f"- **Profile:** {code_span(status['profile'])}"
        + (f", overrides {code_span(status['overrides'])}" if status["overrides"] else ""),
        f"- **Commit:** {code_span(status['commit'] or 'unknown')}",
        f"- **Machine:** {status['machine']['platform']}, Python {status['machine']['python']}, "
        f"{status['machine']['cpus']} CPUs",
        *about_section(status.get("about")), "",
        "## Stages", "",
        "| stage | run time (s) | threads | finished | reused from an earlier run |", "|---|---|---|---|---|",
    ]
    for stage in status["stages"]:
        reused = "skipped" if stage.get("skipped") else "yes" if stage.get("reused") else "no"
        lines.append(f"| {stage['stage']} | {stage.get('seconds', '')} | {stage.get('threads', '')} | "
                     f"{stage.get('finished', '')} | {reused} |")
    lines += ["", "A stage that runs again still reads the captures and caches it keeps under `artifacts_dir` "
              "(calibration, masks, evaluations), each keyed by everything it depends on (parameters, the "
              "model's weights, every package file, the data, library versions), so its run time here can be far "
              "below that of a first run from a clean checkout."
              + (" This run was started with `--force`: every capture and cache entry written before it was "
                 "recomputed." if status.get("force") else ""),
              "", "## Parameters", ""]
    for stage in status["stages"]:
        block = yaml.safe_dump(stage["parameters"], sort_keys=False).strip()
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", block)), default=0))  # no value closes it
        lines += [f"**{stage['stage']}**", "", f"{fence}yaml", block, fence, ""]
    lines += ["## Package versions", "", "| package | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in status["versions"].items()]
    lines += capture_benchmark_section(BENCH_RESULTS / "capture.json")
    lines += pruning_benchmark_section(BENCH_RESULTS / "pruning.json")
    lines += conformance_section(BENCH_RESULTS / "conformance.json")
    lines += scale_report.scale_model_section(BENCH_RESULTS / "scale_model.json")
    lines += scale_report.scale_store_section(BENCH_RESULTS / "scale_store.json")
    lines += scale_report.contention_section(BENCH_RESULTS / "contention.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
