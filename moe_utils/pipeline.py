"""The pipeline: run every stage notebook through papermill with one profile, then build the book.

``python -m moe_utils.pipeline`` (what ``make book`` calls):

1. reads a YAML profile from ``params/`` (default ``params/tiny.yaml``: the embedded model) and
   ``--set key=value`` overrides; precedence is notebook defaults < profile < command line; the
   profile's ``about:`` block (the model's architecture, hardware and time it needs, the paper's
   setting) is checked and shown on the status page, never passed to the notebooks;
2. validates every key against the parameters cells of the notebooks in ``notebooks/``: a key no
   notebook declares, or a value of the wrong type, is an error, before anything runs;
3. executes the notebooks in order with papermill into ``book/executed/``; a stage whose inputs
   (notebook text, parameters, every file of the package, the model's weights, the data, library
   versions, the previous stage: :mod:`moe_utils.fingerprint`) did not change since its last
   successful run is reused, not re-run; a failed stage stops the run and names the notebook and
   the cell; ``--force`` re-runs the stages and recomputes every cache entry and capture they read
   that was written before this run;
4. builds the HTML book with Jupyter Book 1.x without re-executing anything, under the same lock
   as the stages, so the book only ever shows the run its status page describes.
"""

from __future__ import annotations

import argparse
import contextlib
import ast
import errno
import html
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moe_utils import scale_report, threads
from moe_utils.artifacts import (
    atomic_write_bytes, atomic_write_json, json_digest, package_versions, sha256_file,
)
from moe_utils.data_checks import data_problems
from moe_utils.fingerprint import DIGEST_CACHE_ENV, FRESH_ENV, dependency_key, model_digest, tree_digest
from moe_utils.markup import code_span

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = ROOT / "book" / "executed"
PROFILES = ROOT / "params"
DEFAULT_PROFILE = PROFILES / "tiny.yaml"
BENCH_RESULTS = ROOT / "bench" / "results"
STATE_FILE = "pipeline_state.json"  # in the run's artifacts_dir: the state lives with what it describes
LOCK_FILE = ".pipeline.lock"
DIGESTS_FILE = ".file-digests.json"  # in the run's artifacts_dir: file digests by path, size and mtime
#: The top-level key of a profile that describes it; everything else in a profile is a parameter.
ABOUT = "about"
#: Fields of the ``about`` block and their types; those in ABOUT_REQUIRED must be there.
ABOUT_FIELDS: dict[str, type] = {
    "summary": str,      # one sentence: which model, which question
    "model_type": str,   # ``config.model_type``: the registry adapter that reads it (moe_utils.models)
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
    from moe_utils import annotation, caep, evaluation, hsdl, pruning

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
#: threads; unset: :func:`moe_utils.threads.choose_threads` decides per stage).
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
    from moe_utils.models import EMBEDDED, RANDOM_PREFIX

    if name == EMBEDDED:
        return []
    if name.startswith(RANDOM_PREFIX):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        from moe_utils.tiny_configs import BENCH_SHAPES

        kind = name[len(RANDOM_PREFIX):]
        return [] if kind in CONFIG_MAPPING_NAMES or kind in BENCH_SHAPES else [
            f"model {name!r}: {kind!r} is no transformers model type (see `python -m moe_utils.conformance`)"]
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


def stage_fingerprint(stage: Stage, params: dict, previous: str) -> str:
    """The stage's key (:func:`moe_utils.fingerprint.dependency_key`): its notebook, parameters,
    the previous stage's key and artifacts, the weights of its ``model`` (when it declares one), the
    contents of the data folders its ``*_dir`` parameters name, and the package's files, the
    ``$MOE_*_DIR`` data and the library versions."""
    return json_digest(dependency_key({
        "notebook": sha256_file(stage.path),
        "params": params,
        "previous": previous,
        "model": model_digest(params["model"]) if "model" in params else None,
        "data": {k: tree_digest(v) for k, v in params.items() if k.endswith("_dir") and k != "artifacts_dir" and v},
    }))


def _failed_cell(output: Path) -> str:
    """Which code cell of the source notebook raised, as "code cell N ('first line')" (0-based)."""
    import nbformat

    try:
        notebook = nbformat.read(output, as_version=4)
    except Exception:  # noqa: BLE001 - best effort: the error message is what matters
        return "an unknown cell"
    code_cells = [c for c in notebook.cells if c.cell_type == "code"
                  and "injected-parameters" not in c.metadata.get("tags", [])]
    for number, cell in enumerate(code_cells):
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
            return f"code cell {number} ({first[:60]!r})"
    return "an unknown cell"


def execute_stage(stage: Stage, params: dict, output: Path) -> float:
    """Run one notebook with papermill; returns seconds; raises PipelineError naming the failed cell."""
    import jupytext
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    notebook = jupytext.read(stage.path)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            notebook, str(output), parameters=params, kernel_name="python3", cwd=str(ROOT),
            progress_bar=False, log_output=False,
        )
    except papermill.PapermillExecutionError as err:
        if err.ename == "KeyboardInterrupt":  # Ctrl-C reached the kernel too: an interrupt, not a failure
            raise KeyboardInterrupt from None
        if (reason := _kernel_os_error(err.ename, err.evalue)) is not None:
            raise PipelineError(f"stage {stage.name}: {reason}") from None
        raise PipelineError(
            f"stage {stage.name} ({stage.path}) failed in {_failed_cell(output)}: "
            f"{err.ename}: {err.evalue}\nThe executed notebook with the traceback is {output}"
        ) from None
    seconds = time.perf_counter() - start
    _show_only_injected_parameters(output)
    return seconds


