"""The ablation runner: grid checks, Welch's test against known values, and a tiny grid trained end to end, resumed
after a failure without redoing finished runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

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
])
def test_bad_grids_are_one_line_errors(tmp_path, grid, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_grid(write(tmp_path / "grid.json", grid))
    assert "\n" not in str(e.value)


def test_axes_make_the_product_and_common_options_reach_every_configuration(tmp_path, recipe):
    grid = load_grid(write(tmp_path / "grid.json", {
        "recipe": str(recipe), "seeds": [0, 1], "common": {"num_epochs": 2},
        "configs": {"hsc": {}}, "axes": {"img_gnn": ["gat", "gcn"], "img_edges": ["full", "knn:4"]}}))
    assert list(grid.configs) == ["hsc", "img_gnn=gat,img_edges=full", "img_gnn=gat,img_edges=knn:4",
                                  "img_gnn=gcn,img_edges=full", "img_gnn=gcn,img_edges=knn:4"]
    assert all(options["num_epochs"] == 2 for options in grid.configs.values())
    runs = grid.runs(tmp_path / "out")
    assert [(r.name, r.seed) for r in runs[:5]] == [(name, 0) for name in grid.configs]   # seed-major
    config = grid.config(runs[1])
    assert (config.img_gnn, config.embed_size, config.num_epochs) == ("gat", 16, 2)
    assert config.model_name == str(tmp_path / "out" / "img_gnn=gat,img_edges=full" / "seed0" / "checkpoint")


def test_summary_means_stds_and_the_baseline_comparison(tmp_path, recipe):
    grid = load_grid(write(tmp_path / "grid.json", {"recipe": str(recipe), "seeds": [0, 1, 2],
                                                   "configs": {"a": {}, "b": {"itc_weight": 1.0}}}))
    runs = [{"name": n, "seed": s, "test_rsum": v, "parameters": 10, "seconds_per_epoch": 1.0}
            for n, values in (("a", [200.0, 202.0, 204.0]), ("b", [190.0, 191.0, 195.0]))
            for s, v in enumerate(values)]
    a, b = summarize(grid, runs)
    assert (a["test_rsum_mean"], a["test_rsum_std"]) == (202.0, 2.0)
    assert "p" not in a and b["diff_vs_baseline"] == pytest.approx(192.0 - 202.0)
    assert (b["t"], b["p"]) == welch([190.0, 191.0, 195.0], [200.0, 202.0, 204.0])
    table = markdown(grid, summarize(grid, runs[:4]))                # b has one seed so far: no "± 0.0"
    assert "| 202.0 ± 2.0 |" in table and "| 190.0 (one seed: no spread yet) |" in table


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
def test_a_tiny_grid_trains_evaluates_resumes_and_never_redoes_a_finished_run(tmp_path, recipe, capsys, monkeypatch):
    make_synthetic(tmp_path / "data" / "synthetic_precomp", num_train=10, num_dev=10, num_test=10, img_dim=16,
                   num_regions=16)
    monkeypatch.chdir(tmp_path)
    grid = {"recipe": "recipe.json", "data_path": "data", "data_name": "synthetic_precomp", "seeds": [0],
            "configs": {"hsc": {}, "broken": {"vocab_path": "missing.json"}},   # fails in train.py
            "evaluate": {"rerank_k": [3]}}
    write(tmp_path / "grid.json", grid)
    args = ["--grid", "grid.json", "--out", "runs", "--results", "study/ablation.json"]
    assert main(args + ["--jobs", "2"]) == 1     # the broken configuration fails, the others finish
    out, err = capsys.readouterr()
    assert "1 run(s) failed" in err and "broken seed 0: training failed" in err and "missing.json" in err
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
    finished = Path("runs/hsc/seed0/run.json").stat().st_mtime_ns

    grid["configs"]["broken"] = {"img_edges": "knn:4"}   # fixed: only the failed runs train again
    write(tmp_path / "grid.json", grid)
    assert main(args + ["--dry_run"]) == 0
    assert "1 finished, 1 to do here" in capsys.readouterr().out
    assert main(args + ["--dry_run", "--only", "hsc"]) == 0
    assert "1 finished, 0 to do here" in capsys.readouterr().out
    assert main(args + ["--dry_run", "--only", "nope"]) == 2
    assert "--only: nope not in the grid (hsc, broken)" in capsys.readouterr().err
    assert main(args + ["--jobs", "0"]) == 2
    assert "argument --jobs: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(args) == 0
    assert Path("runs/hsc/seed0/run.json").stat().st_mtime_ns == finished
    assert len(json.loads(Path("study/ablation.json").read_text())["runs"]) == 2

    fresh = ["--grid", "grid.json", "--out", "elsewhere", "--results", "study/ablation.json"]   # a fresh clone: the
    assert main(fresh + ["--dry_run"]) == 0                                    # study file, no run folders
    assert "2 finished, 0 to do here" in capsys.readouterr().out
    assert main(fresh + ["--report"]) == 0
    assert "| hsc | (recipe) | 1 |" in capsys.readouterr().out                       # the table, printed
    assert len(json.loads(Path("study/ablation.json").read_text())["runs"]) == 2
    assert main(fresh[:-1] + ["other.json", "--dry_run"]) == 0               # another study file starts afresh
    assert "0 finished, 2 to do here" in capsys.readouterr().out
    Path("broken.json").write_text('{"runs": [{"seed": 0}]}')
    assert main(fresh[:-1] + ["broken.json", "--dry_run"]) == 2
    assert "--results broken.json is not a study written by this command" in capsys.readouterr().err

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
