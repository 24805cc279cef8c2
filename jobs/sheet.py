"""A contact sheet: a grid of images, each with caption lines under it, in fonts that cover the common scripts.

No single font file can cover every script (a font holds at most 65,535 glyphs, and GNU Unifont, which covers the
Basic Multilingual Plane, is not on PyPI), so each run of characters is drawn in the first font of a chain that
has its glyphs: Noto Sans (Latin, Greek, Cyrillic, Devanagari), Noto Sans CJK (Han, kana, Hangul, and many
symbols), Noto Sans Arabic and Noto Sans Thai. All are pip packages (pyproject). A character that no font has is written as
its code point, U+XXXX, never as an empty box.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib.resources import files

from PIL import Image, ImageDraw, ImageFont, features

# (package, file inside it, face index in a collection), in the order the chain tries them.
FONT_FILES = (
    ("fontpkg_noto_sans", "files/NotoSans[wdth,wght].ttf", 0),
    ("noto_cjk_sans_otc", "NotoSansCJK-Regular.ttc", 0),
    ("fontpkg_noto_sans_arabic", "files/NotoSansArabic[wdth,wght].ttf", 0),
    ("fontpkg_noto_sans_thai", "files/NotoSansThai[wdth,wght].ttf", 0),
)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


@dataclass
class Cell:
    image: Image.Image
    caption: list[str]  # one line for each part (cut with …) but the last, which wraps onto the lines left


@functools.lru_cache(maxsize=None)
def _coverage(package: str, name: str, index: int) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(str(files(package) / name), fontNumber=index, lazy=True) as font:
        return frozenset(font.getBestCmap())


class FontChain:
    """Draws text in the first font of FONT_FILES that has each character (shaped with raqm where Pillow has it)."""

    def __init__(self, size: int):
        layout = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
        self.fonts = [
            (ImageFont.truetype(str(files(package) / name), size, index=index, layout_engine=layout),
             _coverage(package, name, index))
            for package, name, index in FONT_FILES
        ]
        self.line_height = math.ceil(size * 1.4)

    def runs(self, text: str) -> list[tuple[ImageFont.FreeTypeFont, str]]:
        """`text` cut into runs of one font each; characters no font has become U+XXXX in the first font."""
        runs: list[tuple[ImageFont.FreeTypeFont, str]] = []
        for char in " ".join(text.split()):
            font = next((font for font, covered in self.fonts if ord(char) in covered), None)
            if font is None:
                font, char = self.fonts[0][0], f"U+{ord(char):04X}"
            if runs and runs[-1][0] is font:
                runs[-1] = (font, runs[-1][1] + char)
            else:
                runs.append((font, char))
        return runs

    def width(self, text: str) -> float:
        return sum(font.getlength(run) for font, run in self.runs(text))

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str) -> None:
        x, y = xy
        for font, run in self.runs(text):
            draw.text((x, y), run, font=font, fill=INK)
            x += font.getlength(run)

    def wrap(self, text: str, width: float, max_lines: int) -> list[str]:
        """Lines that fit `width`, broken at spaces where there are any; the last one ends in … if cut. Text from
        the data may be of any length: no more than a pixel per character can be shown, so only that much of it
        is measured, and each line's end is found by bisection."""
        lines, rest = [], " ".join(text[: max_lines * math.ceil(width) + 1].split())
        while rest and len(lines) < max_lines:
            end, too_long = 1, len(rest) + 1  # the longest prefix that fits (at least one character)
            while too_long - end > 1:
                middle = (end + too_long) // 2
                end, too_long = (middle, too_long) if self.width(rest[:middle]) <= width else (end, middle)
            space = rest.rfind(" ", 0, end + 1)
            if end < len(rest) and space > 0:
                end = space
            lines.append(rest[:end].rstrip())
            rest = rest[end:].lstrip()
        if rest and lines:
            last = lines[-1]
            while last and self.width(last + "…") > width:
                last = last[:-1]
            lines[-1] = last + "…"
        return lines


def contact_sheet(cells: list[Cell], thumb: int = 256, columns: int | None = None, font_size: int = 13,
                  caption_lines: int = 4, margin: int = 8) -> Image.Image:
    """The cells in a grid (about square by default): each image fitted into thumb×thumb, its caption below."""
    if not cells:
        raise ValueError("a contact sheet needs at least one image")
    fonts = FontChain(font_size)
    columns = columns or math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / columns)
    cell_width, cell_height = thumb + margin, thumb + margin + caption_lines * fonts.line_height
    sheet = Image.new("RGB", (columns * cell_width + margin, rows * cell_height + margin), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, cell in enumerate(cells):
        x, y = margin + (i % columns) * cell_width, margin + (i // columns) * cell_height
        sheet.paste(thumbnail(cell.image, thumb), (x, y))
        lines = []
        for j, text in enumerate(cell.caption):  # one line for each part but the last, which gets the rest
            room = caption_lines - len(lines) if j == len(cell.caption) - 1 else 1
            lines += fonts.wrap(text, thumb, room)
        for j, line in enumerate(lines):
            fonts.draw(draw, (x, y + thumb + 2 + j * fonts.line_height), line)
    return sheet


def thumbnail(image: Image.Image, size: int) -> Image.Image:
    """`image` scaled (up or down) to fit size×size, keeping its aspect ratio."""
    scale = size / max(image.size)
    return image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                       Image.Resampling.LANCZOS)
