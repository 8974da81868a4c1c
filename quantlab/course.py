"""Run the whole course: execute every notebook with papermill, then summarize every measurement.

`make course` calls this:

    python -m quantlab.course --model tiny --out build

It writes the executed notebooks to `build/notebooks/`, each chapter's measurement rows to
`build/measurements/`, and one summary of them all to `build/summary.md` and `build/summary.csv`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import measure, models

__all__ = ["notebook_paths", "run_notebook", "write_summary", "markdown_table", "comparison_summary", "main"]

REPO = Path(__file__).resolve().parent.parent
SUMMARY_COLUMNS = [
    "chapter", "model", "recipe", "device", "height", "width", "steps", "mem_after_load_gib", "peak_gpu_mem_gib",
    "peak_host_rss_gib", "weights_bytes", "ms_per_step", "s_per_image", "psnr_db", "ssim", "prompt_accuracy", "date",
]


def notebook_paths(folder: str | os.PathLike = REPO / "notebooks") -> list[Path]:
    """The chapters, in order (`NN_topic.ipynb`)."""
    return sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))


def run_notebook(notebook: Path, out_dir: Path, parameters: dict | None = None, run_dir: Path | None = None) -> float:
    """Execute `notebook` with papermill into `out_dir`; return the seconds it took.

    A notebook that ran in under a second skipped its work, so that counts as a failure.
    """
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    if run_dir is not None:
        os.environ["QUANTLAB_RUN_DIR"] = str(run_dir)
    start = time.perf_counter()
    papermill.execute_notebook(
        str(notebook), str(out_dir / notebook.name), parameters=parameters or {}, cwd=str(notebook.parent),
        kernel_name="python3", progress_bar=False,
    )
    seconds = time.perf_counter() - start
    if seconds < 1.0:
        raise RuntimeError(f"{notebook.name} ran in {seconds:.2f} s: it cannot have done its work.")
    return seconds


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
    return (f"Every recipe side by side ({rows[0].model}, {rows[0].device}, the blog's three prompts; error against "
            f"bf16; prompt accuracy on held-out shape captions):\n\n" + markdown_table(table))


def main(argv: list[str] | None = None) -> int:
    """Command line: run every notebook, summarize, and print where everything is."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("QUANTLAB_MODEL") or models.DEFAULT_MODEL,
                        help=f"one of: {', '.join(models.list_models())}")
    parser.add_argument("--out", default=str(REPO / "build"))
    parser.add_argument("--notebooks", nargs="*", help="run only these notebooks")
    args = parser.parse_args(argv)
    models.get_model(args.model)  # an unknown name fails here, before any notebook starts

    out = Path(args.out).resolve()
    os.environ["QUANTLAB_MODEL"] = args.model
    paths = [Path(p) for p in args.notebooks] if args.notebooks else notebook_paths()
    total = time.perf_counter()
    for path in paths:
        print(f"running {path.name} on {args.model} ...", flush=True)
        seconds = run_notebook(path, out / "notebooks", {"MODEL": args.model}, run_dir=out)
        print(f"  done in {seconds:.1f} s", flush=True)
    summary = write_summary(out)
    print("\n" + comparison_summary(out))
    print(f"\nThe course ran in {time.perf_counter() - total:.0f} s on model {args.model!r}.")
    print(f"  executed notebooks:  {out / 'notebooks'}")
    print(f"  measurements:        {out / 'summary.md'} and {out / 'summary.csv'} ({len(summary)} rows)")
    print(f"  open them with:      make lab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
