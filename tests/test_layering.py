"""The layers of the package: plain types at the bottom, and the trace, prompting and policies
above them without the backends; no import cycle among the modules.

The import graph is read from the source with `ast`: an import at module level runs when the
module is imported (*eager*), one inside a function runs when it is called (*lazy*), one under
``if TYPE_CHECKING:`` never runs. Importing ``a.b.c`` also runs the ``__init__`` of ``a.b``; the
top-level ``collab_agent/__init__.py`` is left out, as it is the facade that re-exports every
layer. A subprocess checks the same at run time, with that facade skipped.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = "collab_agent"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

CORE_LAYERS = {
    "collab_agent.core.trace": "data",
    "collab_agent.core.formats": "data",
    "collab_agent.core.config": "data",
    "collab_agent.core.streaming": "loop",
    "collab_agent.core.context": "loop",
    "collab_agent.core.session": "loop",
    "collab_agent.core.reasoner": "loop",
}
"""The step loop's package in two layers: plain data (the trace, the reasoning formats and the
settings) below the policies, which read them; the loop (reasoner, session, context check,
streamed reveal) above the policies and the backends, which it drives."""

OLD_PATHS = ("reasoner", "session", "trace", "context", "streaming", "prompting", "splitting")
"""Top-level modules that moved into `core` and stay as re-export shims."""

LOWER_LAYERS = (
    "collab_agent.types",
    "collab_agent.trace",
    "collab_agent.prompting",
    *(m for m, layer in CORE_LAYERS.items() if layer == "data"),
)
"""Modules that must load without the backends layer (and every module of `policies`)."""

TYPES_MAY_IMPORT = {"collab_agent.types", "collab_agent._checks", "collab_agent.errors"}

KNOWN_CYCLES: list[set[str]] = []
"""Cycles (through lazy imports) still to break; a cycle that is not listed fails the test."""

FOUNDATION = ("collab_agent.types", "collab_agent.backends", "collab_agent.cache")
"""Modules (and packages) that must not reach the adapters above them."""

FORBIDDEN = ("langchain", "langgraph", "collab_agent.chat_model", "collab_agent.evaluation",
             "collab_agent.cli", "collab_agent.calibrate_cli", "collab_agent.langchain",
             "collab_agent.core.reasoner", "collab_agent.core.session",
             "collab_agent.reasoner", "collab_agent.session")  # fmt: skip
"""What the foundation may not import, eagerly or lazily, directly or through our modules: the
adapters and the step loop."""

LOOP_FORBIDDEN = tuple(f for f in FORBIDDEN if not f.startswith(("collab_agent.core",
                       "collab_agent.reasoner", "collab_agent.session")))  # fmt: skip
"""What the step loop (every module of `core`) may not import: the adapters above it."""

KNOWN_FORBIDDEN: set[tuple[str, str]] = set()
"""Forbidden edges still to remove, as ``(our module, what it imports)``."""

KNOWN_PACKAGE_CYCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@functools.cache
def _imports(module: str) -> list[tuple[str, str]]:
    """``(imported module, "eager" | "lazy")`` for each of our modules ``module`` imports."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[tuple[str, str]] = []

    def targets(node: ast.Import | ast.ImportFrom) -> Iterable[str]:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
            return
        base = node.module or ""
        if node.level:
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        for alias in node.names:
            name = f"{base}.{alias.name}"
            yield name if name in MODULES else base

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.orelse:
                    visit_one(statement, kind)
                continue
            visit_one(child, kind)

    def visit_one(node: ast.AST, kind: str) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.extend((t, kind) for t in targets(node) if t.split(".")[0] == PACKAGE)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(node, "lazy")
        else:
            visit(node, kind)

    visit(ast.parse(path.read_text(encoding="utf-8")), "eager")
    return found


