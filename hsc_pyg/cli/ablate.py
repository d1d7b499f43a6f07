"""``hsc-pyg ablate`` (also ``python -m hsc_pyg.ablate``): train a grid of configurations x seeds, evaluate each
best-dev model on the test split, and write the study as JSON, a Markdown table and a bar plot.

    hsc-pyg ablate --grid configs/studies/layers_f8k.json --out runs/layers \\
        --results benchmarks/results/ablation.json

The grid file (JSON)::

    {
      "recipe": "configs/flickr8k_mini.json",          # the training --config every run starts from
      "data_path": "../shared/data", "data_name": "flickr8k_mini_precomp",
      "seeds": [0, 1, 2],
      "baseline": "hsc",                                # the row the others are compared with (default: the first)
      "common": {"num_epochs": 10},                      # options for every configuration (optional)
      "configs": {"hsc": {}, "sgraf_saf": {"preset": "sgraf_saf"}},
      "axes": {"img_gnn": ["gat", "gcn"], "img_edges": ["full", "knn:8"]},   # optional: their product is added
      "ensembles": {"hsc+sgraf_saf": ["hsc", "sgraf_saf"]},                # optional: scores averaged
      "evaluate": {"split": "test", "rerank_k": [10, 20]}                   # optional
    }

Options are training's (``hsc-pyg train --help``), with JSON types. Every run trains in its own ``hsc-pyg train``
process (a crash loses only that run, which is recorded and retried by the next invocation) in
``OUT/<configuration>/seed<k>/``; a run is finished when its ``run.json`` exists, and finished runs are never redone,
so the same command resumes a half-finished grid (an interrupted training continues from its checkpoint exactly).
To stop a runner, press Ctrl-C or send it SIGTERM or SIGUSR1 (``kill PID``, a scheduler's warning): the signal is
passed on to its running trainings, which save their checkpoints, and the runner exits once they have, with status
128 + the signal (130, 143, 138).
Runs already recorded in the --results file (same options and seed) count as finished too, so a fresh clone of the
repository, which has the study but not the run folders, adds to the study instead of starting it again.
Paths in the grid are relative to the folder the command runs in.

An ensemble averages the score matrices of two or more configurations' models of the same seed (the papers' SGRAF =
SAF + SGR) and is a row of its own (after the configurations), seed k = its members' seed-k models: nothing is trained
for it. Every run of a configuration that an ensemble names keeps its test score matrix, OUT/<config>/seed<k>/sims.npy
(images x captions x 4 bytes; a finished run without one evaluates its best model again to write it, no training),
and the ensemble's seed k is evaluated (evaluate --sims ... --sims ...) as soon as its members' seed k are finished.
Its OUT/<ensemble>/seed<k>/ holds that evaluation's eval.json and run.json (parameters and training seconds: the
members' together; no dev score). Re-ranking (rerank_k) needs a model and is not done for ensembles. --only and
--seeds take ensembles too: a named ensemble is evaluated once its members are finished, whichever invocation trained
them, but its members train only when they are selected too (the default selects everything). Members recorded in
the study only (a fresh clone) have no model to make a matrix from: their ensemble waits (recorded ensembles count as
finished like trained runs).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterator, Sequence

from ..engine.ablation import (CHILDREN, STOP_SIGNALS, RunFailed, compare, evaluate_ensemble, keep_sims, load_grid, read_record,
                               train_and_evaluate, write_study)
from ..errors import ConfigError
from ..io import FolderLock, parse_json
from ..options import integer
from .common import OneLineParser, command_parser, exit_with, run_command


# --------------------------------------------------------------------------- command line
def build_parser() -> OneLineParser:
    p = command_parser("ablate", __doc__.replace("``", ""),
                       epilog="One runner at a time per --out (a second one is refused, naming the first): --jobs N "
                              "trains N runs at once (one per core, say). A run folder finished under another --out "
                              "counts once linked into this one at OUT/<configuration>/seed<k>.")
    p.add_argument("--grid", required=True, metavar="GRID.json", help="configurations, seeds, recipe and data")
    p.add_argument("--out", default="runs/ablation", metavar="DIR",
                   help="run folders, one per configuration and seed (default: %(default)s)")
    p.add_argument("--results", default="", metavar="FILE.json",
                   help="the study: JSON of every finished run, and FILE.md (table) and FILE.png (plot) beside it "
                        "(default: OUT/ablation.json)")
    p.add_argument("--only", default="", metavar="NAME,NAME",
                   help="train only these configurations and evaluate only these ensembles of the grid (the study "
                        "still reports every finished run); names that hold commas are matched whole")
    p.add_argument("--seeds", default="", metavar="S,S", help="train (and evaluate ensembles of) only these seeds "
                                                                   "of the grid")
    p.add_argument("--jobs", type=integer(1), default=1, metavar="N",
                   help="runs trained at the same time, each in its own processes (default: %(default)s); give each "
                        "its share of the cores, e.g. OMP_NUM_THREADS=1 with --jobs 2 on 2 cores")
    p.add_argument("--report", action="store_true", help="train nothing: write the study of the runs finished so far "
                                                          "and print its table")
    p.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="train and write nothing: print configuration (or ensemble) A against B over their finished "
                        "seeds (means, difference, Welch's p); repeat the flag for more pairs")
    p.add_argument("--dry_run", action="store_true", help="check the grid and list the runs, ensemble evaluations "
                                                           "and score matrices to make, then stop")
    return p


def _split_names(text: str, allowed: list) -> list:
    """Comma-separated names where a name may itself hold commas (``img_gnn=gat,img_edges=full``): at each place the
    longest run of pieces that is a name of the grid is taken, else one piece (reported as unknown)."""
    pieces, names, i = [p.strip() for p in text.split(",")], [], 0
    while i < len(pieces):
        j = next((j for j in range(len(pieces), i, -1) if ",".join(pieces[i:j]) in allowed), i + 1)
        names.append(",".join(pieces[i:j]))
        i = j
    return [n for n in names if n]


def _subset(text: str, flag: str, allowed: list, kind=str) -> set:
    """The names in a comma-separated flag, each checked against the grid."""
    try:
        chosen = {kind(item) for item in _split_names(text, [str(a) for a in allowed])}
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers") from None
    unknown = sorted(map(str, chosen - set(allowed)))
    if unknown:
        raise ConfigError(f"{flag}: {', '.join(unknown)} not in the grid ({', '.join(map(str, allowed))})")
    return chosen


def _comparison(c: dict) -> str:
    seeds = {k: len(c[k + "_rsum"]) for k in ("a", "b")}
    side = {k: f"{c[k + '_mean']:.1f} ± {c[k + '_std']:.1f} ({n} seed{'s' * (n != 1)})" for k, n in seeds.items()}
    p = f"Welch p = {c['p']:.3f}" if "p" in c else "no p-value (one seed on a side)"
    return f"{c['a']} vs {c['b']}: {side['a']} against {side['b']}, difference {c['diff']:+.1f}, {p}"


def _recorded(results: Path) -> list:
    """The runs an earlier study wrote to ``results`` (empty when there is no such file yet)."""
    if not results.is_file():
        return []
    try:
        runs = parse_json(results.read_text(encoding="utf-8"))["runs"]
        if not all(isinstance(r, dict) and "config" in r and "seed" in r and "test_rsum" in r for r in runs):
            raise ValueError("a run without config, seed or test_rsum")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--results {results} is not a study written by this command ({e}); repair it, or name "
                          f"another --results file") from None
    return runs


def _finished(runs: list, recorded: list) -> dict:
    """Every finished run of the grid: its run.json on disk (another runner may have added some), else its record in
    the study file (a fresh clone has the study but not the run folders: those runs are not trained again). Each is
    named by this grid (a run folder may be shared with another grid, by a link, under another name)."""
    done = {}
    for r in runs:
        if (r.folder / "run.json").is_file():
            record, why = read_record(r.folder / "run.json")
            if record is not None:
                done[id(r)] = {**record, "name": r.name}
                continue
            print(f"warning: {r.folder / 'run.json'} is damaged ({why}); {r.name} seed {r.seed} is evaluated again",
                  file=sys.stderr)
        old = next((x for x in recorded if x["config"] == r.options and x["seed"] == r.seed), None)
        if old is not None:
            done[id(r)] = {**old, "name": r.name}
    return done


def _waiting_for(run, finished: dict) -> str:
    """What an ensemble run still needs: its members' runs that are not finished, and the score matrices of finished
    ones (those recorded in the study only have no model under --out to make it from)."""
    needs = []
    for m in run.members:
        if id(m) not in finished:
            needs.append(f"{m.name} seed {m.seed}")
        elif not m.sims.is_file():
            needs.append(f"{m.name} seed {m.seed}'s score matrix" + ("" if (m.folder / "run.json").is_file() else
                                                                      " (recorded in the study only: no model here)"))
    return ", ".join(needs)


def _train(grid, runs: list, todo: list, again: list, recorded: list, results: Path, jobs: int) -> tuple[list, list]:
    """Train and evaluate the runs of ``todo``, ``jobs`` at a time (a thread each waits on its run's processes), after
    evaluating the finished runs ``again`` to keep their score matrices; an ensemble run of ``todo`` is evaluated as
    soon as its members are finished and have their matrices. The study is rewritten after every step. Returns the
    failures and the ensemble runs still waiting; Ctrl-C (which reaches every child) starts nothing new and is raised
    again once the running ones have stopped."""
    failures, lock, stop, count = [], threading.Lock(), threading.Event(), itertools.count(1)
    waiting = [r for r in todo if r.members]

    def ready(finished: dict) -> list:           # called under the lock: each ensemble is taken once
        now = [r for r in waiting if not _waiting_for(r, finished)]
        for r in now:
            waiting.remove(r)
        return [(evaluate_ensemble, r, [finished[id(m)] for m in r.members]) for r in now]

    def one(step, run, *inputs) -> None:
        if stop.is_set():
            return
        how = {keep_sims: " (its best model evaluated again to keep its score matrix; no training)",
               evaluate_ensemble: " (score matrices averaged)"}.get(step, "")
        with lock:                 # one line at a time: print writes the text and its newline separately
            print(f"[{next(count)}/{len(todo) + len(again)}] {run.name} seed {run.seed} -> {run.folder}{how}",
                  flush=True)
        try:
            result = step(grid, run, sys.executable, *inputs)
        except RunFailed as e:
            with lock:
                failures.append(str(e))
                print(f"  failed: {e}", file=sys.stderr, flush=True)
            return
        except KeyboardInterrupt:
            stop.set()
            raise
        with lock:
            if result is not None:
                cost = "" if run.members else f" ({result['seconds_per_epoch']:.0f} s/epoch)"
                print(f"  {run.name} seed {run.seed}: test rsum {result['test_rsum']:.1f}{cost}", flush=True)
            finished = _finished(runs, recorded)
            write_study(grid, [finished[id(r)] for r in runs if id(r) in finished], results)
            follow = ready(finished)
        for task in follow:
            one(*task)

    with lock:
        tasks = [*ready(_finished(runs, recorded)), *((keep_sims, r) for r in again),
                 *((train_and_evaluate, r) for r in todo if not r.members)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, *task) for task in tasks]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            stop.set()
            raise
    return failures, waiting


INTERRUPTED = "interrupted: finished runs are kept and an interrupted training resumes; run the same command again"


@contextlib.contextmanager
def _stop_signals_passed_on() -> Iterator[list[int]]:
    """While it lasts, SIGTERM or SIGUSR1 sent to the runner alone reach its running commands (a training saves its
    checkpoint) and stop the runner as Ctrl-C does (``KeyboardInterrupt``, the signal appended to the list yielded); a
    second one is only passed on, so that the runner still waits for the trainings' saves."""
    received: list[int] = []

    def handler(signum, frame) -> None:
        CHILDREN.stop(signum)
        if not received:
            received.append(signum)
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS if s != signal.SIGINT}  # Ctrl-C reaches them all
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def ablate_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    results = Path(args.results) if args.results else out / "ablation.json"
    grid = load_grid(args.grid)
    if results.suffix != ".json":
        raise ConfigError(f"--results {results} must end in .json (the table and plot go beside it)")
    runs = grid.runs(out)
    recorded = _recorded(results)
    finished = _finished(runs, recorded)
    for run in runs:
        done = finished.get(id(run))
        if done is not None and (done.get("config") != run.options or done.get("seed") != run.seed):
            raise ConfigError(f"{run.folder} holds a run with other options ({done.get('config')}); the grid "
                              f"now asks for {run.options}: choose another --out or remove that folder")
    if args.compare:
        unknown = [n for pair in args.compare for n in pair if n not in grid.names()]
        if unknown:
            raise ConfigError(f"--compare: {', '.join(unknown)} not in the grid ({', '.join(grid.names())})")
        done = [finished[id(r)] for r in runs if id(r) in finished]
        print("\n".join([_comparison(compare(done, a, b)) for a, b in args.compare]))
        return 0
    only = _subset(args.only, "--only", grid.names()) if args.only else set(grid.names())
    seeds = _subset(args.seeds, "--seeds", grid.seeds, int) if args.seeds else set(grid.seeds)
    todo = [r for r in runs if id(r) not in finished and r.name in only and r.seed in seeds]
    again = list({id(m): m for r in todo for m in r.members   # finished before ensembles needed their matrices
                  if id(m) in finished and (m.folder / "run.json").is_file() and not m.sims.is_file()}.values())
    n = len(grid.ensembles)
    rows = f"{len(grid.configs)} configurations" + (f" and {n} ensemble{'s' * (n != 1)}" if n else "")
    print(f"{len(runs)} runs ({rows} x {len(grid.seeds)} seeds): {len(finished)} finished, {len(todo)} to do here"
          + (f", and {len(again)} finished run(s) to evaluate again for their score matrices" if again else ""),
          flush=True)
    if args.dry_run:
        for run in again:
            print(f"  {run.folder}  evaluated again to keep its score matrix ({run.sims.name}; no training)")
        for run in todo:
            needs = _waiting_for(run, finished) if run.members else ""
            print(f"  {run.folder}  {json.dumps(run.options)}" + (f" (after {needs})" if needs else ""))
        return 0
    with contextlib.nullcontext() if args.report else FolderLock.acquire(out, "--out"):  # one runner per --out
        with _stop_signals_passed_on() as received:
            try:
                failures, waiting = ([], []) if args.report else _train(grid, runs, todo, again, recorded, results,
                                                                         args.jobs)
            except KeyboardInterrupt:
                if not received:
                    raise                                 # Ctrl-C: run_command says it (status 130)
                print(INTERRUPTED, file=sys.stderr)
                return 128 + received[0]                  # the shell's convention: 143 for SIGTERM, 138 for SIGUSR1
        finished = _finished(runs, recorded)
        if finished:
            write_study(grid, [finished[id(r)] for r in runs if id(r) in finished], results)
        print(f"study of {len(finished)} runs: {results}, {results.with_suffix('.md')}, "
              f"{results.with_suffix('.png')}")
        if args.report:
            print("\n" + results.with_suffix(".md").read_text(), end="")
    for run in waiting:
        print(f"{run.name} seed {run.seed} not evaluated yet: it needs {_waiting_for(run, finished)}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} run(s) failed (run the same command again to retry them):", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), ablate_command, argv, interrupted=INTERRUPTED)


if __name__ == "__main__":
    exit_with(main)
