"""Versions are pinned in one place (pyproject.toml); environment.yml and the Makefile agree with it."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIRED_PINS = {
    "torch": "2.13.0", "diffusers": "0.42.1", "transformers": "5.23.0", "accelerate": "1.15.0",
    "bitsandbytes": "0.50.2", "torchao": "0.18.0", "optimum-quanto": "0.2.7", "gguf": "0.19.0",
    # chapter 08's backends (diffusers 0.42.1 supports these versions; see results/README.md)
    "sdnq": "0.2.8", "nvidia-modelopt": "0.37.0", "auto-round": "0.16.1",
}
UNPINNED = {"jupyterlab", "ipykernel", "papermill", "matplotlib", "ipywidgets", "pandas", "safetensors",
            "sentencepiece"}


def pyproject_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def environment_pip_requirements() -> list[str]:
    lines = (REPO / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    requirements = []
    for line in lines[start + 1:]:
        match = re.match(r"^\s{6,}- (\S+)\s*$", line)
        if not match:
            break
        requirements.append(match.group(1))
    return requirements


def as_pins(requirements: list[str]) -> dict[str, str | None]:
    pins = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        pins[name.lower()] = version or None
    return pins


def test_pyproject_pins_what_the_course_needs():
    pins = as_pins(pyproject_requirements())
    assert {k: pins.get(k) for k in REQUIRED_PINS} == REQUIRED_PINS
    assert UNPINNED <= set(pins)
    assert all(pins[name] is None for name in UNPINNED)


def test_the_hopper_extra_is_the_pin_chapter_06_names():
    from quantlab.recipes import FA3_REQUIREMENT

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras == {"hopper": [FA3_REQUIREMENT]} and FA3_REQUIREMENT == "fa3-fwd==0.0.3"


def test_environment_yml_agrees_with_pyproject():
    assert environment_pip_requirements() == pyproject_requirements()


def test_environment_yml_requires_python_311():
    assert "python>=3.11" in (REPO / "environment.yml").read_text()
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"] == ">=3.11"


@pytest.mark.parametrize("name", sorted(REQUIRED_PINS))
def test_installed_versions_are_the_pinned_ones(name):
    installed = metadata.version(name).split("+")[0]  # torch reports 2.13.0+cpu
    assert installed == REQUIRED_PINS[name]


def test_makefile_installs_torch_first_from_the_pyproject_pin():
    makefile = (REPO / "Makefile").read_text()
    assert REQUIRED_PINS["torch"] not in makefile  # the number lives in pyproject.toml only
    dry_run = subprocess.run(["make", "-n", "-B", "setup", "PYTHON=python3"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.splitlines()
    torch_line = next(i for i, line in enumerate(dry_run) if '"torch==2.13.0"' in line)
    package_line = next(i for i, line in enumerate(dry_run) if "install --quiet -e ." in line)
    assert torch_line < package_line


def test_ci_runs_exactly_make_test():
    script = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert script[-1].strip() == "make test"


def test_make_lab_opens_jupyterlab_as_root_too():
    """Containers and cloud machines often run as root, where JupyterLab refuses to start without --allow-root."""
    import os

    dry_run = subprocess.run(["make", "-n", "lab"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    command = next(line for line in dry_run.splitlines() if "jupyter lab notebooks" in line)
    assert command.rstrip().endswith("--allow-root") == (os.getuid() == 0)


def test_the_modelopt_pin_chapter_08_checks_is_the_one_installed():
    from quantlab.env import MODELOPT_PIN

    assert MODELOPT_PIN in pyproject_requirements()
