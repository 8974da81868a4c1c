"""The course runner: notebook order, the summary of every measurement, and bad input."""

from __future__ import annotations

import pandas as pd
import pytest

import quantlab as ql
from quantlab import course


def test_notebooks_are_found_in_chapter_order(tmp_path):
    for name in ("02_gguf.ipynb", "00_tour.ipynb", "01_bnb.ipynb", "notes.ipynb"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in course.notebook_paths(tmp_path)] == ["00_tour.ipynb", "01_bnb.ipynb", "02_gguf.ipynb"]
    assert course.notebook_paths()[0].name == "00_tour.ipynb"


def test_summary_gathers_every_chapter(tmp_path):
    device = ql.env.device_info("cpu")
    ql.measure.save_rows([ql.measure.new_row("tiny", "bf16", device, ms_per_step=12.5)],
                         tmp_path / "measurements" / "00_tour.json")
    ql.measure.save_rows([ql.measure.new_row("tiny", "quanto-int8", device, weights_bytes=1234),
                          ql.measure.new_row("tiny", "quanto-int4", device, weights_bytes=777)],
                         tmp_path / "measurements" / "04_quanto.json")
    summary = course.write_summary(tmp_path)
    assert list(summary.chapter) == ["00_tour", "04_quanto", "04_quanto"]
    assert list(summary.recipe) == ["bf16", "quanto-int8", "quanto-int4"]
    from_csv = pd.read_csv(tmp_path / "summary.csv")
    assert from_csv.weights_bytes.tolist()[1:] == [1234, 777]
    markdown = (tmp_path / "summary.md").read_text()
    assert "| chapter | model | recipe |" in markdown
    assert "| 00_tour | tiny | bf16 |" in markdown and "12.5" in markdown


def test_summary_of_a_run_with_no_measurements_is_empty(tmp_path):
    summary = course.write_summary(tmp_path)
    assert len(summary) == 0
    assert (tmp_path / "summary.csv").read_text().startswith("chapter,model,recipe")


def test_markdown_table_formats_numbers_and_blanks():
    frame = pd.DataFrame({"recipe": ["a", "b"], "ms_per_step": [1.23456789, None]})
    assert course.markdown_table(frame).splitlines() == [
        "| recipe | ms_per_step |", "|---|---|", "| a | 1.235 |", "| b |  |",
    ]


def test_unknown_model_fails_before_any_notebook_runs(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a notebook ran")

    monkeypatch.setattr(course, "run_notebook", must_not_run)
    with pytest.raises(ValueError, match="Valid models"):
        course.main(["--model", "flux-9"])
