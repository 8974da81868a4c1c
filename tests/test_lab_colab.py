"""colab/ is generated from notebooks/ by `make colab`, is up to date, and each copy does what Colab needs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
import types
from importlib import metadata
from pathlib import Path
from unittest import mock

import nbformat
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from quantlab import course, env, recipes
from quantlab.lab import colab

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = course.notebook_paths()
COPIES = [colab.COLAB_DIR / p.name for p in CHAPTERS]
GENERATED_ROLES = ["badge", "install-md", "install", "gpu-md", "gpu", "login-md", "login", "model-md", "model"]


def t4_roles(stem: str) -> list[str]:
    """The roles of a copy's last section: its introduction, the GPU check, then each recipe's cells."""
    roles = ["t4-md", "t4-check-gpu"]
    for name in colab.CHAPTER_T4[stem][0]:
        parts = [f"t4-{name}-part{n}" for n in range(1, len(recipes.get_recipe(name).script) + 1)]
        roles += [f"t4-{name}-md", f"t4-{name}-settings", *parts, f"t4-{name}-result", f"t4-{name}-free"]
    return roles


def read(path: Path):
    return nbformat.read(path, as_version=4)


def role(cell) -> str | None:
    return cell.metadata.get(colab.MARKER)


def generated(nb, name: str):
    (cell,) = [c for c in nb.cells if role(c) == name]
    return cell


def parameters_cell(nb):
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    return cell


def assigned_values(source: str) -> dict[str, object]:
    """NAME -> value of each `NAME = ...` in a parameters cell, run with no QUANTLAB_* variable set."""
    names = [n.targets[0].id for n in ast.parse(source).body if isinstance(n, ast.Assign)]
    unset = {k: v for k, v in os.environ.items() if not k.startswith("QUANTLAB_")}
    namespace: dict = {}
    with mock.patch.dict(os.environ, unset, clear=True):
        exec(compile(source, "<parameters>", "exec"), namespace)
    return {name: namespace[name] for name in names}


def pyproject_pins() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return [d for d in tomllib.load(f)["project"]["dependencies"] if "==" in d]


# -- colab/ is current ------------------------------------------------------------------------------


def test_every_chapter_has_a_copy_and_nothing_else():
    assert CHAPTERS, "no chapters found"
    assert sorted(p.name for p in colab.COLAB_DIR.glob("*.ipynb")) == [p.name for p in CHAPTERS], (
        "colab/ does not match notebooks/: run `make colab`")


def test_colab_is_up_to_date(tmp_path):
    colab.write_colab(tmp_path)
    for path in sorted(tmp_path.iterdir()):
        committed = colab.COLAB_DIR / path.name
        assert committed.exists(), f"colab/{path.name} is missing: run `make colab`"
        if path.suffix == ".ipynb":
            fresh, stored = json.loads(path.read_text()), json.loads(committed.read_text())
            differing = [i for i, (a, b) in enumerate(zip(stored["cells"], fresh["cells"])) if a != b]
            assert stored == fresh, (f"colab/{path.name} is out of date with notebooks/ (cells {differing[:5]}, "
                                     f"{len(stored['cells'])} cells against {len(fresh['cells'])}): run `make colab`")
        else:
            assert committed.read_text() == path.read_text(), f"colab/{path.name} is out of date: run `make colab`"


def test_write_colab_removes_copies_of_chapters_that_are_gone(tmp_path):
    (tmp_path / "99_gone.ipynb").write_text("{}")
    written = colab.write_colab(tmp_path, notebooks=CHAPTERS[:1])
    assert [p.name for p in written] == [CHAPTERS[0].name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHAPTERS[0].name, "README.md"])


def test_generation_is_deterministic():
    first = nbformat.writes(colab.colab_notebook(CHAPTERS[0]))
    assert nbformat.writes(colab.colab_notebook(CHAPTERS[0])) == first


# -- each copy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", COPIES, ids=lambda p: p.name)
def test_layout_preamble_chapter_then_t4_section(path):
    nb = read(path)
    nbformat.validate(nb)
    roles = [role(c) for c in nb.cells]
    assert roles[:len(GENERATED_ROLES)] == GENERATED_ROLES
    t4 = t4_roles(path.stem)
    assert roles[-len(t4):] == t4
    assert all(r is None for r in roles[len(GENERATED_ROLES):-len(t4)])
    assert nb.metadata["accelerator"] == "GPU" and nb.metadata["colab"]["gpuType"] == "T4"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "outputs stay empty"
    assert len({c.id for c in nb.cells}) == len(nb.cells), "cell ids are unique"


@pytest.mark.parametrize("path", COPIES, ids=lambda p: p.name)
def test_badge_is_built_from_the_repo_constant(path):
    cell = generated(read(path), "badge")
    url = f"https://colab.research.google.com/github/{colab.REPO}/blob/{colab.BRANCH}/colab/{path.name}"
    assert colab.colab_url(path.name) == url
    assert f"[![Open In Colab]({colab.BADGE_SVG})]({url})" in cell.source
    assert colab.BADGE_SVG == "https://colab.research.google.com/assets/colab-badge.svg"
    assert "generated from it by `make colab`: do not edit it" in cell.source
    assert f"`notebooks/{path.name}`" in cell.source


def test_the_repo_is_named_in_one_place():
    """Only the REPO constant spells the repository; everything else is built from it."""
    source = (ROOT / "quantlab" / "lab" / "colab.py").read_text()
    assert source.count(colab.REPO) == 1


@pytest.mark.parametrize("path", COPIES, ids=lambda p: p.name)
def test_install_cell_pins_equal_pyproject(path):
    source = generated(read(path), "install").source
    tree = ast.parse(source)
    constants = {n.targets[0].id: n.value for n in tree.body if isinstance(n, ast.Assign)}
    pins = [ast.literal_eval(constants["TORCH_PIN"]), *ast.literal_eval(constants["PINS"])]
    assert sorted(pins) == sorted(pyproject_pins())
    assert ast.literal_eval(constants["MIN_TORCH"]) == colab.MIN_TORCH
    assert ast.literal_eval(constants["REPO_URL"]) == f"https://github.com/{colab.REPO}"
    also = ast.literal_eval(constants["ALSO_NEEDED"])
    assert "sentencepiece" in also and not set(also) & set(colab.NOT_ON_COLAB)
    assert '"--no-deps", "-e", str(CHECKOUT)' in source  # quantlab itself, without touching the pins


def test_min_torch_satisfies_every_pinned_package():
    """MIN_TORCH is at least every torch minimum the pinned packages declare, and below the pinned torch."""
    torch_pin, pins, _ = colab.pinned_requirements()
    assert Version(colab.MIN_TORCH) <= Version(torch_pin.split("==")[1]) < Version(colab.TORCH_BELOW)
    declared = []
    for pin in pins:
        package, version = pin.split("==")
        if metadata.version(package) != version:
            pytest.skip(f"{package} {metadata.version(package)} is installed, not the pinned {version}")
        for text in metadata.requires(package) or []:
            requirement = Requirement(text)
            if requirement.name == "torch" and (requirement.marker is None or "extra" in str(requirement.marker)):
                declared.append((package, requirement.specifier))
    assert declared, "the pinned packages declare no torch requirement at all?"
    for package, specifier in declared:
        assert Version(f"{colab.MIN_TORCH}.0") in specifier, f"{package} wants torch {specifier}"
    # torchao declares none, but its __init__ loads its kernels only from 2.11 on.
    import torchao

    assert '_parse_version("2.11.0")' in Path(torchao.__file__).read_text()


@pytest.mark.parametrize("installed, keep", [
    ("2.9.0+cu126", False), ("2.10.1", False), ("2.11.0", True), ("2.11.0+cu128", True), ("2.13.0+cu130", True),
    ("2.14.0.dev20261001+cu126", True), ("3.0.0", False), (None, False), ("", False),
])
def test_keep_installed_torch(installed, keep):
    assert colab.keep_installed_torch(installed, colab.MIN_TORCH, colab.TORCH_BELOW) is keep


def test_install_cell_holds_the_tested_decision_verbatim():
    source = generated(read(COPIES[0]), "install").source
    assert __import__("inspect").getsource(colab.keep_installed_torch).strip() in source
    namespace: dict = {}
    (function,) = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)
                   and n.name == "keep_installed_torch"]
    exec(compile(ast.Module([function], []), "<install cell>", "exec"), namespace)
    assert namespace["keep_installed_torch"]("2.13.0+cu126", "2.11", "3") is True
    assert namespace["keep_installed_torch"]("2.8.0+cu126", "2.11", "3") is False


def run_install_cell(monkeypatch, torch_version: str | None, on_colab: bool = True):
    """Run the install cell with pip and git faked: (the commands it ran, what it printed, its SystemExit or None)."""
    import contextlib
    import io

    commands: list[list[str]] = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd, **kw: commands.append(list(cmd)) or 0)
    real_version = metadata.version

    def version(name):
        if name != "torch":
            return real_version(name)
        if torch_version is None:
            raise metadata.PackageNotFoundError(name)
        return torch_version

    monkeypatch.setattr(metadata, "version", version)
    if on_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    source = generated(read(COPIES[0]), "install").source
    printed, exit = io.StringIO(), None
    with contextlib.redirect_stdout(printed):
        try:
            exec(compile(source, "<install cell>", "exec"), {"__name__": "__main__"})
        except SystemExit as error:
            exit = error
    return commands, printed.getvalue(), exit


def pip_commands(commands):
    return [c[5:] for c in commands if c[1:5] == ["-m", "pip", "install", "--quiet"]]


def test_install_cell_keeps_a_compatible_colab_torch(monkeypatch):
    commands, printed, exit = run_install_cell(monkeypatch, "2.12.0+cu126")
    assert exit is None
    pins, quantlab = pip_commands(commands)
    assert pins[0] == "torch==2.12.0+cu126", "naming the installed torch keeps pip from replacing it"
    assert sorted(pins[1:len(pyproject_pins())]) == sorted(set(pyproject_pins()) - {"torch==2.13.0"})
    assert not any("--index-url" in c for c in pip_commands(commands))
    assert quantlab == ["--no-deps", "-e", colab.CHECKOUT]
    assert ["git", "clone", "--depth", "1", f"https://github.com/{colab.REPO}", colab.CHECKOUT] in commands
    assert "Keeping Colab's torch 2.12.0+cu126" in printed


@pytest.mark.parametrize("torch_version", ["2.8.0+cu126", "3.1.0", None])
def test_install_cell_replaces_an_incompatible_torch_and_asks_for_a_restart(monkeypatch, torch_version):
    commands, printed, exit = run_install_cell(monkeypatch, torch_version)
    torch_install, pins, quantlab = pip_commands(commands)
    assert torch_install == ["torch==2.13.0", "torchvision", "--index-url", colab.TORCH_INDEX_URL]
    assert colab.TORCH_INDEX_URL.startswith("https://download.pytorch.org/whl/cu12")
    assert sorted(pins[:len(pyproject_pins()) - 1]) == sorted(set(pyproject_pins()) - {"torch==2.13.0"})
    assert quantlab == ["--no-deps", "-e", colab.CHECKOUT]
    # it says what it installs and from where before doing it, and stops with the restart instruction
    assert f"Installing torch==2.13.0 and a torchvision built for it from {colab.TORCH_INDEX_URL}" in printed
    assert "Runtime > Restart session" in printed and "Runtime > Restart session" in str(exit)


def test_install_cell_does_nothing_off_colab(monkeypatch):
    commands, printed, exit = run_install_cell(monkeypatch, "2.13.0", on_colab=False)
    assert commands == [] and exit is None and "Not on Colab" in printed


@pytest.mark.parametrize("path", COPIES, ids=lambda p: p.name)
def test_gpu_check(path):
    source = generated(read(path), "gpu").source
    assert "torch.cuda.is_available()" in source
    assert "Runtime > Change runtime type > T4 GPU" in source
    assert "ql.env.device_info" in source and "compute capability" in source
    assert "No bf16" in source and "No fp8" in source and "mini" in source


def test_gpu_check_runs_here(capsys):
    """On this machine (no GPU) the cell prints the instructions instead of failing."""
    import torch

    exec(generated(read(COPIES[0]), "gpu").source, {})
    printed = capsys.readouterr().out
    if torch.cuda.is_available():
        assert "compute capability" in printed
    else:
        assert "Runtime > Change runtime type > T4 GPU" in printed and "CPU" in printed


def fake_t4(monkeypatch, patch_torch: bool = True):
    """Make this machine look like a Colab T4 runtime to the generated cells."""
    import torch

    import quantlab as ql

    t4 = ql.env.describe_gpu("Tesla T4", (7, 5), total_memory_gib=14.7, free_memory_gib=14.6)
    if patch_torch:  # only for cells that import nothing more: libraries imported later would believe it too
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ql.env, "device_info", lambda device=None: t4)
    monkeypatch.setattr(ql.env, "host_memory_gib", lambda: (12.7, 11.0))


def test_gpu_check_on_a_t4(monkeypatch, capsys):
    fake_t4(monkeypatch)
    exec(generated(read(COPIES[0]), "gpu").source, {})
    printed = capsys.readouterr().out
    assert "GPU: Tesla T4, 14.7 GiB (14.6 GiB free), compute capability 7.5" in printed
    assert "No bf16" in printed and "No fp8" in printed and "Runtime >" not in printed


@pytest.mark.parametrize("path", COPIES, ids=lambda p: p.name)
def test_login_falls_back_to_schnell(path):
    nb = read(path)
    login, model = generated(nb, "login").source, generated(nb, "model").source
    assert "notebook_login()" in login and "get_token()" in login
    assert model.index(colab.DEV) < model.index(colab.SCHNELL), "FLUX.1-dev first, schnell as the fallback"
    assert "ql.models.check_hub_access" in model and "except ql.ModelUnavailableError" in model
    assert "FULL_MODEL =" in model


@pytest.mark.parametrize("gated, expected", [(True, colab.SCHNELL), (False, colab.DEV)])
def test_model_cell_sets_full_model(monkeypatch, capsys, gated, expected):
    """Without access to FLUX.1-dev the cell falls back to schnell, and says why; it never blocks."""
    import quantlab as ql

    def check(spec):
        if gated and spec.name == colab.DEV:
            raise ql.ModelUnavailableError("FLUX.1-dev is gated and this machine has no token with access to it.")
        return spec.name

    monkeypatch.setattr(ql.models, "check_hub_access", check)
    namespace = {"ql": ql}
    exec(generated(read(COPIES[0]), "model").source, namespace)
    assert namespace["FULL_MODEL"] == expected
    printed = capsys.readouterr().out
    assert ("is gated" in printed and "fallback" in printed) if gated else "fallback" not in printed


def test_model_cell_skips_when_nothing_can_be_downloaded(monkeypatch, capsys):
    import quantlab as ql

    def check(spec):
        raise ql.ModelUnavailableError("Cannot reach the Hugging Face Hub.")

    monkeypatch.setattr(ql.models, "check_hub_access", check)
    namespace = {"ql": ql}
    exec(generated(read(COPIES[0]), "model").source, namespace)
    assert namespace["FULL_MODEL"] is None and "skipped" in capsys.readouterr().out


# -- the chapter inside the copy ----------------------------------------------------------------------


@pytest.mark.parametrize("path", COPIES, ids=lambda p: p.name)
def test_t4_safe_parameter_defaults(path):
    chapter = read(ROOT / "notebooks" / path.name)
    copy_source = parameters_cell(read(path)).source
    values = assigned_values(copy_source)
    assert values["MODEL"] == "mini"
    defaults = {name: node.value for name, node in colab._environ_defaults(ast.parse(copy_source)).items()}
    assert defaults["MODEL"] == "mini" and defaults["FULL_HEIGHT"] == defaults["FULL_WIDTH"] == "512"
    assert 'MODEL = os.environ.get("QUANTLAB_MODEL", "mini")' in copy_source  # papermill and the environment still work
    assert values["FULL_HEIGHT"] == values["FULL_WIDTH"] == 512 and values["FULL_STEPS"] == 0
    assert all(f'"QUANTLAB_{name}"' in copy_source for name in values if name != "MODEL")
    assert not any(isinstance(v, str) and "bfloat16" in v for v in values.values()), "no bf16 on a T4"
    # every other default is the chapter's own
    original = assigned_values(parameters_cell(chapter).source)
    changed = {name for name in original if values[name] != original[name]}
    assert changed <= set(colab.T4_DEFAULTS)
    assert set(values) - set(original) == {name for name, _, _ in colab.FULL_PARAMETERS}


def test_t4_parameters_rewrites_only_the_default():
    source = ('import os\n\nMODEL = os.environ.get("QUANTLAB_MODEL", "tiny")  # note\n'
              'SEED = int(os.environ.get("QUANTLAB_SEED", "0"))')
    rewritten = colab.t4_parameters(source)
    assert 'MODEL = os.environ.get("QUANTLAB_MODEL", "mini")  # note' in rewritten
    assert 'SEED = int(os.environ.get("QUANTLAB_SEED", "0"))' in rewritten
    with pytest.raises(ValueError, match="QUANTLAB_MODEL"):
        colab.t4_parameters('import os\nSEED = int(os.environ.get("QUANTLAB_SEED", "0"))')


@pytest.mark.parametrize("path", COPIES, ids=lambda p: p.name)
def test_chapter_cells_are_otherwise_unchanged(path):
    chapter = read(ROOT / "notebooks" / path.name)
    inside = [c for c in read(path).cells if role(c) is None]
    assert len(inside) == len(chapter.cells)
    for mine, theirs in zip(inside, chapter.cells):
        assert (mine.cell_type, mine.id, mine.metadata) == (theirs.cell_type, theirs.id, theirs.metadata)
        if "parameters" in theirs.metadata.get("tags", []):
            assert mine.source == colab.t4_parameters(theirs.source)
        else:
            assert mine.source == theirs.source


# -- the last section ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", COPIES, ids=lambda p: p.name)
def test_t4_section_is_the_recipes_whole_scripts_one_part_a_cell(path):
    nb = read(path)
    assert generated(nb, "t4-md").source.startswith("## FLUX.1-dev on this T4")
    names, reason = colab.CHAPTER_T4[path.stem]
    assert reason and names
    for name in names:
        recipe = recipes.get_recipe(name)
        settings = generated(nb, f"t4-{name}-settings").source
        assert 'DEVICE, DTYPE = "cuda", torch.float16' in settings and "MAX_SEQUENCE_LENGTH = " in settings
        assert "PROMPT = ql.get_model(FULL_MODEL).prompt" in settings
        parts = [generated(nb, f"t4-{name}-part{n}").source for n in range(1, len(recipe.script) + 1)]
        assert parts == [(recipes.SCRIPTS_DIR / part).read_text().strip() for part in recipe.script]
        result = generated(nb, f"t4-{name}-result").source
        assert f"<= {env.COLAB_T4_GPU_GIB:g}" in result
        for cell in (settings, *parts, result):
            ast.parse(cell)


def test_every_chapter_names_t4_recipes_with_a_whole_script():
    assert set(colab.CHAPTER_T4) == {path.stem for path in CHAPTERS}
    for names, _ in colab.CHAPTER_T4.values():
        assert all(recipes.get_recipe(name).script for name in names)


def test_t4_section_stops_without_a_gpu(monkeypatch, capsys):
    """Run on a CPU, the section says why it skips, and its recipe cells refuse to start."""
    import torch

    import quantlab as ql

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    nb = read(colab.COLAB_DIR / CHAPTERS[1].name)
    namespace = {"ql": ql, "torch": torch, "FULL_MODEL": colab.SCHNELL}
    exec(generated(nb, "t4-check-gpu").source, namespace)
    assert "Skipped: this runtime has no CUDA GPU" in capsys.readouterr().out and namespace["T4_READY"] is False
    name = colab.CHAPTER_T4[CHAPTERS[1].stem][0][0]
    with pytest.raises(AssertionError, match="need a CUDA GPU"):
        exec(generated(nb, f"t4-{name}-settings").source, namespace)


# -- README -------------------------------------------------------------------------------------------


def test_readme_links_every_copy():
    text = (colab.COLAB_DIR / "README.md").read_text()
    for path in CHAPTERS:
        assert f"({colab.colab_url(path.name)})" in text
    assert "quantlab/lab/colab.py" in text and "`REPO`" in text and "make colab" in text
