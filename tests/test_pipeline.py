"""The pipeline: profile validation, failure reporting, stage reuse, and a real end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from moe_utils.pipeline import runner as pipeline
from moe_utils.pipeline.profiles import (
    PipelineError, discover_stages, load_profile, notebook_parameters, parse_overrides, validate,
)
from moe_utils.capture.store import RoutingStore

HEADER = """# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---
"""


def _notebook(path: Path, params: str, body: str) -> Path:
    path.write_text(f'{HEADER}\n# %% tags=["parameters"]\n{params}\n\n# %%\n{body}\n')
    return path


@pytest.fixture(scope="module")
def stages():
    return discover_stages()


def test_every_profile_is_valid(stages):
    profiles = sorted(pipeline.PROFILES.glob("*.yaml"))
    assert pipeline.DEFAULT_PROFILE in profiles
    for profile in profiles:
        validate(load_profile(profile), stages)


def test_every_stage_shares_the_artifacts_dir(stages):
    assert [s.name for s in stages] == ["00_model_card", "01_capture", "02_hsdl", "03_annotation", "04_pruning",
                                        "05_mmlu_pro_results", "06_routing_prediction", "07_explorer"]
    assert all("artifacts_dir" in s.defaults for s in stages)


@pytest.mark.parametrize("params, message", [
    ({"n_per_categroy": 5}, "unknown key 'n_per_categroy'"),
    ({"n_per_category": "5"}, "expects int"),
    ({"record_probs": 1}, "expects bool"),
    ({"categories": "math"}, "expects list"),
    ({"prune_ratios": [1.5]}, r"prune_ratios' = \[1.5\]: prune_ratio must be in \(0, 1\)"),
    ({"batch_size": 0}, "batch_size' = 0 must be a positive integer"),
    ({"prediction_horizons": [1, 0]}, "prediction_horizons.*non-empty list of positive layer counts"),
    ({"heldout_per_category": 0}, "heldout_per_category' = 0 must be a positive integer"),
    ({"explorer_questions": 0}, "explorer_questions' = 0 must be a positive integer"),
    ({"n_per_category": None}, "n_per_category' = None is NoneType"),
    ({"model": "/no/such/checkpoint"}, "neither an existing directory nor a Hub id"),
    ({"model": "random:not_a_type"}, "'not_a_type' is no transformers model type"),
])
def test_invalid_profiles_are_errors(stages, params, message):
    with pytest.raises(PipelineError, match=message):
        validate(params, stages)


def test_overrides_are_yaml(stages):
    parsed = parse_overrides(["n_per_category=5", "categories=[math, law]", "data_dir=null"])
    assert parsed == {"n_per_category": 5, "categories": ["math", "law"], "data_dir": None}
    validate(parsed, stages)
    with pytest.raises(PipelineError, match="key=value"):
        parse_overrides(["oops"])


def test_bad_values_stop_the_run_before_any_stage(tmp_path):
    with pytest.raises(PipelineError, match="prune_ratios"):
        pipeline.run(overrides={"prune_ratios": [1.5]}, executed=tmp_path)
    assert not any(tmp_path.iterdir())


def test_malformed_yaml_names_its_source(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [embedded\n")
    with pytest.raises(PipelineError, match=r"bad.yaml is not valid YAML"):
        load_profile(bad)
    with pytest.raises(PipelineError, match=r"--set 'prune_ratios=\[0.5' : the value is not valid YAML".replace(" :", ":")):
        parse_overrides(["prune_ratios=[0.5"])


def test_a_mistyped_stage_in_only_is_an_error_before_anything_runs(tmp_path):
    with pytest.raises(PipelineError, match=r"--only names no stage \['01_captur'\].*01_capture"):
        pipeline.run(only=["01_captur"], executed=tmp_path)
    assert not any(tmp_path.iterdir())


def test_parameters_cell_must_hold_literals(tmp_path):
    good = _notebook(tmp_path / "01_a.py", "x = 1\nname = 'a'\nitems = [1, 2]\nmissing = None", "print(x)")
    assert notebook_parameters(good) == {"x": 1, "name": "a", "items": [1, 2], "missing": None}
    bad = _notebook(tmp_path / "02_b.py", "import os\nx = os.getcwd()", "print(x)")
    with pytest.raises(PipelineError, match="literals"):
        notebook_parameters(bad)


def test_failed_stage_is_named_with_its_cell_and_not_reused(tmp_path):
    notebooks = tmp_path / "nb"
    notebooks.mkdir()
    _notebook(notebooks / "01_ok.py", "x = 1", "y = x + 1")
    _notebook(notebooks / "02_fails.py", "x = 1", "raise ValueError('planted failure')")
    profile = tmp_path / "p.yaml"
    profile.write_text("x: 2\n")
    executed = tmp_path / "executed"
    with pytest.raises(PipelineError, match=r"02_fails .*code cell 1 .*ValueError: planted failure"):
        pipeline.run(profile, notebooks=notebooks, executed=executed)
    state = json.loads((executed / pipeline.STATE_FILE).read_text())
    assert "01_ok" in state and "02_fails" not in state  # a failed stage is never recorded as done

    # Fix the stage: the first is reused, the second runs; a parameter change re-runs both.
    _notebook(notebooks / "02_fails.py", "x = 1", "z = x")
    status = pipeline.run(profile, notebooks=notebooks, executed=executed)
    assert [s["reused"] for s in status["stages"]] == [True, False]
    status = pipeline.run(profile, {"x": 3}, notebooks=notebooks, executed=executed)
    assert [s["reused"] for s in status["stages"]] == [False, False]
    status_page = (executed / "status.md").read_text()
    assert "| 01_ok |" in status_page and "| 02_fails |" in status_page and "x: 3" in status_page


def _writing_stages(tmp_path):
    """Two toy stages that write into their artifact folders, and a profile pointing at ``a/``."""
    notebooks = tmp_path / "nb"
    notebooks.mkdir()
    write = ("from pathlib import Path\nout = Path(artifacts_dir) / '{name}'\nout.mkdir(parents=True, exist_ok=True)\n"
             "(out / 'result.txt').write_text(str(x))")
    for name in ("01_first", "02_second"):
        _notebook(notebooks / f"{name}.py", "x = 1\nartifacts_dir = 'unset'", write.format(name=name))
    profile = tmp_path / "p.yaml"
    profile.write_text(f"artifacts_dir: {tmp_path / 'a'}\n")
    return notebooks, profile, tmp_path / "executed"


def test_reuse_verifies_the_artifacts_and_a_rerun_repairs_them(tmp_path):
    notebooks, profile, executed = _writing_stages(tmp_path)
    run = lambda **kw: [s["reused"] for s in pipeline.run(profile, notebooks=notebooks, executed=executed, **kw)["stages"]]
    assert run() == [False, False]
    assert (tmp_path / "a" / pipeline.STATE_FILE).is_file()  # the state lives with the artifacts
    assert run() == [True, True]
    (tmp_path / "a" / "02_second" / "result.txt").unlink()  # an artifact gone: that stage runs again
    assert run() == [True, False] and (tmp_path / "a" / "02_second" / "result.txt").is_file()
    (tmp_path / "a" / "01_first" / "result.txt").write_text("tampered")  # modified: that stage runs again;
    assert run() == [False, True] and (tmp_path / "a" / "01_first" / "result.txt").read_text() == "1"
    # the next is reused because the repaired artifacts are byte-identical to those it was run on
    (executed / "02_second.ipynb").write_text((executed / "02_second.ipynb").read_text() + " ")
    assert run() == [True, False]  # an executed notebook that is not the recorded one is not trusted


def test_each_artifacts_dir_keeps_its_own_state(tmp_path):
    notebooks, profile, executed = _writing_stages(tmp_path)
    other = {"artifacts_dir": str(tmp_path / "b")}
    run = lambda over=None: [s["reused"] for s in pipeline.run(profile, over, notebooks=notebooks,
                                                               executed=executed)["stages"]]
    assert run() == [False, False] and run(other) == [False, False]
    assert run(other) == [True, True]
    assert run() == [False, False]  # a/'s state is kept, but the executed notebooks are now b/'s: not trusted


def test_a_second_run_on_the_same_artifacts_is_refused(tmp_path):
    notebooks, profile, executed = _writing_stages(tmp_path)
    with pipeline.run_lock([tmp_path / "a"]):
        with pytest.raises(PipelineError, match=r"another pipeline run \(pid \d+\) is using .*a"):
            pipeline.run(profile, notebooks=notebooks, executed=executed)
    assert not (tmp_path / "a" / pipeline.STATE_FILE).exists()  # nothing was recorded
    assert [s["reused"] for s in pipeline.run(profile, notebooks=notebooks, executed=executed)["stages"]] == \
        [False, False]


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path, monkeypatch):
    """Every real stage notebook runs through papermill on a tiny random model and real MMLU-Pro rows."""
    from .conftest import SHARED_DATA

    if not (SHARED_DATA / "mmlu_pro").is_dir():
        pytest.skip("needs the local MMLU-Pro copy")
    monkeypatch.setenv("MOE_MMLU_PRO_DIR", str(SHARED_DATA / "mmlu_pro"))
    monkeypatch.setenv("MOE_WIKITEXT_DIR", str(SHARED_DATA / "wikitext-2"))
    artifacts = tmp_path / "artifacts"
    status = pipeline.run(pipeline.PROFILES / "smoke.yaml", {"artifacts_dir": str(artifacts)},
                          executed=tmp_path / "executed")
    assert not any(s["reused"] or s.get("skipped") for s in status["stages"])
    store = RoutingStore.open(artifacts / "01_capture" / "store")
    assert store.n_samples == 4 and set(store.tokens.label) == {"math", "law"}
    executed = nbformat.read(tmp_path / "executed" / "01_capture.ipynb", as_version=4)
    tags = [cell.metadata.get("tags", []) for cell in executed.cells]
    assert ["parameters", "remove-cell"] in tags  # the defaults are hidden in the book ...
    assert ["injected-parameters"] in tags  # ... and the values this run used are shown
    again = pipeline.run(pipeline.PROFILES / "smoke.yaml", {"artifacts_dir": str(artifacts)},
                         executed=tmp_path / "executed")
    assert all(s["reused"] for s in again["stages"])


@pytest.mark.slow
def test_another_architecture_is_one_parameter_away(tmp_path, monkeypatch):
    """The same profile with ``model`` changed to a group-limited DeepSeek-V3 router (shared experts,
    sigmoid scores, 2 routing groups): every stage runs, and stage 4 says which method it skipped."""
    from .conftest import SHARED_DATA

    if not (SHARED_DATA / "mmlu_pro").is_dir():
        pytest.skip("needs the local MMLU-Pro copy")
    monkeypatch.setenv("MOE_MMLU_PRO_DIR", str(SHARED_DATA / "mmlu_pro"))
    monkeypatch.setenv("MOE_WIKITEXT_DIR", str(SHARED_DATA / "wikitext-2"))
    artifacts = tmp_path / "artifacts"
    status = pipeline.run(pipeline.PROFILES / "smoke.yaml", {"artifacts_dir": str(artifacts), "model": "random:deepseek_v3"},
                          executed=tmp_path / "executed")
    assert not any(s.get("skipped") or s["reused"] for s in status["stages"])
    manifest = json.loads((artifacts / "04_pruning" / "manifest.json").read_text())
    assert list(manifest["parameters"]["skipped_methods"]) == ["output"]
    assert (artifacts / "05_mmlu_pro_results").is_dir()
