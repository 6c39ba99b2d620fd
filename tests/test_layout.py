"""The package's layout: no import cycles, imports at the top, one glue module per notebook, and the
old flat module names still working (:mod:`moe_utils.moved`)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from moe_utils import moved

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moe_utils"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _imports(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported package module, statement, at module level) for every import of ``moe_utils`` in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from a.b import c": the module a.b.c when c is one, else a.b
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names]
        for target in targets:
            if target.startswith("moe_utils"):
                found.append((target, node, id(node) in top))
    return found


def _graph(*, top_only: bool) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {t for t, _, at_top in _imports(path) if (at_top or not top_only) and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    """Counting imports inside functions too: a cycle hidden in a function is still a cycle of concerns.
    The package roots are left out: ``moe_utils/__init__`` re-exports load_model, so every module
    'imports' it, and the old-name aliases point into every subpackage."""
    graph = _graph(top_only=False)
    graph = {k: {t for t in v if t not in ("moe_utils", "moe_utils.moved")}
             for k, v in graph.items() if k not in ("moe_utils", "moe_utils.moved")}
    assert _cycles(graph) == []


def test_imports_of_the_package_sit_at_the_top_or_say_why():
    """An import of a package module inside a function carries a comment on its line saying why."""
    hidden = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, node, at_top in _imports(path):
            if not at_top and "#" not in lines[node.lineno - 1]:
                hidden.append(f"{name}:{node.lineno} imports {target}")
    assert hidden == []


def test_every_stage_notebook_has_its_glue_module_under_its_name():
    from moe_utils.stages import STAGES

    glue = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__"}
    named = {stage.split("_", 1)[1] for stage in STAGES}
    assert glue <= named, f"glue modules not named after a notebook: {sorted(glue - named)}"
    for stage in STAGES:
        notebook = (ROOT / "notebooks" / f"{stage}.py").read_text()
        module = f"moe_utils.stages.{stage.split('_', 1)[1]}"
        if module in MODULES:
            leaf = module.rsplit(".", 1)[1]
            assert (f"from moe_utils.stages import {leaf}" in notebook
                    or f"import {module}" in notebook or f"from {module} import" in notebook
                    or "from moe_utils.stages import" in notebook and f" {leaf}" in notebook), stage


def test_glue_modules_never_display():
    """The notebooks display; the glue returns tables, figures and Markdown."""
    for path in (PACKAGE / "stages").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "display" not in names | imported, path.name
        assert not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("IPython")
                       for n in ast.walk(tree)), path.name


@pytest.mark.parametrize("old", sorted(moved.MOVED))
def test_old_module_names_still_work(old):
    """``from moe_utils import <old>`` and ``import moe_utils.<old>`` give the moved module (or, for a
    name a package took, a package that forwards the old module's names)."""
    target = importlib.import_module(moved.MOVED[old])
    module = importlib.import_module(f"moe_utils.{old}")
    if f"moe_utils.{old}" in moved.FORWARDED:
        public = [n for n in vars(target) if not n.startswith("_")
                  and getattr(getattr(target, n), "__module__", None) == target.__name__]
        assert public and all(getattr(module, n) is getattr(target, n) for n in public)
    else:
        assert module is target
    assert getattr(importlib.import_module("moe_utils"), old) is module


def test_old_names_work_in_a_fresh_interpreter():
    """The import forms external code uses, each in a new process (nothing imported before)."""
    code = ("from moe_utils import hsdl, pruning_stage\n"
            "import moe_utils.store\n"
            "from moe_utils.models import load_model\n"
            "from moe_utils.hsdl import HSDL\n"
            "import moe_utils.patterns.hsdl as new, moe_utils.stages.pruning as glue\n"
            "assert hsdl is new and HSDL is new.HSDL and pruning_stage is glue\n"
            "assert moe_utils.store.__name__ == 'moe_utils.capture.store'\n"
            "from moe_utils.patterns import atom_table\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_unknown_names_still_fail():
    with pytest.raises(ImportError):
        importlib.import_module("moe_utils.no_such_module")
    with pytest.raises(AttributeError):
        importlib.import_module("moe_utils.models").no_such_name


def test_the_package_data_ships():
    """The files beside the modules are declared in pyproject's package-data (so a wheel has them)."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moe_utils"]
    data = [p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts]
    assert data
    for path in data:
        relative = path.relative_to(PACKAGE)
        assert any(relative.match(pattern) for pattern in declared), relative


def test_one_list_of_data_variables():
    """Every data location variable is spelled once, in moe_utils/common/data_env.py, and the Makefile
    exports exactly those."""
    import re

    from moe_utils.common.data_env import DATA_ENV

    spelled = {}
    for name, path in MODULES.items():
        for literal in re.findall(r"[\"'](MOE_[A-Z_]+_DIR)[\"']", path.read_text()):
            spelled.setdefault(literal, []).append(name)
    assert spelled == {v: ["moe_utils.common.data_env"] for v in DATA_ENV}
    exported = re.findall(r"^export (MOE_[A-Z_]+_DIR)\b", (ROOT / "Makefile").read_text(), re.M)
    assert sorted(exported) == sorted(DATA_ENV)


def test_notebooks_read_no_path_relative_to_the_working_directory(tmp_path, monkeypatch):
    """Outside their parameters cell, notebooks spell no project path; the package resolves them from
    the project root (moe_utils.common.project), so a notebook run from elsewhere reads the same files."""
    import re

    from moe_utils.common import project
    from moe_utils.stages import hsdl as hsdl_glue, stage_paths

    for path in sorted((ROOT / "notebooks").glob("0*.py")):
        cells = path.read_text().split("# %%")
        code = [c for c in cells if not c.startswith(" [markdown]") and 'tags=["parameters"]' not in c.splitlines()[0]]
        lines = [line for cell in code for line in cell.splitlines() if not line.lstrip().startswith("#")]
        spelled = [line for line in lines if re.search(r"[\"'](bench|params|book|notebooks|artifacts)/", line)]
        assert spelled == [], path.name
    monkeypatch.chdir(tmp_path)
    assert stage_paths("artifacts/x").root == project.ROOT / "artifacts" / "x"
    assert stage_paths(tmp_path).root == tmp_path
    assert (hsdl_glue.benchmark() is None) == (not (project.BENCH_RESULTS / "hsdl.json").is_file())
