"""The house rules, enforced: layers (import-linter), no import cycle, module and function sizes, and
every third-party import declared.

Each rule is a function over a source tree, run on ``antidote_pl/`` and, to show it can fail, on a
small tree written to ``tmp_path`` that breaks it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import REPO

PACKAGE = "antidote_pl"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
LINT = (
    "from importlinter.cli import lint_imports; raise SystemExit(lint_imports(no_cache=True, no_logo=True))"
)


# --------------------------------------------------------------------------- the checks
def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Runs import-linter with the contracts in ``root``'s pyproject.toml, on the package in ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(node: ast.AST, name: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        parent = name.split(".") if is_package else name.split(".")[:-1]
        parent = parent[: len(parent) - node.level + 1]
        base = ".".join([*parent, base] if base else parent)
    # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod.
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside a function."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported(node, name, is_package, modules):
                while target and target not in modules:  # an attribute of a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's cycles: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_modules(root: Path, package: str, limit: int = MAX_MODULE_LINES) -> list[str]:
    """``path: lines`` of every module over ``limit`` lines."""
    out = []
    for path in module_files(root, package).values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            out.append(f"{path.relative_to(root)}: {lines}")
    return out


def long_functions(root: Path, package: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name: lines`` of every function or method over ``limit`` lines (decorators
    excluded: a decorated function's ``lineno`` is its ``def`` line)."""
    out = []
    for path in module_files(root, package).values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {lines}")
    return out


def third_party_imports(root: Path, package: str) -> set[str]:
    """Top-level names of every module the package imports from outside itself and the stdlib."""
    names = set()
    for path in module_files(root, package).values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n != package and n not in sys.stdlib_module_names and n != "__future__"}


def _distribution(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def undeclared(imports: set[str], dependencies: list[str]) -> list[str]:
    """Imported top-level names whose installed distribution is not in ``dependencies``."""
    declared = {_distribution(r) for r in dependencies}
    owners = importlib.metadata.packages_distributions()
    out = []
    for name in sorted(imports):
        dists = {d.lower().replace("_", "-") for d in owners.get(name, [name])}
        if not dists & declared:
            out.append(f"{name} (from {', '.join(sorted(dists))})")
    return out


# --------------------------------------------------------------------------- the rules, on antidote_pl
def test_layers_contract_is_kept():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_no_import_cycle():
    graph = import_graph(REPO, PACKAGE)
    assert sum(len(v) for v in graph.values()) > 100  # the graph really is the package's
    assert import_cycles(graph) == []


def test_no_module_over_600_lines():
    assert long_modules(REPO, PACKAGE) == []


def test_no_function_over_60_lines():
    assert long_functions(REPO, PACKAGE) == []


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    imports = third_party_imports(REPO, PACKAGE)
    assert {"torch", "lightning", "yaml", "numpy"} <= imports
    assert undeclared(imports, project["dependencies"]) == []


def test_ci_installs_import_linter():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(_distribution(r) == "import-linter" for r in project["optional-dependencies"]["dev"])
    assert 'pip install -q -e ".[dev]"' in (REPO / ".ci" / "run").read_text()


# --------------------------------------------------------------------------- each rule can fail
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


BROKEN_LAYERS = """
[tool.importlinter]
root_package = "toy"

[[tool.importlinter.contracts]]
name = "layers"
type = "layers"
containers = ["toy"]
layers = ["high", "low"]
"""


def test_layers_check_fails_on_an_upward_import(tmp_path):
    root = _write(
        tmp_path,
        {
            "pyproject.toml": BROKEN_LAYERS,
            "toy/__init__.py": "",
            "toy/high.py": "X = 1\n",
            "toy/low.py": "def f():\n    from toy.high import X\n    return X\n",
        },
    )
    proc = lint_imports(root)
    assert proc.returncode == 1 and "BROKEN" in proc.stdout, proc.stdout + proc.stderr
    (root / "toy" / "low.py").write_text("X = 2\n")
    assert lint_imports(root).returncode == 0


def test_cycle_check_finds_module_and_function_level_cycles(tmp_path):
    root = _write(
        tmp_path,
        {
            "toy/__init__.py": "",
            "toy/a.py": "from toy import b\n",
            "toy/b.py": "def f():\n    from toy.c import g\n    return g\n",
            "toy/c.py": "import toy.a\n",
            "toy/d.py": "from . import a\nfrom .sub.e import h\n",
            "toy/sub/__init__.py": "",
            "toy/sub/e.py": "from ..d import x\nh = 1\n",
        },
    )
    graph = import_graph(root, "toy")
    assert graph["toy.b"] == {"toy.c"} and graph["toy.d"] == {"toy.a", "toy.sub.e"}
    assert import_cycles(graph) == [["toy.a", "toy.b", "toy.c"], ["toy.d", "toy.sub.e"]]
    (root / "toy" / "c.py").write_text("X = 1\n")
    (root / "toy" / "sub" / "e.py").write_text("h = 1\n")
    assert import_cycles(import_graph(root, "toy")) == []


def test_size_checks_fail_on_a_long_module_and_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    shorter = "\n".join(f"    x{i} = {i}" for i in range(59))
    root = _write(
        tmp_path,
        {
            "toy/__init__.py": "",
            "toy/long.py": "\n" * 601,
            # 61 lines from `def` to its last line (the decorator not counted); `short` has 60.
            "toy/f.py": f"@decorated\ndef long():\n{body}\n\n\ndef short():\n{shorter}\n",
        },
    )
    assert long_modules(root, "toy") == ["toy/long.py: 601"]
    assert long_functions(root, "toy") == ["toy/f.py:2 long: 61"]


@pytest.mark.parametrize(
    ("dependencies", "missing"), [(["torch>=2"], ["yaml (from pyyaml)"]), (["PyYAML>=6"], [])]
)
def test_dependency_check_finds_an_undeclared_import(tmp_path, dependencies, missing):
    root = _write(
        tmp_path,
        {"toy/__init__.py": "import os\nimport torch\nfrom toy import x\n", "toy/x.py": "import yaml\n"},
    )
    assert third_party_imports(root, "toy") == {"torch", "yaml"}
    assert undeclared({"yaml"}, dependencies) == missing
