"""The package's layering, checked without MPI: pure modules stay light, no import cycles, small files.

- ``PURE`` names the packages and modules that must import without mpi4py, Horovod or click: a
  subprocess blocks those three and imports ``hvdhybrid`` and every module of ``PURE``.
- The intra-package import graph (module-level and function-level imports, not ``if TYPE_CHECKING:``)
  has no cycle. Lazy exports are not edges: a folder's ``__init__`` maps names to submodules as
  strings (``_lazy.exports``), so it is a leaf for them, and a submodule's import of its own package's
  ``__init__`` is left out.
- No module is over ``MAX_LINES`` lines unless its docstring says why ("over 350 lines").
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from collections import deque
from pathlib import Path

# Packages (every module under them) and modules that must not import mpi4py, Horovod or click.
PURE = ["hvdhybrid.layout", "hvdhybrid.errors", "hvdhybrid.config"]
# Entries of PURE that may not exist (yet); any other entry must name a package or a module.
PURE_OPTIONAL = {"hvdhybrid.config"}
HEAVY = ("mpi4py", "horovod", "click")

MAX_LINES = 350
SIZE_EXCUSE = "over 350 lines"

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "hvdhybrid"
PACKAGE_DIR = ROOT / PACKAGE


# ---------------------------------------------------------------------------------------------
# 1. Pure modules import nothing heavy

_BLOCKING_IMPORTER = r"""
import importlib
import importlib.abc
import json
import sys
import traceback

HEAVY = tuple(json.loads(sys.argv[2]))
preloaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
if preloaded:
    sys.exit(f"already imported before hvdhybrid (by the environment): {preloaded}")
attempts = []


class BlockHeavy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            chain = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                     if "hvdhybrid" in f.filename]
            attempts.append([name, chain])
            raise ImportError(f"blocked by test_layers: import of {name}")
        return None


sys.meta_path.insert(0, BlockHeavy())
import hvdhybrid  # noqa: E402,F401

for module in json.loads(sys.argv[1]):
    importlib.import_module(module)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({"attempts": attempts, "loaded": loaded}))
"""


def _module_path(name: str) -> Path:
    return ROOT.joinpath(*name.split("."))


def _walk(package: str, directory: Path) -> list[str]:
    """``package`` and every module below it, found from the files (nothing is imported)."""
    names = [package]
    for info in pkgutil.iter_modules([str(directory)]):
        child = f"{package}.{info.name}"
        if info.ispkg:
            names += _walk(child, directory / info.name)
        else:
            names.append(child)
    return names


def pure_modules() -> list[str]:
    names: list[str] = []
    for entry in PURE:
        path = _module_path(entry)
        if (path / "__init__.py").is_file():
            names += _walk(entry, path)
        elif path.with_suffix(".py").is_file():
            names.append(entry)
        else:
            assert entry in PURE_OPTIONAL, f"PURE names {entry}, which is neither a package nor a module"
    return names


def test_pure_modules_import_nothing_heavy():
    modules = pure_modules()
    assert "hvdhybrid.layout.topology" in modules, modules  # the walk found the folder's files
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKING_IMPORTER, json.dumps(modules), json.dumps(HEAVY)],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"importing hvdhybrid and {modules} with {HEAVY} blocked failed "
        f"(the traceback shows the import chain):\n{proc.stderr}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["loaded"], f"heavy modules in sys.modules: {report['loaded']}"
    # An import that was tried and caught (try/except ImportError) would load the module where it
    # is installed: that is heavy too.
    assert not report["attempts"], "heavy imports tried (module, hvdhybrid frames):\n" + "\n".join(
        f"{name}: {' <- '.join(reversed(chain))}" for name, chain in report["attempts"])


# ---------------------------------------------------------------------------------------------
# 2. No import cycle


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name; a package's name stands for its ``__init__``."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST):
    """Every import statement below ``node``, at any depth, except in ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    yield stmt
                else:
                    yield from _import_nodes(stmt)
        else:
            yield from _import_nodes(child)


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (``a.b.Name`` -> ``a.b``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_edges(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(module imported, line) for every intra-package import of module ``name``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    edges = []
    for node in _import_nodes(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base_parts = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import a`: a submodule of pkg when there is one, else a name in pkg.
                sub = f"{base}.{alias.name}"
                targets.append(sub if alias.name != "*" and sub in modules else base)
        for target in targets:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            module = _known_prefix(target, modules)
            if module is None or module == name:
                continue
            if modules[module].name == "__init__.py" and name.startswith(module + "."):
                continue  # a submodule importing its own package: how lazy exports work
            edges.append((module, node.lineno))
    return edges


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}."""
    modules = package_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        graph[name] = {}
        for target, line in import_edges(name, path, modules):
            graph[name].setdefault(target, line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _shortest_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node]):
            if succ not in members:
                continue
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if succ not in previous:
                previous[succ] = node
                queue.append(succ)
    return component


def test_no_import_cycle():
    graph = import_graph()
    assert "hvdhybrid.layout.topology" in graph
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    lines = []
    for component in cycles:
        example = _shortest_cycle(graph, component)
        steps = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(example, example[1:]))
        lines.append(f"{len(component)} modules: {', '.join(component)}; e.g. {steps} -> {example[-1]}")
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 3. Module size


def test_module_size():
    oversized = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        count = len(text.splitlines())
        if count <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text, filename=str(path))) or ""
        if SIZE_EXCUSE in " ".join(doc.split()).lower():
            continue
        oversized.append(f"{path.relative_to(ROOT)}: {count} lines")
    assert not oversized, (
        f"{len(oversized)} module(s) over {MAX_LINES} lines (split them, or say in the module docstring "
        f"why it is '{SIZE_EXCUSE}'):\n" + "\n".join(oversized))


# One door to each outside system: Horovod only through comm/horovod_ops, click only in the CLI.
DOORS = {"horovod": ("hvdhybrid.comm.horovod_ops",), "click": ("hvdhybrid.cli.",)}


def test_one_door_to_horovod_and_click():
    """Was: compression.py imported horovod.torch past hvd.py, and errors.py imported click."""
    bad = []
    for name, path in package_modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _import_nodes(tree):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if node.level == 0 else [])
            for target in targets:
                top = target.split(".")[0]
                allowed = DOORS.get(top)
                if allowed and not any(name == a or name.startswith(a) for a in allowed):
                    bad.append(f"{name} (line {node.lineno}) imports {target}")
    assert not bad, "\n".join(bad)
