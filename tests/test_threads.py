"""The thread policy, and that every stage's kernel runs the threads the pipeline chose."""

from __future__ import annotations

import json
import os

import pytest

from moe_utils.pipeline import profiles
from moe_utils.pipeline import runner as pipeline
from moe_utils.common import threads
from tests.test_pipeline import _notebook


def test_the_parameter_wins_then_the_environment_then_the_free_cores():
    env = {"OMP_NUM_THREADS": "3"}
    assert threads.choose_threads(2, environ=env, cores=8, load=0)[0] == 2
    assert threads.choose_threads(None, environ=env, cores=8, load=0) == (3, "set by OMP_NUM_THREADS / MKL_NUM_THREADS")
    assert threads.choose_threads(None, environ={"MKL_NUM_THREADS": "5"}, cores=8, load=0)[0] == 5
    assert threads.choose_threads(None, environ={}, cores=8, load=0)[0] == 8
    assert threads.choose_threads(None, environ={}, cores=8, load=2.6)[0] == 5
    assert threads.choose_threads(None, environ={}, cores=2, load=1.0)[0] == 1  # one core left beside one job
    assert threads.choose_threads(None, environ={}, cores=2, load=7.0)[0] == 1  # never fewer than 1
    assert threads.choose_threads(None, environ={}, cores=8, load=0, active_params=2.4e6)[0] == 2  # small model
    assert threads.choose_threads(None, environ={}, cores=2, load=0.2, active_params=2.4e6)[0] == 2  # idle: 2
    assert threads.choose_threads(None, environ={}, cores=2, load=1.0, active_params=2.4e6)[0] == 1  # busy: 1
    assert threads.choose_threads(None, environ={"OMP_NUM_THREADS": "4"}, cores=2, load=1.0,
                                  active_params=2.4e6)[0] == 4  # the user's setting still wins
    assert threads.choose_threads(None, environ={}, cores=8, load=0, active_params=1.3e9)[0] == 8
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            threads.choose_threads(bad, environ={})
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='two'"):
        threads.choose_threads(None, environ={"OMP_NUM_THREADS": "two"})


def test_busy_cores_counts_the_other_running_processes(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 4\nprocs_blocked 0\n")
    assert threads.busy_cores(samples=3, interval=0.0, stat=stat) == 3.0  # this process is one of the 4
    stat.write_text("cpu  1 2 3\n")
    assert threads.busy_cores(samples=1, stat=stat) == pytest.approx(os.getloadavg()[0])  # fallback


def test_environment_sets_and_restores():
    environ = {"MKL_NUM_THREADS": "7"}
    with threads.environment(2, environ):
        assert environ == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert environ == {"MKL_NUM_THREADS": "7"}


def test_every_stage_kernel_runs_the_chosen_threads(tmp_path, monkeypatch):
    notebooks = tmp_path / "nb"
    notebooks.mkdir()
    body = ("import json, os\nfrom pathlib import Path\nimport torch\n"
            "Path(out).write_text(json.dumps([os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads()]))")
    _notebook(notebooks / "01_a.py", f"out = '{tmp_path / 'a.json'}'", body)
    _notebook(notebooks / "02_b.py", f"other = '{tmp_path / 'b.json'}'", body.replace("Path(out)", "Path(other)"))
    profile = tmp_path / "p.yaml"
    profile.write_text("threads: 2\n")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    status = pipeline.run(profile, notebooks=notebooks, executed=tmp_path / "executed")
    assert [json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json")] == [["2", 2], ["2", 2]]
    assert [s["threads"] for s in status["stages"]] == [2, 2]
    assert "| 01_a | " in (tmp_path / "executed" / "status.md").read_text()
    assert "OMP_NUM_THREADS" not in os.environ  # restored after each stage

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting, when no parameter is given
    profile.write_text("{}\n")
    status = pipeline.run(profile, force=True, notebooks=notebooks, executed=tmp_path / "executed")
    assert json.loads((tmp_path / "a.json").read_text()) == ["1", 1] and status["stages"][0]["threads"] == 1


def test_bad_thread_settings_stop_the_run_before_any_stage(tmp_path, monkeypatch):
    with pytest.raises(profiles.PipelineError, match="'threads' = 0 must be a positive integer"):
        pipeline.run(overrides={"threads": 0}, executed=tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "all")
    with pytest.raises(profiles.PipelineError, match="OMP_NUM_THREADS='all' is not a positive integer"):
        pipeline.run(executed=tmp_path)
    assert not any(tmp_path.iterdir())
