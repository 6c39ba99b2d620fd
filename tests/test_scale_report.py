"""The scale benchmark's JSON on a small synthetic store, and the status page's sections built from it."""

from __future__ import annotations

import json

from bench import scale_store
from moe_utils.pipeline import scale_report


def test_a_small_scale_run_is_recorded_and_shown(tmp_path):
    out = tmp_path / "scale_store.json"
    scale_store.main(["--shapes", "phimoe", "--tokens", "2000", "--heldout-tokens", "100", "--hsdl-steps", "30",
                      "--inference-steps", "3", "--tokens-per-question", "50", "--out", str(out),
                      "--null-bootstrap", "5", "--control-draws", "10", "--n-surrogates", "1",
                      "--work-dir", str(tmp_path / "work")])
    result = json.loads(out.read_text())
    case = result["cases"][0]
    steps = [(s["stage"], s["step"]) for s in case["steps"]]
    assert ("02", "coverage against chance") in steps and ("06", "rankings (every predictor)") in steps
    assert all(s["seconds"] >= 0 and s["peak_rss_gb"] > 0 for s in case["steps"])
    assert ("01", "token-identity control") in steps and ("02", "surrogate refits (1)") in steps
    assert case["analysis_seconds"] == round(sum(s["seconds"] for s in case["steps"]
                                                 if s["step"] != "write synthetic store"), 1)
    assert case["n_hsdl_fits"] == 1 + 4 + 1 and case["analysis_seconds_at_notebook_settings"] > case["analysis_seconds"]
    assert case["coverage_columns_counted"] == 2000 and case["notebook_heldout_tokens"] == 6 * 5 * 50
    assert case["meets_target"] == (case["analysis_seconds"] <= 600 and case["analysis_peak_rss_gb"] <= 8)
    page = "\n".join(scale_report.scale_store_section(out))
    assert "Phi-3.5-MoE" in page and "| 02 | coverage against chance |" in page and "and their 5 HSDL refits" in page
    assert scale_report.scale_store_section(tmp_path / "missing.json") == []
    assert ("machine was shared" in page) == (max(case["loadavg_at_start"][0], case["loadavg_at_end"][0])
                                              >= 0.5 * case["cpu_count"])
    # a run stopped early shows what it measured, marked incomplete
    result["cases"] = [{**case, "complete": False, "steps": case["steps"][:3], "notes": ["stopped at a deadline"]}]
    out.write_text(json.dumps(result))
    page = "\n".join(scale_report.scale_store_section(out))
    assert "incomplete run" in page and "- stopped at a deadline" in page
    assert "| 02 | coverage against chance |" not in page


def test_the_contention_section_shows_each_setting(tmp_path):
    path = tmp_path / "contention.json"
    rows = [{"setting": name, "threads": f"alone {n}, beside {n}", "alone_seconds": alone, "contended_seconds": busy,
             "ratio": busy / alone, "meets_target": busy / alone <= 2.5}
            for name, n, alone, busy in (("torch's default (one per core)", 2, 10.0, 40.0),
                                         ("the pipeline's policy", 1, 12.0, 15.0))]
    path.write_text(json.dumps({"date": "2026-12-07T12:00:00", "machine": {"cpu_count": 2, "torch": "2.13.0"},
                                "workload": "stage 00_model_card", "target": "at most 2.5 times", "settings": rows}))
    page = scale_report.contention_section(path)
    assert "| torch's default (one per core) (alone 2, beside 2) | 10.0 | 40.0 | 4.00 | no |" in page
    assert "| the pipeline's policy (alone 1, beside 1) | 12.0 | 15.0 | 1.25 | yes |" in page
