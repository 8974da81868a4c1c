"""Run the whole course: execute every notebook with papermill, then summarize every measurement.

`make course` calls this:

    python -m quantlab.course --model mini --out build

It writes the executed notebooks to `build/notebooks/`, each chapter's measurement rows to
`build/measurements/`, one summary of them all to `build/summary.md` and `build/summary.csv`, and how each
chapter ran (device, status, seconds, stderr lines, the first error) to `build/course.json`. With
`--keep-going` a failing chapter does not stop the rest (the GPU run of every chapter uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from . import env, measure, models

__all__ = ["notebook_paths", "run_notebook", "stderr_lines", "chapter_row", "write_summary", "markdown_table",
           "comparison_summary", "main"]

REPO = Path(__file__).resolve().parent.parent
SUMMARY_COLUMNS = [
    "chapter", "model", "recipe", "device", "height", "width", "steps", "mem_after_load_gib", "peak_gpu_mem_gib",
    "peak_host_rss_gib", "weights_bytes", "ms_per_step", "s_per_image", "psnr_db", "ssim", "prompt_accuracy", "date",
]


def notebook_paths(folder: str | os.PathLike = REPO / "notebooks") -> list[Path]:
    """The chapters, in order (`NN_topic.ipynb`)."""
    return sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the notebooks' kernels, and put back what was there after."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_notebook(notebook: Path, out_dir: Path, parameters: dict | None = None, run_dir: Path | None = None) -> float:
    """Execute `notebook` with papermill into `out_dir`; return the seconds it took.

    A notebook that ran in under a second skipped its work, so that counts as a failure.
    """
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _environment(**({"QUANTLAB_RUN_DIR": str(run_dir)} if run_dir is not None else {})):
        papermill.execute_notebook(
            str(notebook), str(out_dir / notebook.name), parameters=parameters or {}, cwd=str(notebook.parent),
            kernel_name="python3", progress_bar=False,
            # The kernel logs, at every start, that it talks to this process over local TCP without encryption
            # (Jupyter's default): one alarming line per chapter on the console. Its errors still show.
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    seconds = time.perf_counter() - start
    if seconds < 1.0:
        raise RuntimeError(f"{notebook.name} ran in {seconds:.2f} s: it cannot have done its work.")
    return seconds


def stderr_lines(executed: Path) -> list[str]:
    """The lines an executed notebook printed to stderr, in order."""
    import nbformat

    lines = []
    for cell in nbformat.read(executed, as_version=4).cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                lines += output.get("text", "").splitlines()
    return lines


def _first_error(executed: Path) -> str | None:
    import nbformat

    for cell in nbformat.read(executed, as_version=4).cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"{output.get('ename')}: {output.get('evalue')}"[:500]
    return None


def chapter_row(notebook: Path, out_dir: Path, model: str, seconds: float | None, error: BaseException | None):
    """How one chapter ran, as a `Measurement` row named after it: status, seconds, stderr lines, first error."""
    executed = out_dir / notebook.name
    lines = stderr_lines(executed) if executed.exists() else []
    first = (_first_error(executed) if executed.exists() else None) or (
        f"{type(error).__name__}: {str(error)[:400]}" if error is not None else None)
    return measure.new_row(model, notebook.stem, env.default_device(), notes="the chapter run by papermill",
                           extra={"status": "ran" if error is None else "failed", "seconds": seconds,
                                  "stderr_lines": len(lines), "first_error": first})


def markdown_table(frame) -> str:
    """A GitHub Markdown table of `frame` (floats to 4 significant digits)."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def write_summary(run_dir: Path):
    """Gather `run_dir/measurements/*.json` into `summary.csv` and `summary.md`; return the frame."""
    import pandas as pd

    frames = []
    for path in sorted((run_dir / "measurements").glob("*.json")):
        frame = measure.to_frame(measure.load_rows(path))
        frame.insert(0, "chapter", path.stem)
        frames.append(frame)
    summary = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SUMMARY_COLUMNS)
    summary = summary[[c for c in SUMMARY_COLUMNS if c in summary.columns]]
    summary.to_csv(run_dir / "summary.csv", index=False)
    (run_dir / "summary.md").write_text(
        "# quantlab: every measurement of this run\n\n"
        "Units are in the column names. Empty cells were not measured on this device.\n\n"
        + markdown_table(summary) + "\n"
    )
    return summary


