"""Each row's control image for a ControlNet (--controlnet): read, checked and prepared on the host.

The control column holds, per row, an encoded image (bytes, or a Hugging Face image struct) or a path or URL,
relative to the prompts file's folder unless absolute. Each image is decoded, resized to the job's size (Lanczos,
as diffusers' control image processor resizes) and, with --control-preprocess canny, turned into OpenCV's edge
map. A row whose image is missing, cannot be decoded or has another aspect ratio fails alone, naming the file and
row. The student and the teacher take the ControlNet itself (instaflow/controlnet.py): this stage feeds them the
images and records, per row, the scale and the sha256 of the control image as given.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from instaflow.controlnet import ControlNet
from instaflow.loading import ComponentCache
from instaflow.models import CONTROL_IMAGES, PromptBatch
from pipeline.model_source import ModelSource, resolve_model_source
from pipeline.plan import WorkUnit
from pipeline.reader import Sample
from pipeline.stages.base import Encode, Stage, UnitOutputs
from pipeline.storage import filesystem, get_bytes

FIELDS = [pa.field("controlnet_scale", pa.float32()), pa.field("control_digest", pa.string())]
PIXELS, DIGEST = "control_pixels", "control_digest"  # what prepare_rows adds to a sample's inputs
MAX_ASPECT_DIFFERENCE = 0.01  # relative: more is another shape, which resizing would distort
READ_THREADS = 8  # control images are read and decoded in parallel (I/O, and Pillow decodes without the GIL)


class ControlImageError(ValueError):
    """A row's control image that cannot be used; the message says why."""


class ControlNetStage(Stage):
    name = "controlnet"

    def __init__(self, spec, input_fs):
        self.spec = spec
        self.input_fs = input_fs
        self.column = spec.control_column
        self.pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="control")

    @classmethod
    def wanted(cls, spec) -> bool:
        return bool(spec.controlnet)

    @classmethod
    def input_columns(cls, spec) -> dict[str, str]:
        return {spec.control_column: "--control-column"}

    @classmethod
    def sources(cls, spec) -> dict[str, ModelSource]:
        return {"controlnet": resolve_model_source(spec.controlnet, spec.dtype, spec.storage_options, "module")}

    @classmethod
    def load(cls, spec, sources: dict, cache: ComponentCache) -> "ControlNetStage":
        if spec.control_preprocess == "canny":
            _cv2()  # a missing OpenCV is a worker that cannot start, not every row failed
        return cls(spec, filesystem(spec.prompts, spec.storage_options)[0])

    def added_fields(self) -> dict[str, list[pa.Field]]:
        return {output: FIELDS for output in self.spec.tasks}

    def prepare_rows(self, unit: WorkUnit, samples: list[Sample]) -> None:
        """Each sample's control image, ready (at the job's size, preprocessed), or the sample's error. The
        samples of one input row (--samples-per-prompt) share their row's image."""
        by_row: dict[int, list[Sample]] = {}
        for sample in samples:
            by_row.setdefault(sample.row, []).append(sample)
        rows = list(by_row.values())
        for group, prepared in zip(rows, self.pool.map(lambda group: self._prepared(unit, group[0]), rows)):
            for sample in group:
                if isinstance(prepared, str):
                    sample.error = prepared
                else:
                    sample.inputs[PIXELS], sample.inputs[DIGEST] = prepared

    def _prepared(self, unit: WorkUnit, sample: Sample) -> tuple[np.ndarray, str] | str:
        try:
            data = self._image_bytes(unit, sample.inputs.get(self.column))
            return self._pixels(data), hashlib.sha256(data).hexdigest()
        except ControlImageError as exc:
            return f"{unit.path} row {sample.row}: control image ({self.column}): {exc}"

    def _image_bytes(self, unit: WorkUnit, value) -> bytes:
        if isinstance(value, dict):  # a Hugging Face image: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            if not value:
                raise ControlImageError("empty")
            return value
        if not isinstance(value, str) or not value:
            kind = type(value).__name__
            raise ControlImageError("missing" if value is None else f"not image bytes or a path ({kind})")
        if "://" in value:
            fs, path = filesystem(value, self.spec.storage_options)
        else:
            fs, path = self.input_fs, value if value.startswith("/") else posixpath.join(posixpath.dirname(unit.path),
                                                                                          value)
        try:
            return get_bytes(fs, path)
        except (FileNotFoundError, IsADirectoryError):
            raise ControlImageError(f"{value!r}: no such file") from None

    def _pixels(self, data: bytes) -> np.ndarray:
        spec = self.spec
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ControlImageError(f"cannot be decoded ({type(exc).__name__}: {exc})") from None
        aspect = spec.width / spec.height
        if abs(image.width / image.height - aspect) > MAX_ASPECT_DIFFERENCE * aspect:
            raise ControlImageError(f"{image.width}x{image.height} has another aspect ratio than the job's "
                                    f"{spec.width}x{spec.height}")
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), Image.LANCZOS)
        pixels = np.asarray(image)
        if spec.control_preprocess == "canny":
            edges = _cv2().Canny(pixels, spec.canny_low, spec.canny_high)
            pixels = np.repeat(edges[:, :, None], 3, axis=2)
        return pixels

    def prepare(self, batch: PromptBatch) -> None:
        pixels = torch.from_numpy(np.stack([inputs[PIXELS] for inputs in batch.row_inputs]))
        batch.stage_inputs[CONTROL_IMAGES] = pixels.pin_memory() if torch.cuda.is_available() else pixels

    def run(self, batch: PromptBatch, n: int, produced: dict, encode: Encode) -> dict:
        return {"digests": [inputs[DIGEST] for inputs in batch.row_inputs[:n]]}

    def collect(self, keys: list[str], result: dict, outputs: UnitOutputs) -> None:
        for output in self.spec.tasks:
            outputs.column(output, "controlnet_scale").update(dict.fromkeys(keys, self.spec.controlnet_scale))
            outputs.column(output, "control_digest").update(zip(keys, result["digests"]))


def load_controlnet(spec, sources: dict, cache: ComponentCache) -> ControlNet | None:
    """The job's ControlNet for a student or a teacher (one copy for both, through the cache), or None."""
    if not spec.controlnet:
        return None
    return ControlNet(cache.load_controlnet(sources["controlnet"].local_dir(spec.storage_options)),
                      spec.controlnet_scale)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("--control-preprocess canny needs OpenCV: pip install opencv-python-headless") from None
    return cv2
