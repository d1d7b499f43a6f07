"""Ablation studies: a grid of training configurations x seeds, each trained by ``python -m hsc_pyg train`` in its own
process and evaluated by ``python -m hsc_pyg evaluate``, and ensembles (the score matrices of several configurations'
models of one seed averaged), summarised as JSON, a Markdown table (mean, standard deviation, Welch's t-test against a
baseline) and a bar plot. The command line and the grid file's layout:
:mod:`hsc_pyg.cli.ablate`.
"""
from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Sequence

from ..config import MAX_SEED, PRESETS, Config
from ..errors import ConfigError, HSCError
from ..io import atomic_files, parse_json, read_json, write_json

#: the folder this package was imported from: a run's processes import the same package (not another install)
IMPORTED_FROM = Path(__file__).resolve().parents[2]
GRID_KEYS = {"recipe", "data_path", "data_name", "seeds", "baseline", "common", "configs", "axes", "ensembles",
             "evaluate"}
RUN_FIELDS = ("model_name", "logger_name", "seed", "data_path", "data_name")   # set per run by the runner


# --------------------------------------------------------------------------- the grid
@dataclass
class Run:
    name: str                  # the configuration's name (a row of the table)
    options: dict[str, Any]    # what differs from the recipe (common options included)
    seed: int
    folder: Path
    members: tuple[Run, ...] = ()   # an ensemble's: the runs (same seed) whose score matrices it averages

    @property
    def sims(self) -> Path:
        """The test score matrix a run keeps when an ensemble needs it (``evaluate --save_sims``)."""
        return self.folder / "sims.npy"


@dataclass
class Grid:
    recipe: str
    data_path: str
    data_name: str
    seeds: list[int]
    configs: dict[str, dict[str, Any]]
    baseline: str
    evaluate: dict[str, Any]
    ensembles: dict[str, list[str]] = field(default_factory=dict)   # name -> the configurations it averages

    def names(self) -> list[str]:
        """The rows of the study: the configurations, then the ensembles."""
        return [*self.configs, *self.ensembles]

    def options(self, name: str) -> dict[str, Any]:
        """What a row's runs are recorded with (``config`` of run.json): a configuration's options, or an ensemble's
        members as ``{"ensemble": [...]}``."""
        return self.configs[name] if name in self.configs else {"ensemble": self.ensembles[name]}

    def runs(self, out: Path) -> list[Run]:
        """Seed-major order: every configuration's first seed before any second one, so that a partial grid already
        compares every configuration; the ensembles' runs after all trained ones."""
        trained = {(name, seed): Run(name, options, seed, out / name / f"seed{seed}")
                   for seed in self.seeds for name, options in self.configs.items()}
        return [*trained.values(), *(Run(name, self.options(name), seed, out / name / f"seed{seed}",
                                         tuple(trained[m, seed] for m in members))
                                     for seed in self.seeds for name, members in self.ensembles.items())]

    def keeps_sims(self, run: Run) -> bool:
        """Whether an ensemble averages this run's score matrix (only then is it kept: images x captions x 4 bytes)."""
        return any(run.name in members for members in self.ensembles.values())

    def config(self, run: Run) -> Config:
        """The full training configuration of one run (ConfigError when an option is unknown or out of range)."""
        base = Config.load(self.recipe).to_dict() if self.recipe else {}
        if "preset" in run.options:
            for field in PRESETS.get(run.options["preset"], ()):
                base.pop(field, None)
        values = {**base, **run.options, "seed": run.seed, "data_path": self.data_path, "data_name": self.data_name,
                  "model_name": str(run.folder / "checkpoint"), "logger_name": str(run.folder / "log")}
        try:
            return Config(**values)
        except ConfigError as e:
            raise ConfigError(f"configuration {run.name!r}: {e}") from None


