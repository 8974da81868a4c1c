"""Every chapter follows the notebook conventions, and runs end to end through papermill.

nbval runs the same notebooks as stored (`pytest --nbval-lax notebooks`, part of `make test`);
papermill here injects parameters the way `make course` does, and stops at the first error.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import nbformat
import pytest

from quantlab import course

NOTEBOOKS = course.notebook_paths()
# A chapter imports the quantlab public API, the libraries it teaches, and os for its parameters.
ALLOWED_IMPORTS = {"os", "torch", "quantlab", "diffusers", "transformers", "bitsandbytes", "torchao", "optimum",
                   "gguf"}


def read(path: Path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def test_there_are_chapters():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_tour.ipynb"


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_skeleton(path):
    nb = read(path)
    text = markdown(nb)
    for heading in ("What you will learn", "Prerequisites", "## Check", "## Summary", "## Exercises"):
        assert heading in text, f"{path.name} lacks {heading!r}"
    assert nb.cells[-1].cell_type == "markdown" and "## Exercises" in nb.cells[-1].source
    checks = [c for c in code_cells(nb) if c.source.count("assert ") >= 3]
    assert checks, f"{path.name} has no check cell of asserts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_end_to_end_with_papermill(path, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RUN_DIR", str(tmp_path))
    seconds = course.run_notebook(path, tmp_path / "notebooks", {"MODEL": "tiny"})
    executed = read(tmp_path / "notebooks" / path.name)
    cells = code_cells(executed)
    assert all(c.execution_count is not None for c in cells), "every code cell ran"
    assert not any(o.output_type == "error" for c in cells for o in c.outputs)
    assert seconds > 1.0
    rows = json.loads((tmp_path / "measurements" / f"{path.stem}.json").read_text())
    assert rows and all(row["model"] == "tiny" for row in rows)
    assert all(row["versions"]["torch"].startswith("2.13.0") for row in rows)
