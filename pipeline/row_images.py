"""Each row's image from an input column, read and checked on the host: ControlNet's control images, encode's images.

The column holds, per row, encoded image bytes, a Hugging Face image struct ({"bytes", "path"}, as image Parquet
stores images) or a path or URL, relative to the Parquet file's folder unless absolute. Each image is decoded to
RGB and resized to the job's size with Lanczos (as diffusers' image processors resize). A row whose image is
missing, cannot be decoded or has another aspect ratio (which resizing would distort) fails alone, naming the file,
row and column. Rows are read in parallel: reading is I/O, and Pillow decodes without the GIL.
"""

from __future__ import annotations

import io
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from PIL import Image

from pipeline.plan import WorkUnit
from pipeline.reader import Sample
from pipeline.storage import filesystem, get_bytes

MAX_ASPECT_DIFFERENCE = 0.01  # relative: more is another shape, which resizing would distort
READ_THREADS = 8


class RowImageError(ValueError):
    """A row's image that cannot be used; the message says why."""


class RowImages:
    """The images of one input column (`column`, called `what` in errors) for a job of `spec`'s size; `input_fs`
    holds the input files, against whose folders relative paths are read."""

    def __init__(self, spec, input_fs, column: str, what: str):
        self.spec = spec
        self.input_fs = input_fs
        self.column = column
        self.what = what
        self.pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="row-images")

    def read(self, unit: WorkUnit, samples: list[Sample], name: str, prepare: Callable[[bytes], Any]) -> None:
        """Each sample's `prepare(its image's bytes)` into its `inputs[name]`, or the sample's error naming the
        file, row and column (`prepare` raises RowImageError for an image it cannot use). The samples of one
        input row (--samples-per-prompt) share their row's image."""
        by_row: dict[int, list[Sample]] = {}
        for sample in samples:
            by_row.setdefault(sample.row, []).append(sample)
        rows = list(by_row.values())
        for group, prepared in zip(rows, self.pool.map(lambda group: self._prepared(unit, group[0], prepare), rows)):
            for sample in group:
                if isinstance(prepared, RowImageError):
                    sample.error = f"{unit.path} row {sample.row}: {self.what} ({self.column}): {prepared}"
                else:
                    sample.inputs[name] = prepared

    def _prepared(self, unit: WorkUnit, sample: Sample, prepare: Callable[[bytes], Any]) -> Any:
        try:
            return prepare(self.image_bytes(unit, sample.inputs.get(self.column)))
        except RowImageError as exc:
            return exc

    def image_bytes(self, unit: WorkUnit, value) -> bytes:
        """A row's image as given: its bytes, or the file its path or URL names."""
        if isinstance(value, dict):  # a Hugging Face image: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            if not value:
                raise RowImageError("empty")
            return value
        if not isinstance(value, str) or not value:
            kind = type(value).__name__
            raise RowImageError("missing" if value is None else f"not image bytes or a path ({kind})")
        if "://" in value:
            fs, path = filesystem(value, self.spec.storage_options)
        else:
            fs, path = self.input_fs, value if value.startswith("/") else posixpath.join(posixpath.dirname(unit.path),
                                                                                          value)
        try:
            return get_bytes(fs, path)
        except (FileNotFoundError, IsADirectoryError):
            raise RowImageError(f"{value!r}: no such file") from None

    def pixels(self, data: bytes) -> np.ndarray:
        """(H, W, 3) uint8 RGB at the job's size: decoded, its aspect ratio checked, resized with Lanczos."""
        spec = self.spec
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise RowImageError(f"cannot be decoded ({type(exc).__name__}: {exc})") from None
        aspect = spec.width / spec.height
        if abs(image.width / image.height - aspect) > MAX_ASPECT_DIFFERENCE * aspect:
            raise RowImageError(f"{image.width}x{image.height} has another aspect ratio than the job's "
                                f"{spec.width}x{spec.height}")
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), Image.LANCZOS)
        return np.asarray(image)