def _where(path: Path, key: str) -> str:
    return f"grid {path}: {key!r}"


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; one-line ConfigError for anything that would fail later."""
    path = Path(path)
    raw = read_json(path, "grid", "see hsc-pyg ablate --help for its layout", ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"grid {path} holds a {type(raw).__name__}; expected a JSON object with 'configs'")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise ConfigError(f"grid {path}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                          f"{', '.join(sorted(GRID_KEYS))}")
    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < MAX_SEED for s in seeds)):
        raise ConfigError(f"{_where(path, 'seeds')} must be a list of distinct non-negative integers below {MAX_SEED:,}, "
                          f"found {seeds!r}")
    common = _options(raw.get("common", {}), _where(path, "common"))
    configs: dict[str, dict[str, Any]] = {}
    for name, options in _object(raw.get("configs", {}), _where(path, "configs")).items():
        configs[_name(name, path)] = {**common, **_options(options, _where(path, f"configs.{name}"))}
    axes = _object(raw.get("axes", {}), _where(path, "axes"))
    for option, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{_where(path, f'axes.{option}')} must be a non-empty list of values, found {values!r}")
    for combination in product(*axes.values()) if axes else ():
        options = dict(zip(axes, combination))
        name = _name(",".join(f"{k}={v}" for k, v in options.items()), path)
        if name in configs:
            raise ConfigError(f"grid {path}: configuration {name!r} is both in 'configs' and made by 'axes'")
        configs[name] = {**common, **_options(options, _where(path, "axes"))}
    if not configs:
        raise ConfigError(f"grid {path} names no configuration; add 'configs' (name -> options) or 'axes'")
    ensembles = _ensembles(raw.get("ensembles", {}), configs, path)
    baseline = raw.get("baseline", next(iter(configs)))
    if baseline not in configs and baseline not in ensembles:
        raise ConfigError(f"{_where(path, 'baseline')} is {baseline!r}, which is not one of the configurations "
                          f"({', '.join([*configs, *ensembles])})")
    evaluate = _object(raw.get("evaluate", {}), _where(path, "evaluate"))
    bad = sorted(set(evaluate) - {"split", "rerank_k"})
    if bad:
        raise ConfigError(f"{_where(path, 'evaluate')}: unknown key(s) {', '.join(bad)}; it takes split and rerank_k")
    ks = evaluate.get("rerank_k", [])
    if not isinstance(ks, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ConfigError(f"{_where(path, 'evaluate.rerank_k')} must be a list of integers >= 1, found {ks!r}")
    grid = Grid(recipe=str(raw.get("recipe", "")), data_path=str(raw.get("data_path", "data")),
                data_name=str(raw.get("data_name", "synthetic_precomp")), seeds=seeds, configs=configs,
                baseline=baseline, evaluate={"split": str(evaluate.get("split", "test")), "rerank_k": ks},
                ensembles=ensembles)
    if grid.recipe and not Path(grid.recipe).is_file():
        raise ConfigError(f"{_where(path, 'recipe')}: {grid.recipe} does not exist (paths are relative to "
                          f"{Path.cwd()})")
    for run in grid.runs(Path("runs")):   # every configuration is checked before anything trains
        if not run.members:
            grid.config(run)
    return grid


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a JSON object, found {type(value).__name__}")
    return value


def _options(value: Any, where: str) -> dict[str, Any]:
    options = _object(value, where)
    fixed = sorted(set(options) & set(RUN_FIELDS))
    if fixed:
        raise ConfigError(f"{where}: {', '.join(fixed)} are set by the runner (seeds, data_path and data_name at the "
                          "top of the grid); remove them")
    return dict(options)


def _ensembles(value: Any, configs: dict[str, Any], path: Path) -> dict[str, list[str]]:
    ensembles = {}
    for name, members in _object(value, _where(path, "ensembles")).items():
        where = _where(path, f"ensembles.{name}")
        if _name(name, path) in configs:
            raise ConfigError(f"{where}: {name!r} is also a configuration; give the ensemble another name")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"{where} must be a list of configuration names, found {members!r}")
        unknown = [m for m in members if m not in configs]
        if unknown:
            raise ConfigError(f"{where}: {', '.join(map(repr, unknown))} is not a configuration of the grid "
                              f"({', '.join(configs)})")
        if len(set(members)) < 2 or len(set(members)) != len(members):
            raise ConfigError(f"{where} must name 2 or more distinct configurations, found {members!r}")
        ensembles[name] = members
    return ensembles


def _name(name: str, path: Path) -> str:
    if not name or name in (".", "..") or "/" in name or os.sep in name or name.startswith("."):
        raise ConfigError(f"grid {path}: {name!r} cannot name a run folder; use letters, digits, '_', '=' or ','")
    return name


# --------------------------------------------------------------------------- running
class RunFailed(HSCError):
    """One run's training or evaluation ended with an error (the others go on)."""


