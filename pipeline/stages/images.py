"""The student's images: InstaFlow (one Euler step) or a 2-RF model, written as WebDataset tars or image Parquet.

With --merge-finetune and --lora the student's weights are changed once per worker, as the InstaFlow repo's
rf_lora.py does (instaflow/lora.py): first a fine-tune's difference from its base is added to the UNet and the
fine-tune's VAE, text encoder and tokenizer are taken, then each LoRA is fused into the UNet and text encoder.
The changed modules are this stage's own copies: a teacher that shares the originals keeps them unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pyarrow as pa

from instaflow.loading import ComponentCache, Components, LatentGeometry
from instaflow.lora import TEXT_ENCODER, UNET, check_lora, check_merge, fuse_loras, merge_finetune, meta_modules, \
    read_lora
from instaflow.models import PromptBatch, Settings, Student
from pipeline.model_source import ModelSource, resolve_model_source
from pipeline.stages.base import CONDITIONING, Encode, HostCopy, ModelKind, Stage, UnitOutputs, check_same_geometry, \
    collect_encoded, metadata_rows, module_geometry, pipeline_kind
from pipeline.storage import redact_text
from pipeline.writers import IMAGE_EXTENSIONS, image_parquet_shard, metadata_table, webdataset_shard

NON_FINITE = "non-finite output (NaN or inf in the latent or image)"
LORA_FIELD = pa.field("lora", pa.string())  # JSON: what changed the student's weights, in the order applied
_CONFIGS = [f"{UNET}/config.json", f"{TEXT_ENCODER}/config.json"]


def student_vae(spec, sources: dict[str, ModelSource]) -> tuple[str, ModelSource]:
    """The flag and model whose VAE the student's latents are decoded with: the fine-tune's with --merge-finetune
    (`_changed_weights`), else the model's (a tiny decoder stands in for it with the same latents)."""
    return ("--merge-finetune", sources["merge_finetune"]) if spec.merge_finetune else ("--model", sources["model"])


class ImagesStage(Stage):
    name = "images"
    is_output = True
    model_kinds = {"model": pipeline_kind("--model"), "merge_finetune": pipeline_kind("--merge-finetune"),
                   "merge_base": pipeline_kind("--merge-base", decodes=False),
                   "decoder": ModelKind("--tiny-decoder", {"config.json": ("AutoencoderTiny",)})}

    def __init__(self, spec, student: Student, weights_record: str | None = None):
        self.spec = spec
        self.student = student
        self.weights_record = weights_record

    @classmethod
    def wanted(cls, spec) -> bool:
        return "images" in spec.tasks

    @classmethod
    def consumes(cls, spec) -> tuple[str, ...]:
        return (CONDITIONING,)

    @classmethod
    def produces(cls, spec) -> tuple[str, ...]:
        return (cls.name,)

    @classmethod
    def sources(cls, spec) -> dict[str, ModelSource]:
        def pin(model: str, layout: str = "pipeline") -> ModelSource:
            return resolve_model_source(model, spec.dtype, spec.storage_options, layout)

        sources = {"model": pin(spec.model)}
        if spec.decoder == "tiny":
            sources["decoder"] = pin(spec.tiny_decoder, "module")
        if spec.merge_finetune:
            sources["merge_finetune"], sources["merge_base"] = pin(spec.merge_finetune), pin(spec.merge_base)
        for index, (lora, _) in enumerate(spec.loras):
            sources[f"lora_{index}"] = pin(lora, "file")
        return sources

    @classmethod
    def check(cls, spec, sources: dict[str, ModelSource]) -> None:
        """A tiny decoder whose latents are not those of the VAE it stands in for, a fine-tune whose UNet does not
        line up with the student's, or a LoRA key that fits neither the UNet nor the text encoder it will be fused
        into, is refused here, from the models' configs alone."""
        if "decoder" in sources:
            cls.check_decoder(spec, sources)
        if not spec.loras and not spec.merge_finetune:
            return
        options = spec.storage_options
        with contextlib.ExitStack() as stack:
            unet, text_encoder = meta_modules(stack.enter_context(sources["model"].config_files(_CONFIGS, options)))
            if spec.merge_finetune:
                finetune = stack.enter_context(sources["merge_finetune"].config_files(_CONFIGS, options))
                base = stack.enter_context(sources["merge_base"].config_files(_CONFIGS[:1], options))
                finetune_unet, text_encoder = meta_modules(finetune)
                try:
                    check_merge(unet, finetune_unet, *meta_modules(base, [UNET]))
                except ValueError as exc:
                    raise ValueError(f"--merge-finetune {spec.merge_finetune!r} (base {spec.merge_base!r}): "
                                     f"{exc}") from None
            for index in range(len(spec.loras)):
                check_lora(read_lora(sources[f"lora_{index}"].local_file(options)), unet, text_encoder)

    @classmethod
    def check_decoder(cls, spec, sources: dict[str, ModelSource]) -> None:
        """The tiny decoder stands in for the student's VAE, and the seed noise takes its latent shape: another
        geometry would sample other noise at another latent size."""
        flag, source = student_vae(spec, sources)
        what = f"--tiny-decoder {redact_text(spec.tiny_decoder)!r}"
        decoder = module_geometry(sources["decoder"], "tiny_decoder", what,
                                  lambda config: LatentGeometry.of_vae(config, "AutoencoderTiny"), spec.storage_options)
        check_same_geometry(what, decoder, f"{flag} {redact_text(source.model)!r}",
                            source.latent_geometry(flag, spec.storage_options))

    @classmethod
    def load(cls, spec, sources: dict, cache: ComponentCache) -> "ImagesStage":
        components = cache.load(sources["model"].local_dir(spec.storage_options), variant=sources["model"].variant)
        components = _changed_weights(spec, sources, cache, components)
        if "decoder" in sources:  # after the fine-tune's VAE, which it stands in for
            decoder = cache.load_tiny_decoder(sources["decoder"].local_dir(spec.storage_options))
            components = dataclasses.replace(components, vae=decoder)
        settings = Settings(spec.steps, spec.guidance_scale, height=spec.height, width=spec.width)
        student = Student(components, settings)
        return cls(spec, student, weights_record(spec, sources))

    @classmethod
    def added_fields(cls, spec) -> dict[str, list[pa.Field]]:
        return {cls.name: [LORA_FIELD]} if spec.loras or spec.merge_finetune else {}  # as weights_record has one

    def prepare(self, batch: PromptBatch) -> None:
        self.student.prepare(batch)

    @property
    def image_column(self) -> str | None:
        """Where the student's image is stored: `image`; with a refiner, `unrefined_image` if kept, else nowhere
        (the refiner stage stores its image as `image`)."""
        if not self.spec.refiner:
            return "image"
        return "unrefined_image" if self.spec.keep_unrefined else None

    def run(self, batch: PromptBatch, n: int, produced: dict, encode: Encode) -> dict:
        out = self.student.generate(batch)
        produced[self.name] = out.pixels[:n]
        encodes = encode(HostCopy(out.pixels[:n]), n) if self.image_column else []
        return {"encodes": encodes, "finite": HostCopy(out.finite[:n]), "truncated": out.truncated[:n]}

    def collect(self, keys: list[str], result: dict, outputs: UnitOutputs) -> None:
        outputs.truncated[self.name].update(zip(keys, result["truncated"]))
        if self.weights_record:
            outputs.column(self.name, LORA_FIELD.name).update(dict.fromkeys(keys, self.weights_record))
        if self.image_column:
            collect_encoded(keys, result["encodes"], outputs, self.name, "image", self.image_column)
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
        unrefined = {"unrefined": outputs.column(self.name, "unrefined_image")} if spec.keep_unrefined else None
        prefix = f"{spec.image_dir}{shard}"
        if spec.output_format == "webdataset":
            shard_files = webdataset_shard(metadata, images, extension, unrefined)
            return {f"{prefix}.tar": shard_files["tar"], f"{prefix}.parquet": shard_files["parquet"]}
        return {f"{prefix}.parquet": image_parquet_shard(metadata, images, extension, unrefined)}


