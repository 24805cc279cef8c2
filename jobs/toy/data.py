"""The procedural captioned image set of the toy reflow reproduction (`instaflow-batch reproduce-toy`).

Each image is one shape (circle, square, triangle, star) of one colour on a background of another colour, in one
of four positions, drawn with Pillow at 4x and downsampled (smooth edges), with a seeded jitter of size and
place. A full caption says all four: `a red triangle on a blue background, top left`; a partial one leaves some
out (`a red shape`, `a star on a blue background`, `something, top left`), so that one caption has many images
and the flow's conditional distributions have many modes, as a text-to-image teacher's have. Combinations, not
images, are held out: the held-out captions are combinations never drawn for training, each of whose shape-colour
pairs is. Everything is derived from the seed, so two builds give the same bytes.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 40), "purple": (140, 50, 180), "orange": (245, 130, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), **COLOURS}
POSITIONS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
             "bottom right": (0.73, 0.73)}
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS),
              "position": tuple(POSITIONS)}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Caption:
    """An image's attributes; None for one a partial caption leaves out."""

    shape: str | None
    colour: str | None
    background: str | None
    position: str | None

    @property
    def text(self) -> str:
        if self.shape is None and self.colour is None:
            subject = "something"
        else:
            noun = self.shape or "shape"
            subject = f"{_article(self.colour or noun)} {self.colour + ' ' if self.colour else ''}{noun}"
        background = f" on {_article(self.background)} {self.background} background" if self.background else ""
        return subject + background + (f", {self.position}" if self.position else "")

    @property
    def given(self) -> tuple[str, ...]:
        """The attributes the caption says."""
        return tuple(name for name in ATTRIBUTES if getattr(self, name) is not None)

    def labels(self) -> dict[str, int]:
        """Each attribute's class index, for the classifier (-1 for one left out)."""
        return {name: ATTRIBUTES[name].index(value) if (value := getattr(self, name)) is not None else -1
                for name in ATTRIBUTES}

    def keeping(self, names) -> "Caption":
        """The partial caption of this image that says only `names`."""
        return Caption(**{name: getattr(self, name) if name in names else None for name in ATTRIBUTES})

    def matches(self, image: "Caption") -> bool:
        """Whether a full caption's image fits this (partial) caption."""
        return all(getattr(image, name) == getattr(self, name) for name in self.given)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_captions() -> list[Caption]:
    """Every combination whose shape and background differ in colour, in a fixed order."""
    return [Caption(shape, colour, background, position)
            for shape, colour, background, position in itertools.product(SHAPES, COLOURS, BACKGROUNDS, POSITIONS)
            if background != colour]


def captions_by_text() -> dict[str, Caption]:
    """Every caption a training image or an evaluation prompt can have (each combination with any of its
    attributes left out), by its text."""
    names = list(ATTRIBUTES)
    subsets = [kept for k in range(len(names) + 1) for kept in itertools.combinations(names, k)]
    return {partial.text: partial for caption in all_captions() for partial in map(caption.keeping, subsets)}


def split_captions(held_out_fraction: float, seed: int) -> tuple[list[Caption], list[Caption]]:
    """(training, held-out) captions: a seeded share held out, every shape-colour pair kept in training."""
    captions = all_captions()
    order = np.random.default_rng(seed).permutation(len(captions))
    wanted = round(held_out_fraction * len(captions))
    held, kept_pairs = [], {}
    for caption in captions:
        kept_pairs[(caption.shape, caption.colour)] = kept_pairs.get((caption.shape, caption.colour), 0) + 1
    for index in order:
        caption = captions[index]
        pair = (caption.shape, caption.colour)
        if len(held) < wanted and kept_pairs[pair] > 1:
            held.append(caption)
            kept_pairs[pair] -= 1
    held_set = set(held)
    return [c for c in captions if c not in held_set], sorted(held, key=captions.index)


def training_caption(image: Caption, full_share: float, rng: np.random.Generator) -> Caption:
    """The caption one training image is shown with: the full one with probability `full_share`, else each
    attribute kept with probability 1/2 (possibly none: `something`)."""
    if rng.random() < full_share:
        return image
    return image.keeping([name for name in ATTRIBUTES if rng.random() < 0.5])


# Partial captions whose samples are measured for how they cover their modes (the attributes they leave out);
# fixed before any model is trained. Each says at most one attribute, so each is common in training: of the images
# shown with a partial caption, 1/16 are shown `something`, and 1/64 to 1/128 each of the others.
PARTIAL_CAPTIONS = (
    Caption(None, "red", None, None), Caption("star", None, None, None), Caption(None, None, None, None),
    Caption(None, None, None, "top left"), Caption(None, None, "black", None), Caption("circle", None, None, None),
    Caption(None, "blue", None, None), Caption(None, None, None, "bottom right"),
)


def tokenizer_corpus() -> str:
    """Every word a caption can have, for the toy tokenizer's merges."""
    words = {"shape", "something"}
    for caption in all_captions():
        words.update(caption.text.replace(",", " ").split())
    return " ".join(sorted(words))


def draw(caption: Caption, size: int, seed: int) -> np.ndarray:
    """The caption's image, HxWx3 uint8: its jitter (size, offset, rotation of the polygon) from `seed`."""
    rng = np.random.default_rng(seed)
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[caption.background])
    cx, cy = POSITIONS[caption.position]
    cx, cy = (cx + rng.uniform(-0.05, 0.05)) * big, (cy + rng.uniform(-0.05, 0.05)) * big
    radius = rng.uniform(0.15, 0.2) * big
    angle = rng.uniform(-0.2, 0.2)
    fill = COLOURS[caption.colour]
    canvas = ImageDraw.Draw(image)
    if caption.shape == "circle":
        canvas.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        canvas.polygon(_polygon(caption.shape, cx, cy, radius, angle), fill=fill)
    return np.asarray(image.resize((size, size), Image.LANCZOS))


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(k * np.pi / 2 + np.pi / 4, radius * 0.95) for k in range(4)]
    elif shape == "triangle":
        corners = [(k * 2 * np.pi / 3 - np.pi / 2, radius * 1.1) for k in range(3)]
    else:  # a five-pointed star: outer and inner corners in turn
        corners = [(k * np.pi / 5 - np.pi / 2, radius * (1.1 if k % 2 == 0 else 0.45)) for k in range(10)]
    return [(cx + r * np.cos(a + angle), cy + r * np.sin(a + angle)) for a, r in corners]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