COMPARISON_CHAPTER = "07_compare"
COMPARISON_COLUMNS = ["recipe", "mem_after_load_gib", "peak_mem_gib", "peak_mem_kind", "s_per_image", "weights_gib",
                      "psnr_db", "ssim", "sqnr_db", "prompt_accuracy"]


def comparison_summary(run_dir: Path) -> str:
    """Chapter 07's comparison table from this run, as Markdown, or a line saying it did not run."""
    from . import compare

    path = run_dir / "measurements" / f"{COMPARISON_CHAPTER}.json"
    if not path.exists():
        return f"No comparison table: chapter {COMPARISON_CHAPTER} did not run (run it with make course)."
    rows = [r for r in measure.load_rows(path) if "backend" in r.extra]  # the comparison's rows, one per recipe
    if not rows:
        return f"No comparison table: {path.name} holds no comparison rows."
    table = compare.comparison_table(rows)[COMPARISON_COLUMNS]
    return (f"Every recipe side by side ({rows[0].model}, {rows[0].device}, the same three prompts and seed; error against "
            f"bf16; prompt accuracy on held-out shape captions):\n\n" + markdown_table(table))


def main(argv: list[str] | None = None) -> int:
    """Command line: run every notebook, summarize, and print where everything is."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("QUANTLAB_MODEL") or models.DEFAULT_MODEL,
                        help=f"one of: {', '.join(models.list_models())}")
    parser.add_argument("--out", default=str(REPO / "build"))
    parser.add_argument("--notebooks", nargs="*", help="run only these notebooks")
    parser.add_argument("--keep-going", action="store_true", help="run every chapter even after one fails")
    args = parser.parse_args(argv)
    models.get_model(args.model)  # an unknown name fails here, before any notebook starts

    out = Path(args.out).resolve()
    paths = [Path(p) for p in args.notebooks] if args.notebooks else notebook_paths()
    total = time.perf_counter()
    chapters = []
    with _environment(QUANTLAB_MODEL=args.model):  # the kernels read it; put back afterwards
        for path in paths:
            print(f"running {path.name} on {args.model} ...", flush=True)
            started, error = time.perf_counter(), None
            try:
                seconds = run_notebook(path, out / "notebooks", {"MODEL": args.model}, run_dir=out)
            except Exception as failure:  # papermill's error names the cell; the executed copy holds the traceback
                error, seconds = failure, time.perf_counter() - started
            row = chapter_row(path, out / "notebooks", args.model, seconds, error)
            chapters.append(row)
            measure.save_rows(chapters, out / "course.json")
            print(f"  {row.extra['status']} in {seconds:.1f} s, {row.extra['stderr_lines']} lines on stderr"
                  + (f": {row.extra['first_error']}" if error else ""), flush=True)
            if error is not None and not args.keep_going:
                raise error
    summary = write_summary(out)
    print("\n" + comparison_summary(out))
    print(f"\nThe course ran in {time.perf_counter() - total:.0f} s on model {args.model!r}.")
    print(f"  executed notebooks:  {out / 'notebooks'}")
    print(f"  measurements:        {out / 'summary.md'} and {out / 'summary.csv'} ({len(summary)} rows)")
    print(f"  how each chapter ran: {out / 'course.json'}")
    print("  open them with:      make lab")
    return 1 if any(row.extra["status"] != "ran" for row in chapters) else 0


if __name__ == "__main__":
    sys.exit(main())