def _graph(kinds: set[str], with_packages: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        for target, kind in _imports(module):
            if kind not in kinds or target not in MODULES or target == module:
                continue
            graph[module].add(target)
            if with_packages:  # importing a.b.c runs a.b's __init__ (the facade excepted)
                parts = target.split(".")
                graph[module].update(
                    ".".join(parts[:i])
                    for i in range(2, len(parts))
                    if ".".join(parts[:i]) != module
                )
    return graph


def _loaded_by(module: str, graph: dict[str, set[str]]) -> dict[str, str]:
    """Every module importing ``module`` loads, each with the module that imports it."""
    parent = {module: ""}
    todo = [module]
    while todo:
        current = todo.pop()
        for target in graph.get(current, ()):
            if target not in parent:
                parent[target] = current
                todo.append(target)
    return parent


def _chain(module: str, parent: dict[str, str]) -> str:
    chain = [module]
    while parent[chain[-1]]:
        chain.append(parent[chain[-1]])
    return " <- ".join(chain)


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                cycles.append(component)

    for module in sorted(set(graph).union(*graph.values())):
        if module not in index:
            connect(module)
    return cycles


LOWER = [*LOWER_LAYERS, *sorted(m for m in MODULES if m.split(".")[:2] == [PACKAGE, "policies"])]


def test_the_import_graph_is_read() -> None:
    eager = _graph({"eager"}, with_packages=True)
    assert "collab_agent.types" in eager["collab_agent.backends.base"]
    assert "collab_agent.backends" in eager["collab_agent.backends.local"]  # the package's init
    assert "collab_agent.policies.files" in eager["collab_agent.policies.registry"]


def _all_imports(module: str) -> set[str]:
    """Every module ``module`` names in an import statement (ours and third-party), eager or
    lazy, except under ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.orelse:
                    visit(statement)
            elif isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                found.add(child.module)
            else:
                visit(child)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")))
    return found | {target for target, _ in _imports(module)}


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m == FOUNDATION[0] or m.startswith(FOUNDATION[1:]))
)
def test_the_foundation_imports_no_adapter(module: str) -> None:
    loaded = _loaded_by(module, _graph({"eager", "lazy"}, with_packages=True))
    bad = [
        f"{name} <- {_chain(reached, loaded)}"
        for reached in loaded
        for name in sorted(_all_imports(reached))
        if (name.split(".")[0] in FORBIDDEN or name.startswith(FORBIDDEN))
        and (reached, name) not in KNOWN_FORBIDDEN
    ]
    assert bad == []


def test_the_forbidden_edge_check_reads_eager_and_lazy_imports() -> None:
    assert "langchain_core.exceptions" in _all_imports("collab_agent.langchain.errors")  # eager
    lazy = _all_imports("collab_agent.langchain.chat_model")  # in with_structured_output
    assert "langchain_core.output_parsers" in lazy


def test_types_import_only_the_errors_and_the_argument_checks() -> None:
    loaded = _loaded_by("collab_agent.types", _graph({"eager"}, with_packages=True))
    assert set(loaded) <= TYPES_MAY_IMPORT, sorted(set(loaded) - TYPES_MAY_IMPORT)


@pytest.mark.parametrize("module", LOWER)
def test_lower_layers_load_without_the_backends(module: str) -> None:
    loaded = _loaded_by(module, _graph({"eager"}, with_packages=True))
    backends = [m for m in loaded if m.startswith("collab_agent.backends")]
    assert not backends, [_chain(m, loaded) for m in backends]


def test_lower_layers_load_without_the_backends_at_run_time() -> None:
    code = (
        "import importlib, json, sys, types\n"
        f"facade = types.ModuleType({PACKAGE!r}); facade.__path__ = [{str(ROOT)!r}]\n"
        f"sys.modules[{PACKAGE!r}] = facade\n"
        f"for name in {LOWER!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = json.loads(result.stdout)
    assert "collab_agent.policies.registry" in loaded
    assert [m for m in loaded if m.startswith("collab_agent.backends")] == []


def _package_of(module: str) -> str:
    """The top-level module or subpackage ``module`` belongs to; `core`'s two layers count as
    two packages (``collab_agent.core:data``, ``collab_agent.core:loop``)."""
    if module in CORE_LAYERS:
        return f"collab_agent.core:{CORE_LAYERS[module]}"
    return ".".join(module.split(".")[:2])


def _by_package(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between the top-level modules and subpackages (``collab_agent.policies``...)."""
    collapsed: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        source = _package_of(module)
        collapsed[source].update(_package_of(t) for t in targets)
        collapsed[source].discard(source)
    return collapsed


def test_every_core_module_has_a_layer() -> None:
    assert sorted(m for m in MODULES if m.startswith("collab_agent.core.")) == sorted(CORE_LAYERS)


@pytest.mark.parametrize("module", sorted(CORE_LAYERS))
def test_the_step_loop_imports_no_adapter(module: str) -> None:
    loaded = _loaded_by(module, _graph({"eager", "lazy"}, with_packages=True))
    bad = [
        f"{name} <- {_chain(reached, loaded)}"
        for reached in loaded
        for name in sorted(_all_imports(reached))
        if (name.split(".")[0] in LOOP_FORBIDDEN or name.startswith(LOOP_FORBIDDEN))
        and (reached, name) not in KNOWN_FORBIDDEN
    ]
    assert bad == []


def test_the_policies_sit_between_the_core_data_and_the_loop() -> None:
    packages = _by_package(_graph({"eager", "lazy"}, with_packages=False))
    assert "collab_agent.core:data" in packages["collab_agent.policies"]
    assert "collab_agent.policies" in packages["collab_agent.core:loop"]
    assert "collab_agent.core:loop" not in packages["collab_agent.core:data"]
    # eager only: the splitter reads the bundled models' metadata when it is called
    eager = _by_package(_graph({"eager"}, with_packages=False))
    assert not eager["collab_agent.core:data"] & {
        "collab_agent.policies",
        "collab_agent.backends",
        "collab_agent.core:loop",
    }


@pytest.mark.parametrize("old", OLD_PATHS)
def test_the_moved_modules_are_shims_of_core(old: str) -> None:
    """The old paths import only their `core` module, so they can never drift from it."""
    assert {t for t, _ in _imports(f"collab_agent.{old}")} <= {
        f"collab_agent.core.{old}",
        "collab_agent.core.formats",
    }


def test_no_new_import_cycle_between_modules() -> None:
    cycles = _cycles(_graph({"eager", "lazy"}, with_packages=False))
    assert [c for c in cycles if c not in KNOWN_CYCLES] == []


def test_no_new_import_cycle_between_packages() -> None:
    cycles = _cycles(_by_package(_graph({"eager", "lazy"}, with_packages=False)))
    assert [c for c in cycles if c not in KNOWN_PACKAGE_CYCLES] == []
    # the cycles this layout broke: policies <-> calibration, report <-> runner
    assert not any({"collab_agent.policies", "collab_agent.calibration"} <= c for c in cycles)
    module_cycles = _cycles(_graph({"eager", "lazy"}, with_packages=False))
    assert not any("collab_agent.evaluation.report" in c for c in module_cycles)
