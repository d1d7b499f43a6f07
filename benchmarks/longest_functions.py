"""The longest functions of the library, by lines from ``def`` to the last line of the body (the issue's "longest
library function under 80 lines" is checked with this).

    python benchmarks/longest_functions.py [--top 10] [--package hsc_pyg]
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def function_lengths(package: Path) -> list[tuple[int, str]]:
    """``(lines, "path:line name")`` of every function and method under ``package``, longest first."""
    rows = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--package", default="hsc_pyg")
    args = parser.parse_args()
    for lines, where in function_lengths(ROOT / args.package)[:args.top]:
        print(f"{lines:4d}  {where}")
