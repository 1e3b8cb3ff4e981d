"""bench/ is layered: each module imports only modules below it in the order bench/__init__.py
states, wherever the import is (module level, inside a function, under TYPE_CHECKING), so
the package has no circle; and the core, offload_skip.py, imports nothing from the harness.
Read from the source with ast: nothing here is imported."""
import ast
import graphlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
MODULES = sorted(path.stem for path in BENCH.glob("*.py") if path.stem != "__init__")


def bench_imports(source: str, modules=MODULES) -> set[str]:
    """The bench modules `source` imports anywhere in it; ``__init__`` for the package itself
    (``import bench``, or a name from ``from bench import`` / ``from . import`` that is not
    one of `modules`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level <= 1:  # `..` would leave bench/
            package = "bench" if node.level else None
            module = ".".join(filter(None, (package, node.module)))
            if module != "bench":
                names = [module]
            else:
                names = [f"bench.{alias.name}" if alias.name in modules else "bench" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "bench":
                found.add("__init__")
            elif name.startswith("bench."):
                found.add(name.split(".")[1])
    return found


def _imports_of(module: str) -> set[str]:
    return bench_imports((BENCH / f"{module}.py").read_text(encoding="utf-8"))


def _package_doc() -> str:
    return ast.get_docstring(ast.parse((BENCH / "__init__.py").read_text(encoding="utf-8")))


def _stated_layers() -> list[str]:
    """The indented ``base < hostmem < ...`` block of bench/__init__.py's docstring, lowest first."""
    chain = " ".join(re.findall(r"^ {4}(\S.*)$", _package_doc(), re.MULTILINE))
    return [name.strip() for name in chain.split("<")]


LAYERS = _stated_layers()


@pytest.mark.parametrize("source, expected", [
    ("from .schema import Result", {"schema"}),
    ("from . import fetch, layer_loading", {"fetch", "layer_loading"}),
    ("from bench.measure import Speed", {"measure"}),
    ("import bench.cli as cli", {"cli"}),
    ("from bench import Run", {"__init__"}),
    ("import bench", {"__init__"}),
    ("def f():\n    from .experiment import Run", {"experiment"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .measure import Memory", {"measure"}),
    ("import torch\nimport offload_skip\nfrom benchmarks import x\nfrom .. import y", set()),
])
def test_the_scanner_finds_every_kind_of_bench_import(source, expected):
    assert bench_imports(source, modules=("cli", "fetch", "layer_loading", "measure")) == expected


def test_the_stated_order_places_every_module_once():
    assert sorted(LAYERS) == MODULES
    described = re.findall(r"^- (\w+):", _package_doc(), re.MULTILINE)
    assert described == LAYERS, "the module list describes the modules in layer order"


@pytest.mark.parametrize("module", MODULES)
def test_a_module_imports_only_lower_layers(module):
    rank = {name: k for k, name in enumerate(LAYERS)}
    upward = sorted(m for m in _imports_of(module) if rank.get(m, len(LAYERS)) >= rank[module])
    assert not upward, f"bench/{module}.py imports {upward}, not below it in {' < '.join(LAYERS)}"


def test_the_import_graph_is_acyclic():
    graph = {module: _imports_of(module) for module in [*MODULES, "__init__"]}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        # graphlib lists each module before the one that imports it
        pytest.fail(f"bench imports in a circle: {' imports '.join(reversed(err.args[1]))}")


def test_the_core_imports_nothing_from_bench():
    assert bench_imports((REPO / "offload_skip.py").read_text(encoding="utf-8")) == set()


MAX_FUNCTION_LINES = 60  # longer ones get split where their concerns meet


@pytest.mark.parametrize("module", MODULES)
def test_no_function_is_longer_than_the_limit(module):
    tree = ast.parse((BENCH / f"{module}.py").read_text(encoding="utf-8"))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"bench/{module}.py: {long}"