def _kernel_os_error(name: str, value: str) -> str | None:
    """:func:`os_error_message` of an error raised in a stage's kernel, from its printed form
    (``[Errno 28] No space left on device: 'path'``); a write cut short without an errno
    (numpy's "N requested and M written") is a full disk too."""
    if not name.endswith("Error"):
        return None
    if match := re.search(r"\[Errno (\d+)\] ([^:]*)(?:: '(.*)')?", value):
        return os_error_message(OSError(int(match[1]), match[2], match[3]))
    if re.search(r"\d+ requested and \d+ written", value):
        return f"the disk is full: a write was cut short ({value.strip()}); free space and run again"
    return None


def _show_only_injected_parameters(path: Path) -> None:
    """The book shows the parameters this run used (papermill's injected cell), not also the
    notebook's defaults: the defaults cell is tagged ``remove-cell`` for myst-nb."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
    atomic_write_bytes(path, nbformat.writes(notebook).encode())


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run(profile: Path = DEFAULT_PROFILE, overrides: dict | None = None, *, only: list[str] | None = None,
        force: bool = False, notebooks: Path = NOTEBOOKS, executed: Path = EXECUTED,
        book: Callable[[], Any] | None = None) -> dict:
    """Validate, then execute the stages (reusing unchanged ones), write the status page and call
    ``book()`` (the book build), all under one lock; returns the run's status record."""
    stages = discover_stages(notebooks)
    if conflicts := conflicting_defaults(stages):
        raise PipelineError(f"notebooks declare shared parameters with different defaults: {conflicts}; give each "
                            "the same default in every notebook")
    unknown = sorted(set(only or ()) - {stage.name for stage in stages})
    if unknown:
        raise PipelineError(f"--only names no stage {unknown}; the stages are "
                            f"{', '.join(stage.name for stage in stages)}")
    params = {**load_profile(profile), **(overrides or {})}
    validate(params, stages)
    if problems := data_problems(params, {name for stage in stages for name in stage.defaults}):
        raise PipelineError("the data the stages read is not usable:\n  " + "\n  ".join(problems))
    try:
        threads.user_threads()  # a malformed OMP_NUM_THREADS fails here, before any stage runs
    except ValueError as err:
        raise PipelineError(str(err)) from None
    about = load_about(profile)
    artifacts = _artifacts_root(params, stages)
    with run_lock([executed, *([artifacts] if artifacts else [])]), \
            _run_environment((artifacts or executed) / DIGESTS_FILE, force):
        status = _run_stages(stages, params, profile, overrides, about, only=only, force=force, executed=executed,
                             state_path=(artifacts or executed) / STATE_FILE, artifacts=artifacts)
        status["force"] = force
        atomic_write_json(executed / "status.json", status)
        write_status_page(status, executed / "status.md")
        if book is not None:
            book()
    return status


