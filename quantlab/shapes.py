"""Coloured shapes with captions, and a detector that reads them back: the data of the trained mini FLUX.

A scene is a shape, colour, size, position and background. `caption` writes it as a sentence ("a small red
circle at the top left on a blue background"), `render` paints it, and `detect` recognises it from pixels alone. Because the colours are exact and the layout is a grid,
the detector is exact on rendered scenes, so `prompt_accuracy` of a generator's images against their
captions measures how well the generator follows its prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "Scene",
    "caption",
    "parse_caption",
    "render",
    "detect",
    "prompt_accuracy",
    "all_scenes",
    "split_scenes",
    "held_out_captions",
    "matches",
]

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SIZES = {"small": 0.22, "large": 0.40}  # the shape's extent, as a fraction of the image side
POSITIONS = {  # the shape's centre, as fractions of the image side (x, y)
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}


@dataclass(frozen=True)
class Scene:
    """One shape on a plain background. Chapters 00, 01, 02, 03, 04, 05, 07, 08."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self):
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.size, SIZES, "size"), (self.position, POSITIONS, "position"),
                                     (self.background, COLOURS, "background")):
            if value not in allowed:
                raise ValueError(f"Unknown {what} {value!r}. Valid: {', '.join(allowed)}.")
        if self.colour == self.background:
            raise ValueError(f"A {self.colour} shape on a {self.background} background would be invisible.")


def all_scenes() -> list[Scene]:
    """Every scene there is (3 shapes × 6 colours × 2 sizes × 5 positions × 5 backgrounds = 900).
    Chapters 00, 01, 02, 03, 04, 05, 07, 08."""
    return [Scene(s, c, z, p, b) for s in SHAPES for c in COLOURS for z in SIZES for p in POSITIONS
            for b in COLOURS if b != c]


