"""The pocket world: 32x32 pictures of one coloured shape on a plain background, with
captions such as "a small red circle on a blue background", drawn by a seeded generator.

It is small enough to train a text-to-image model on two CPU cores in under an hour,
and every image has a ground truth (shape, colour, size, background), so a model's
prompt accuracy can be measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
BACKGROUNDS = ("black", "white", "blue", "green")
SIZES = {"small": (5, 7), "large": (10, 13)}  # half-extent in pixels, inclusive range


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    background: str
    center: tuple[int, int]
    extent: int

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"


def vocabulary() -> list[str]:
    """Every word a caption can use."""
    words = ["a", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS, *SIZES]
    return list(dict.fromkeys(words))


def random_scene(rng: np.random.Generator) -> Scene:
    background = str(rng.choice(BACKGROUNDS))
    color = str(rng.choice([c for c in COLORS if c != background]))
    size = str(rng.choice(list(SIZES)))
    low, high = SIZES[size]
    extent = int(rng.integers(low, high + 1))
    margin = extent + 1
    center = (int(rng.integers(margin, SIZE - margin)), int(rng.integers(margin, SIZE - margin)))
    return Scene(str(rng.choice(SHAPES)), color, size, background, center, extent)


def scene_from_caption(caption: str, rng: np.random.Generator) -> Scene:
    """A random scene that matches a caption of the world's grammar."""
    words = caption.split()
    size, color, shape, background = words[1], words[2], words[3], words[6]
    low, high = SIZES[size]
    extent = int(rng.integers(low, high + 1))
    margin = extent + 1
    center = (int(rng.integers(margin, SIZE - margin)), int(rng.integers(margin, SIZE - margin)))
    return Scene(shape, color, size, background, center, extent)


def shape_mask(shape: str, center: tuple[int, int], extent: int) -> np.ndarray:
    """Boolean [SIZE, SIZE] mask of a shape (anti-aliasing is left to the models)."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    cy, cx = center
    dy, dx = ys - cy, xs - cx
    if shape == "circle":
        return dx**2 + dy**2 <= extent**2
    if shape == "square":
        side = extent * 0.85
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if shape == "triangle":
        # apex up: inside when below the two slanted edges and above the base
        return (dy <= extent * 0.8) & (dy >= -extent) & (np.abs(dx) <= (dy + extent) * 0.6)
    if shape == "cross":
        arm = max(1.5, extent * 0.35)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= extent)) | (
            (np.abs(dy) <= arm) & (np.abs(dx) <= extent)
        )
    raise ValueError(f"unknown shape {shape}")


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """[SIZE, SIZE, 3] uint8 image; ``rng`` adds a little pixel noise (texture)."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    image[:] = COLORS[scene.background]
    image[shape_mask(scene.shape, scene.center, scene.extent)] = COLORS[scene.color]
    if rng is not None:
        image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def batch(count: int, rng: np.random.Generator) -> tuple[np.ndarray, list[Scene]]:
    """``count`` random scenes and their images ([count, SIZE, SIZE, 3] uint8)."""
    scenes = [random_scene(rng) for _ in range(count)]
    return np.stack([render(s, rng) for s in scenes]), scenes


def all_captions() -> list[str]:
    """Every caption of the world (shape x colour x size x background, colour != background)."""
    return [
        f"a {size} {color} {shape} on a {background} background"
        for shape in SHAPES
        for color in COLORS
        for size in SIZES
        for background in BACKGROUNDS
        if color != background
    ]
