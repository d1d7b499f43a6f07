"""The install routes agree: pyproject.toml (ranges), constraints.txt (the exact versions tested, which `make` passes
to pip) and environment.yml (conda); and an installed torch-scatter is really picked up by PyG."""
from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

RUNTIME = {"torch", "torch-geometric", "numpy", "nltk", "networkx", "matplotlib", "tensorboard", "tqdm"}
DEV = {"pytest", "pyyaml"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared() -> dict[str, Requirement]:
    """Every dependency pyproject.toml names (runtime and extras), by normalised name."""
    project = _project()
    lines = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {_name(line): Requirement(line) for line in lines}


def _constraints(file: str = "constraints.txt") -> dict[str, Version]:
    pins = {}
    for line in (ROOT / file).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{file}: {line!r} is not an exact pin (name==version)"
            pins[_name(name)] = Version(version)
    return pins


def _environment() -> tuple[list[str], list[str]]:
    """environment.yml's conda lines and its pip lines."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "hsc_pyg" and env["channels"]
    deps = env["dependencies"]
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict)]
    assert len(pip_sections) == 1
    return [d for d in deps if isinstance(d, str)], pip_sections[0]


def test_pyproject_states_ranges_not_pins():
    project = _project()
    assert project["name"] == "hsc_pyg"
    declared = _declared()
    assert {_name(d) for d in project["dependencies"]} == RUNTIME
    assert {_name(d) for d in project["optional-dependencies"]["scatter"]} == {"torch-scatter"}
    assert DEV <= {_name(d) for d in project["optional-dependencies"]["dev"]}
    for name, requirement in declared.items():
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators and "==" not in operators, f"{name}: a tested lower bound, not a pin"


def test_torch_and_pyg_floors_are_the_versions_the_floor_run_used():
    """pyproject.toml's lower bounds of torch and torch-geometric are constraints-floor.txt's pins (`make test-floor`
    runs the default suite on them), not guesses."""
    declared, floor = _declared(), _constraints("constraints-floor.txt")
    for name in ("torch", "torch-geometric"):
        assert declared[name].specifier == SpecifierSet(f">={floor[name]}"), f"{name}: {declared[name]} vs floor run"
        assert floor[name] < _constraints()[name], f"{name}: the floor is not older than today's set"


@pytest.mark.parametrize("file", ["constraints.txt", "constraints-floor.txt"])
def test_constraints_pin_every_declared_dependency_inside_its_range(file):
    pins = _constraints(file)
    for name, requirement in _declared().items():
        if file == "constraints.txt" or name in RUNTIME | DEV:
            assert name in pins, f"{file} has no line for {name}"
        if name in pins:
            assert pins[name] in requirement.specifier, f"{file}: {name}=={pins[name]} is outside {requirement}"
    # No local build label (`+cpu`): the CPU wheel and PyPI's CUDA build of the same release must both satisfy it.
    assert not pins["torch"].local
    assert "hsc-pyg" not in pins


def test_make_passes_the_constraints_to_every_pip_install():
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line or "-c constraints-floor.txt" in line for line in installs)
    assert makefile.count("$(PIP_INSTALL)") >= 3 and makefile.count("$(FLOOR_INSTALL)") >= 2


def test_environment_yml_has_the_same_ranges_as_pyproject():
    conda, pip = _environment()
    assert {"python", "pip"} <= {_name(d) for d in conda} and "-e ." in pip
    python = next(d for d in conda if _name(d) == "python")
    assert Version(python.split("=")[-1]) in SpecifierSet(_project()["requires-python"])
    listed = {_name(d): Requirement(d).specifier for d in conda + pip if d != "-e ." and _name(d) not in {"python", "pip"}}
    declared = _declared()
    assert RUNTIME | DEV <= set(listed), f"environment.yml lacks {sorted(RUNTIME | DEV - set(listed))}"
    for name, specifier in listed.items():
        assert name in declared, f"environment.yml names {name}, which pyproject.toml does not"
        assert specifier == declared[name].specifier, f"{name}: environment.yml {specifier} != pyproject {declared[name]}"


@pytest.mark.skipif(importlib.util.find_spec("torch_scatter") is None,
                    reason="torch-scatter is not installed (`make test-scatter` builds and installs it)")
def test_installed_torch_scatter_is_used_by_pyg():
    """Installed but not loadable (built against another torch) shows as WITH_TORCH_SCATTER False: a failure here.

    PyG's CSR segment reduction ([E, F] values, [N + 1] pointers -> [N, F]) must run torch_scatter's kernel and give
    the plain per-segment sums.
    """
    import torch_geometric.typing
    from torch.profiler import ProfilerActivity, profile
    from torch_geometric.utils import segment

    assert torch_geometric.typing.WITH_TORCH_SCATTER
    values = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    ptr = torch.tensor([0, 4, 4, 7, 10])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = segment(values, ptr, reduce="sum")
    assert any(event.key.startswith("torch_scatter::") for event in prof.key_averages())
    expected = torch.stack([values[a:b].sum(0) for a, b in zip(ptr[:-1].tolist(), ptr[1:].tolist())])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
