"""Stage paths, the model caveat and the parameters several stages share (moe_utils.stages)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_utils import stages
from moe_utils.pipeline import profiles
from moe_utils.pipeline import runner as pipeline


def test_stage_paths_follow_the_stage_names(tmp_path):
    paths = stages.stage_paths(tmp_path)
    assert paths.store == tmp_path / "01_capture" / "store"
    assert paths.hsdl == tmp_path / "02_hsdl" and paths.pruning_cache == tmp_path / "04_pruning" / "cache"
    assert paths.valid_store.parent.name == "00_model_card" and paths.results.name == "05_mmlu_pro_results"
    with pytest.raises(ValueError, match="unknown stage '07_x'"):
        paths.stage("07_x")


def test_the_stages_are_the_notebooks():
    """The pipeline runs notebooks/<stage>.py and records <artifacts_dir>/<stage>: the same names."""
    assert tuple(stage.name for stage in profiles.discover_stages()) == stages.STAGES


def test_model_caveat():
    assert "randomly initialised model (`random:olmoe`)" in stages.model_caveat("random:olmoe")
    embedded = stages.model_caveat("embedded", "Accuracy sits at chance.")
    assert embedded.startswith("The embedded model") and embedded.endswith("Accuracy sits at chance.")
    assert stages.model_caveat("allenai/OLMoE-1B-7B-0924") is None


def test_parameters_shared_by_stages_have_one_default():
    """Every parameter several notebooks declare defaults to the same value in each: a profile sets
    it once for all of them, and a stage run alone must not silently use another value."""
    notebooks = profiles.discover_stages()
    shared = {name for name in notebooks[1].defaults if sum(name in s.defaults for s in notebooks) > 1}
    assert {"model", "artifacts_dir", "categories", "seed"} <= shared
    assert profiles.conflicting_defaults(notebooks) == {}


def test_a_disagreeing_default_is_found_and_refused(tmp_path):
    for name, value in (("01_a", 1), ("02_b", 2), ("03_c", 1)):
        (tmp_path / f"{name}.py").write_text(f'# %% tags=["parameters"]\nseed = {value}\nother_{name} = 0\n')
    found = profiles.discover_stages(Path(tmp_path))
    assert profiles.conflicting_defaults(found) == {"seed": {"01_a": 1, "02_b": 2, "03_c": 1}}
    with pytest.raises(profiles.PipelineError, match="different defaults.*seed"):
        pipeline.run(notebooks=Path(tmp_path), executed=tmp_path / "executed")
