"""Pictures: image grids with captions, side-by-side comparisons, bar charts and an image flipper."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .measure import require_columns

__all__ = ["image_grid", "prompt_accuracy_grid", "side_by_side", "bar_chart", "memory_time_bars", "memory_time_scatter", "tradeoff_scatter",
           "histogram", "byte_layout", "png_bytes", "ImageFlipper", "image_flipper"]


def _figure(nrows: int, ncols: int, cell_inches: float = 3.0):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(cell_inches * ncols, cell_inches * nrows + 0.3), squeeze=False)
    return fig, axes


def image_grid(images: Sequence, captions: Sequence[str] | None = None, ncols: int | None = None,
               title: str | None = None, cell_inches: float = 3.0):
    """A matplotlib figure with `images` in a grid, each captioned below its title line.
    Chapters 00, 01, 02, 03, 04, 05, 07."""
    if not images:
        raise ValueError("image_grid needs at least one image.")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions.")
    ncols = ncols or min(len(images), 4)
    nrows = -(-len(images) // ncols)
    fig, axes = _figure(nrows, ncols, cell_inches)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(np.asarray(images[i]))
            if captions is not None:
                ax.set_title(captions[i], fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def prompt_accuracy_grid(results, n: int = 4, title: str | None = None, cell_inches: float = 1.6):
    """The first `n` shape pictures of each `measure.PromptAccuracy` in `results` ({label: result}), one row each.

    Every picture is titled with its row's label and "match" or "MISS" (`shapes.matches`); the captions,
    the same for every row, are printed, one line per column. Chapters 01, 02, 03, 04, 05, 07.
    """
    from . import shapes

    if not results:
        raise ValueError("prompt_accuracy_grid needs at least one result.")
    captions = next(iter(results.values())).captions
    shown = range(min(n, len(captions)))
    for i in shown:
        print(f"column {i + 1}: {captions[i]}")
    return image_grid(
        [result.images[i] for result in results.values() for i in shown],
        [f"{label}: {'match' if shapes.matches(result.images[i], result.captions[i]) else 'MISS'}"
         for label, result in results.items() for i in shown],
        ncols=len(shown), cell_inches=cell_inches, title=title)


def side_by_side(left, right, left_caption: str = "reference", right_caption: str = "quantized",
                 show_difference: bool = True):
    """Two images next to each other, and optionally their absolute difference (amplified x4). Chapter 01."""
    images = [left, right]
    captions = [left_caption, right_caption]
    if show_difference:
        diff = np.abs(np.asarray(left, dtype=np.int16) - np.asarray(right, dtype=np.int16))
        images.append(np.clip(diff * 4, 0, 255).astype(np.uint8))
        captions.append("|difference| x4")
    return image_grid(images, captions, ncols=len(images))


def _barh(ax, labels, values) -> None:
    """Horizontal bars, first row on top, each labelled with its value; a missing value leaves a gap."""
    values = np.asarray(values, dtype=float)
    bars = ax.barh(range(len(values)), np.nan_to_num(values, nan=0.0))
    ax.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.3g}" for v in values], padding=3, fontsize=8)
    ax.set_yticks(range(len(values)), [str(label) for label in labels])
    ax.invert_yaxis()


def bar_chart(frame, value: str, label: str = "recipe", title: str | None = None, reference: float | None = None,
              reference_label: str = "reference", references: dict[str, float] | None = None):
    """A horizontal bar chart of column `value` for each row, labelled by column `label`.

    `reference` draws one dashed line; `references` draws one per entry, labelled by its key. Chapters 00, 02, 06.
    """
    import matplotlib.pyplot as plt

    require_columns(frame, label, value)
    lines = dict(references or {})
    if reference is not None:
        lines[reference_label] = reference
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(frame) + 1.2))
    _barh(ax, frame[label], frame[value])
    ax.set_xlabel(value)
    for index, (name, x) in enumerate(lines.items()):
        ax.axvline(x, color="black", linestyle=("--", ":", "-.")[index % 3], linewidth=1)
        ax.text(x, -0.6 - 0.5 * index, f" {name}", fontsize=8, va="bottom")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def memory_time_bars(frame, label: str = "recipe", memory: str = "mem_after_load_gib", time: str = "s_per_image",
                     title: str | None = None):
    """Memory and time side by side, one bar per row of `frame`, rows aligned across the panels.
    Chapters 00, 01, 02, 03, 04, 08."""
    import matplotlib.pyplot as plt

    require_columns(frame, label)
    columns = [c for c in (memory, "peak_gpu_mem_gib", time) if c in frame.columns and frame[c].notna().any()]
    if not columns:
        raise ValueError(f"Nothing to draw: {memory}, peak_gpu_mem_gib and {time} are all missing or empty.")
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 0.45 * len(frame) + 1.4), squeeze=False)
    for i, (ax, column) in enumerate(zip(axes.flat, columns)):
        _barh(ax, frame[label] if i == 0 else [""] * len(frame), frame[column])
        ax.set_xlabel(column)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _rows_with(frame, memory: str, time: str, *other_columns: str):
    """The rows of `frame` that have both a `memory` and a `time` figure; `ValueError` when none has."""
    require_columns(frame, memory, time, *other_columns)
    drawn = frame[frame[memory].notna() & frame[time].notna()]
    if drawn.empty:
        raise ValueError(f"Nothing to draw: no row has both {memory} and {time}.")
    return drawn


def memory_time_scatter(frame, memory: str = "peak_gpu_mem_gib", time: str = "s_per_image", label: str = "recipe",
                        source: str = "source", limit_gib: float | None = None, limit_label: str = "limit",
                        log_time: bool = True, title: str | None = None):
    """Peak memory (y) against time (x), one point per row, labelled; rows of each `source` get their own marker.

    Rows with the same `label` in several sources (ours and the blog's, say) are joined by a thin
    line, so that each pair is easy to find. `limit_gib` draws a horizontal line (a GPU's memory). Chapters 05, 07.
    """
    import matplotlib.pyplot as plt

    drawn = _rows_with(frame, memory, time, label)
    sources = list(dict.fromkeys(drawn[source])) if source in drawn.columns else [None]
    markers = "os^Dv<>"
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, name in enumerate(sources):
        rows = drawn if name is None else drawn[drawn[source] == name]
        ax.scatter(rows[time], rows[memory], marker=markers[i % len(markers)], s=46, label=name,
                   facecolors="none" if i else None, edgecolors=f"C{i}", color=f"C{i}")
        for row in rows.itertuples():
            ax.annotate(str(getattr(row, label)), (getattr(row, time), getattr(row, memory)), fontsize=7,
                        xytext=(4, 3), textcoords="offset points", color=f"C{i}")
    if source in drawn.columns and len(sources) > 1:
        for _, group in drawn.groupby(label):
            if len(group) > 1:
                ax.plot(group[time], group[memory], color="grey", linewidth=0.6, alpha=0.6, zorder=0)
    if log_time:
        ax.set_xscale("log")
    if limit_gib is not None:  # after the scale is set, so that the label sits at the left edge
        ax.axhline(limit_gib, color="black", linestyle="--", linewidth=1)
        ax.text(ax.get_xlim()[0], limit_gib, f" {limit_label}", fontsize=8, va="bottom")
    ax.set_xlabel(time)
    ax.set_ylabel(memory)
    if sources != [None]:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def tradeoff_scatter(frame, memory: str, time: str, error: str, front, label: str = "recipe",
                     log_time: bool = True, title: str | None = None):
    """Memory (y) against time (x), each point coloured by `error`, the rows of `front` joined and ringed.

    `front` is a boolean Series over `frame` (for example `compare.pareto_front(frame)`): the rows no
    other row beats on both axes. An infinite `error` (identical to the reference) is drawn in the
    colour of the best finite value, and its label says so. Chapter 07.
    """
    import matplotlib.pyplot as plt

    drawn = _rows_with(frame, memory, time, error, label)
    front = front.reindex(drawn.index).fillna(False).astype(bool)
    colour = drawn[error].astype(float)
    finite = colour[np.isfinite(colour)]
    colour = colour.where(np.isfinite(colour), finite.max() if len(finite) else 0.0)
    fig, ax = plt.subplots(figsize=(9, 6))
    points = ax.scatter(drawn[time], drawn[memory], c=colour, cmap="viridis", s=60, zorder=3)
    fig.colorbar(points, ax=ax, label=f"{error} (higher is closer to the reference)")
    ringed = drawn[front].sort_values(time)
    ax.plot(ringed[time], ringed[memory], color="crimson", linewidth=1.2, zorder=2, label="Pareto front")
    ax.scatter(ringed[time], ringed[memory], s=160, facecolors="none", edgecolors="crimson", linewidths=1.5, zorder=4)
    for row in drawn.itertuples():
        value = getattr(row, error)
        text = str(getattr(row, label)) + (" (identical)" if value is not None and np.isinf(value) else "")
        ax.annotate(text, (getattr(row, time), getattr(row, memory)), fontsize=7, xytext=(5, 3),
                    textcoords="offset points")
    if log_time:
        ax.set_xscale("log")
    ax.set_xlabel(time)
    ax.set_ylabel(memory)
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def histogram(values, markers: dict[str, Sequence[float]] | None = None, bins: int = 120, log: bool = False,
              title: str | None = None, xlabel: str = "value"):
    """A histogram of `values`, with each named set of `markers` drawn as vertical lines of one colour. Chapter 01."""
    import matplotlib.pyplot as plt

    data = np.asarray(values.detach().float().cpu() if hasattr(values, "detach") else values, dtype=float).ravel()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.hist(data, bins=bins, color="0.7", log=log)
    for i, (label, xs) in enumerate((markers or {}).items()):
        colour = f"C{i}"
        for j, x in enumerate(np.atleast_1d(np.asarray(xs, dtype=float))):
            ax.axvline(x, color=colour, linewidth=1, alpha=0.9, label=label if j == 0 else None)
    if markers:
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def png_bytes(image) -> bytes:
    """An image (PIL, or an HxWx3 uint8 array) encoded as PNG, as `ipywidgets.Image` takes it. Chapters 00, 07."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageFlipper:
    """An ipywidgets widget that flips between images: a slider and buttons choose which one shows. Chapter 00."""

    def __init__(self, images: Sequence, captions: Sequence[str]):
        import ipywidgets as widgets

        if len(images) != len(captions) or not images:
            raise ValueError(f"ImageFlipper needs as many captions as images, at least one: {len(images)} vs "
                             f"{len(captions)}.")
        self.captions = list(captions)
        self._png = [png_bytes(image) for image in images]
        self.image = widgets.Image(value=self._png[0], format="png", width=384)
        self.label = widgets.Label(value=self.captions[0])
        self.selector = widgets.ToggleButtons(options=list(range(len(images))), value=0,
                                              description="image", style={"button_width": "40px"})
        self.selector.observe(lambda change: self.show(change["new"]), names="value")
        self.widget = widgets.VBox([self.selector, self.label, self.image])

    @property
    def index(self) -> int:
        """Which image is showing."""
        return self.selector.value

    def show(self, index: int) -> None:
        """Show image `index`."""
        if self.selector.value != index:
            self.selector.value = index  # fires the observer, which comes back here
            return
        self.image.value = self._png[index]
        self.label.value = self.captions[index]

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def image_flipper(images: Sequence, captions: Sequence[str]) -> ImageFlipper:
    """A widget that flips between `images`; display it as the last expression of a cell. Chapter 00."""
    return ImageFlipper(images, captions)


def byte_layout(fields: Sequence[tuple[str, int, str]], title: str | None = None):
    """One block of a storage format drawn as a strip of bytes: (field, bytes, meaning) in byte order. Chapter 02."""
    import matplotlib.pyplot as plt

    total = sum(size for _, size, _ in fields)
    fig, ax = plt.subplots(figsize=(10, 1.3 + 0.28 * len(fields)))
    start = 0
    colours = plt.get_cmap("tab10")
    for index, (name, size, meaning) in enumerate(fields):
        ax.barh(0, size, left=start, color=colours(index % 10), edgecolor="black")
        ax.text(start + size / 2, 0, name, ha="center", va="center", fontsize=9, fontweight="bold")
        ax.text(0, -0.6 - 0.35 * index, f"{name}: {size} bytes, {meaning}", ha="left", va="center", fontsize=8,
                color=colours(index % 10))
        start += size
    ax.set_xlim(0, total)
    ax.set_ylim(-0.6 - 0.35 * len(fields), 0.6)
    ax.set_yticks([])
    ax.set_xlabel(f"byte offset (block of {total} bytes)")
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
