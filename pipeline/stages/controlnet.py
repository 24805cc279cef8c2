"""Each row's control image for a ControlNet (--controlnet): read, checked and prepared on the host.

The control column is read as pipeline/row_images.py reads a column of images (bytes, a Hugging Face image struct,
or a path or URL inside the prompts root or an allowed source; decoded and resized to the job's size; a row whose
image cannot be used fails alone, naming the file and row); with --control-preprocess canny, each image is then
turned into OpenCV's edge map. This stage owns the ControlNet (instaflow/controlnet.py) and puts it, with each
batch's control images, among the batch's conditioners, which the student and the teacher run under
(instaflow/conditioning.py); it records, per row, the scale and the sha256 of the control image as read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from instaflow.controlnet import ControlNet, controlnet_geometry
from instaflow.loading import ComponentCache
from instaflow.models import PromptBatch
from pipeline.model_source import ModelSource, resolve_model_source
from pipeline.plan import WorkUnit
from pipeline.reader import Sample
from pipeline.row_images import RowImages
from pipeline.stages.base import CONDITIONING, Encode, ModelKind, Stage, UnitOutputs, check_same_geometry, \
    module_geometry
from pipeline.stages.images import student_vae
from pipeline.storage import filesystem, redact_text

FIELDS = [pa.field("controlnet_scale", pa.float32()), pa.field("control_digest", pa.string())]
PREPARED = "control"  # what prepare_rows adds to a sample's inputs: (pixels, the sha256 of the image as given)


class ControlNetStage(Stage):
    name = "controlnet"
    model_kinds = {"controlnet": ModelKind("--controlnet", {"config.json": ("ControlNetModel",)})}

    def __init__(self, spec, controlnet: ControlNet, input_fs):
        self.spec = spec
        self.controlnet = controlnet
        self.images = RowImages(spec, input_fs, spec.control_column, "control image")

    @classmethod
    def wanted(cls, spec) -> bool:
        return bool(spec.controlnet)

    @classmethod
    def produces(cls, spec) -> tuple[str, ...]:
        return (CONDITIONING,)

    @classmethod
    def input_columns(cls, spec) -> dict[str, str]:
        return {spec.control_column: "--control-column"}

    @classmethod
    def sources(cls, spec) -> dict[str, ModelSource]:
        return {"controlnet": resolve_model_source(spec.controlnet, spec.dtype, spec.storage_options, "module")}

    @classmethod
    def check(cls, spec, sources: dict[str, ModelSource]) -> None:
        """The ControlNet runs on the latents of every model it conditions (the student, decoded by its VAE or a
        merged fine-tune's; the teacher): it must take their channels, and bring the control image down to their
        side."""
        options, what = spec.storage_options, f"--controlnet {redact_text(spec.controlnet)!r}"
        taken = module_geometry(sources["controlnet"], "controlnet", what, controlnet_geometry, options)
        conditioned = [student_vae(spec, sources)] if "model" in sources else []
        conditioned += [("--teacher", sources["teacher"])] if "teacher" in sources else []
        for flag, source in conditioned:
            check_same_geometry(what, taken, f"{flag} {redact_text(source.model)!r}",
                                source.latent_geometry(flag, options))

    @classmethod
    def load(cls, spec, sources: dict, cache: ComponentCache) -> "ControlNetStage":
        if spec.control_preprocess == "canny":
            _cv2()  # a missing OpenCV is a worker that cannot start, not every row failed
        model = cache.load_controlnet(sources["controlnet"].local_dir(spec.storage_options))
        return cls(spec, ControlNet(model, spec.controlnet_scale), filesystem(spec.prompts, spec.storage_options)[0])

    @classmethod
    def added_fields(cls, spec) -> dict[str, list[pa.Field]]:
        return {output: FIELDS for output in spec.tasks}

    def prepare_rows(self, unit: WorkUnit, samples: list[Sample]) -> None:
        """Each sample's control image, ready (at the job's size, preprocessed), or the sample's error."""
        self.images.read(unit, samples, PREPARED, self._pixels)

    def _pixels(self, data: bytes) -> np.ndarray:
        pixels = self.images.pixels(data)
        if self.spec.control_preprocess == "canny":
            edges = _cv2().Canny(pixels, self.spec.canny_low, self.spec.canny_high)
            pixels = np.repeat(edges[:, :, None], 3, axis=2)
        return pixels

    def end_rows(self, unit: WorkUnit, samples: list[Sample]) -> None:
        self.images.judge(unit, samples)

    def prepare(self, batch: PromptBatch) -> None:
        pixels = torch.from_numpy(np.stack([inputs[PREPARED][0] for inputs in batch.row_inputs]))
        batch.conditioners.append(self.controlnet.control(pixels.pin_memory() if torch.cuda.is_available() else pixels))

    def run(self, batch: PromptBatch, n: int, produced: dict, encode: Encode) -> dict:
        return {"digests": [inputs[PREPARED][1] for inputs in batch.row_inputs[:n]]}

    def collect(self, keys: list[str], result: dict, outputs: UnitOutputs) -> None:
        for output in self.spec.tasks:
            outputs.column(output, "controlnet_scale").update(dict.fromkeys(keys, self.spec.controlnet_scale))
            outputs.column(output, "control_digest").update(zip(keys, result["digests"]))


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("--control-preprocess canny needs OpenCV: pip install opencv-python-headless") from None
    return cv2
