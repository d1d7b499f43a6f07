"""The machinery of the bad-input corpus (tests/test_bad_inputs*.py).

Each case copies one good tree, breaks one thing in its copy (``setup``), runs one real command line in a subprocess
and compares every file of the tree before and after: the command must exit with status 2, print one line on stderr
that matches the case's message, and leave every file as it was. The subprocesses run concurrently (each spends
seconds importing torch). The commands of :data:`IN_PROCESS` (light ones, whose cases are many) run their ``main`` in
this process instead, one after the other, with stdout and stderr captured.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
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
#: ``python -m MODULE`` commands run in this process -> the module of their ``main``
IN_PROCESS = {"hsc_pyg.cli.import_captions": "hsc_pyg.cli.import_captions", "hsc_pyg.cli.vocab": "hsc_pyg.cli.vocab",
              "hsc_pyg.cli.convert": "hsc_pyg.cli.convert", "hsc_pyg.cli.synthetic": "hsc_pyg.cli.synthetic",
              "hsc_pyg.search": "hsc_pyg.cli.search", "hsc_pyg.viz": "hsc_pyg.cli.viz"}


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


def hold_lock(folder: str) -> Callable[[Path], None]:
    """Another process holds the lock of ``tree/folder`` (:class:`hsc_pyg.io.FolderLock`'s file, naming it as a
    ``sleep``) while the case runs; :func:`run_selected` stops it afterwards."""
    def setup(tree: Path) -> None:
        (tree / folder).mkdir(parents=True, exist_ok=True)
        script = ("import fcntl, json, os, sys, time; f = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                  "fcntl.flock(f, fcntl.LOCK_EX); os.write(f, json.dumps(dict(pid=os.getpid(), host='h', "
                  "command='python sleep 60', started='now')).encode()); print('ok', flush=True); time.sleep(60)")
        holder = subprocess.Popen([sys.executable, "-c", script, str(tree / folder / ".hsc_pyg.lock")],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "ok\n"
        HOLDERS.append(holder)
    return setup


HOLDERS: list[subprocess.Popen] = []


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
    argv = [fill(a, tree) for a in case.command]
    if _in_process(case):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                status = importlib.import_module(IN_PROCESS[argv[1]]).main(argv[2:])
            except SystemExit as e:
                status = e.code
        return Outcome(tree, status, err.getvalue(), before, snapshot(tree))
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return Outcome(tree, result.returncode, result.stderr, before, snapshot(tree))


def _in_process(case: Case) -> bool:
    return case.command[0] == "-m" and case.command[1] in IN_PROCESS


def run_selected(cases: list[Case], good: Path, base: Path, request) -> dict[str, Outcome]:
    """Run, concurrently, the cases that this pytest session selected of :data:`TEST_NAME`."""
    selected = {item.callspec.params["case"].name for item in request.session.items
                if getattr(item, "originalname", "") == TEST_NAME}
    chosen = [case for case in cases if case.name in selected and not _in_process(case)]
    try:
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
            outcomes = dict(zip((case.name for case in chosen),
                                pool.map(lambda case: run_case(case, good, base), chosen)))
        outcomes.update({case.name: run_case(case, good, base) for case in cases
                         if case.name in selected and _in_process(case)})
    finally:
        for holder in HOLDERS:  # the processes of hold_lock
            holder.kill()
            holder.wait()
        HOLDERS.clear()
    return outcomes


def assert_one_line_and_nothing_changed(case: Case, outcome: Outcome) -> None:
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.returncode == 2, outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, repr(outcome.stderr)
    assert re.match(r"(\S+( \S+)?: )?error: ", lines[0]), lines[0]  # ours, or argparse's for a flag's type
    assert re.search(fill(case.message, outcome.tree, escape=lambda path: re.escape(str(path))), lines[0]), lines[0]
    assert outcome.after == outcome.before
