"""The two install routes name the same stack: pyproject.toml (pip) and environment.yml (conda)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

RUNTIME = {"torch", "torch-geometric", "numpy", "nltk", "networkx", "matplotlib", "tensorboard", "tqdm"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_pyproject_pins_torch_and_lists_the_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "hsc_pyg"
    deps = project["dependencies"]
    assert "torch==2.13.0" in deps
    assert {_name(d) for d in deps} == RUNTIME
    extras = project["optional-dependencies"]
    assert {_name(d) for d in extras["scatter"]} == {"torch-scatter"}
    assert {"pytest", "pyyaml"} <= {_name(d) for d in extras["dev"]}


def test_environment_yml_is_a_valid_conda_environment_for_the_same_stack():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "hsc_pyg" and env["channels"]
    deps = env["dependencies"]
    conda = {_name(d) for d in deps if isinstance(d, str)}
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict)]
    assert len(pip_sections) == 1 and {"python", "pip"} <= conda
    pip = pip_sections[0]
    assert "torch==2.13.0" in pip and "-e ." in pip
    assert RUNTIME | {"torch-scatter", "pytest", "pyyaml"} <= conda | {_name(d) for d in pip if d != "-e ."}
    python = next(d for d in deps if isinstance(d, str) and _name(d) == "python")
    assert tuple(int(p) for p in python.split("=")[-1].split(".")) >= (3, 10)
