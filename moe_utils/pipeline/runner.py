"""The pipeline: run every stage notebook through papermill with one profile, then build the book.

``python -m moe_utils.pipeline`` (what ``make book`` calls):

1. reads a YAML profile from ``params/`` (default ``params/tiny.yaml``: the embedded model) and
   ``--set key=value`` overrides; precedence is notebook defaults < profile < command line; the
   profile's ``about:`` block (the model's architecture, hardware and time it needs, the paper's
   setting) is checked and shown on the status page, never passed to the notebooks;
2. validates every key against the parameters cells of the notebooks in ``notebooks/``: a key no
   notebook declares, or a value of the wrong type, is an error, before anything runs
   (:mod:`moe_utils.pipeline.profiles`);
3. executes the notebooks in order with papermill into ``book/executed/``; a stage whose inputs
   (notebook text, parameters, every file of the package, the model's weights, the data, library
   versions, the previous stage: :mod:`moe_utils.common.fingerprint`) did not change since its last
   successful run is reused, not re-run; a failed stage stops the run and names the notebook and
   the cell; ``--force`` re-runs the stages and recomputes every cache entry and capture they read
   that was written before this run;
4. writes the status page (:mod:`moe_utils.pipeline.status`) and builds the HTML book with Jupyter Book 1.x without re-executing anything, under the same lock
   as the stages, so the book only ever shows the run its status page describes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_utils.common import threads
from moe_utils.common.artifacts import (
    atomic_write_bytes, atomic_write_json, json_digest, package_versions, sha256_file,
)
from moe_utils.evaluation.data_checks import data_problems
from moe_utils.common.fingerprint import DIGEST_CACHE_ENV, FRESH_ENV, dependency_key, model_digest, tree_digest
from moe_utils.common.project import EXECUTED, NOTEBOOKS, PROFILES, ROOT, resolve
from moe_utils.pipeline.profiles import (
    PipelineError, Stage, conflicting_defaults, discover_stages, load_about, load_profile, parse_overrides, validate,
)
from moe_utils.pipeline.status import write_status_page

log = logging.getLogger(__name__)

DEFAULT_PROFILE = PROFILES / "tiny.yaml"
STATE_FILE = "pipeline_state.json"  # in the run's artifacts_dir: the state lives with what it describes
LOCK_FILE = ".pipeline.lock"
DIGESTS_FILE = ".file-digests.json"  # in the run's artifacts_dir: file digests by path, size and mtime
def stage_fingerprint(stage: Stage, params: dict, previous: str) -> str:
    """The stage's key (:func:`moe_utils.common.fingerprint.dependency_key`): its notebook, parameters,
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
    ``force`` the time before which no cache entry or capture is reused (:mod:`moe_utils.common.fingerprint`)."""
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
    return resolve(value)


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
