"""The teacher's reflow pairs: (noise, teacher latent) per row, and with --teacher-images the decoded latent.

`PairsOutput` is what every maker of pairs shares (the model pinned as the teacher, collecting noise and latents,
the pair Parquet shard); `PairsStage` makes them with a teacher's sampler, pipeline/stages/encode.py with a VAE.
"""

from __future__ import annotations

import torch

from instaflow.loading import ComponentCache, Components
from instaflow.models import PromptBatch, Settings, Teacher
from instaflow.sampling import decode, finite_per_sample, to_pixels
from pipeline.model_source import ModelSource, resolve_model_source
from pipeline.stages.base import CONDITIONING, Encode, HostCopy, Stage, UnitOutputs, collect_encoded, metadata_rows, \
    pipeline_kind
from pipeline.storage import redact_text
from pipeline.writers import IMAGE_EXTENSIONS, metadata_table, pairs_parquet_shard


class PairsOutput(Stage):
    """The pairs output: rows of (noise, latent) from the model pinned as "teacher", whose `components` a subclass
    sets; its `run` returns `pair_result`'s dict."""

    name = "pairs"
    is_output = True
    non_finite = "non-finite output (NaN or inf in the teacher latent)"
    components: Components

    @classmethod
    def sources(cls, spec) -> dict[str, ModelSource]:
        return {"teacher": resolve_model_source(spec.teacher, spec.dtype, spec.storage_options)}

    def collect(self, keys: list[str], result: dict, outputs: UnitOutputs) -> None:
        outputs.truncated[self.name].update(zip(keys, result["truncated"]))
        noise, latents = outputs.column(self.name, "noise"), outputs.column(self.name, "latent")
        for key, noise_i, latent_i, finite in zip(keys, result["noise"].numpy(), result["latent"].numpy(),
                                                  result["finite"].numpy()):
            if finite:
                noise[key], latents[key] = noise_i, latent_i
            else:
                outputs.fail(self.name, key, self.non_finite)
        collect_encoded(keys, result.get("encodes", ()), outputs, self.name, "teacher image")

    def files(self, shard: str, samples, extra, outputs: UnitOutputs) -> dict[str, bytes]:
        spec = self.spec
        rows = metadata_rows(spec, samples, outputs, self.name, spec.teacher, spec.teacher_steps,
                             spec.teacher_guidance_scale, None)
        teacher = {"model": redact_text(spec.teacher), "kind": spec.teacher_kind, "steps": spec.teacher_steps,
                   "guidance_scale": spec.teacher_guidance_scale}
        shape = self.components.latent.shape(spec.height, spec.width)
        images = outputs.column(self.name, "image") if spec.teacher_images else None
        return {f"{spec.pair_dir}{shard}.parquet": pairs_parquet_shard(
            metadata_table(rows, extra, outputs.added_columns(self.name, samples)), outputs.column(self.name, "noise"),
            outputs.column(self.name, "latent"), teacher, shape, images, IMAGE_EXTENSIONS[spec.image_format])}


def pair_result(noise: torch.Tensor, latents: torch.Tensor, finite: torch.Tensor, truncated: list[bool],
                n: int) -> dict:
    """A batch's first `n` pairs as `PairsOutput.collect` takes them: float32 copies to the host under way."""
    return {"noise": HostCopy(noise[:n].float()), "latent": HostCopy(latents[:n].float()),
            "finite": HostCopy(finite[:n]), "truncated": truncated[:n]}


class PairsStage(PairsOutput):
    model_kinds = {"teacher": pipeline_kind("--teacher")}
    def __init__(self, spec, teacher: Teacher):
        self.spec = spec
        self.teacher = teacher
        self.components = teacher.components

    @classmethod
    def wanted(cls, spec) -> bool:
        return "pairs" in spec.tasks and not spec.encodes

    @classmethod
    def consumes(cls, spec) -> tuple[str, ...]:
        return (CONDITIONING,)

    @classmethod
    def produces(cls, spec) -> tuple[str, ...]:
        return (cls.name,) if spec.teacher_images else ()  # the decoded teacher latents, for scores

    @classmethod
    def load(cls, spec, sources: dict, cache: ComponentCache) -> "PairsStage":
        source = sources["teacher"]
        components = cache.load(source.local_dir(spec.storage_options), variant=source.variant)
        settings = Settings(spec.teacher_steps, spec.teacher_guidance_scale, height=spec.height, width=spec.width)
        return cls(spec, Teacher(components, spec.teacher_kind, settings))

    def prepare(self, batch: PromptBatch) -> None:
        self.teacher.prepare(batch)

    def run(self, batch: PromptBatch, n: int, produced: dict, encode: Encode) -> dict:
        pairs = self.teacher.pairs(batch)
        result = pair_result(pairs.noise, pairs.latents, pairs.finite, pairs.truncated, n)
        if self.spec.teacher_images:
            images = decode(self.components.vae, pairs.latents[:n])
            pixels = to_pixels(images)
            produced[self.name] = pixels
            result["encodes"] = encode(HostCopy(pixels), n)
            result["finite"] = HostCopy(finite_per_sample(pairs.latents[:n], images))
        return result