class Children:
    """The commands a runner has started and not yet seen end. A stop signal sent to the runner alone (``kill PID``,
    a scheduler's SIGTERM or SIGUSR1) is passed on to them with :meth:`stop`, so that each training saves its
    checkpoint and ends instead of running on without its runner; after it, :meth:`call` starts nothing. Ctrl-C needs
    no passing on: the terminal sends it to the whole process group."""

    def __init__(self) -> None:
        self.lock, self.running, self.signum = threading.Lock(), set(), None

    def call(self, command: list[str], **popen: Any) -> int:
        """``subprocess.call(command, **popen)``, unless a stop was asked for (then ``KeyboardInterrupt``)."""
        with self.lock:    # stop() waits for a start in progress, so the new process is either not started or told
            if self.signum is not None:
                raise KeyboardInterrupt
            process = subprocess.Popen(command, **popen)
            self.running.add(process)
        try:
            return process.wait()
        finally:
            with self.lock:
                self.running.discard(process)

    def stop(self, signum: int) -> None:
        """Send ``signum`` to every running command and refuse new ones (safe to call again)."""
        with self.lock:
            self.signum = signum
            for process in self.running:
                if process.poll() is None:
                    process.send_signal(signum)


#: the signals that stop a runner and its commands (those a training saves a checkpoint on), and the exit statuses of a
#: command they stopped: 128 + the signal (a training, after its save) or minus it (a command killed by it)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
STOPPED = {128 + s for s in STOP_SIGNALS} | {-s for s in STOP_SIGNALS}
#: this process's commands (a signal is sent to a process, so there is one set per process)
CHILDREN = Children()


