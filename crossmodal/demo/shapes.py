"""A synthetic image–caption dataset: solid-colour shapes on a plain background.

Small enough to train a tiny CLIP in seconds, yet a real retrieval problem: 8 colours × 4 shapes
gives 32 concepts that differ in colour only, in shape only, or in both.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 20),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "pink": (240, 110, 180),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
BACKGROUND = (255, 255, 255)
IMAGE_SIZE = 128
MANIFEST = "manifest.json"

# Caption templates for training; the first is the canonical caption of the demo collection.
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {shape} that is {colour}",
    "{colour} {shape}",
    "a drawing of a {colour} {shape}",
)


@dataclass(frozen=True)
class DemoItem:
    colour: str
    shape: str
    image: Image.Image = field(compare=False, repr=False)

    @property
    def file(self) -> str:
        return f"{self.colour}-{self.shape}.png"

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape)

    @property
    def captions(self) -> list[str]:
        return [self.caption, TEMPLATES[1].format(colour=self.colour, shape=self.shape)]


def concepts() -> list[tuple[str, str]]:
    """Every (colour, shape) pair, in a fixed order."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def caption(colour: str, shape: str) -> str:
    return TEMPLATES[0].format(colour=colour, shape=shape)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [
            (cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a)))
            for a in (90, 210, 330)
        ]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = math.radians(90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        return points
    raise ValueError(f"not a polygon shape: {shape}")


def render(
    colour: str,
    shape: str,
    *,
    size: int = IMAGE_SIZE,
    rng: random.Random | None = None,
) -> Image.Image:
    """Draw one shape. Without ``rng`` the canonical (centred, fixed size, white) image; with it
    a jittered variant (position, size, a slightly off-white background) for training."""
    fill = COLOURS[colour]
    background = BACKGROUND
    cx = cy = size / 2
    r = size * 0.34
    if rng is not None:
        r *= rng.uniform(0.75, 1.1)
        slack = size / 2 - r - 2
        cx += rng.uniform(-slack, slack) * 0.5
        cy += rng.uniform(-slack, slack) * 0.5
        grey = rng.randint(232, 255)
        background = (grey, grey, grey)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = r * 0.85  # a square of the same "radius" looks larger than the circle
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape in ("triangle", "star"):
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape: {shape}")
    return image


def demo_collection(size: int = IMAGE_SIZE) -> list[DemoItem]:
    """One canonical image per colour × shape: deterministic, the same bytes on every run."""
    return [DemoItem(c, s, render(c, s, size=size)) for c, s in concepts()]


def training_samples(seed: int, size: int = IMAGE_SIZE) -> Iterator[tuple[int, Image.Image]]:
    """An endless stream of (concept index, jittered image), every concept once per round in a
    shuffled order, so consecutive runs of ``len(concepts())`` hold each concept exactly once."""
    rng = random.Random(seed)
    pairs = concepts()
    while True:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for index in order:
            colour, shape = pairs[index]
            yield index, render(colour, shape, size=size, rng=rng)


def write_collection(out: Path) -> Path:
    """Write the demo collection as PNG files plus ``manifest.json``:
    ``[{"file", "captions": [...], "attributes": {"colour", "shape"}}]``. Returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for item in demo_collection():
        item.image.save(out / item.file, format="PNG")
        manifest.append(
            {
                "file": item.file,
                "captions": item.captions,
                "attributes": {"colour": item.colour, "shape": item.shape},
            }
        )
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path
