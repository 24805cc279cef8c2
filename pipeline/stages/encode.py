"""Reflow pairs from a dataset of images (the encode job): per row, the seed's noise and the VAE's latent of the
row's image, independent of each other, written as the teacher's pairs are (pipeline/stages/pairs.py), with the
sha256 of the image's bytes as read (`image_digest`), as ControlNet rows record their control image's.

The latent is the mean of the VAE encoder's distribution times the VAE's scaling factor: deterministic, where SD's
training draws a sample. The noise is the seed contract's, cast to the model dtype as a teacher consumes it. The
images are read as pipeline/row_images.py reads a column of images; a row whose image cannot be used fails alone.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from instaflow.loading import ComponentCache, Components
from instaflow.models import PromptBatch
from instaflow.sampling import encode_images, finite_per_sample
from pipeline.plan import WorkUnit
from pipeline.reader import Sample
from pipeline.row_images import RowImages
from pipeline.stages.base import Encode, UnitOutputs, pipeline_kind
from pipeline.stages.pairs import PairsOutput, pair_result
from pipeline.storage import filesystem

PIXELS = "encode_pixels"  # prepare_rows: (pixels, the image's sha256) in a sample's inputs; the batch's stage input
DIGEST = pa.field("image_digest", pa.string())


class EncodeStage(PairsOutput):
    non_finite = "non-finite output (NaN or inf in the image's latent)"
    model_kinds = {"teacher": pipeline_kind("--model")}  # the encode job's --model is pinned as its "teacher"

    def __init__(self, spec, components: Components, input_fs):
        self.spec = spec
        self.components = components
        self.images = RowImages(spec, input_fs, spec.image_column, "image")

    @classmethod
    def wanted(cls, spec) -> bool:
        return spec.encodes

    @classmethod
    def input_columns(cls, spec) -> dict[str, str]:
        return {spec.image_column: "--image-column"}

    @classmethod
    def load(cls, spec, sources: dict, cache: ComponentCache) -> "EncodeStage":
        source = sources["teacher"]
        components = cache.load(source.local_dir(spec.storage_options), variant=source.variant)
        return cls(spec, components, filesystem(spec.prompts, spec.storage_options)[0])

    @classmethod
    def added_fields(cls, spec) -> dict[str, list[pa.Field]]:
        return {cls.name: [DIGEST]}

    def prepare_rows(self, unit: WorkUnit, samples: list[Sample]) -> None:
        self.images.read(unit, samples, PIXELS, self.images.pixels)

    def end_rows(self, unit: WorkUnit, samples: list[Sample]) -> None:
        self.images.judge(unit, samples)

    def prepare(self, batch: PromptBatch) -> None:
        """Tokens (for `truncated`), the seed noise and the images, on the host."""
        spec, components = self.spec, self.components
        batch.tokens(components, negative=False)
        batch.host_noise(components, spec.height, spec.width)
        pixels = torch.from_numpy(np.stack([inputs[PIXELS][0] for inputs in batch.row_inputs]))
        batch.stage_inputs[PIXELS] = pixels.pin_memory() if components.runtime.device.type == "cuda" else pixels

    def run(self, batch: PromptBatch, n: int, produced: dict, encode: Encode) -> dict:
        c, spec = self.components, self.spec
        latents = encode_images(c.vae, batch.stage_inputs[PIXELS], c.runtime.device, c.runtime.dtype)
        noise = batch.noise(c, spec.height, spec.width)
        digests = [inputs[PIXELS][1] for inputs in batch.row_inputs[:n]]
        return pair_result(noise, latents, finite_per_sample(latents), batch.truncated(c), n) | {"digests": digests}

    def collect(self, keys: list[str], result: dict, outputs: UnitOutputs) -> None:
        super().collect(keys, result, outputs)
        outputs.column(self.name, DIGEST.name).update(zip(keys, result["digests"]))
