"""The scale benchmark's JSON on a small synthetic store, and the status page's sections built from it."""

from __future__ import annotations

import json

from bench import contention, scale_store
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
    assert case["meets_target"] == (case["analysis_seconds_at_notebook_settings"] <= 600
                                    and case["analysis_seconds"] <= 600 and case["analysis_peak_rss_gb"] <= 8)
    page = "\n".join(scale_report.scale_store_section(out))
    assert "Phi-3.5-MoE" in page and "| 02 | coverage against chance |" in page and "and their 5 HSDL refits" in page
    # the fit, 4 stability refits, 1 surrogate, at 600 steps: the Adam steps' rate and the fit's fixed part
    fits = 6 * (case["hsdl_fit_fixed_seconds"] + case["hsdl_seconds_per_step"] * 600) / 60
    assert case["hsdl_steps_run"] <= 30 and case["hsdl_fit_fixed_seconds"] > 0
    assert f"{fits:.0f} minutes for the 6 HSDL fits" in page
    assert scale_report.scale_store_section(tmp_path / "missing.json") == []
    assert ("machine was shared" in page) == (max(case["loadavg_at_start"][0], case["loadavg_at_end"][0])
                                              >= 0.5 * case["cpu_count"])
    # a run stopped early shows what it measured, marked incomplete
    result["cases"] = [{**case, "complete": False, "steps": case["steps"][:3], "notes": ["stopped at a deadline"]}]
    out.write_text(json.dumps(result))
    page = "\n".join(scale_report.scale_store_section(out))
    assert "incomplete run" in page and "- stopped at a deadline" in page
    assert "| 02 | coverage against chance |" not in page


class _FakeCompetitor:
    running = 0

    def __init__(self):
        type(self).running += 1

    def kill(self):
        type(self).running -= 1

    def wait(self):
        return 0


def test_contention_interleaves_alone_and_beside_and_compares_medians(monkeypatch, tmp_path):
    monkeypatch.setattr(contention, "competitor", _FakeCompetitor)
    monkeypatch.setattr(contention.time, "sleep", lambda _: None)
    seen, times = [], iter([10.0, 30.0, 14.0, 20.0, 12.0, 40.0])

    def measure():
        seen.append(_FakeCompetitor.running)
        return next(times), 2 - _FakeCompetitor.running

    row = contention.interleaved("stage x", measure, rounds=3)
    assert seen == [0, 1, 0, 1, 0, 1] and _FakeCompetitor.running == 0
    assert row["all_seconds"] == {"alone": [10.0, 14.0, 12.0], "contended": [30.0, 20.0, 40.0]}
    assert row["alone_seconds"] == 12.0 and row["contended_seconds"] == 30.0 and row["ratio"] == 2.5
    assert row["meets_target"] and row["threads"] == "alone 2, beside 1"
    path = tmp_path / "contention.json"
    slow = {**row, "workload": "tests: pytest tests/test_threads.py", "setting": contention.POLICY,
            "alone_seconds": 10.0, "contended_seconds": 30.0, "ratio": 3.0, "meets_target": False}
    machine = {"cpu_count": 2, "torch": "2.13.0"}
    path.write_text(json.dumps({"schema": 2, "date": "2026-12-07T12:00:00", "machine": machine,
                                "profile": "params/tiny.yaml", "quick": False, "parameters": {"rounds": 3},
                                "target": "at most 2.5 times", "meets_target": False,
                                "rows": [{**row, "workload": "stage 00_model_card", "setting": contention.POLICY},
                                         slow]}))
    page = scale_report.contention_section(path)
    assert ("| stage 00_model_card | the pipeline's policy: alone 2, beside 1 | 2026-12-07 | 3 | 12.0 | 30.0 | 2.50 "
            "| yes |") in page
    assert ("| tests: pytest tests/test_threads.py | the pipeline's policy: alone 2, beside 1 | 2026-12-07 | 3 | 10.0 "
            "| 30.0 | 3.00 | no |") in page
    assert any("missed with the pipeline's thread policy" in line for line in page)
    assert scale_report.contention_section(tmp_path / "missing.json") == []


def test_contention_keeps_the_rows_a_run_did_not_measure(tmp_path):
    path = tmp_path / "contention.json"
    old = [{"workload": "stage 00_model_card", "setting": contention.POLICY, "ratio": 1.2, "date": "2026-12-01"},
           {"workload": "tests: the whole suite (make test)", "setting": contention.POLICY, "ratio": 9.0}]
    path.write_text(json.dumps({"rows": old, "date": "2026-11-30", "parameters": {"rounds": 2}}))
    new = [{"workload": "tests: the whole suite (make test)", "setting": contention.POLICY, "ratio": 1.4}]
    assert contention.merge_rows(path, new) == [{**old[0], "rounds": 2}, new[0]]  # its own date kept
    assert contention.merge_rows(tmp_path / "none.json", new) == new
