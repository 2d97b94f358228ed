"""pdkit's import graph, read from the source with ``ast`` (nothing is imported): no cycles, no vllm at import time.

What counts as an edge of the cycle graph: an ``import``/``from ... import`` of a pdkit module that runs when its
module is imported, that is, a statement at module level (in ``if``/``try``/``with`` blocks too), outside functions
and outside ``if TYPE_CHECKING:``.  Imports inside functions are left out on purpose: they run when the function is
called, after every module involved has finished importing, so they cannot deadlock an import; they are also how
pdkit defers heavy or optional dependencies (vllm, torch, ray) and breaks a dependency it needs only at call time.
``if TYPE_CHECKING:`` blocks never run.

``from pkg import name`` is an edge to ``pkg.name`` when that is a module of pdkit, else to ``pkg``; ``import a.b`` is
an edge to ``a.b`` (the parent packages' ``__init__`` also run, but they are left out: counting them would make
every package ``__init__`` that re-exports its submodules a cycle).  Relative imports are resolved against the
importing module's package.

The package's folders follow pyproject.toml's package-dir: pdkit/ is ``pdkit``, connectors/ is ``pdkit.connectors``,
kernels/ is ``pdkit.kernels``.  They are read as text only, since an installed pdkit.connectors may be another
checkout's.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# pyproject.toml [tool.setuptools] package-dir (configs/ holds no Python).
PACKAGE_DIRS = {"pdkit": ROOT / "pdkit", "pdkit.connectors": ROOT / "connectors", "pdkit.kernels": ROOT / "kernels"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module, absolute, as written (before resolving to a known module)
    names: tuple[str, ...]  # `from target import names`; () for `import target`
    line: int
    at_import_time: bool  # module level, outside functions and `if TYPE_CHECKING:`


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out: dict[str, Path] = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str) -> Iterator[Import]:
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))

    def walk(node: ast.AST, at_import_time: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, (), child.lineno, at_import_time)
            elif isinstance(child, ast.ImportFrom):
                names = tuple(a.name for a in child.names)
                yield Import(module, _absolute(module, child), names, child.lineno, at_import_time)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), at_import_time)
            else:
                yield from walk(child, at_import_time)

    yield from walk(tree, True)


ALL_IMPORTS = [imp for module in MODULES for imp in _imports(module)]


def _known(name: str) -> str | None:
    """The deepest module of the package that ``name`` names or lies in; None outside the package."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def _edges(imp: Import) -> set[str]:
    """The package's modules that one import statement loads."""
    if imp.names and imp.target in MODULES:
        subs = {f"{imp.target}.{n}" for n in imp.names}
        return {s for s in subs if s in MODULES} | ({imp.target} if subs - MODULES.keys() else set())
    known = _known(imp.target)
    return {known} if known else set()


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}, import-time imports only."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for imp in ALL_IMPORTS:
        if imp.at_import_time:
            for target in _edges(imp):
                graph[imp.module].setdefault(target, imp.line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in components:
        start = min(component)
        # Shortest path back to start inside the component (breadth first).
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in component and w not in previous:
                        previous[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append(path[::-1])
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:], strict=False)]
    return "\n    ".join(steps)


def test_the_walk_sees_the_package() -> None:
    assert {"pdkit", "pdkit.cli", "pdkit.config", "pdkit.frontend.server", "pdkit.connectors.pd_connector"} <= set(
        MODULES
    )
    graph = import_graph()
    assert "pdkit.config" in graph["pdkit.plan"]  # an absolute import
    assert any(graph[m] for m in MODULES if m.startswith("pdkit.connectors."))  # `from pdkit.connectors.x import`


def test_relative_and_submodule_imports_resolve() -> None:
    module = "pdkit.frontend.server"
    rel = ast.ImportFrom(module="registry", names=[ast.alias("Registry")], level=1)
    assert _absolute(module, rel) == "pdkit.frontend.registry"
    pkg = ast.ImportFrom(module=None, names=[ast.alias("registry")], level=2)
    assert _absolute("pdkit.frontend", pkg) == "pdkit"
    assert _edges(Import(module, "pdkit.frontend", ("registry",), 1, True)) == {"pdkit.frontend.registry"}
    assert _edges(Import(module, "pdkit.frontend.registry", ("Registry",), 1, True)) == {"pdkit.frontend.registry"}
    assert _edges(Import(module, "pdkit", ("config", "__version__"), 1, True)) == {"pdkit.config", "pdkit"}
    assert _edges(Import(module, "os.path", (), 1, True)) == set()


def test_find_cycles_names_a_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    if cycles:
        pytest.fail(
            "import cycle(s) among pdkit's modules (module-level imports; move the shared thing to the lower module, "
            "or into a small new one):\n  " + "\n  ".join(_describe(c, graph) for c in cycles)
        )


def test_pdkit_never_imports_vllm_at_import_time() -> None:
    """Design rule: nothing under pdkit/ imports vllm when imported (connectors/ is vLLM's plug-in and may).

    tests/test_kv_config.py checks the same at run time for the modules the CLI loads; this covers every module.
    """
    found = [
        f"{MODULES[imp.module].relative_to(ROOT)}:{imp.line}: {imp.target}"
        for imp in ALL_IMPORTS
        if imp.at_import_time
        and MODULES[imp.module].is_relative_to(PACKAGE_DIRS["pdkit"])
        and (imp.target == "vllm" or imp.target.startswith("vllm."))
    ]
    assert not found, "vllm imported at module level under pdkit/ (import it inside the function):\n" + "\n".join(found)