@contextlib.contextmanager
def _run_environment(digests: Path, force: bool):
    """Environment the stages' kernels inherit for one run: where file digests are kept, and with
    ``force`` the time before which no cache entry or capture is reused (:mod:`moe_utils.fingerprint`)."""
    saved = {name: os.environ.get(name) for name in (DIGEST_CACHE_ENV, FRESH_ENV)}
    os.environ.setdefault(DIGEST_CACHE_ENV, str(digests))
    if force:
        os.environ[FRESH_ENV] = repr(time.time())
        log.info("--force: every cache entry and capture written before now is recomputed, not reused")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_stages(stages: list[Stage], params: dict, profile: Path, overrides: dict | None, about: dict | None, *,
                only: list[str] | None, force: bool, executed: Path, state_path: Path,
                artifacts: Path | None) -> dict:
    """Run or reuse each stage in order. A stage is reused only when its inputs are unchanged and
    what it produced still verifies: its executed notebook and every file of its artifact folder
    against the checksums recorded when it finished. A stage that fails is never recorded."""
    state = _read_state(state_path)
    previous = ""
    status = {"profile": str(Path(profile).resolve().relative_to(ROOT)) if Path(profile).resolve().is_relative_to(ROOT)
              else str(profile), "overrides": overrides or {}, "about": about, "stages": [], "commit": _git_commit(),
              "versions": package_versions(("torch", "transformers", "lm_eval", "numpy", "scikit-learn",
                                            "papermill", "jupyter-book", "moe-collab-study")),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()}}
    for stage in stages:
        stage_params = {k: v for k, v in {**stage.defaults, **params}.items() if k in stage.defaults}
        fingerprint = stage_fingerprint(stage, stage_params, previous)
        output = executed / f"{stage.name}.ipynb"
        stage_dir = artifacts / stage.name if artifacts else None
        record = {"stage": stage.name, "parameters": stage_params}
        cached = state.get(stage.name, {})
        if only is not None and stage.name not in only:
            log.info("%s: skipped (not in --only)", stage.name)
            record.update(cached, reused=False, skipped=True)
        elif not force and (problem := _reuse_problem(cached, fingerprint, output, stage_dir)) is None:
            log.info("%s: unchanged and verified, reusing its last run", stage.name)
            record.update(cached, reused=True)
        else:
            log.info("%s: running%s", stage.name, "" if force else f" ({problem})")
            state.pop(stage.name, None)
            atomic_write_json(state_path, state)  # a failed run must not leave a stale "done" record
            n_threads, why = threads.choose_threads(params.get("threads"), active_params=_active_params(about))
            log.info("%s: %d thread(s): %s", stage.name, n_threads, why)
            with threads.environment(n_threads):
                seconds = execute_stage(stage, stage_params, output)
            record.update(fingerprint=fingerprint, seconds=round(seconds, 1), threads=n_threads,
                          finished=time.strftime("%Y-%m-%d %H:%M:%S"), reused=False)
            state[stage.name] = {**{k: record[k] for k in ("fingerprint", "seconds", "finished")},
                                 "notebook": sha256_file(output), "artifacts": directory_digest(stage_dir)}
            atomic_write_json(state_path, state)
            log.info("%s: done in %.1f s", stage.name, seconds)
        status["stages"].append(record)
        previous = json_digest([fingerprint, state.get(stage.name, {}).get("artifacts")])
    return status


def _active_params(about: dict | None) -> float | None:
    """Parameters active per token from a profile's ``about`` block (the work's size), None if it does not say."""
    parameters = (about or {}).get("parameters")
    return parameters["active_b"] * 1e9 if parameters else None


def _artifacts_root(params: dict, stages: list[Stage]) -> Path | None:
    """The run's ``artifacts_dir`` (absolute), where its state lives; None for stages without one."""
    value = params.get("artifacts_dir") or next(
        (s.defaults["artifacts_dir"] for s in stages if s.defaults.get("artifacts_dir")), None)
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else ROOT / path


def _read_state(path: Path) -> dict:
    """The run state, or an empty one (with a warning) when it is missing or unreadable: every stage
    then runs again, which repairs it."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        state = None
    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
        log.warning("%s is unreadable: every stage runs again", path)
        return {}
    return state


def directory_digest(path: Path | None) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative names; hidden files such as locks and
    temporary files left out); empty when the folder does not exist."""
    if path is None or not path.is_dir():
        return {}
    return {str(f.relative_to(path)): sha256_file(f) for f in sorted(path.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)}


