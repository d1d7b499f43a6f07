"""The machinery of the bad-input corpus (tests/test_bad_inputs*.py).

Each case copies one good tree, breaks one thing in its copy (``setup``), runs one real command line in a subprocess
and compares every file of the tree before and after: the command must exit with status 2, print one line on stderr
that matches the case's message, and leave every file as it was. The subprocesses run concurrently (each spends
seconds importing torch).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TEST_NAME = "test_bad_input_exits_2_with_one_line_and_changes_nothing"


@dataclass(frozen=True)
class Case:
    name: str
    command: list[str]  # after "python"; {tree}, {data}, {ckpt} and {out} are filled in
    message: str  # a regular expression the error line must match
    setup: Callable[[Path], None] | None = None


@dataclass
class Outcome:
    tree: Path
    returncode: int
    stderr: str
    before: dict[str, str]
    after: dict[str, str]


def write(name: str, content: bytes | Callable[[Path], bytes]):
    """A setup that writes ``tree/name`` (``content`` may be computed from the tree)."""
    def setup(tree: Path) -> None:
        (tree / name).write_bytes(content(tree) if callable(content) else content)
    return setup


def snapshot(tree: Path) -> dict[str, str]:
    """Every file under ``tree`` -> the SHA-256 of its bytes."""
    return {str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tree.rglob("*")) if p.is_file()}


def slug(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


def fill(text: str, tree: Path, escape=lambda path: str(path)) -> str:
    return text.format(tree=escape(tree), data=escape(tree / "data"), ckpt=escape(tree / "model.pth"),
                       out=escape(tree / "out"))


def run_case(case: Case, good: Path, base: Path) -> Outcome:
    tree = base / slug(case.name)
    shutil.copytree(good, tree)
    if case.setup is not None:
        case.setup(tree)
    before = snapshot(tree)
    result = subprocess.run([sys.executable, *(fill(a, tree) for a in case.command)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    return Outcome(tree, result.returncode, result.stderr, before, snapshot(tree))


def run_selected(cases: list[Case], good: Path, base: Path, request) -> dict[str, Outcome]:
    """Run, concurrently, the cases that this pytest session selected of :data:`TEST_NAME`."""
    selected = {item.callspec.params["case"].name for item in request.session.items
                if getattr(item, "originalname", "") == TEST_NAME}
    chosen = [case for case in cases if case.name in selected]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return dict(zip((case.name for case in chosen), pool.map(lambda case: run_case(case, good, base), chosen)))


def assert_one_line_and_nothing_changed(case: Case, outcome: Outcome) -> None:
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.returncode == 2, outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("error: ")
    assert re.search(fill(case.message, outcome.tree, escape=lambda path: re.escape(str(path))), lines[0]), lines[0]
    assert outcome.after == outcome.before
