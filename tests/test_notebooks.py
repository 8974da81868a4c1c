"""Every chapter follows the course's conventions, teaches the real API in a whole-recipe cell, and runs end to end.

Each notebook runs once, as stored (the parameters cell's defaults: the mini model), through papermill, which
stops at the first error and names the cell; the run must print at most 30 lines to stderr.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nbformat
import pytest

import quantlab as ql
from quantlab import course

NOTEBOOKS = course.notebook_paths()
# A chapter imports the quantlab public API, the libraries it teaches, and os for its parameters; `resource` reads a
# CPU's peak memory in the whole-recipe cells.
ALLOWED_IMPORTS = {"os", "resource", "gc", "warnings", "torch", "quantlab", "diffusers", "transformers", "bitsandbytes",
                   "torchao", "optimum", "gguf", "sdnq", "modelopt", "auto_round"}
MAX_WORDS, MAX_CELLS, MAX_CHECK_LINES, MAX_STDERR_LINES = 3000, 45, 25, 30


def read(path: Path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def words(nb) -> int:
    return len(re.findall(r"\w+", markdown(nb)))


def test_there_are_chapters():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_tour.ipynb"
    assert [p.stem[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(len(NOTEBOOKS))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped_in_git(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
    assert dirty == [], f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_reads_the_environment(path):
    nb = read(path)
    tagged = [c for c in code_cells(nb) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    source = tagged[0].source
    assert 'MODEL = os.environ.get("QUANTLAB_MODEL", "mini")' in source
    assigned = [n.targets[0].id for n in ast.parse(source).body if isinstance(n, ast.Assign)]
    assert assigned and all(name.isupper() for name in assigned)
    assert all(f'"QUANTLAB_{name}"' in source for name in assigned if name != "MODEL")
    # papermill reads one "=" a line to find the parameters (a second one, as in "==", makes it warn and skip)
    code_lines = [line.split("#")[0] for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert all(line.count("=") <= 1 for line in code_lines)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_imports_only_quantlab_and_the_libraries_taught(path):
    imported = set()
    for cell in code_cells(read(path)):
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED_IMPORTS, f"{path.name} imports {sorted(imported - ALLOWED_IMPORTS)}"
    assert "quantlab" in imported
    sources = "\n".join(c.source for c in code_cells(read(path)))
    assert "quantlab.lab" not in sources, "chapters never import the lab"
    assert "torch_dtype=" not in sources, "diffusers 0.42 calls it dtype="


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_skeleton_and_length(path):
    nb = read(path)
    text = markdown(nb)
    for heading in ("What you will learn", "Prerequisites", "## Check", "## Summary", "## Exercises"):
        assert heading in text, f"{path.name} lacks {heading!r}"
    assert nb.cells[-1].cell_type == "markdown" and "## Exercises" in nb.cells[-1].source
    assert words(nb) <= MAX_WORDS, f"{path.name}: {words(nb)} words of markdown (a sitting is about {MAX_WORDS})"
    assert len(nb.cells) <= MAX_CELLS, f"{path.name}: {len(nb.cells)} cells"
    checks = [c for c in code_cells(nb) if c.source.count("assert ") >= 3]
    assert checks, f"{path.name} has no check cell of asserts"
    check = checks[-1].source.strip().splitlines()
    assert len(check) <= MAX_CHECK_LINES, f"{path.name}: the check cell has {len(check)} lines"


def whole_recipe_cells(nb):
    return [c for c in code_cells(nb) if "whole-recipe" in c.metadata.get("tags", [])]


def guarded(body: str) -> str:
    """A whole script as a chapter shows it where diffusers refuses it on this machine: inside a try that prints
    diffusers' own refusal in one line (a CPU has no GPU for bitsandbytes or offloading)."""
    indented = "\n".join(("    " + line) if line else "" for line in body.rstrip("\n").splitlines())
    return (f"try:\n{indented}\nexcept RuntimeError as refusal:  # diffusers needs a CUDA GPU for this; on a CPU "
            "it says so\n    print(f\"diffusers refused: {refusal}\")\n")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_whole_recipe_cell_a_learner_can_paste(path):
    nb = read(path)
    cells = whole_recipe_cells(nb)
    assert len(cells) == 1, f"{path.name}: one code cell tagged whole-recipe"
    cell = cells[0]
    assert nb.cells.index(cell) < 12, f"{path.name}: the whole-recipe cell comes near the top"
    source = cell.source
    assert "ql." not in source and "quantlab" not in source
    assert re.search(r"\.from_pretrained\(MODEL_ID|\.from_single_file\(", source)
    assert re.search(r"\bpipe\(", source) and all(
        word in source for word in ("height=HEIGHT", "width=WIDTH", "num_inference_steps=STEPS", "guidance_scale="))
    assert "max_memory_reserved" in source or "ru_maxrss" in source  # a print of peak memory
    # the cell is the recipe's whole script (the one place it is kept), as pasted, or guarded for a CPU
    recipe = ql.get_recipe(cell.metadata["recipe"])
    body = recipe.script_body()
    assert source.strip("\n") in (body.strip("\n"), guarded(body).strip("\n")), (
        f"{path.name}: the whole-recipe cell must be ql.get_recipe({recipe.name!r}).script_body()")


def test_each_newer_backend_that_runs_here_has_its_own_whole_script():
    # chapter 08 teaches five backends: each that runs on a CPU shows its own script, free of quantlab
    nb = read(next(p for p in NOTEBOOKS if p.name.startswith("08_")))
    scripts = {c.metadata["recipe"]: c.source for c in code_cells(nb) if "backend-recipe" in c.metadata.get("tags", [])}
    scripts[whole_recipe_cells(nb)[0].metadata["recipe"]] = whole_recipe_cells(nb)[0].source
    assert {ql.get_recipe(name).backend for name in scripts} == {"sdnq", "modelopt", "bfl", "autoround"}
    for name, source in scripts.items():
        assert "ql." not in source and "quantlab" not in source, name
        assert source.strip("\n") == ql.get_recipe(name).script_body().strip("\n"), name
        assert re.search(r"\bpipe\(", source) and "max_memory_reserved" in source, name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_end_to_end_quietly(path, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("QUANTLAB_MODEL", raising=False)  # as stored: the mini model
    seconds = course.run_notebook(path, tmp_path / "notebooks", {})
    executed = read(tmp_path / "notebooks" / path.name)
    cells = code_cells(executed)
    assert all(c.execution_count is not None for c in cells), "every code cell ran"
    assert not any(o.output_type == "error" for c in cells for o in c.outputs)
    assert seconds > 1.0
    lines = course.stderr_lines(tmp_path / "notebooks" / path.name)
    assert len(lines) <= MAX_STDERR_LINES, f"{path.name} printed {len(lines)} lines to stderr:\n" + "\n".join(lines)
    assert not [line for line in lines if "Traceback" in line]
    rows = json.loads((tmp_path / "measurements" / f"{path.stem}.json").read_text())
    assert rows and all(row["model"] == "mini" for row in rows)
    assert all(row["versions"]["torch"] == ql.env.package_versions()["torch"] for row in rows)