def _reuse_problem(cached: dict, fingerprint: str, output: Path, stage_dir: Path | None) -> str | None:
    """Why a stage's last run cannot be reused, or None when it can."""
    if not cached:
        return "no finished run recorded"
    if cached.get("fingerprint") != fingerprint:
        return "its inputs changed"
    if not output.is_file():
        return f"its executed notebook {output.name} is missing"
    if cached.get("notebook") != sha256_file(output):
        return f"{output.name} is not the notebook of its recorded run"
    recorded, now = cached.get("artifacts") or {}, directory_digest(stage_dir)
    missing = sorted(set(recorded) - set(now))
    changed = sorted(name for name in recorded if name in now and now[name] != recorded[name])
    if missing or changed:
        return "its artifacts no longer verify: " + ", ".join(
            [f"{name} missing" for name in missing[:3]] + [f"{name} modified" for name in changed[:3]])
    return None


@contextlib.contextmanager
def run_lock(folders: list[Path]):
    """Hold an exclusive lock on each folder (its ``.pipeline.lock``) for one run: a second run on
    the same artifacts or executed notebooks is refused at once with a clear message."""
    import fcntl

    handles = []
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / LOCK_FILE, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise PipelineError(f"another pipeline run ({holder}) is using {folder}; wait for it to finish, or "
                                    "give this run another artifacts_dir (and checkout, for the executed notebooks)")
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            handles.append(handle)
        yield
    finally:
        for handle in handles:
            handle.close()


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
             "`moe_utils.expert_surgery.remove_experts` against the original, in the same run. Ratios are "
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
    """Markdown lines showing the conformance table of ``python -m moe_utils.conformance``."""
    if not path.is_file():
        return []
    from moe_utils.conformance import CHECKS, MERGING_CHECKS

    columns = (*CHECKS, *MERGING_CHECKS)
    result = json.loads(path.read_text())
    total = result["summary"]
    lines = ["", "## Conformance: every MoE causal LM of transformers", "",
             f"From `python -m moe_utils.conformance` with transformers {result['transformers']}, re-checked by "
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


def build_book(builder: str = "html") -> Path:
    """``jupyter-book build`` of the repository root (config in ``_config.yml``), strict: warnings fail."""
    executable = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(executable) if executable.is_file() else "jupyter-book", "build", str(ROOT), "--builder", builder,
           "--warningiserror", "--nitpick", "--keep-going"]
    log.info("building the book: %s", " ".join(cmd))
    returncode = run_child(cmd)
    index = ROOT / "_build" / builder / "index.html"
    if returncode != 0 or not index.is_file():
        raise PipelineError("the book build failed (warnings are errors); see the messages above")
    log.info("book built: %s", index)
    return index


def run_child(cmd: list[str]) -> int:
    """Run ``cmd`` in ``ROOT`` and wait for it; its exit code. The child never outlives the run's
    lock: it is ended if this process is interrupted, and (Linux) if this process dies, even by SIGKILL."""
    child = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=_die_with_parent)
    try:
        return child.wait()
    except BaseException:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


def _die_with_parent() -> None:
    """In the child, before it runs: ask Linux to end it (SIGTERM) if the pipeline dies first, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_utils.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="YAML profile (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter (repeatable); the value is read as YAML")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (e.g. 01_capture)")
    parser.add_argument("--force", action="store_true", help="re-run stages even if their inputs did not change")
    parser.add_argument("--no-book", action="store_true", help="execute the notebooks but do not build the book")
    parser.add_argument("--list", action="store_true", help="list the stages and their parameters, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.list:
            for stage in discover_stages():
                print(f"{stage.name}: {stage.defaults}")
            return 0
        run(args.profile, parse_overrides(args.overrides), only=args.only, force=args.force,
            book=None if args.no_book else build_book)
    except PipelineError as err:
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted (Ctrl-C): finished stages and captured batches are kept; run the same command "
                  "again to resume")
        return 130
    except OSError as err:
        if (message := os_error_message(err)) is None:
            raise
        log.error("%s", message)
        return 1
    return 0


def os_error_message(err: OSError) -> str | None:
    """One line for a full disk or an unwritable folder (None for other errors), naming the path."""
    where = f" {err.filename}" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"the disk is full: could not write{where}; free space on that disk (or set artifacts_dir to " \
               "another one) and run again: finished work is kept"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "its file system is read-only" if err.errno == errno.EROFS else "permission denied"
        return f"cannot write{where}: {why}; make the folder writable or set artifacts_dir to a writable folder"
    return None


if __name__ == "__main__":
    sys.exit(main())
