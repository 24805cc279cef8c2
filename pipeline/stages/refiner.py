"""The SDXL refiner after the student (--refiner): the image stored is the refined one.

It runs in the same worker, on the device, from the student's image where the images stage left it
(`produced["images"]`, no copy to the host), and leaves the refined image there for later stages (scores). With
--keep-unrefined the images stage stores the student's image too. Each row records the refiner, its strength,
steps, the refined size and the seed of its generator (instaflow/refiner.py).
"""

from __future__ import annotations

import pyarrow as pa

import dataclasses

import torch

from instaflow.loading import ComponentCache, Runtime
from instaflow.models import PromptBatch
from instaflow.refiner import Refiner, RefinerSettings, refined_size, refiner_seed
from pipeline.model_source import ModelSource, resolve_model_source
from pipeline.stages.base import Encode, HostCopy, ModelKind, Stage, UnitOutputs, collect_encoded

OUTPUT = "images"
NON_FINITE = "non-finite refined image (NaN or inf in its latent or image)"
FIELDS = [pa.field("refiner", pa.string()), pa.field("refiner_strength", pa.float32()),
          pa.field("refiner_steps", pa.int32()), pa.field("refined_height", pa.int32()),
          pa.field("refined_width", pa.int32()), pa.field("refiner_seed", pa.int64())]


class RefinerStage(Stage):
    name = "refiner"
    model_kinds = {"refiner": ModelKind("--refiner", {"model_index.json": ("StableDiffusionXLImg2ImgPipeline",
                                                                           "StableDiffusionXLPipeline")})}

    def __init__(self, spec, refiner: Refiner, refiner_name: str):
        self.spec = spec
        self.refiner = refiner
        self.refiner_name = refiner_name
        self.height, self.width = refined_size(spec.height, spec.width, spec.refine_size)

    @classmethod
    def wanted(cls, spec) -> bool:
        return bool(spec.refiner)

    @classmethod
    def consumes(cls, spec) -> tuple[str, ...]:
        return (OUTPUT,)

    @classmethod
    def produces(cls, spec) -> tuple[str, ...]:
        return (OUTPUT,)  # the refined image in place of the student's

    @classmethod
    def sources(cls, spec) -> dict[str, ModelSource]:
        return {"refiner": resolve_model_source(spec.refiner, spec.dtype, spec.storage_options, "xl")}

    @classmethod
    def load(cls, spec, sources: dict, cache: ComponentCache) -> "RefinerStage":
        """With --refiner-offload its modules are loaded into host memory, uncompiled, and go to the device one
        at a time while they run."""
        source = sources["refiner"]
        device = cache.runtime.device
        if spec.refiner_offload:
            cache = ComponentCache(Runtime(torch.device("cpu"), cache.runtime.dtype), allow_pickle=spec.allow_pickle)
        components = cache.load_refiner(source.local_dir(spec.storage_options), variant=source.variant)
        settings = RefinerSettings(spec.refiner_strength, spec.refiner_steps, spec.refiner_guidance_scale,
                                   spec.aesthetic_score, spec.negative_aesthetic_score)
        refiner = Refiner(dataclasses.replace(components, device=device), settings, spec.refine_size,
                          offload=spec.refiner_offload)
        return cls(spec, refiner, source.identity()["name"])

    @classmethod
    def added_fields(cls, spec) -> dict[str, list[pa.Field]]:
        return {OUTPUT: FIELDS}

    def prepare(self, batch: PromptBatch) -> None:
        self.refiner.prepare(batch)

    def run(self, batch: PromptBatch, n: int, produced: dict, encode: Encode) -> dict:
        out = self.refiner.refine(produced[OUTPUT], batch, batch.seeds)
        produced[OUTPUT] = out.pixels
        return {"encodes": encode(HostCopy(out.pixels), n), "finite": HostCopy(out.finite),
                "seeds": [refiner_seed(seed) for seed in batch.seeds[:n]]}

    def collect(self, keys: list[str], result: dict, outputs: UnitOutputs) -> None:
        collect_encoded(keys, result["encodes"], outputs, OUTPUT, "refined image")
        for key, finite in zip(keys, result["finite"].numpy()):
            if not finite:
                outputs.fail(OUTPUT, key, NON_FINITE)
        spec = self.spec
        values = {"refiner": self.refiner_name, "refiner_strength": spec.refiner_strength,
                  "refiner_steps": spec.refiner_steps, "refined_height": self.height, "refined_width": self.width}
        for name, value in values.items():
            outputs.column(OUTPUT, name).update(dict.fromkeys(keys, value))
        outputs.column(OUTPUT, "refiner_seed").update(zip(keys, result["seeds"]))
