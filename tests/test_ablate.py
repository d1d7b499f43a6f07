"""The ablation runner: grid checks, Welch's test against known values, and a tiny grid trained end to end (with an
ensemble of its two configurations), resumed after a failure without redoing finished runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hsc_pyg.cli.ablate import main
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.engine.ablation import compare, load_grid, markdown, summarize, welch
from hsc_pyg.engine.checkpoint import read_checkpoint
from hsc_pyg.errors import ConfigError

RECIPE = {"embed_size": 16, "word_dim": 8, "sim_dim": 8, "img_layers": 2, "txt_layers": 2, "batch_size": 8,
          "vocab_threshold": 1, "val_step": 1000, "log_step": 1, "num_epochs": 1, "device": "cpu"}


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture()
def recipe(tmp_path) -> Path:
    return write(tmp_path / "recipe.json", RECIPE)


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("t, df, p", [(2.776445, 4, 0.05), (4.604095, 4, 0.01), (2.570582, 5, 0.05),
                                      (1.0, 1, 0.5), (0.0, 3, 1.0)])
def test_t_distribution_tail_matches_the_tables(t, df, p):
    from hsc_pyg.engine.ablation import _t_sf

    assert 2 * _t_sf(t, df) == pytest.approx(p, abs=2e-6)


def test_welch_against_a_hand_computation():
    a, b = [206.2, 204.0, 205.1], [179.9, 183.0, 181.2]
    t, p = welch(a, b)
    ma, mb = sum(a) / 3, sum(b) / 3
    va = sum((x - ma) ** 2 for x in a) / 2 / 3
    vb = sum((x - mb) ** 2 for x in b) / 2 / 3
    assert t == pytest.approx((ma - mb) / math.sqrt(va + vb))
    assert p < 1e-3
    assert welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, 1.0)
    assert welch([1.0], [1.0, 2.0]) is None


# --------------------------------------------------------------------------- the grid file
@pytest.mark.parametrize("grid, message", [
    ({"configs": {}}, "names no configuration"),
    ({"configs": {"a": {}}, "seeds": [0, 0]}, "distinct non-negative integers"),
    ({"configs": {"a": {}}, "seeds": "0"}, "distinct non-negative integers"),
    ({"configs": {"a": {"seed": 3}}}, "set by the runner"),
    ({"configs": {"a": {"img_gnn": "nope"}}}, "configuration 'a'"),
    ({"configs": {"a": {"embed_size": -4}}}, "configuration 'a'"),
    ({"configs": {"../x": {}}}, "cannot name a run folder"),
    ({"configs": {"a": {}}, "baseline": "b"}, "not one of the configurations"),
    ({"configs": {"a": {}}, "typo": 1}, "unknown key"),
    ({"configs": {"a": {}}, "axes": {"img_gnn": []}}, "non-empty list"),
    ({"configs": {"a": {}}, "evaluate": {"rerank_k": [0]}}, "integers >= 1"),
    ({"configs": {"a": {}}, "recipe": "missing.json"}, "does not exist"),
    ({"configs": {"a": {}}, "ensembles": ["a"]}, "'ensembles' must be a JSON object"),
    ({"configs": {"a": {}, "b": {}}, "ensembles": {"e": "a,b"}}, "must be a list of configuration names"),
    ({"configs": {"a": {}, "b": {}}, "ensembles": {"e": ["a", "x"]}}, "'x' is not a configuration of the grid"),
    ({"configs": {"a": {}, "b": {}}, "ensembles": {"e": ["a"]}}, "2 or more distinct configurations"),
    ({"configs": {"a": {}, "b": {}}, "ensembles": {"e": ["a", "a"]}}, "2 or more distinct configurations"),
    ({"configs": {"a": {}, "b": {}}, "ensembles": {"b": ["a", "b"]}}, "'b' is also a configuration"),
    ({"configs": {"a": {}, "b": {}}, "ensembles": {"../e": ["a", "b"]}}, "cannot name a run folder"),
])
def test_bad_grids_are_one_line_errors(tmp_path, grid, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_grid(write(tmp_path / "grid.json", grid))
    assert "\n" not in str(e.value)


def test_axes_make_the_product_and_common_options_reach_every_configuration(tmp_path, recipe):
    grid = load_grid(write(tmp_path / "grid.json", {
        "recipe": str(recipe), "seeds": [0, 1], "common": {"num_epochs": 2},
        "configs": {"hsc": {}}, "axes": {"img_gnn": ["gat", "gcn"], "img_edges": ["full", "knn:4"]},
        "ensembles": {"both": ["hsc", "img_gnn=gcn,img_edges=full"]}}))
    assert list(grid.configs) == ["hsc", "img_gnn=gat,img_edges=full", "img_gnn=gat,img_edges=knn:4",
                                  "img_gnn=gcn,img_edges=full", "img_gnn=gcn,img_edges=knn:4"]
    assert all(options["num_epochs"] == 2 for options in grid.configs.values())
    runs = grid.runs(tmp_path / "out")
    assert [(r.name, r.seed) for r in runs[:5]] == [(name, 0) for name in grid.configs]   # seed-major
    assert [(r.name, r.seed) for r in runs[10:]] == [("both", 0), ("both", 1)]           # ensembles after them
    for ensemble in runs[10:]:                                # seed k averages the members' seed-k models
        assert ensemble.members == (runs[5 * ensemble.seed], runs[5 * ensemble.seed + 3])
        assert ensemble.options == {"ensemble": ["hsc", "img_gnn=gcn,img_edges=full"]}
        assert ensemble.folder == tmp_path / "out" / "both" / f"seed{ensemble.seed}"
    assert [grid.keeps_sims(r) for r in runs[:5]] == [True, False, False, True, False]   # only members keep matrices
    config = grid.config(runs[1])
    assert (config.img_gnn, config.embed_size, config.num_epochs) == ("gat", 16, 2)
    assert config.model_name == str(tmp_path / "out" / "img_gnn=gat,img_edges=full" / "seed0" / "checkpoint")


def test_summary_means_stds_and_the_baseline_comparison(tmp_path, recipe):
    grid = load_grid(write(tmp_path / "grid.json", {"recipe": str(recipe), "seeds": [0, 1, 2],
                                                   "configs": {"a": {}, "b": {"itc_weight": 1.0}},
                                                   "ensembles": {"a+b": ["a", "b"]}}))
    runs = [{"name": n, "seed": s, "test_rsum": v, "parameters": 10, "seconds_per_epoch": 1.0}
            for n, values in (("a+b", [210.0, 214.0, 212.0]), ("a", [200.0, 202.0, 204.0]),
                              ("b", [190.0, 191.0, 195.0]))
            for s, v in enumerate(values)]
    a, b, ensemble = summarize(grid, runs)                         # the ensemble's row after the configurations
    assert (a["test_rsum_mean"], a["test_rsum_std"]) == (202.0, 2.0)
    assert "p" not in a and b["diff_vs_baseline"] == pytest.approx(192.0 - 202.0)
    assert (b["t"], b["p"]) == welch([190.0, 191.0, 195.0], [200.0, 202.0, 204.0])
    assert ensemble["config"] == {"ensemble": ["a", "b"]} and ensemble["diff_vs_baseline"] == pytest.approx(10.0)
    assert (ensemble["t"], ensemble["p"]) == welch([210.0, 214.0, 212.0], [200.0, 202.0, 204.0])
    table = markdown(grid, summarize(grid, runs[3:7]))                # b has one seed so far: no "± 0.0"
    assert "| 202.0 ± 2.0 |" in table and "| 190.0 (one seed: no spread yet) |" in table
    assert "| a+b | a + b, scores averaged | 3 | 212.0 ± 2.0 | +10.0 |" in markdown(grid, summarize(grid, runs))


def test_compare_any_two_configurations_from_the_command_line(tmp_path, recipe, capsys):
    grid = write(tmp_path / "grid.json", {"recipe": str(recipe), "seeds": [0, 1, 2],
                                          "configs": {"a": {}, "b,c": {"itc_weight": 1.0}, "d": {"itc_weight": 2.0}}})
    values = {"a": [200.0, 202.0, 204.0], "b,c": [190.0, 191.0, 195.0], "d": [180.0]}
    options = {"a": {}, "b,c": {"itc_weight": 1.0}, "d": {"itc_weight": 2.0}}
    results = write(tmp_path / "study.json", {"runs": [
        {"name": n, "config": options[n], "seed": s, "test_rsum": v} for n in values for s, v in enumerate(values[n])]})
    runs = [{"name": n, "test_rsum": v} for n in values for v in values[n]]
    c = compare(runs, "b,c", "a")
    assert (c["a_mean"], c["b_mean"], c["b_std"], c["diff"]) == (192.0, 202.0, 2.0, -10.0)
    assert (c["t"], c["p"]) == welch(values["b,c"], values["a"])
    assert "p" not in compare(runs, "a", "d")                           # one seed on a side: no test
    with pytest.raises(ConfigError, match="'e' has no finished run yet"):
        compare(runs, "a", "e")

    argv = ["--grid", str(grid), "--out", str(tmp_path / "out"), "--results", str(results)]
    before = results.read_text()
    assert main(argv + ["--compare", "b,c", "a", "--compare", "a", "d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"b,c vs a: 192.0 ± 2.6 (3 seeds) against 202.0 ± 2.0 (3 seeds), difference -10.0, "
                     f"Welch p = {c['p']:.3f}",
                     "a vs d: 202.0 ± 2.0 (3 seeds) against 180.0 ± 0.0 (1 seed), difference +22.0, "
                     "no p-value (one seed on a side)"]
    assert main(argv + ["--compare", "a", "b"]) == 2                      # "b" alone is not a configuration
    assert "--compare: b not in the grid" in capsys.readouterr().err
    assert results.read_text() == before and not (tmp_path / "out").exists()   # nothing trained or written


def test_only_takes_configuration_names_that_hold_commas():
    from hsc_pyg.cli.ablate import _split_names
    grid = ["hsc", "img_gnn=gat,img_edges=full", "img_gnn=gat", "itc_weight=1,itc_loss=hinge"]
    assert _split_names("itc_weight=1,itc_loss=hinge", grid) == ["itc_weight=1,itc_loss=hinge"]
    assert _split_names("hsc, img_gnn=gat,img_edges=full,img_gnn=gat", grid) == \
        ["hsc", "img_gnn=gat,img_edges=full", "img_gnn=gat"]
    assert _split_names("img_edges=full,hsc", grid) == ["img_edges=full", "hsc"]     # the unknown piece is reported


# --------------------------------------------------------------------------- end to end
def reference_recalls(sims: np.ndarray) -> dict[str, float]:
    """MODEL.md section 4, one query at a time: an image's rank is the best position of any of its 5 captions in its
    row sorted by descending score, a caption's the position of its image in its column; ties count against it."""
    n, m = sims.shape
    i2t = [min(sum(1 for j in range(m) if j // 5 != i and sims[i, j] >= sims[i, c]) for c in range(5 * i, 5 * i + 5))
           for i in range(n)]
    t2i = [sum(1 for k in range(n) if k != j // 5 and sims[k, j] >= sims[j // 5, j]) for j in range(m)]
    recalls = {f"r{k}_{name}": 100.0 * sum(r < k for r in ranks) / len(ranks)
               for name, ranks in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5, 10)}
    return {**recalls, "rsum": sum(recalls.values())}


def test_a_tiny_grid_trains_evaluates_resumes_and_never_redoes_a_finished_run(tmp_path, recipe, capsys, monkeypatch):
    make_synthetic(tmp_path / "data" / "synthetic_precomp", num_train=10, num_dev=10, num_test=10, img_dim=16,
                   num_regions=16)
    monkeypatch.chdir(tmp_path)
    grid = {"recipe": "recipe.json", "data_path": "data", "data_name": "synthetic_precomp", "seeds": [0],
            "configs": {"hsc": {}, "broken": {"vocab_path": "missing.json"}},   # fails in train.py
            "ensembles": {"both": ["hsc", "broken"]}, "evaluate": {"rerank_k": [3]}}
    write(tmp_path / "grid.json", grid)
    args = ["--grid", "grid.json", "--out", "runs", "--results", "study/ablation.json"]
    assert main(args + ["--jobs", "2"]) == 1     # the broken configuration fails, the others finish
    out, err = capsys.readouterr()
    assert "1 run(s) failed" in err and "broken seed 0: training failed" in err and "missing.json" in err
    assert "both seed 0 not evaluated yet: it needs broken seed 0" in err        # its member failed: it waits
    study = json.loads(Path("study/ablation.json").read_text())
    assert [(r["name"], r["seed"]) for r in study["runs"]] == [("hsc", 0)]
    run = study["runs"][0]
    assert run["config"] == {} and run["parameters"] > 0 and len(run["rerank"]) == 1
    trained = read_checkpoint(Path("runs/hsc/seed0/checkpoint/checkpoint.pth"))["train_seconds"]
    assert run["train_seconds"] == round(trained, 1) > 0 and run["train_attempts"] == 1   # the training's own count
    evaluation = json.loads(Path("runs/hsc/seed0/eval.json").read_text())
    assert run["test_rsum"] == evaluation["metrics"]["rsum"]
    assert run["rerank"][0]["shared_rsum"] == evaluation["rerank"][0]["shared_metrics"]["rsum"]
    table = Path("study/ablation.md").read_text()
    assert table.startswith("| configuration |") and "| K = 3 (own / shared) |" in table
    own, shared = run["rerank"][0]["rsum"], run["rerank"][0]["shared_rsum"]
    assert f"| {own:.1f} / {shared:.1f} |" in table
    assert Path("study/ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert Path("runs/hsc/seed0/sims.npy").is_file()                    # kept: an ensemble averages it
    finished = Path("runs/hsc/seed0/run.json").stat().st_mtime_ns
    checkpoint = Path("runs/hsc/seed0/checkpoint/checkpoint.pth").stat().st_mtime_ns

    grid["configs"]["broken"] = {"img_gnn": "gcn", "sim_dim": 4}   # fixed: only the failed runs train again
    write(tmp_path / "grid.json", grid)
    Path("runs/hsc/seed0/sims.npy").unlink()            # as a run finished before an ensemble needed its matrix
    assert main(args + ["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "1 finished, 2 to do here, and 1 finished run(s) to evaluate again for their score matrices" in out
    assert "runs/hsc/seed0  evaluated again to keep its score matrix (sims.npy; no training)" in out
    assert ('runs/both/seed0  {"ensemble": ["hsc", "broken"]} (after hsc seed 0\'s score matrix, broken seed 0)'
            in out)
    assert main(args + ["--dry_run", "--only", "hsc"]) == 0
    assert "1 finished, 0 to do here" in capsys.readouterr().out
    assert main(args + ["--dry_run", "--only", "nope"]) == 2
    assert "--only: nope not in the grid (hsc, broken, both)" in capsys.readouterr().err
    assert main(args + ["--jobs", "0"]) == 2
    assert "argument --jobs: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(args) == 0
    assert "hsc seed 0 -> runs/hsc/seed0 (its best model evaluated again" in capsys.readouterr().out
    assert Path("runs/hsc/seed0/run.json").stat().st_mtime_ns == finished                  # its record as it was,
    assert Path("runs/hsc/seed0/checkpoint/checkpoint.pth").stat().st_mtime_ns == checkpoint   # and not trained
    sims = [np.load(f"runs/{name}/seed0/sims.npy") for name in ("hsc", "broken")]
    assert sims[0].shape == (10, 50)
    report = json.loads(Path("runs/both/seed0/eval.json").read_text())
    assert report["sims"] == ["runs/hsc/seed0/sims.npy", "runs/broken/seed0/sims.npy"]
    expected = reference_recalls((sims[0] + sims[1]) / np.float32(2))
    assert {k: report["metrics"][k] for k in expected} == pytest.approx(expected)
    assert all(reference_recalls(member) != expected for member in sims)      # the average ranks unlike either
    study = json.loads(Path("study/ablation.json").read_text())
    assert [(r["name"], r["seed"]) for r in study["runs"]] == [("hsc", 0), ("broken", 0), ("both", 0)]
    hsc, broken, both = study["runs"]
    assert both["config"] == {"ensemble": ["hsc", "broken"]} and both["test_rsum"] == report["metrics"]["rsum"]
    assert both["parameters"] == hsc["parameters"] + broken["parameters"]
    assert both["train_seconds"] == pytest.approx(hsc["train_seconds"] + broken["train_seconds"], abs=0.1)
    assert "dev_best_rsum" not in both and "rerank" not in both
    assert [row["name"] for row in study["summary"]] == ["hsc", "broken", "both"]
    table = Path("study/ablation.md").read_text()
    assert f"| both | hsc + broken, scores averaged | 1 | {both['test_rsum']:.1f} (one seed: no spread yet) |" in table
    assert "| – | – |" in table                                           # no re-ranking for an ensemble
    stamps = [Path(f"runs/{name}/seed0/run.json").stat().st_mtime_ns for name in ("hsc", "broken", "both")]
    assert main(args) == 0
    assert "3 finished, 0 to do here" in capsys.readouterr().out
    assert [Path(f"runs/{name}/seed0/run.json").stat().st_mtime_ns for name in ("hsc", "broken", "both")] == stamps
    assert main(args + ["--compare", "both", "hsc"]) == 0
    assert capsys.readouterr().out.startswith(f"both vs hsc: {both['test_rsum']:.1f} ± 0.0 (1 seed) against")

    fresh = ["--grid", "grid.json", "--out", "elsewhere", "--results", "study/ablation.json"]   # a fresh clone: the
    assert main(fresh + ["--dry_run"]) == 0                                    # study file, no run folders
    assert "3 finished, 0 to do here" in capsys.readouterr().out
    assert main(fresh + ["--report"]) == 0
    assert "| hsc | (recipe) | 1 |" in capsys.readouterr().out                       # the table, printed
    assert len(json.loads(Path("study/ablation.json").read_text())["runs"]) == 3
    assert main(fresh[:-1] + ["other.json", "--dry_run"]) == 0               # another study file starts afresh
    assert "0 finished, 3 to do here" in capsys.readouterr().out
    Path("broken.json").write_text('{"runs": [{"seed": 0}]}')
    assert main(fresh[:-1] + ["broken.json", "--dry_run"]) == 2
    assert "--results broken.json is not a study written by this command" in capsys.readouterr().err

    grid["ensembles"]["both"] = ["broken", "hsc"]    # a finished ensemble with other members is not silently reused
    write(tmp_path / "grid.json", grid)
    assert main(args) == 2
    assert "runs/both/seed0 holds a run with other options" in capsys.readouterr().err
    grid["ensembles"]["both"] = ["hsc", "broken"]
    grid["configs"]["hsc"] = {"img_layers": 1}       # a finished run with other options is not silently reused
    write(tmp_path / "grid.json", grid)
    assert main(args) == 2
    assert "holds a run with other options" in capsys.readouterr().err


def test_a_resumed_training_is_told_its_run_folder_and_data_again(tmp_path, recipe, monkeypatch):
    """A checkpoint written by a runner started in another folder holds paths relative to that folder: the resumed
    training must still write into this run's folder (else evaluate.py reads a stale best model)."""
    from hsc_pyg.engine import ablation

    monkeypatch.chdir(tmp_path)
    grid = load_grid(write(tmp_path / "grid.json", {"recipe": "recipe.json", "data_path": "data",
                                                     "data_name": "synthetic_precomp", "seeds": [0],
                                                     "configs": {"hsc": {}}}))
    run = grid.runs(Path("runs"))[0]
    (run.folder / "checkpoint").mkdir(parents=True)
    (run.folder / "checkpoint" / "checkpoint.pth").write_bytes(b"interrupted")
    calls = []

    def child(python, argv, log):           # records the command, writes a log and fails, as a crashed training
        calls.append(argv)
        # the attempt is on record before it starts (a runner killed meanwhile does not lose it)
        assert json.loads((run.folder / "timing.json").read_text())["attempts"] == len(calls)
        log.write_text("stopped\n")
        return 1

    monkeypatch.setattr(ablation, "_child", child)
    with pytest.raises(ablation.RunFailed, match="training failed"):
        ablation.train_and_evaluate(grid, run, "python")
    argv = calls[0]
    assert argv[argv.index("--resume") + 1] == str(run.folder / "checkpoint" / "checkpoint.pth")
    options = dict(zip(argv[::2], argv[1::2])) | dict(zip(argv[1::2], argv[2::2]))
    assert options["--model_name"] == str(run.folder / "checkpoint")
    assert options["--logger_name"] == str(run.folder / "log")
    assert (options["--data_path"], options["--data_name"]) == ("data", "synthetic_precomp")


@pytest.mark.parametrize("grid", sorted((Path(__file__).resolve().parents[1] / "configs" / "studies").glob("*.json")),
                         ids=lambda p: p.name)
def test_the_shipped_study_grids_are_valid(grid, monkeypatch):
    monkeypatch.chdir(grid.parents[2])          # their paths are relative to the project root
    loaded = load_grid(grid)
    assert loaded.configs and loaded.baseline in loaded.configs


# --------------------------------------------------------------------------- stopping a runner
def test_children_pass_a_stop_on_and_start_nothing_after_it():
    import signal
    import subprocess
    import sys
    import threading

    from hsc_pyg.engine.ablation import Children

    children, status = Children(), []
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    thread = threading.Thread(target=lambda: status.append(children.call(sleeper, stdout=subprocess.DEVNULL)))
    thread.start()
    for _ in range(500):                      # until it runs (at most 10 s)
        if children.running:
            break
        threading.Event().wait(0.02)
    children.stop(signal.SIGTERM)
    thread.join(30)
    assert status == [-signal.SIGTERM] and not children.running
    with pytest.raises(KeyboardInterrupt):
        children.call(sleeper)                # nothing new starts once stopped


def test_sigterm_to_the_runner_stops_its_training_with_a_checkpoint(tmp_path):
    """``kill RUNNER_PID`` (not the whole group, as a scheduler or a user does) must not leave the training running
    without its runner: the training saves its checkpoint and ends, then the runner does."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    make_synthetic(tmp_path / "data" / "synthetic_precomp", num_train=10, num_dev=10, num_test=10, img_dim=16,
                   num_regions=16)
    write(tmp_path / "recipe.json", {**RECIPE, "num_epochs": 100000})           # runs until stopped
    write(tmp_path / "grid.json", {"recipe": "recipe.json", "data_path": "data", "data_name": "synthetic_precomp",
                                   "seeds": [0], "configs": {"hsc": {}}})
    runner = subprocess.Popen([sys.executable, "-m", "hsc_pyg.ablate", "--grid", "grid.json", "--out", "runs"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log, lock = tmp_path / "runs/hsc/seed0/train.log", tmp_path / "runs/hsc/seed0/checkpoint/.hsc_pyg.lock"
    try:
        deadline = time.monotonic() + 120
        while not (log.is_file() and "dev:" in log.read_text()):             # training, past its first epoch
            assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
            time.sleep(0.2)
        training = json.loads(lock.read_text())["pid"]
        runner.send_signal(signal.SIGTERM)
        out, err = runner.communicate(timeout=120)
        assert runner.returncode == 128 + signal.SIGTERM and "interrupted" in err, (out, err)
        with pytest.raises(ProcessLookupError):
            os.kill(training, 0)              # ended (and reaped by the runner), not left running as an orphan
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)       # whatever is left of the runner's session
    assert "interrupted by SIGTERM" in log.read_text()
    assert read_checkpoint(tmp_path / "runs/hsc/seed0/checkpoint/checkpoint.pth")["iteration"] > 0
    assert not (tmp_path / "runs/hsc/seed0/run.json").exists()             # unfinished: the next runner resumes it
