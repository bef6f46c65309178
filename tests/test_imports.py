"""The package's shape: every module imports alone in a fresh interpreter, and imports run one way (no cycle, at
module level or inside functions)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
from pathlib import Path

import batchrun
from tests.conftest import PYTHON, ROOT, cli_env

MODULES = sorted(m.name for m in pkgutil.walk_packages(batchrun.__path__, "batchrun."))


def test_every_module_imports_alone():
    procs = {m: subprocess.Popen([PYTHON, "-c", f"import {m}"], cwd=ROOT, env=cli_env(), stderr=subprocess.PIPE,
                                 text=True) for m in MODULES}
    failed = {m: p.communicate(timeout=300)[1].strip().splitlines()[-1:] for m, p in procs.items()
              if p.wait(timeout=300) != 0}
    assert not failed, failed


def imports_of(module: str) -> set[str]:
    """The batchrun modules a module imports, at any level (a function-level import that dodges a cycle is one)."""
    path = Path(batchrun.__file__).parent.joinpath(*module.split(".")[1:])
    source = (path / "__init__.py") if path.is_dir() else path.with_suffix(".py")
    out = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batchrun"):
            for alias in node.names:  # `from batchrun.engines import hf` names a module; otherwise the package
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("batchrun")}
    return out - {module}


def test_imports_form_no_cycle():
    graph = {m: imports_of(m) & set(MODULES) for m in MODULES}
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m)
    assert graph["batchrun.engines.hf"] >= {"batchrun.engines.hf_tp", "batchrun.engines.hf_backend"}
