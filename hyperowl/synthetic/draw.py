"""Seeded drawing of the synthetic pictures: coloured shapes, digits and small scenes (PIL).

Every function takes a `random.Random` so that one seed always gives the same pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
    "purple": (160, 60, 200),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")


@dataclass(frozen=True)
class Item:
    """One object of a picture: `colour` and `shape` names, its box `(x0, y0, x1, y1)` in pixels."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[int, int]:
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2


def background(rng: random.Random, size: int) -> Image.Image:
    """A dark grey canvas `size x size` (the shade varies a little per picture)."""
    shade = rng.randint(20, 50)
    return Image.new("RGB", (size, size), (shade, shade, shade))


def draw_item(image: Image.Image, item: Item) -> None:
    """Paint `item` onto `image` in place."""
    draw = ImageDraw.Draw(image)
    fill = COLOURS[item.colour]
    x0, y0, x1, y1 = item.box
    if item.shape == "circle":
        draw.ellipse(item.box, fill=fill)
    elif item.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif item.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    elif item.shape == "cross":
        w = max(2, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - w // 2, y0, cx - w // 2 + w - 1, y1 - 1), fill=fill)
        draw.rectangle((x0, cy - w // 2, x1 - 1, cy - w // 2 + w - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {item.shape!r}; expected one of {SHAPES}")


def random_box(rng: random.Random, size: int, low: float, high: float) -> tuple[int, int, int, int]:
    """A square box whose side is a random fraction in [low, high] of `size`, fully inside the picture."""
    side = max(4, round(size * rng.uniform(low, high)))
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    return x, y, x + side, y + side


def centred_box(rng: random.Random, size: int, low: float = 0.65, high: float = 0.75, jitter: float = 0.06) -> tuple[int, int, int, int]:
    """A square box of side `low..high` x `size`, centred up to `jitter` x `size` pixels off the middle.

    Large, nearly centred shapes make the small from-scratch vision tower learn shapes quickly (a
    shape anywhere in the picture trained several times slower in our runs).
    """
    side = max(4, round(size * rng.uniform(low, high)))
    shift = max(0, round(size * jitter))
    x = min(size - side, max(0, (size - side) // 2 + rng.randint(-shift, shift)))
    y = min(size - side, max(0, (size - side) // 2 + rng.randint(-shift, shift)))
    return x, y, x + side, y + side


def shape_picture(rng: random.Random, size: int, colour: str, shape: str) -> tuple[Image.Image, Item]:
    """One large shape, nearly centred (see `centred_box`)."""
    image = background(rng, size)
    item = Item(colour, shape, centred_box(rng, size))
    draw_item(image, item)
    return image, item


def scene_picture(rng: random.Random, size: int, count: int) -> tuple[Image.Image, list[Item]]:
    """`count` small non-overlapping shapes (25-35% of the side) of random colours and kinds."""
    for _ in range(1000):
        boxes = [random_box(rng, size, 0.25, 0.35) for _ in range(count)]
        if all(_apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            break
    else:
        raise ValueError(f"cannot place {count} separate shapes in a {size}px picture")
    image = background(rng, size)
    items = [Item(rng.choice(list(COLOURS)), rng.choice(SHAPES), box) for box in boxes]
    for item in items:
        draw_item(image, item)
    return image, items


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Boxes separated by at least one pixel."""
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def digit_picture(rng: random.Random, size: int, digit: int, colour: str) -> Image.Image:
    """The digit `digit` (0-9) drawn large (about 70-90% of the side) at a slightly random place."""
    image = background(rng, size)
    font = _font(max(8, round(size * rng.uniform(0.7, 0.9))))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    w, h = right - left, bottom - top
    x = rng.randint(0, max(0, size - w)) - left
    y = rng.randint(0, max(0, size - h)) - top
    draw.text((x, y), str(digit), fill=COLOURS[colour], font=font)
    return image