def _child(python: str, argv: list[str], log: Path) -> int:
    """Run ``python -m hsc_pyg ARGV`` (a command of this package) with its output appended to ``log``; Ctrl-C reaches
    the child too (same process group) and a runner's SIGTERM is passed on (:class:`Children`); the child saves its
    checkpoint and the runner then stops."""
    command = [python, "-m", "hsc_pyg", *argv]
    path = os.pathsep.join(p for p in (str(IMPORTED_FROM), os.environ.get("PYTHONPATH", "")) if p)
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
        out.flush()
        return CHILDREN.call(command, cwd=os.getcwd(), stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": path})


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _check(status: int, run: Run, step: str, log: Path) -> None:
    """A child's exit status: stopped by a stop signal (:data:`STOP_SIGNALS`), the runner stops too; any other failure
    (an error, a crash, SIGKILL) fails this run only."""
    if status in STOPPED:
        raise KeyboardInterrupt
    if status != 0:
        raise RunFailed(f"{run.name} seed {run.seed}: {step} failed with status {status}: {_last_line(log)} "
                        f"(log {log})")


def _evaluate(grid: Grid, run: Run, python: str, sources: list[str], *options: str) -> None:
    """``hsc-pyg evaluate`` of ``sources`` (``--model`` / ``--sims`` flags) on the grid's data and split."""
    argv = ["evaluate", *sources, "--data_path", grid.data_path, "--data_name", grid.data_name,
            "--split", grid.evaluate["split"], "--no_progress", *options]
    _check(_child(python, argv, run.folder / "eval.log"), run, "evaluation", run.folder / "eval.log")


def train_and_evaluate(grid: Grid, run: Run, python: str) -> dict[str, Any]:
    """Train ``run`` (resuming an interrupted training) and evaluate its best-dev model, each with the interpreter
    ``python``; write and return ``run.json``."""
    folder = run.folder
    folder.mkdir(parents=True, exist_ok=True)
    config = grid.config(run)
    checkpoint = folder / "checkpoint" / "checkpoint.pth"
    timing_path = folder / "timing.json"
    timing = _read_timing(timing_path)
    if not (folder / "train_done.json").exists():
        timing["attempts"] += 1
        write_json(timing_path, timing)   # counted before it starts: a runner killed during it still counts it
        if checkpoint.is_file():
            # the folders and data named again: the checkpoint's own paths may be relative to another working folder
            argv = ["train", "--resume", str(checkpoint), "--no_progress",
                    "--model_name", config.model_name, "--logger_name", config.logger_name,
                    "--data_path", config.data_path, "--data_name", config.data_name]
        else:
            config.save(folder / "config.json")
            argv = ["train", "--config", str(folder / "config.json"), "--no_progress", "--overwrite"]
        start = time.perf_counter()
        status = _child(python, argv, folder / "train.log")
        timing["train_seconds"] += time.perf_counter() - start
        write_json(timing_path, timing)
        _check(status, run, "training", folder / "train.log")
        write_json(folder / "train_done.json", timing)
    report = folder / "eval.json"
    options = ["--json", str(report)]
    if grid.evaluate["rerank_k"]:
        options += ["--rerank_k", *map(str, grid.evaluate["rerank_k"])]
    if grid.keeps_sims(run):
        options += ["--save_sims", str(run.sims), "--overwrite"]
    _evaluate(grid, run, python, ["--model", str(folder / "checkpoint" / "model_best.pth")], *options)
    result = _run_record(run, report, _trained_fields(run, config, timing))
    write_json(folder / "run.json", result, indent=1)
    return result


def keep_sims(grid: Grid, run: Run, python: str) -> None:
    """Evaluate the best model of a finished run again to write the score matrix an ensemble needs (``run.sims``);
    nothing is trained and its record is left as it is."""
    best = run.folder / "checkpoint" / "model_best.pth"
    if not best.is_file():
        raise RunFailed(f"{run.name} seed {run.seed}: {best} is missing, so its score matrix cannot be made again; "
                        f"train the run again (remove {run.folder}) or leave it out of the ensembles")
    _evaluate(grid, run, python, ["--model", str(best)], "--save_sims", str(run.sims), "--overwrite")


def evaluate_ensemble(grid: Grid, run: Run, python: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the score matrices of an ensemble run's members (their records ``members``), evaluate the average and
    write and return ``run.json``: parameters and training seconds are the members' together, and there is no dev
    score of its own."""
    run.folder.mkdir(parents=True, exist_ok=True)
    report = run.folder / "eval.json"
    _evaluate(grid, run, python, [flag for m in run.members for flag in ("--sims", str(m.sims))], "--json", str(report))
    result = _run_record(run, report, {key: round(sum(m[key] for m in members), 1)   # an int stays an int
                                       for key in ("parameters", "train_seconds", "seconds_per_epoch")})
    write_json(run.folder / "run.json", result, indent=1)
    return result


#: the fields of a run record (run.json) that the study reads
RECORD_KEYS = ("config", "seed", "test_rsum")


def read_record(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A run's record (``run.json``) and "", or None and why it cannot be used (truncated, not an object, without
    config, seed or a numeric test_rsum): such a run is evaluated again."""
    try:
        record = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, " ".join(str(e).split())[:120]
    if not isinstance(record, dict):
        return None, f"it holds a {type(record).__name__}, not a record"
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        return None, f"no {', '.join(missing)}"
    if not isinstance(record["test_rsum"], (int, float)) or isinstance(record["test_rsum"], bool):
        return None, f"test_rsum is {record['test_rsum']!r}, not a number"
    return record, ""


def _read_timing(path: Path) -> dict[str, Any]:
    """The training time and attempts recorded so far (none when the file is missing or damaged)."""
    try:
        timing = parse_json(path.read_text(encoding="utf-8"))
        if isinstance(timing.get("train_seconds"), (int, float)) and type(timing.get("attempts")) is int:
            return timing
    except (OSError, ValueError, AttributeError):
        pass
    return {"train_seconds": 0.0, "attempts": 0}


def _run_record(run: Run, path: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """A run's record: its evaluation report ``path`` (metrics, re-ranking) and ``fields`` (parameters, time)."""
    report = read_json(path, "evaluation report", "evaluate the run again")
    metrics = report["metrics"]
    record = {"name": run.name, "config": run.options, "seed": run.seed,
              "test_rsum": metrics["rsum"], "test_metrics": metrics, "split": report["split"], **fields}
    if "first_stage_metrics" in report:
        record["first_stage_rsum"] = report["first_stage_metrics"]["rsum"]
        record["rerank"] = [{"k": r["k"], "rsum": r["metrics"]["rsum"], "fraction": r["fraction"],
                             **({"shared_rsum": r["shared_metrics"]["rsum"]} if "shared_metrics" in r else {})}
                            for r in report["rerank"]]
    return record


def _trained_fields(run: Run, config: Config, timing: dict[str, Any]) -> dict[str, Any]:
    """A trained run's best dev score, size and training time, from its checkpoints."""
    from .checkpoint import load_checkpoint, read_checkpoint

    model = load_checkpoint(run.folder / "checkpoint" / "model_best.pth", map_location="cpu")
    last = read_checkpoint(run.folder / "checkpoint" / "checkpoint.pth")
    # the training's own count (every attempt, to its last save) when the checkpoint has one; the runner's misses the
    # attempts of a runner that was killed (older checkpoints)
    seconds = last.get("train_seconds")
    seconds = seconds if isinstance(seconds, (int, float)) else timing["train_seconds"]
    return {"dev_best_rsum": float(last["best_rsum"]), "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": config.num_epochs, "train_seconds": round(seconds, 1),
            "seconds_per_epoch": round(seconds / max(config.num_epochs, 1), 1), "train_attempts": timing["attempts"]}


# --------------------------------------------------------------------------- the study
def _t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom (t >= 0), through the regularized incomplete beta
    function I_x(df/2, 1/2) / 2 with x = df / (df + t^2), evaluated by its continued fraction (Lentz)."""
    if t == 0.0:
        return 0.5
    a, b, x = df / 2.0, 0.5, df / (df + t * t)
    if x <= 0.0:
        return 0.0
    swap = x > (a + 1.0) / (a + b + 2.0)      # the fraction converges fast below this point; use symmetry above it
    if swap:
        a, b, x = b, a, 1.0 - x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    incomplete = front * value
    return (1.0 - incomplete if swap else incomplete) / 2.0


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """Welch's t statistic and two-sided p-value of mean(a) - mean(b); None with fewer than 2 values on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((v - ma) ** 2 for v in a) / (len(a) - 1) / len(a)
    vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1) / len(b)
    if va + vb == 0.0:
        return (0.0, 1.0) if ma == mb else (math.copysign(math.inf, ma - mb), 0.0)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, min(1.0, 2.0 * _t_sf(abs(t), df))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def compare(runs: list[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Configuration ``a`` against ``b`` over their finished seeds: each side's mean and sample standard deviation,
    the difference of the means and Welch's t and two-sided p (absent with fewer than 2 seeds a side)."""
    out: dict[str, Any] = {"a": a, "b": b}
    for side, name in (("a", a), ("b", b)):
        values = [r["test_rsum"] for r in runs if r["name"] == name]
        if not values:
            raise ConfigError(f"{name!r} has no finished run yet: train it first (or leave it out of the comparison)")
        out[f"{side}_mean"], out[f"{side}_std"] = _mean_std(values)
        out[f"{side}_rsum"] = values
    out["diff"] = out["a_mean"] - out["b_mean"]
    test = welch(out["a_rsum"], out["b_rsum"])
    if test is not None:
        out["t"], out["p"] = test
    return out


def summarize(grid: Grid, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration, then per ensemble (grid order): seeds done, mean and sample standard deviation of
    the test rsum, difference from the baseline with Welch's two-sided p-value, parameters, seconds per epoch."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_name.setdefault(r["name"], []).append(r)
    rows = []
    for name in grid.names():
        done = by_name.get(name, [])
        if not done:
            continue
        values = [r["test_rsum"] for r in done]
        mean, std = _mean_std(values)
        row = {"name": name, "config": grid.options(name), "seeds": sorted(r["seed"] for r in done),
               "test_rsum_mean": mean, "test_rsum_std": std, "test_rsum": values,
               "parameters": done[0]["parameters"],
               "seconds_per_epoch": _mean_std([r["seconds_per_epoch"] for r in done])[0]}
        if name != grid.baseline and grid.baseline in by_name:
            versus = compare(runs, name, grid.baseline)
            row["diff_vs_baseline"] = versus["diff"]
            row.update({k: versus[k] for k in ("t", "p") if k in versus})
        if "rerank" in done[0]:
            row["first_stage_rsum_mean"] = _mean_std([r["first_stage_rsum"] for r in done])[0]
            for i, entry in enumerate(done[0]["rerank"]):
                row[f"rerank_k{entry['k']}_rsum_mean"] = _mean_std([r["rerank"][i]["rsum"] for r in done])[0]
                if all("shared_rsum" in r["rerank"][i] for r in done):
                    row[f"rerank_k{entry['k']}_shared_rsum_mean"] = _mean_std(
                        [r["rerank"][i]["shared_rsum"] for r in done])[0]
        rows.append(row)
    return rows


def markdown(grid: Grid, rows: list[dict[str, Any]]) -> str:
    ks = grid.evaluate["rerank_k"]
    head = ["configuration", "options", "seeds", "test rsum (mean ± std)", f"vs {grid.baseline}", "p (Welch)"]
    head += ["first stage"] + [f"K = {k} (own / shared)" for k in ks] if ks else []
    head += ["parameters", "s / epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        options = (" + ".join(row["config"]["ensemble"]) + ", scores averaged" if row["name"] in grid.ensembles
                   else ", ".join(f"{k}={v}" for k, v in row["config"].items()) or "(recipe)")
        diff = f"{row['diff_vs_baseline']:+.1f}" if "diff_vs_baseline" in row else ""
        p = f"{row['p']:.3f}" if "p" in row else ""
        cells = [row["name"], options, str(len(row["seeds"])),
                 f"{row['test_rsum_mean']:.1f} ± {row['test_rsum_std']:.1f}" if len(row["seeds"]) > 1
                 else f"{row['test_rsum_mean']:.1f} (one seed: no spread yet)", diff, p]
        if ks:
            cells.append(f"{row['first_stage_rsum_mean']:.1f}" if "first_stage_rsum_mean" in row else "–")
            cells += [_rerank_cell(row, k) for k in ks]
        cells += [f"{row['parameters']:,}", f"{row['seconds_per_epoch']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Test rsum of each best-dev model on {grid.data_name}/{grid.evaluate['split']}; std is the sample "
                 f"standard deviation over seeds; p: Welch's two-sided t-test against {grid.baseline} (with 3 seeds a "
                 "side only large, consistent differences reach p < 0.05); s / epoch: the training's wall seconds per "
                 "epoch (validations included, every attempt counted).")
    if grid.ensembles:
        lines.append("")
        lines.append(f"{', '.join(grid.ensembles)}: the score matrices of the named configurations' models of each "
                     "seed averaged before ranking (no training of its own; parameters and s / epoch are the "
                     "members' together" + ("; no re-ranking: –" if ks else "") + ").")
    if ks:
        lines.append("")
        lines.append("K = k: rsum after re-ranking each query's top k of the first stage exactly; own: each query "
                     "ranks only its own top k by exact score; shared: every pair scored for either direction's top k "
                     "ranks by its exact score in both directions (the same exact scores); shared is missing for runs "
                     "evaluated before it was reported.")
    return "\n".join(lines) + "\n"


def _rerank_cell(row: dict[str, Any], k: int) -> str:
    if f"rerank_k{k}_rsum_mean" not in row:
        return "–"
    own = f"{row[f'rerank_k{k}_rsum_mean']:.1f}"
    shared = row.get(f"rerank_k{k}_shared_rsum_mean")
    return own if shared is None else f"{own} / {shared:.1f}"


def plot(grid: Grid, rows: list[dict[str, Any]]) -> bytes:
    """Horizontal bars of the mean test rsum with the standard deviation as error bars, as PNG bytes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.2), dpi=120)
    ax = fig.add_subplot()
    names = [r["name"] for r in rows][::-1]
    means = [r["test_rsum_mean"] for r in rows][::-1]
    stds = [r["test_rsum_std"] for r in rows][::-1]
    colors = ["tab:orange" if n == grid.baseline else "tab:green" if n in grid.ensembles else "tab:blue"
              for n in names]
    ax.barh(names, means, xerr=stds, color=colors, capsize=3)
    for y, row in enumerate(rows[::-1]):   # every seed's value as a dot
        ax.plot(row["test_rsum"], [y] * len(row["test_rsum"]), "k.", markersize=4)
    low = min(m - s for m, s in zip(means, stds))
    ax.set_xlim(left=max(0.0, low - 0.1 * (max(means) - low + 1.0) - 5.0))
    ax.set_xlabel(f"test rsum on {grid.data_name} (mean ± std over seeds)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")   # long configuration names would clip the x label
    return buffer.getvalue()


def write_study(grid: Grid, runs: list[dict[str, Any]], results: Path) -> None:
    """``results`` (JSON: every run, and the summary rows), the Markdown table and the plot beside it, as one unit."""
    rows = summarize(grid, runs)
    data = {"data_name": grid.data_name, "split": grid.evaluate["split"], "recipe": grid.recipe,
            "baseline": grid.baseline, "runs": runs, "summary": rows}
    text, table, picture = json.dumps(data, indent=1) + "\n", markdown(grid, rows), plot(grid, rows)
    atomic_files({results: lambda f: f.write(text.encode()),
                  results.with_suffix(".md"): lambda f: f.write(table.encode()),
                  results.with_suffix(".png"): lambda f: f.write(picture)})
