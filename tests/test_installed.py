"""The package runs where it is installed: ``pip install .`` (not editable) into a fresh virtual environment, then
every command through the console entry point ``hsc-pyg`` or ``python -m hsc_pyg`` from a folder outside the checkout
(the slow test); the fast ones check the entry point's table of commands and that no ``python -m`` form exits 0
having done nothing."""
from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from hsc_pyg.cli import main as entry

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--embed_size", "16", "--word_dim", "8", "--sim_dim", "8", "--img_layers", "1", "--txt_layers", "1",
        "--batch_size", "10", "--vocab_threshold", "1", "--num_epochs", "1", "--device", "cpu"]


def test_the_console_entry_point_is_the_dispatcher_and_every_command_has_a_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"hsc-pyg": "hsc_pyg.cli.main:run"}
    for name, (module, _) in entry.COMMANDS.items():
        command = __import__(f"hsc_pyg.cli.{module}", fromlist=["main", "build_parser"])
        assert command.build_parser().prog == f"hsc-pyg {name}"


def test_the_dispatcher_lists_the_commands_and_refuses_an_unknown_one(capsys):
    assert entry.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"\n  {name} " in usage for name in entry.COMMANDS)
    assert entry.main([]) == 2
    assert capsys.readouterr().err == ("hsc-pyg: error: a command is needed; one of " + ", ".join(entry.COMMANDS)
                                       + " (see hsc-pyg --help)\n")
    assert entry.main(["trian"]) == 2
    assert capsys.readouterr().err == ("hsc-pyg: error: no command 'trian'; one of " + ", ".join(entry.COMMANDS)
                                       + " (see hsc-pyg --help)\n")
    assert entry.main(["vocab", "--threshold", "x"]) == 2      # a bad flag: the command's own one-line usage error
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("name", list(entry.COMMANDS))
def test_every_command_explains_itself(name, capsys):
    assert entry.main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: hsc-pyg {name} ")


@pytest.mark.parametrize("module, command", [("hsc_pyg.data.synthetic", "synthetic"), ("hsc_pyg.data.vocab", "vocab")])
def test_library_modules_once_run_as_commands_refuse_with_one_line(tmp_path, module, command):
    result = subprocess.run([sys.executable, "-m", module, "--out", str(tmp_path / "x")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not (tmp_path / "x").exists()
    assert result.stderr.splitlines() == [f"error: {module} is a library module, not a command; run `hsc-pyg {command}` (or `python -m "
                      f"hsc_pyg {command}`; --help lists its flags)"]


#: every ``python -m`` form of a command: the package, its tool packages' ``__main__.py`` and each command module
PYTHON_M_FORMS = sorted({"hsc_pyg", "hsc_pyg.cli.main"}
                        | {f"hsc_pyg.{p.parent.name}" for p in (ROOT / "hsc_pyg").glob("*/__main__.py")}
                        | {f"hsc_pyg.cli.{module}" for module, _ in entry.COMMANDS.values()})


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")   # runpy on an imported module
@pytest.mark.parametrize("module", PYTHON_M_FORMS)
def test_every_python_m_form_explains_itself_and_without_arguments_runs_or_refuses_in_one_line(module, tmp_path,
                                                                                               monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", [module, *argv])
        with pytest.raises(SystemExit) as stop:
            runpy.run_module(module, run_name="__main__")
        out, err = capfd.readouterr()
        return stop.value.code, out, err

    status, out, err = run("--help")
    assert status == 0 and out.startswith("usage: hsc-pyg") and err == ""
    status, out, err = run()
    if module == "hsc_pyg.cli.synthetic":      # the one command whose every flag has a default: the built-in data
        assert status == 0 and len((tmp_path / "data/synthetic_precomp/train_caps.txt").read_text().splitlines()) > 0
    else:
        assert status == 2 and err.count("\n") == 1 and "error" in err, err
        assert list(tmp_path.iterdir()) == []   # a refusal leaves nothing behind (train: not its empty run folders)


def _install(tmp_path: Path) -> Path:
    """A fresh venv holding a wheel-style install of a copy of the checkout; torch, PyG and the other dependencies
    are the running interpreter's (a .pth line), so nothing is downloaded."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "hsc_pyg", source / "hsc_pyg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    str(source)], check=True, timeout=600, cwd=tmp_path)
    return venv


@pytest.mark.slow
def test_pip_install_runs_every_command_outside_the_checkout(tmp_path):
    venv = _install(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1", HSC_PYG_CACHE=str(work / "cache"))

    def run(*argv: str) -> str:
        result = subprocess.run(list(argv), cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{argv}: {result.stderr[-2000:]}"
        return result.stdout

    where = run("python", "-c", "import hsc_pyg; print(hsc_pyg.__file__)")
    assert Path(where.strip()).is_relative_to(venv) and not (work / "hsc_pyg").exists()
    run("hsc-pyg", "synthetic", "--out", "data/synthetic_precomp", "--train", "10", "--dev", "10", "--test", "10",
        "--img_dim", "16", "--regions", "16")
    run("hsc-pyg", "train", "--data_path", "data", "--data_name", "synthetic_precomp", "--model_name", "runs/m",
        "--logger_name", "runs/m/log", "--no_progress", *TINY)
    model = "runs/m/model_best.pth"
    assert (work / model).is_file()
    run("hsc-pyg", "evaluate", "--model", model, "--data_path", "data", "--data_name", "synthetic_precomp",
        "--json", "eval.json", "--device", "cpu", "--no_progress")
    assert 0 <= json.loads((work / "eval.json").read_text())["metrics"]["rsum"] <= 600
    out = run("hsc-pyg", "search", "--model", model, "--data_path", "data", "--data_name", "synthetic_precomp",
              "--query", "a red cube", "--k", "3", "--device", "cpu", "--no_progress")
    assert len(out.splitlines()) == 3
    recipe = dict(zip(TINY[::2], TINY[1::2]))
    (work / "recipe.json").write_text(json.dumps({k[2:]: int(v) if v.isdigit() else v for k, v in recipe.items()}))
    grid = {"recipe": "recipe.json", "data_path": "data", "data_name": "synthetic_precomp", "seeds": [0],
            "configs": {"hsc": {}}}
    (work / "grid.json").write_text(json.dumps(grid))
    run("python", "-m", "hsc_pyg", "ablate", "--grid", "grid.json", "--out", "study")
    record = json.loads((work / "study" / "hsc" / "seed0" / "run.json").read_text())
    assert record["name"] == "hsc" and 0 <= record["test_rsum"] <= 600
