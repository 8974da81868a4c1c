"""The course runner: notebook order, the summary of every measurement, and bad input."""

from __future__ import annotations

import os

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


def test_the_course_ends_with_the_comparison_table(tmp_path):
    assert "did not run" in course.comparison_summary(tmp_path)
    device = ql.env.device_info("cpu")
    rows = [ql.measure.new_row("tiny", "bf16", device, mem_after_load_gib=0.03, peak_host_rss_gib=0.4, s_per_image=0.2,
                               weights_bytes=2**25, psnr_db=float("inf"), ssim=1.0, prompt_accuracy=0.9,
                               extra={"backend": "none", "sqnr_db": float("inf")}),
            ql.measure.new_row("tiny", "quanto-int8", device, mem_after_load_gib=0.02, peak_host_rss_gib=0.5,
                               s_per_image=0.3, weights_bytes=2**24, psnr_db=41.3, ssim=0.999,
                               extra={"backend": "quanto", "sqnr_db": 32.9}),
            ql.measure.new_row("tiny", "a live aside", device, s_per_image=1.0)]  # not a comparison row
    ql.measure.save_rows(rows, tmp_path / "measurements" / "07_compare.json")
    text = course.comparison_summary(tmp_path)
    lines = text.splitlines()
    assert lines[0].startswith("Every recipe side by side (tiny, CPU")
    assert lines[2].startswith("| recipe | mem_after_load_gib | peak_mem_gib | peak_mem_kind | s_per_image |")
    assert lines[4] == "| bf16 | 0.03 | 0.4 | host RSS | 0.2 | 0.03125 | inf | 1 | inf | 0.9 |"
    assert lines[5].startswith("| quanto-int8 |") and "32.9" in lines[5] and len(lines) == 6
    assert lines[5].endswith("|  |")  # a row without prompt accuracy leaves the column empty


def _executed(tmp_path, outputs):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)", outputs=outputs)])
    path = tmp_path / "notebooks" / "03_x.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_a_chapters_run_is_a_row_with_its_stderr_lines_and_first_error(tmp_path):
    import nbformat

    stream = nbformat.v4.new_output("stream", name="stderr", text="a warning\nanother line\n")
    error = nbformat.v4.new_output("error", ename="RuntimeError", evalue="No GPU found.", traceback=[])
    executed = _executed(tmp_path, [stream, nbformat.v4.new_output("stream", name="stdout", text="fine\n"), error])
    assert course.stderr_lines(executed) == ["a warning", "another line"]
    row = course.chapter_row(tmp_path / "03_x.ipynb", tmp_path / "notebooks", "mini", 12.5, RuntimeError("cell 3"))
    assert (row.recipe, row.model) == ("03_x", "mini")
    assert row.extra == {"status": "failed", "seconds": 12.5, "stderr_lines": 2,
                         "first_error": "RuntimeError: No GPU found."}
    ok = course.chapter_row(tmp_path / "04_y.ipynb", tmp_path / "notebooks", "mini", 3.0, None)  # never executed
    assert ok.extra["status"] == "ran" and ok.extra["stderr_lines"] == 0 and ok.extra["first_error"] is None


def test_keep_going_runs_every_chapter_and_records_each(tmp_path, monkeypatch):
    paths = [tmp_path / "00_a.ipynb", tmp_path / "01_b.ipynb"]
    monkeypatch.setenv("QUANTLAB_MODEL", "mini")
    seen = []

    def run(path, out_dir, parameters, run_dir=None):
        seen.append(os.environ["QUANTLAB_MODEL"])
        if path.name == "00_a.ipynb":
            raise RuntimeError("cell 2 failed")
        return 4.0

    monkeypatch.setattr(course, "run_notebook", run)
    monkeypatch.setattr(course, "notebook_paths", lambda: paths)
    out = tmp_path / "build"
    assert course.main(["--model", "tiny", "--out", str(out), "--keep-going"]) == 1
    rows = ql.measure.load_rows(out / "course.json")
    assert [(r.recipe, r.extra["status"]) for r in rows] == [("00_a", "failed"), ("01_b", "ran")]
    assert rows[0].extra["first_error"] == "RuntimeError: cell 2 failed" and rows[1].extra["seconds"] == 4.0
    assert seen == ["tiny", "tiny"] and os.environ["QUANTLAB_MODEL"] == "mini"  # the chapters' model, then put back
    with pytest.raises(RuntimeError, match="cell 2 failed"):  # without it, the first failure stops the run
        course.main(["--model", "tiny", "--out", str(tmp_path / "again")])


def test_a_chapter_run_prints_its_own_stderr_and_not_the_kernels_start_up_warning(tmp_path, capfd):
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("import sys, time\nprint('from the chapter', file=sys.stderr)\n"
                                                "time.sleep(1)")]
    nbformat.write(notebook, tmp_path / "00_probe.ipynb")
    course.run_notebook(tmp_path / "00_probe.ipynb", tmp_path / "out")
    assert course.stderr_lines(tmp_path / "out" / "00_probe.ipynb") == ["from the chapter"]
    assert "without encryption" not in capfd.readouterr().err  # ipykernel's line, once per chapter, is off
