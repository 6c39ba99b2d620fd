"""One lock over the whole run (book build included), one-line messages for interrupts, full disks
and unwritable folders, and every parameter and data folder checked before the first stage (issue 26)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moe_utils.compression import caep
from moe_utils.pipeline import profiles
from moe_utils.pipeline import runner as pipeline
from moe_utils.pipeline.profiles import PipelineError

HEADER = ("# ---\n# jupyter:\n#   kernelspec:\n#     display_name: Python 3\n#     language: python\n"
          "#     name: python3\n# ---\n")


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    """Two toy stages run by a fake stage runner (no kernel): ``(notebooks, profile, executed, calls)``."""
    notebooks = tmp_path / "nb"
    notebooks.mkdir()
    for name in ("01_a", "02_b"):
        (notebooks / f"{name}.py").write_text(f'{HEADER}\n# %% tags=["parameters"]\nx = 1\n'
                                               f"artifacts_dir = 'unset'\n\n# %%\ny = x\n")
    profile = tmp_path / "p.yaml"
    profile.write_text(f"artifacts_dir: {tmp_path / 'art'}\n")
    calls = []

    def fake_execute(stage, params, output):
        calls.append(stage.name)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"stage": stage.name, "params": params}))
        return 0.0

    monkeypatch.setattr(pipeline, "execute_stage", fake_execute)
    return notebooks, profile, tmp_path / "executed", calls


def test_a_second_run_during_the_first_runs_book_build_is_refused(toy):
    notebooks, profile, executed, calls = toy
    seen = {}

    def book():  # the first run's book build: its status page is written, its lock still held
        seen["status"] = json.loads((executed / "status.json").read_text())
        with pytest.raises(PipelineError, match="another pipeline run"):
            pipeline.run(profile, {"x": 2}, notebooks=notebooks, executed=executed)
        seen["notebook"] = (executed / "02_b.ipynb").read_text()

    status = pipeline.run(profile, notebooks=notebooks, executed=executed, book=book)
    assert calls == ["01_a", "02_b"]  # the refused run executed nothing ...
    assert json.loads(seen["notebook"])["params"]["x"] == 1  # ... and rewrote no page under the build
    assert seen["status"]["stages"] == json.loads(json.dumps(status["stages"]))  # the page describes this run


def test_the_old_book_build_ran_outside_the_lock(toy):
    """The control: once ``run`` returns, a second run may start, so a build done after it is unprotected."""
    notebooks, profile, executed, calls = toy
    pipeline.run(profile, notebooks=notebooks, executed=executed)
    pipeline.run(profile, {"x": 2}, notebooks=notebooks, executed=executed)
    assert calls == ["01_a", "02_b", "01_a", "02_b"]


def test_the_book_builder_dies_with_a_killed_pipeline(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from moe_utils.pipeline.runner import run_child
        run_child([sys.executable, "-c", {child!r}])
    """)])
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    builder = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(builder, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(builder, signal.SIGKILL)
        pytest.fail("the builder outlived the killed pipeline")


@pytest.mark.parametrize(("error", "code", "message"), [
    (KeyboardInterrupt(), 130, r"^interrupted \(Ctrl-C\): .*run the same command again"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/art/01_capture/store/x.npz"), 1,
     r"^the disk is full: could not write /data/art/01_capture/store/x\.npz; free space"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/art"), 1, r"^cannot write /ro/art: its file system is read-only"),
    (PermissionError(errno.EACCES, "Permission denied", "/locked"), 1, r"^cannot write /locked: permission denied"),
])
def test_interrupts_full_disks_and_unwritable_folders_are_one_line(monkeypatch, caplog, error, code, message):
    def failing_run(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(pipeline, "run", failing_run)
    with caplog.at_level(logging.ERROR):
        assert pipeline.main(["--no-book"]) == code
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert __import__("re").search(message, errors[0]), errors[0]


def test_a_stage_that_filled_the_disk_says_so():
    assert pipeline._kernel_os_error("OSError", "[Errno 28] No space left on device: '/a/b.npz'").startswith(
        "the disk is full: could not write /a/b.npz")
    assert "disk is full" in pipeline._kernel_os_error("OSError", "Failed to write: 22662 requested and 2016 written")
    assert pipeline._kernel_os_error("ValueError", "bad value") is None


@pytest.mark.parametrize("value", [0.0, 0.5, 0.999, 1.0, 1.5, -0.1])
def test_the_threshold_ratio_is_accepted_up_front_exactly_when_the_stage_accepts_it(value):
    stages = profiles.discover_stages()
    try:
        caep.caep([[1.0, 0.0], [0.0, 1.0]], [[1.0], [2.0]], value, 0.5)
        stage_accepts = True
    except ValueError:
        stage_accepts = False
    try:
        profiles.validate({"caep_threshold_ratio": value}, stages)
        pipeline_accepts = True
    except PipelineError:
        pipeline_accepts = False
    assert pipeline_accepts == stage_accepts


@pytest.mark.parametrize(("key", "value", "message"), [
    ("hsdl_levels", [0], "levels must be positive"),
    ("pruning_methods", ["caep", "bogus"], "unknown pruning method"),
    ("categories", ["math", "astrology"], "unknown MMLU-Pro category 'astrology'"),
    ("domain_prune_ratio", 1.0, "prune_ratio must be in"),
])
def test_values_the_stages_refuse_are_refused_before_any_stage(key, value, message):
    with pytest.raises(PipelineError, match=message):
        profiles.validate({key: value}, profiles.discover_stages())


def _mmlu_pro_without_answers(folder: Path) -> Path:
    import pandas as pd

    folder.mkdir()
    pd.DataFrame({"question_id": [1], "question": ["q"], "options": [["a", "b"]], "category": ["math"]}) \
        .to_parquet(folder / "test-00000.parquet")
    return folder


def test_bad_data_is_reported_before_the_first_stage(toy, tmp_path, monkeypatch):
    notebooks, profile, executed, calls = toy
    for name in ("01_a", "02_b"):
        path = notebooks / f"{name}.py"
        path.write_text(path.read_text().replace("x = 1\n", "x = 1\ndata_dir = None\nwikitext_dir = None\n"))
    bad = _mmlu_pro_without_answers(tmp_path / "mmlu")
    with pytest.raises(PipelineError, match=r"lacks the MMLU-Pro column\(s\) \['answer', 'answer_index'\]"):
        pipeline.run(profile, {"data_dir": str(bad)}, notebooks=notebooks, executed=executed)
    monkeypatch.setenv("MOE_WIKITEXT_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(PipelineError, match=r"WikiText-2 folder .*nowhere .* does not exist"):
        pipeline.run(profile, notebooks=notebooks, executed=executed)
    assert calls == []


def test_the_shared_data_passes_the_checks_and_a_broken_copy_does_not(tmp_path):
    from moe_utils.evaluation.blimp import paradigms
    from moe_utils.evaluation.data_checks import blimp_problems, mmlu_pro_problems, wikitext_problems

    from .conftest import SHARED_DATA

    if not (SHARED_DATA / "blimp").is_dir():
        pytest.skip("needs the local data")
    assert mmlu_pro_problems(SHARED_DATA / "mmlu_pro") == []
    assert wikitext_problems(SHARED_DATA / "wikitext-2") == []
    assert blimp_problems(SHARED_DATA / "blimp") == []
    copy = tmp_path / "blimp"
    copy.mkdir()
    for name in paradigms():
        (copy / f"{name}.jsonl").symlink_to(SHARED_DATA / "blimp" / f"{name}.jsonl")
    (copy / f"{paradigms()[0]}.jsonl").unlink()
    assert "lacks 1 of the" in blimp_problems(copy)[0]
    (copy / f"{paradigms()[0]}.jsonl").write_text('{"sentence_good": "a"}\n')
    assert "the first record lacks the fields" in blimp_problems(copy)[0]


def test_force_recomputes_caches_and_says_so(toy, caplog, monkeypatch):
    notebooks, profile, executed, calls = toy
    seen = []
    real = pipeline.execute_stage

    def recording(stage, params, output):
        seen.append(os.environ.get("MOE_FRESH_SINCE"))
        return real(stage, params, output)

    monkeypatch.setattr(pipeline, "execute_stage", recording)
    pipeline.run(profile, notebooks=notebooks, executed=executed)
    with caplog.at_level(logging.INFO):
        pipeline.run(profile, notebooks=notebooks, executed=executed, force=True)
    assert seen[:2] == [None, None] and all(float(s) > 0 for s in seen[2:]) and len(seen) == 4
    assert "MOE_FRESH_SINCE" not in os.environ  # restored after the run
    assert any("recomputed, not reused" in r.getMessage() for r in caplog.records)


def test_ctrl_c_inside_a_stage_is_an_interrupt_not_a_failed_cell(tmp_path):
    """Ctrl-C reaches the stage's kernel too: papermill reports it as the cell's error; the pipeline
    turns it back into an interrupt (the one-line message of ``main``), not a stage failure."""
    notebooks = tmp_path / "nb"
    notebooks.mkdir()
    (notebooks / "01_a.py").write_text(f'{HEADER}\n# %% tags=["parameters"]\nx = 1\n\n# %%\nraise KeyboardInterrupt\n')
    profile = tmp_path / "p.yaml"
    profile.write_text("x: 1\n")
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(profile, notebooks=notebooks, executed=tmp_path / "executed")
