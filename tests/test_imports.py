"""The import graph of the library: no cycles (not even through function-level imports), data flows one way (``data``
-> ``nn`` -> ``engine``), no argparse and no command line module imported by a library module, and ``import hsc_pyg``
runs no command line."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hsc_pyg"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (absolute names; ``from . import x`` counts x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def is_command_line(name: str) -> bool:
    return name.startswith("hsc_pyg.cli") or name.endswith("__main__")


def test_no_import_cycle():
    edges = graph()
    # package __init__ files are reached by importing any submodule; follow only real imports
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


#: DESIGN.md's flow, files -> data -> nn -> engine -> command lines: a module of one of these packages imports none of
#: the packages after it
FLOW = ["hsc_pyg.data", "hsc_pyg.nn", "hsc_pyg.engine"]


def test_data_flows_one_way():
    def package(name: str) -> int | None:
        return next((i for i, p in enumerate(FLOW) if name == p or name.startswith(p + ".")), None)

    edges = graph()
    assert {package(name) for name in edges} >= {0, 1, 2}      # the packages are where the test looks
    against = sorted((name, target) for name, targets in edges.items() for target in targets
                     if package(name) is not None and package(target) is not None and package(target) > package(name))
    assert against == []


#: Library modules that import argparse without parsing argv: options (and config) add the flags of the dataclasses to
#: the command
#: lines' parsers; checkpoint allow-lists ``argparse.Namespace``, the type of an official checkpoint's ``opt``.
ARGPARSE_USERS = {"hsc_pyg.config", "hsc_pyg.options", "hsc_pyg.engine.checkpoint"}


def test_library_modules_import_no_argparse_and_no_command_line():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if is_command_line(name):
            continue
        bad = sorted(m for m in imports_of(path) if m == "argparse" and name not in ARGPARSE_USERS
                     or m == "sys" or is_command_line(m))
        if "parse_args(" in path.read_text():
            bad.append("parse_args()")
        if bad:
            offenders[name] = bad
    assert offenders == {}


def test_import_hsc_pyg_loads_no_command_line_module():
    code = ("import sys, hsc_pyg; bad = [m for m in sys.modules if m.startswith('hsc_pyg.cli') "
            "or m.endswith('__main__') and m.startswith('hsc_pyg')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert {"hsc_pyg.config", "hsc_pyg.registry"} <= set(graph())