def split_scenes(held_out_fraction: float = 0.1, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """All scenes split into (training, held out): the held-out captions never appear in training.
    Chapters 00, 01, 02, 03, 04, 05, 07, 08."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    cut = int(round(len(scenes) * held_out_fraction))
    return scenes[cut:], scenes[:cut]


def held_out_captions(n: int | None = None) -> list[str]:
    """`n` of the 90 captions the mini model never saw in training (all of them by default), spread evenly.
    Chapters 00, 01, 02, 03, 04, 05, 07, 08."""
    held_out = [caption(s) for s in split_scenes(0.1, seed=0)[1]]
    if n is None or n >= len(held_out):
        return held_out
    if n < 1:
        raise ValueError(f"held_out_captions needs n >= 1, got {n}.")
    return [held_out[round(i * len(held_out) / n)] for i in range(n)]


def caption(scene: Scene) -> str:
    """The scene as a sentence, for example 'a small red circle at the top left on a blue background'.
    Chapters 00, 01, 02, 03, 04, 05, 07, 08."""
    where = "in the center" if scene.position == "center" else f"at the {scene.position}"
    return f"a {scene.size} {scene.colour} {scene.shape} {where} on a {scene.background} background"


def parse_caption(text: str) -> Scene:
    """The scene a caption describes; `ValueError` for a sentence `caption` would not write.
    Chapters 00, 01, 02, 03, 04, 05, 07, 08."""
    words = text.strip().lower().split()
    try:
        if words[0] != "a" or words[-1] != "background" or words[-4:-2] != ["on", "a"]:
            raise IndexError
        size, colour, shape = words[1:4]
        where = " ".join(words[4:-4])
        position = "center" if where == "in the center" else where.removeprefix("at the ")
        return Scene(shape, colour, size, position, words[-2])
    except (IndexError, ValueError) as error:
        example = caption(Scene("circle", "red", "small", "top left", "blue"))
        raise ValueError(f"Not a scene caption: {text!r}. Example: {example!r}.") from error


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a `size`×`size` RGB uint8 image (no anti-aliasing, so colours are exact).
    Chapters 00, 01, 02, 03, 04, 05, 07, 08."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = COLOURS[scene.background]
    cx, cy = (v * size for v in POSITIONS[scene.position])
    half = SIZES[scene.size] * size / 2
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    if scene.shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    elif scene.shape == "square":
        mask = (abs(xs - cx) <= half) & (abs(ys - cy) <= half)
    else:  # an upward triangle in the same box: apex at the top, base at the bottom
        top, bottom = cy - half, cy + half
        rel = (ys - top) / (bottom - top)
        mask = (ys >= top) & (ys <= bottom) & (abs(xs - cx) <= rel * half)
    image[mask] = COLOURS[scene.colour]
    return image


def _nearest_colour(rgb) -> str:
    rgb = np.asarray(rgb, dtype=float)
    return min(COLOURS, key=lambda name: float(((np.asarray(COLOURS[name]) - rgb) ** 2).sum()))


def _box_blur(pixels: np.ndarray, radius: int = 1) -> np.ndarray:
    """Each pixel replaced by the mean of its (2·radius+1)² neighbourhood (edges repeated)."""
    padded = np.pad(pixels, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    width = 2 * radius + 1
    out = np.zeros_like(pixels)
    for dy in range(width):
        for dx in range(width):
            out += padded[dy:dy + pixels.shape[0], dx:dx + pixels.shape[1]]
    return out / width**2


def _templates(size: int) -> list[tuple[tuple[str, str, str], np.ndarray]]:
    """The mask of every (shape, size, position) at `size` pixels, rendered once per image size."""
    if size not in _TEMPLATE_CACHE:
        _TEMPLATE_CACHE[size] = [
            ((shape, size_name, position),
             render(Scene(shape, "white", size_name, position, "black"), size)[..., 0] > 127)
            for shape in SHAPES for size_name in SIZES for position in POSITIONS]
    return _TEMPLATE_CACHE[size]


_TEMPLATE_CACHE: dict[int, list] = {}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def detect(image) -> Scene | None:
    """Read the scene back from an image: background, then the shape's colour, size, position and form.

    The image is blurred over 3×3 pixels against noise. The background is the median colour of the
    border; the shape is every pixel far from it, and its shape, size and position are those of the
    rendered layout that overlaps it best. Returns None when no shape stands out.
    Chapters 00, 01, 02, 03, 04, 05, 07, 08.
    """
    pixels = _box_blur(np.asarray(image, dtype=float)[..., :3])
    size = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = _nearest_colour(np.median(border, axis=0))
    distance = np.sqrt(((pixels - np.asarray(COLOURS[background])) ** 2).sum(-1))
    mask = distance > 0.5 * distance.max() if distance.max() > 60 else np.zeros_like(distance, dtype=bool)
    if mask.sum() < 4:
        return None
    colour = _nearest_colour(np.median(pixels[mask], axis=0))
    if colour == background:
        return None
    # the layout that best overlaps the shape's pixels: every shape, size and position is a template
    best = max(_templates(size), key=lambda item: _iou(item[1], mask))[0]
    shape, size_name, position = best
    try:
        return Scene(shape, colour, size_name, position, background)
    except ValueError:
        return None


def matches(image, text: str) -> bool:
    """Whether the detector finds the shape, colour and position that caption `text` asks for in `image`.
    Chapters 00, 01, 02, 03, 04, 05, 07, 08."""
    wanted, found = parse_caption(text), detect(image)
    return found is not None and (found.shape, found.colour, found.position) == (
        wanted.shape, wanted.colour, wanted.position)


def prompt_accuracy(images, captions) -> float:
    """The fraction of images whose detected shape, colour and position all match their caption.
    Chapters 00, 01, 02, 03, 04, 05, 07, 08."""
    images, captions = list(images), list(captions)
    if len(images) != len(captions) or not images:
        raise ValueError(f"prompt_accuracy needs one caption per image, at least one: {len(images)} images, "
                         f"{len(captions)} captions.")
    return sum(matches(image, text) for image, text in zip(images, captions)) / len(images)
