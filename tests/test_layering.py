"""The top-level packages depend on each other in one direction only: no import cycles.

Every import counts, also the ones inside functions (a lazy import is still a dependency).
The core of ``vpp_edge/`` (presets, tokenizer, the graph spec, the precision registry, ...)
is one package. The entry points sit on top of everything and are a layer of their own:
the CLI with the subcommand modules it registers (``vpp calibrate``, ``vpp deploy``,
``vpp eval``), the Python API and the run-recording/viewing modules of ``vpp run``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vpp_edge", "training", "export", "calibrate", "runtime", "firmware_bridge", "evaluation", "deploy")
# vpp_edge modules that use the packages above the core, and the subcommand modules of the CLI.
ENTRY_POINTS = ("cli", "api", "recording", "rerun_view", "run_video")
SUBCOMMANDS = {"calibrate": "commands", "deploy": "cli", "evaluation": "commands"}
APP = "entry points"


def _node(module: str) -> str | None:
    """The package a ``vpp_edge.*`` module belongs to (None for other libraries)."""
    parts = module.split(".")
    if parts[0] != "vpp_edge":
        return None
    if len(parts) > 2 and SUBCOMMANDS.get(parts[1]) == parts[2]:
        return APP
    if len(parts) > 1 and parts[1] in PACKAGES[1:]:
        return parts[1]
    if len(parts) > 1 and parts[1] in ENTRY_POINTS:
        return APP
    return "vpp_edge"


def _file_node(package: str, path: Path) -> str:
    top = path.parent == ROOT / package
    if top and (path.stem in ENTRY_POINTS if package == "vpp_edge" else SUBCOMMANDS.get(package) == path.stem):
        return APP
    return package


def _imports(path: Path, package: str) -> list[tuple[str, int]]:
    """``vpp_edge.*`` modules imported by ``path`` (relative imports resolved), with line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    relative = path.relative_to(ROOT / package).with_suffix("").parts
    here = ["vpp_edge", *([] if package == "vpp_edge" else [package]), *relative]
    if here[-1] == "__init__":
        here = here[:-1] + ["__init__"]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:-node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]  # from vpp_edge import export
    return found


def dependencies() -> dict[tuple[str, str], list[str]]:
    """(package, package it imports) -> the import sites."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = _file_node(package, path)
            for module, line in _imports(path, package):
                target = _node(module)
                if target and target != source:
                    edges.setdefault((source, target), []).append(f"{path.relative_to(ROOT)}:{line} {module}")
    return edges


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one package (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_top_level_packages_import_each_other_without_cycles():
    edges = dependencies()
    assert ("export", "runtime") in edges and ("calibrate", "export") in edges  # the walk sees real imports
    found = cycles(edges)
    details = [f"{' <-> '.join(group)}: " + "; ".join(
        f"{a} -> {b} ({edges[(a, b)][0]})" for a in group for b in group if (a, b) in edges) for group in found]
    assert not found, "import cycles between top-level packages:\n" + "\n".join(details)


def test_the_cycle_check_catches_a_cycle():
    edges = {("export", "runtime"): ["x"], ("runtime", "export"): ["y"], ("calibrate", "export"): ["z"]}
    assert cycles(edges) == [["export", "runtime"]]
    assert cycles({("a", "b"): ["x"], ("b", "c"): ["y"]}) == []


@pytest.mark.parametrize("module", ["vpp_edge.precisions", "vpp_edge.graph_spec", "vpp_edge.runtime.manifest"])
def test_shared_specs_need_the_standard_library_only(module):
    """The precision registry, the graph spec and the manifest schema are read by the robot
    side and the stdlib-only deploy agent: importing them loads no third-party package."""
    code = (f"import sys; before = set(sys.modules); import {module}; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['vpp_edge']"
