"""persia's floors: imports point one way, down this list (docs/ARCHITECTURE.md, "Floors").

The import graph is built with ``ast`` from every module of the package, imports inside functions
and under ``TYPE_CHECKING`` included, and ``importlib.import_module("persia...")`` /
``__import__("persia...")`` with a literal name count as imports. The test fails on an import
cycle between packages or top-level modules, on an import that runs up :data:`FLOORS`, on Ray
imported outside the Ray backend and numba outside the kernel modules.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "persia"

#: The floors, bottom first; a module may import modules of its own floor or of floors below.
#: Each entry is a unit: a top-level module or a package (with everything under it).
FLOORS: list[list[str]] = [
    # leaves (``persia`` itself: the package's __init__, importing only leaves)
    [
        "persia",
        "persia.errors",
        "persia._settings",
        "persia.logger",
        "persia.hashing",
        "persia.utils",
        "persia.env",
        "persia.metrics",
        "persia.service",
        "persia.version",
        # Prometheus metrics of every role: the only importer of prometheus_client
        "persia.telemetry",
    ],
    # PERSIA's data types, optimizers, the embedding-layer spec, the YAML loaders (and the old
    # path of the loaders, persia.config)
    ["persia.embedding", "persia.config"],
    ["persia.store"],
    ["persia.rpc"],
    ["persia.worker"],
    # the runtime (and PERSIA's path of its DDP options, persia.distributed)
    ["persia.runtime", "persia.distributed"],
    ["persia.checkpoint"],
    ["persia.ctx", "persia.data"],
    ["persia.job", "persia.datasets"],
    ["persia.serving"],
    # the inference server (FastAPI, gRPC) over a served model
    ["persia.server"],
    # the Ray backend (and the old import paths of its configs, persia.cluster)
    ["persia.backends", "persia.cluster"],
    ["persia.cli"],
]

#: The one import allowed to run upward: the backend registry's lazy import of a backend by name.
UPWARD_EXCEPTION = "persia.runtime.registry"
#: Modules that import a module whose name is computed at run time: the backend registry, and
#: the job file's ``model.type: "package.module:Class"`` (the user's own model class).
DYNAMIC_IMPORTERS = {"persia.runtime.registry", "persia.job.models"}
#: The only places Ray and numba may be imported.
RAY_UNITS = ("persia.backends.ray",)
NUMBA_MODULES = {
    "persia.store.kernels.table",
    "persia.store.kernels.disk",
    "persia.store.kernels.half",
    "persia.worker.kernels",
    "persia.rpc.kernels",
    "persia.embedding.kernels",
    "persia.telemetry.kernels",
    # the ID hash is a file format and its numba kernels live with its documentation
    "persia.hashing",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _unit(module: str) -> str:
    """The floor unit a module belongs to (the longest declared prefix)."""
    best = None
    for floor in FLOORS:
        for unit in floor:
            if module == unit or module.startswith(unit + "."):
                if best is None or len(unit) > len(best):
                    best = unit
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS")
    return best


def _floor(unit: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if unit in floor)


def _imports(module: str, path: Path) -> tuple[set[str], set[str], bool]:
    """(persia modules imported, other top-level packages imported, a computed-name import)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    other: set[str] = set()
    dynamic = False

    def add(name: str) -> None:
        if name == "persia" or name.startswith("persia."):
            found.add(name)
        else:
            other.add(name.partition(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            add(name)
            for alias in node.names:
                if f"{name}.{alias.name}" in MODULES:
                    add(f"{name}.{alias.name}")
        elif isinstance(node, ast.Call):
            func = node.func
            called = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            if called in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    add(arg.value)
                else:
                    dynamic = True
    return found, other, dynamic


GRAPH: dict[str, set[str]] = {}
OTHER: dict[str, set[str]] = {}
DYNAMIC: set[str] = set()
for _name, _path in MODULES.items():
    GRAPH[_name], OTHER[_name], _dyn = _imports(_name, _path)
    if _dyn:
        DYNAMIC.add(_name)


def test_every_module_is_on_a_floor():
    for module in MODULES:
        _unit(module)


def test_no_import_runs_up_the_floors():
    upward = []
    for module, targets in GRAPH.items():
        here = _floor(_unit(module))
        for target in targets:
            there = _floor(_unit(target))
            if there > here:
                upward.append(f"{module} (floor {here}) imports {target} (floor {there})")
    assert upward == [], "imports that run up the floor order:\n" + "\n".join(sorted(upward))


def test_no_cycle_between_packages_or_top_level_modules():
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in GRAPH.items():
        a = _unit(module)
        for target in targets:
            b = _unit(target)
            if a != b and a != "persia" and b != "persia":  # every module loads persia/__init__
                edges[a].add(b)
    assert _cycles(edges) == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_cycle_between_modules():
    """Inside a package too: two modules that import each other (even inside functions) are
    one module in disguise, or a floor that was not declared."""
    edges = {m: {t for t in targets if t in MODULES and t != m} for m, targets in GRAPH.items()}
    assert _cycles(edges) == []


def test_the_registry_is_the_only_computed_import_into_persia():
    assert DYNAMIC == DYNAMIC_IMPORTERS
    from persia.runtime.registry import BACKENDS

    for name, module in BACKENDS.items():
        assert module in MODULES, f"backend {name!r}: no module {module}"
    # the registry's upward reach is exactly the declared backends
    assert _floor(_unit(UPWARD_EXCEPTION)) < _floor(_unit(BACKENDS["ray"]))


def test_ray_only_in_the_ray_backend():
    outside = sorted(
        m for m, other in OTHER.items() if "ray" in other and not m.startswith(RAY_UNITS)
    )
    assert outside == []


def test_prometheus_client_only_in_telemetry():
    outside = sorted(
        m
        for m, other in OTHER.items()
        if "prometheus_client" in other and not m.startswith("persia.telemetry")
    )
    assert outside == []


def test_numba_only_in_kernel_modules():
    assert {m for m, other in OTHER.items() if "numba" in other} <= NUMBA_MODULES


def test_the_checker_sees_what_it_should(tmp_path):
    """The graph builder finds imports inside functions, relative imports and literal
    import_module calls (else the tests above could not fail)."""
    GRAPH_CASE = tmp_path / "case.py"
    GRAPH_CASE.write_text(
        "import importlib\n"
        "def f():\n"
        "    from persia.cli import main\n"
        "    from . import errors\n"
        "    importlib.import_module('persia.serving')\n"
    )
    found, _, dynamic = _imports("persia.store.case", GRAPH_CASE)
    assert {"persia.cli", "persia.cli.main", "persia.store", "persia.serving"} <= found
    assert not dynamic


@pytest.mark.parametrize("unit", [u for floor in FLOORS for u in floor])
def test_every_declared_unit_exists(unit):
    assert unit in MODULES