def _changed_weights(spec, sources: dict, cache: ComponentCache, components: Components) -> Components:
    """The student's components with the fine-tune merged and the LoRAs fused, into copies of the modules that
    change (placed and compiled once changed); the cache's modules, which other models may share, stay as they
    are."""
    options, changed = spec.storage_options, {}
    if spec.merge_finetune:
        finetune = cache.load(sources["merge_finetune"].local_dir(options), variant=sources["merge_finetune"].variant)
        base = cache.load(sources["merge_base"].local_dir(options), variant=sources["merge_base"].variant)
        changed[UNET] = cache.editable_copy(components.unet)
        merge_finetune(changed[UNET], finetune.unet, base.unet, spec.merge_scale)
        components = dataclasses.replace(components, vae=finetune.vae, text_encoder=finetune.text_encoder,
                                         tokenizer=finetune.tokenizer)
    if spec.loras:
        changed.setdefault(UNET, cache.editable_copy(components.unet))
        changed[TEXT_ENCODER] = cache.editable_copy(components.text_encoder)
        loras = [(read_lora(sources[f"lora_{index}"].local_file(options)), scale)
                 for index, (_, scale) in enumerate(spec.loras)]
        fuse_loras(changed[UNET], changed[TEXT_ENCODER], loras)
    return dataclasses.replace(components, **{name: cache.place(name, module) for name, module in changed.items()})


def weights_record(spec, sources: dict[str, ModelSource]) -> str | None:
    """The `lora` column: JSON of what changed the student's weights, in the order applied (the merge, then each
    LoRA), each with its name, digest (the file's sha256, a model folder's digest, or the hub commit) and scale;
    None when nothing did."""
    def entry(kind: str, source: ModelSource, scale: float) -> dict:
        files = dict(source.files)
        digest = files[next(iter(files))] if source.layout == "file" and files else source.revision
        return {"kind": kind, "name": source.identity()["name"], "digest": digest, "scale": scale}

    entries = []
    if spec.merge_finetune:
        base = sources["merge_base"]
        entries.append(entry("merge", sources["merge_finetune"], spec.merge_scale)
                       | {"base": base.identity()["name"], "base_digest": base.revision})
    entries += [entry("lora", sources[f"lora_{index}"], scale) for index, (_, scale) in enumerate(spec.loras)]
    return json.dumps(entries) if entries else None
