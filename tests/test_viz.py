"""Tests for quantlab.viz: grids, side-by-side comparisons, bar charts and the image flipper."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from quantlab import viz  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _images(n: int, size: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --- image_grid ---------------------------------------------------------------------------------


def test_prompt_accuracy_grid_marks_each_picture_match_or_miss(capsys):
    from quantlab import quality, shapes

    scenes = shapes.split_scenes()[1][:5]
    captions = [shapes.caption(s) for s in scenes]
    drawn = [shapes.render(s, 64) for s in scenes]
    wrong = [shapes.render(scenes[0], 64)] * 5  # the first scene every time: only the first caption matches
    results = {"right": quality.PromptAccuracy(1.0, captions, drawn), "wrong": quality.PromptAccuracy(0.2, captions, wrong)}
    fig = viz.prompt_accuracy_grid(results, n=3, title="t")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["right: match"] * 3 + ["wrong: match", "wrong: MISS", "wrong: MISS"]
    assert capsys.readouterr().out.splitlines() == [f"column {i + 1}: {captions[i]}" for i in range(3)]
    assert np.array_equal(fig.axes[4].images[0].get_array(), wrong[1])
    with pytest.raises(ValueError, match="at least one"):
        viz.prompt_accuracy_grid({})


def test_image_grid_layout_titles_and_pixels():
    images = _images(5)
    captions = [f"image {i}" for i in range(5)]
    fig = viz.image_grid(images, captions, ncols=3, title="five")
    axes = fig.axes
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:5]] == captions
    for ax, image in zip(axes[:5], images):
        assert len(ax.images) == 1
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), image)
    # the sixth cell is empty and turned off
    assert axes[5].get_title() == ""
    assert len(axes[5].images) == 0
    assert not axes[5].axison
    # rows and columns: 2 x 3
    assert axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 3)
    assert fig.get_suptitle() == "five"


def test_image_grid_default_columns_is_at_most_four():
    fig = viz.image_grid(_images(6))
    assert len(fig.axes) == 8  # 4 columns, 2 rows
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 4)
    assert [ax.get_title() for ax in fig.axes] == [""] * 8
    fig2 = viz.image_grid(_images(2))
    assert fig2.axes[0].get_subplotspec().get_gridspec().get_geometry() == (1, 2)


def test_image_grid_caption_count_mismatch_raises():
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        viz.image_grid(_images(3), ["a", "b"])


def test_image_grid_empty_raises():
    with pytest.raises(ValueError, match="at least one image"):
        viz.image_grid([])


# --- side_by_side -------------------------------------------------------------------------------


def test_side_by_side_difference_image():
    a, b = _images(2, size=16)
    a[0, 0] = (255, 0, 10)
    b[0, 0] = (0, 255, 13)  # |diff| 255, 255, 3 -> x4 -> clipped 255, 255, 12
    fig = viz.side_by_side(a, b, "bf16", "int8")
    axes = fig.axes
    assert len(axes) == 3
    assert [ax.get_title() for ax in axes] == ["bf16", "int8", "|difference| x4"]
    expected = np.clip(np.abs(a.astype(np.int16) - b.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
    shown = np.asarray(axes[2].images[0].get_array())
    assert shown.dtype == np.uint8
    np.testing.assert_array_equal(shown, expected)
    assert tuple(shown[0, 0]) == (255, 255, 12)
    np.testing.assert_array_equal(np.asarray(axes[0].images[0].get_array()), a)
    np.testing.assert_array_equal(np.asarray(axes[1].images[0].get_array()), b)


def test_side_by_side_without_difference():
    a, b = _images(2)
    fig = viz.side_by_side(a, b, show_difference=False)
    assert [ax.get_title() for ax in fig.axes] == ["reference", "quantized"]


# --- bar_chart ----------------------------------------------------------------------------------


def _frame() -> pd.DataFrame:
    return pd.DataFrame({
        "recipe": ["bf16", "quanto-int8", "torchao-int8wo", "bnb-4bit-nf4"],
        "mem_after_load_gib": [33.2, 17.1, np.nan, 9.8],
        "peak_gpu_mem_gib": [np.nan, np.nan, np.nan, np.nan],
        "s_per_image": [10.5, 12.25, 11.0, 14.0],
    })


def _bars(ax) -> dict[float, float]:
    """{bar centre on the y axis: bar length} for a horizontal bar chart."""
    return {float(p.get_y() + p.get_height() / 2): float(p.get_width()) for p in ax.patches}


def test_bar_chart_one_bar_per_row_and_missing_values_marked():
    fig = viz.bar_chart(_frame(), "mem_after_load_gib", title="memory")
    ax = fig.axes[0]
    assert len(ax.patches) == 4  # every row keeps its place; the missing one is an empty bar
    assert [p.get_width() for p in ax.patches] == [33.2, 17.1, 0.0, 9.8]
    assert [t.get_text() for t in ax.texts] == ["33.2", "17.1", "n/a", "9.8"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["bf16", "quanto-int8", "torchao-int8wo", "bnb-4bit-nf4"]
    assert ax.get_xlabel() == "mem_after_load_gib"
    assert ax.get_title() == "memory"
    assert ax.yaxis_inverted()  # first row on top


def test_bar_chart_unknown_column_lists_columns():
    with pytest.raises(ValueError) as info:
        viz.bar_chart(_frame(), "ms_per_step")
    message = str(info.value)
    assert "'ms_per_step'" in message
    assert "Columns: recipe, mem_after_load_gib, peak_gpu_mem_gib, s_per_image." in message


def test_bar_chart_reference_line():
    fig = viz.bar_chart(_frame(), "s_per_image", reference=10.5, reference_label="bf16")
    ax = fig.axes[0]
    assert len(ax.patches) == 4
    vertical = [line for line in ax.lines if list(line.get_xdata()) == [10.5, 10.5]]
    assert len(vertical) == 1
    assert vertical[0].get_linestyle() == "--"
    assert any(t.get_text().strip() == "bf16" for t in ax.texts)


def test_bar_chart_draws_one_labelled_line_per_reference():
    fig = viz.bar_chart(_frame(), "s_per_image", references={"bf16 floor": 7.5, "fp8 floor": 4.5})
    ax = fig.axes[0]
    assert sorted(line.get_xdata()[0] for line in ax.lines) == [4.5, 7.5]
    assert {t.get_text().strip() for t in ax.texts} >= {"bf16 floor", "fp8 floor"}


def test_bar_chart_without_reference_draws_no_line():
    fig = viz.bar_chart(_frame(), "s_per_image")
    assert len(fig.axes[0].lines) == 0


# --- memory_time_bars ---------------------------------------------------------------------------


def test_memory_time_bars_one_subplot_per_non_empty_column():
    fig = viz.memory_time_bars(_frame(), title="cost")
    assert len(fig.axes) == 2  # peak_gpu_mem_gib is all NaN: no subplot
    assert [ax.get_xlabel() for ax in fig.axes] == ["mem_after_load_gib", "s_per_image"]
    assert len(fig.axes[0].patches) == len(fig.axes[1].patches) == 4  # one place per row in every panel
    assert [t.get_text() for t in fig.axes[0].texts][2] == "n/a"
    assert fig.get_suptitle() == "cost"


def test_memory_time_bars_three_columns():
    frame = _frame().assign(mem_after_load_gib=[33.2, 17.1, 16.9, 9.8], peak_gpu_mem_gib=[40.0, 20.0, 21.0, 12.0])
    fig = viz.memory_time_bars(frame)
    assert [ax.get_xlabel() for ax in fig.axes] == ["mem_after_load_gib", "peak_gpu_mem_gib", "s_per_image"]
    assert sorted(_bars(fig.axes[1]).values()) == [12.0, 20.0, 21.0, 40.0]
    # only the first subplot carries the row labels
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(frame["recipe"])
    assert not any(t.get_visible() and t.get_text() for ax in fig.axes[1:] for t in ax.get_yticklabels())


def test_memory_time_bars_bars_stay_beside_their_row_when_a_value_is_missing():
    frame = pd.DataFrame({
        "recipe": ["A", "B", "C"],
        "mem_after_load_gib": [1.0, 2.0, 3.0],
        "peak_gpu_mem_gib": [1.0, np.nan, 3.0],  # B ran out of memory, say
        "s_per_image": [1.0, 2.0, 3.0],
    })
    fig = viz.memory_time_bars(frame)
    labelled = fig.axes[0]
    rows = {t.get_text(): t.get_position()[1] for t in labelled.get_yticklabels()}  # recipe -> y of its label
    assert _bars(labelled) == {rows["A"]: 1.0, rows["B"]: 2.0, rows["C"]: 3.0}
    # C's peak must be drawn at C's height (beside C's label), not at B's; B's place is empty
    assert _bars(fig.axes[1]) == {rows["A"]: 1.0, rows["B"]: 0.0, rows["C"]: 3.0}
    assert [t.get_text() for t in fig.axes[1].texts] == ["1", "n/a", "3"]


# --- image_flipper ------------------------------------------------------------------------------


def test_image_flipper_show_updates_index_label_and_image():
    images = _images(3)
    captions = ["bf16", "int8", "int4"]
    flipper = viz.image_flipper(images, captions)
    assert isinstance(flipper, viz.ImageFlipper)
    assert flipper.index == 0
    assert flipper.label.value == "bf16"
    assert flipper.image.value == _png(images[0])
    flipper.show(1)
    assert flipper.index == 1
    assert flipper.label.value == "int8"
    assert flipper.image.value == _png(images[1])
    assert flipper.image.value != _png(images[0])


def test_image_flipper_selector_change_updates_image():
    images = _images(3)
    flipper = viz.image_flipper(images, ["a", "b", "c"])
    flipper.selector.value = 2  # what clicking a button does
    assert flipper.index == 2
    assert flipper.label.value == "c"
    assert flipper.image.value == _png(images[2])
    flipper.show(0)
    assert (flipper.index, flipper.label.value, flipper.image.value) == (0, "a", _png(images[0]))


def test_image_flipper_widget_layout():
    flipper = viz.image_flipper(_images(2), ["a", "b"])
    assert list(flipper.selector.options) == [0, 1]
    assert flipper.widget.children == (flipper.selector, flipper.label, flipper.image)


def test_image_flipper_mismatched_captions_raise():
    with pytest.raises(ValueError, match="2 vs 1"):
        viz.image_flipper(_images(2), ["only one"])
    with pytest.raises(ValueError, match="at least one"):
        viz.image_flipper([], [])


def test_histogram_draws_one_line_per_marker_and_a_legend_entry_per_set():
    values = np.random.default_rng(0).normal(size=1000)
    fig = viz.histogram(values, markers={"a": [-1, 1], "b": [0.5]}, title="t", xlabel="x")
    ax = fig.axes[0]
    assert [line.get_xdata()[0] for line in ax.lines] == [-1, 1, 0.5]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    assert ax.get_title() == "t" and ax.get_xlabel() == "x"
    assert sum(p.get_height() for p in ax.patches) == 1000


def test_memory_time_scatter_draws_one_point_per_row_and_source():
    frame = pd.DataFrame([
        {"recipe": "bf16", "peak_gpu_mem_gib": 36.2, "s_per_image": 8.9, "source": "ours"},
        {"recipe": "nf4+offload", "peak_gpu_mem_gib": 7.6, "s_per_image": 16.0, "source": "ours"},
        {"recipe": "bf16", "peak_gpu_mem_gib": 36.166, "s_per_image": 12.0, "source": "blog"},
        {"recipe": "missing", "peak_gpu_mem_gib": None, "s_per_image": 3.0, "source": "blog"},
    ])
    fig = viz.memory_time_scatter(frame, limit_gib=8)
    ax = fig.axes[0]
    offsets = [c.get_offsets() for c in ax.collections]
    assert [len(o) for o in offsets] == [2, 1]  # the row without a peak is not drawn
    assert sorted(float(x) for x, _ in offsets[0]) == [8.9, 16.0]
    assert len(ax.lines) == 2  # bf16's pair joined, and the 8 GiB line
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ours", "blog"]
    assert ax.get_xscale() == "log"
    plt.close(fig)


def test_memory_time_scatter_needs_its_columns_and_a_point():
    with pytest.raises(ValueError, match="No column 'peak_gpu_mem_gib'"):
        viz.memory_time_scatter(pd.DataFrame({"recipe": ["a"], "s_per_image": [1.0]}))
    with pytest.raises(ValueError, match="Nothing to draw"):
        viz.memory_time_scatter(pd.DataFrame({"recipe": ["a"], "s_per_image": [1.0], "peak_gpu_mem_gib": [None]}))


# --- tradeoff_scatter ------------------------------------------------------------


def _tradeoff_frame():
    return pd.DataFrame({"recipe": ["bf16", "int8", "int4", "slow"], "peak_mem_gib": [30.0, 17.0, 10.0, 20.0],
                         "s_per_image": [9.0, 12.0, 20.0, 40.0], "sqnr_db": [np.inf, 30.0, 14.0, 25.0]})


def test_tradeoff_scatter_colours_by_error_and_rings_the_front():
    frame = _tradeoff_frame()
    front = pd.Series([True, True, True, False])
    fig = viz.tradeoff_scatter(frame, "peak_mem_gib", "s_per_image", "sqnr_db", front)
    ax = fig.axes[0]
    points, rings = ax.collections[0], ax.collections[1]
    assert points.get_offsets().tolist() == [[9.0, 30.0], [12.0, 17.0], [20.0, 10.0], [40.0, 20.0]]
    # the identical bf16 row takes the colour of the best finite error (30 dB)
    assert points.get_array().tolist() == [30.0, 30.0, 14.0, 25.0]
    assert rings.get_offsets().tolist() == [[9.0, 30.0], [12.0, 17.0], [20.0, 10.0]]
    line = ax.lines[0]
    assert line.get_label() == "Pareto front" and list(line.get_xdata()) == [9.0, 12.0, 20.0]
    labels = [t.get_text() for t in ax.texts]
    assert "bf16 (identical)" in labels and "slow" in labels
    assert ax.get_xscale() == "log" and fig.axes[1].get_ylabel().startswith("sqnr_db")
    with pytest.raises(ValueError, match="No column 'ssim'"):
        viz.tradeoff_scatter(frame, "peak_mem_gib", "s_per_image", "ssim", front)
