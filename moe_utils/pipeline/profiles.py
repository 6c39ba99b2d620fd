"""Profiles: a YAML file of parameters for the stage notebooks, checked before anything runs.

The parameters a profile may set are those the notebooks' parameters cells declare
(:func:`discover_stages`); :func:`validate` refuses an unknown key, a value of the wrong type or
out of range, and runs the stages' own checks on the values (:func:`_stage_checks`), so a bad
profile fails in a second, not an hour into a run. A profile's ``about:`` block (architecture,
hardware, time) is checked by :func:`validate_about` and shown on the status page
(:mod:`moe_utils.pipeline.status`), never passed to the notebooks.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moe_utils.common.project import NOTEBOOKS, PROFILES
from moe_utils.compression import caep, pruning
from moe_utils.evaluation import harness as evaluation
from moe_utils.models.loading import EMBEDDED, RANDOM_PREFIX
from moe_utils.models.tiny_configs import BENCH_SHAPES
from moe_utils.patterns import annotation, hsdl


#: The top-level key of a profile that describes it; everything else in a profile is a parameter.
ABOUT = "about"
#: Fields of the ``about`` block and their types; those in ABOUT_REQUIRED must be there.
ABOUT_FIELDS: dict[str, type] = {
    "summary": str,      # one sentence: which model, which question
    "model_type": str,   # ``config.model_type``: the registry adapter that reads it (moe_utils.models.loading)
    "hardware": str,     # what it needs to run: GPU memory, RAM
    "time": str,         # how long, saying whether that is an estimate or measured
    "parameters": dict,  # {total_b, active_b}: billions of parameters, all and used per token; optional
    #                      active_counts_input_embedding: false where the model card leaves it out
    "config": dict,      # the checkpoint's config.json fields that fix its shape (tests build it from them)
    "paper": str,        # the paper's setting this profile follows, where one applies
    "notes": str,        # anything else a user must know (remote code, missing features)
}
ABOUT_REQUIRED = ("summary", "model_type", "hardware", "time")


class PipelineError(RuntimeError):
    """A profile is invalid or a stage failed."""


@dataclass
class Stage:
    """One notebook of the pipeline and the parameters its parameters cell declares."""

    name: str  # file stem, e.g. "01_capture"
    path: Path
    defaults: dict[str, Any]


def notebook_parameters(path: Path) -> dict[str, Any]:
    """Names and default values of the ``parameters``-tagged cell of a jupytext notebook.

    The cell may hold only ``name = <literal>`` assignments (papermill's convention).
    """
    import jupytext

    notebook = jupytext.read(path)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise PipelineError(f"{path.name}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    defaults = {}
    for node in ast.parse(cells[0].source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise PipelineError(f"{path.name}: the parameters cell may only assign literals to names")
        try:
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError as err:
            raise PipelineError(f"{path.name}: parameter {node.targets[0].id} is not a literal") from err
    return defaults


def discover_stages(notebooks: Path = NOTEBOOKS) -> list[Stage]:
    """The notebooks ``NN_name.py`` in order."""
    paths = sorted(p for p in notebooks.glob("[0-9][0-9]_*.py"))
    if not paths:
        raise PipelineError(f"no stage notebooks in {notebooks}")
    return [Stage(p.stem, p, notebook_parameters(p)) for p in paths]


def conflicting_defaults(stages: list[Stage]) -> dict[str, dict[str, Any]]:
    """``{parameter: {stage: default}}`` for every parameter that several stages declare with
    different defaults: a profile sets a parameter once for every stage, so a stage run alone must
    not silently use another value (empty when they all agree)."""
    declared: dict[str, dict[str, Any]] = {}
    for stage in stages:
        for name, default in stage.defaults.items():
            declared.setdefault(name, {})[stage.name] = default
    return {name: by_stage for name, by_stage in declared.items() if len({repr(v) for v in by_stage.values()}) > 1}


def _type_ok(value: Any, default: Any) -> bool:
    if default is None:
        return True  # None defaults mean "optional": any value, or None for the stage's fallback
    if value is None:
        return False  # an empty --set (n_per_category=) must not silently mean something else
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def validate(params: dict[str, Any], stages: list[Stage]) -> None:
    """Every key must be declared by some stage, with a value of the declared default's type."""
    declared: dict[str, list[tuple[str, Any]]] = {name: [("the pipeline", None)] for name in PIPELINE_KEYS}
    for stage in stages:
        for name, default in stage.defaults.items():
            declared.setdefault(name, []).append((stage.name, default))
    problems = []
    for key, value in params.items():
        if key not in declared:
            problems.append(f"unknown key {key!r} (no notebook declares it; known: {', '.join(sorted(declared))})")
            continue
        for stage_name, default in declared[key]:
            if not _type_ok(value, default):
                problems.append(f"{key!r} = {value!r} is {type(value).__name__}, but {stage_name} expects "
                                f"{type(default).__name__} (default {default!r})")
    problems += [problem for key, value in params.items() if key in declared for problem in _range_problems(key, value)]
    if problems:
        raise PipelineError("invalid parameters:\n  " + "\n  ".join(problems))


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


#: Values each parameter may take, beyond its type: (check, what it must be).
RANGES: dict[str, tuple[Any, str]] = {
    "prune_ratios": (lambda v: isinstance(v, list) and v, "a non-empty list of fractions strictly between 0 and 1"),
    "annotation_alpha": (_fraction, "a significance level strictly between 0 and 1"),
    "confidence": (_fraction, "strictly between 0 and 1"),
    "atom_threshold": (lambda v: isinstance(v, (int, float)) and v >= 0, ">= 0"),
    "n_per_category": (_positive_int, "a positive integer (a number above a category's size takes all of it)"),
    "n_bootstrap": (lambda v: isinstance(v, int) and v >= 0, ">= 0"),
    **{name: (_positive_int, "a positive integer") for name in (
        "batch_size", "eval_batch_size", "hsdl_batch_size", "hsdl_steps", "max_length", "output_tokens",
        "annotation_rows", "render_max_tokens", "domain_mc_limit", "domain_ppl_limit", "heldout_per_category",
        "hsdl_inference_steps", "card_paragraphs", "blimp_pairs", "explorer_questions", "explorer_max_tokens",
        "explorer_partners")},
    "prediction_horizons": (lambda v: isinstance(v, list) and v and all(_positive_int(x) for x in v),
                            "a non-empty list of positive layer counts (1 = the next MoE layer)"),
    "random_seeds": (lambda v: isinstance(v, list) and v and all(isinstance(x, int) for x in v),
                     "a non-empty list of integer seeds"),
}


def _stage_checks() -> dict[str, Any]:
    """Parameters the stages check with their own functions, run here on the same values before
    any stage starts: each raises ValueError saying what is wrong (one definition for both)."""
    def correction(value):
        if value not in annotation.CORRECTIONS:
            raise ValueError(f"must be one of {annotation.CORRECTIONS}, got {value!r}")

    return {
        "prune_ratios": lambda v: [caep.check_ratio("prune_ratio", r) for r in v],
        "domain_prune_ratio": lambda v: caep.check_ratio("prune_ratio", v),
        "caep_threshold_ratio": lambda v: caep.check_ratio("threshold_ratio", v),
        "hsdl_levels": hsdl.check_levels,
        "pruning_methods": pruning.check_methods,
        "categories": lambda v: [evaluation.resolve_category(c) for c in v],
        "annotation_correction": correction,
    }


#: Parameters of the pipeline itself, declared by no notebook: ``threads`` (every stage's torch/OpenMP
#: threads; unset: :func:`moe_utils.common.threads.choose_threads` decides per stage).
PIPELINE_KEYS = ("threads",)
RANGES["threads"] = (_positive_int, "a positive integer (leave it unset to choose from the cores free)")


def _range_problems(key: str, value: Any) -> list[str]:
    if key in RANGES and value is not None and not RANGES[key][0](value):
        return [f"{key!r} = {value!r} must be {RANGES[key][1]}"]
    if key == "model" and isinstance(value, str):
        return _model_problems(value)
    if value is not None and (check := _stage_checks().get(key)) is not None:
        try:
            check(value)
        except (ValueError, TypeError) as err:
            return [f"{key!r} = {value!r}: {err}"]
    return []


def _model_problems(name: str) -> list[str]:
    """A model must be ``embedded``, ``random:<type>``, an existing local directory with a
    ``config.json``, or a Hub id of the form ``owner/name``: checked before any stage runs."""
    if name == EMBEDDED:
        return []
    if name.startswith(RANDOM_PREFIX):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        kind = name[len(RANDOM_PREFIX):]
        return [] if kind in CONFIG_MAPPING_NAMES or kind in BENCH_SHAPES else [
            f"model {name!r}: {kind!r} is no transformers model type (see `python -m moe_utils.models.conformance`)"]
    path = Path(name).expanduser()
    if path.is_dir():
        return [] if (path / "config.json").is_file() else [f"model {name!r}: the directory has no config.json"]
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return [f"model {name!r} is neither an existing directory nor a Hub id of the form 'owner/name'"]
    return []


def load_profile(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(PROFILES.glob("*.yaml")))
        raise PipelineError(f"profile {path} not found (profiles in {PROFILES}: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a profile is a mapping of parameter names to values")
    return {key: value for key, value in data.items() if key != ABOUT}


def validate_about(about: Any, source: str = "profile") -> dict[str, Any]:
    """Check a profile's ``about`` block: required fields present, every field known and of its type."""
    if not isinstance(about, dict):
        raise PipelineError(f"{source}: 'about' must be a mapping with the fields {', '.join(ABOUT_FIELDS)}")
    problems = [f"missing about.{name}" for name in ABOUT_REQUIRED if name not in about]
    for name, value in about.items():
        if name not in ABOUT_FIELDS:
            problems.append(f"unknown field about.{name} (known: {', '.join(ABOUT_FIELDS)})")
        elif not isinstance(value, ABOUT_FIELDS[name]):
            problems.append(f"about.{name} must be {ABOUT_FIELDS[name].__name__}, got {type(value).__name__}")
    if isinstance(about.get("time"), str) and not any(w in about["time"].lower() for w in ("estimate", "measured")):
        problems.append("about.time must say whether it is an estimate or measured")
    parameters = about.get("parameters")
    if isinstance(parameters, dict) and not all(
            isinstance(parameters.get(k), (int, float)) and not isinstance(parameters.get(k), bool) and parameters[k] > 0
            for k in ("total_b", "active_b")):
        problems.append("about.parameters needs positive numbers total_b and active_b (billions)")
    if problems:
        raise PipelineError(f"{source}: invalid about block:\n  " + "\n  ".join(problems))
    return about


def load_about(path: Path) -> dict[str, Any] | None:
    """The profile's validated ``about`` block, or None if it has none."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or ABOUT not in data:
        return None
    return validate_about(data[ABOUT], str(path))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings; values are read as YAML (``n=5`` is an int, ``x=[a, b]`` a list)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise PipelineError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise PipelineError(f"--set {pair!r}: the value is not valid YAML ({err})") from err
    return out


