"""The student's images: InstaFlow (one Euler step) or a 2-RF model, written as WebDataset tars or image Parquet."""

from __future__ import annotations

import dataclasses

from instaflow.loading import ComponentCache
from instaflow.models import PromptBatch, Settings, Student
from pipeline.stages.base import Encode, HostCopy, Stage, UnitOutputs, collect_encoded, metadata_rows
from pipeline.writers import IMAGE_EXTENSIONS, image_parquet_shard, metadata_table, webdataset_shard

NON_FINITE = "non-finite output (NaN or inf in the latent or image)"


class ImagesStage(Stage):
    name = "images"
    is_output = True

    def __init__(self, spec, student: Student):
        self.spec = spec
        self.student = student

    @classmethod
    def load(cls, spec, sources: dict, cache: ComponentCache) -> "ImagesStage":
        components = cache.load(sources["model"].local_dir(spec.storage_options), variant=sources["model"].variant)
        if "decoder" in sources:
            decoder = cache.load_tiny_decoder(sources["decoder"].local_dir(spec.storage_options))
            components = dataclasses.replace(components, vae=decoder)
        settings = Settings(spec.steps, spec.guidance_scale, height=spec.height, width=spec.width)
        return cls(spec, Student(components, settings))

    def prepare(self, batch: PromptBatch) -> None:
        self.student.prepare(batch)

    def run(self, batch: PromptBatch, n: int, produced: dict, encode: Encode) -> dict:
        out = self.student.generate(batch)
        produced[self.name] = out.pixels[:n]
        return {"encodes": encode(HostCopy(out.pixels[:n]), n), "finite": HostCopy(out.finite[:n]),
                "truncated": out.truncated[:n]}

    def collect(self, keys: list[str], result: dict, outputs: UnitOutputs) -> None:
        outputs.truncated[self.name].update(zip(keys, result["truncated"]))
        collect_encoded(keys, result["encodes"], outputs, self.name, "image")
        for key, finite in zip(keys, result["finite"].numpy()):
            if not finite:
                outputs.fail(self.name, key, NON_FINITE)

    def files(self, shard: str, samples, extra, outputs: UnitOutputs) -> dict[str, bytes]:
        spec = self.spec
        decoder = "full" if spec.decoder == "full" else spec.tiny_decoder
        rows = metadata_rows(spec, samples, outputs, self.name, spec.model, spec.steps, spec.guidance_scale, decoder)
        metadata = metadata_table(rows, extra, outputs.added_columns(self.name, samples))
        extension = IMAGE_EXTENSIONS[spec.image_format]
        images = outputs.column(self.name, "image")
        prefix = f"{spec.image_dir}{shard}"
        if spec.output_format == "webdataset":
            shard_files = webdataset_shard(metadata, images, extension)
            return {f"{prefix}.tar": shard_files["tar"], f"{prefix}.parquet": shard_files["parquet"]}
        return {f"{prefix}.parquet": image_parquet_shard(metadata, images, extension)}
