"""The shapes data of the mini FLUX: captions, rendering, and a detector that reads scenes back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab import shapes

SCENES = shapes.all_scenes()


def test_there_are_900_scenes_and_every_caption_reads_back():
    assert len(SCENES) == len(set(SCENES)) == 3 * 6 * 2 * 5 * 5
    for scene in SCENES:
        assert shapes.parse_caption(shapes.caption(scene)) == scene
    assert shapes.caption(shapes.Scene("circle", "red", "small", "top left", "blue")) == \
        "a small red circle at the top left on a blue background"
    assert shapes.caption(shapes.Scene("square", "white", "large", "center", "black")) == \
        "a large white square in the center on a black background"


@pytest.mark.parametrize("size", [32, 64])
def test_the_detector_reads_every_rendered_scene_exactly(size):
    for scene in SCENES:
        image = shapes.render(scene, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert shapes.detect(image) == scene


def test_the_detector_survives_noise():
    rng = np.random.default_rng(0)
    noisy = [np.clip(shapes.render(s) + rng.normal(0, 60, (64, 64, 3)), 0, 255).astype(np.uint8) for s in SCENES]
    assert shapes.prompt_accuracy(noisy, [shapes.caption(s) for s in SCENES]) == 1.0


def test_rendering_uses_exact_palette_colours_and_sizes():
    scene = shapes.Scene("square", "red", "large", "center", "blue")
    image = shapes.render(scene)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours == {shapes.COLOURS["red"], shapes.COLOURS["blue"]}
    red = (image == shapes.COLOURS["red"]).all(-1)
    side = int(round(0.40 * 64))
    assert abs(red.sum() - side**2) <= 2 * side  # a 26-pixel square, give or take an edge row
    small = (shapes.render(shapes.Scene("circle", "red", "small", "center", "blue")) == shapes.COLOURS["red"]).all(-1)
    assert small.sum() == pytest.approx(np.pi * (0.11 * 64) ** 2, rel=0.1)


def test_prompt_accuracy_counts_shape_colour_and_position():
    scene = shapes.Scene("circle", "red", "small", "top left", "blue")
    right = shapes.render(scene)
    wrong_colour = shapes.render(shapes.Scene("circle", "yellow", "small", "top left", "blue"))
    wrong_place = shapes.render(shapes.Scene("circle", "red", "small", "bottom right", "blue"))
    other_size = shapes.render(shapes.Scene("circle", "red", "large", "top left", "blue"))  # size is not scored
    text = shapes.caption(scene)
    assert shapes.prompt_accuracy([right, wrong_colour, wrong_place, other_size], [text] * 4) == 0.5
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    assert shapes.detect(blank) is None
    assert shapes.prompt_accuracy([blank], [text]) == 0.0
    with pytest.raises(ValueError, match="one caption per image"):
        shapes.prompt_accuracy([right], [])


def test_bad_scenes_and_captions_are_refused():
    with pytest.raises(ValueError, match="invisible"):
        shapes.Scene("circle", "red", "small", "center", "red")
    with pytest.raises(ValueError, match="Unknown shape 'hexagon'"):
        shapes.Scene("hexagon", "red", "small", "center", "blue")
    with pytest.raises(ValueError, match="Not a scene caption"):
        shapes.parse_caption("a cat on a mat")


def test_held_out_scenes_never_appear_in_training():
    train, held_out = shapes.split_scenes(0.1, seed=0)
    assert len(held_out) == 90 and len(train) == 810 and not set(train) & set(held_out)
    assert shapes.split_scenes(0.1, seed=0) == (train, held_out)
    assert shapes.split_scenes(0.1, seed=1)[1] != held_out
    assert all(s.colour != s.background for s in train + held_out) and len({s.shape for s in train}) == 3
