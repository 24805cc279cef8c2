"""Per-row scores of the images a job makes: the safety checker's NSFW score and the CLIP score (--scores).

Scores read each image output's pixels on the device, right after the stage that made them (the student's
images; the decoded teacher latents with --teacher-images), and add columns to that output. A row whose image
failed has null scores. A score that fails on a row (it raised, or it is not finite) does not fail the row: its
columns are null there and `scores_error` says why. No image is changed.
"""

from __future__ import annotations

import pyarrow as pa

from instaflow.loading import ComponentCache
from instaflow.models import PromptBatch
from instaflow.scores import ClipScorer, ImagePreprocess, SafetyScorer
from pipeline.model_source import ModelSource, resolve_model_source
from pipeline.settings import MODEL, setting
from pipeline.stages.base import Encode, HostCopy, ModelKind, Stage, UnitOutputs
from pipeline.storage import normalize_model

FIELDS = {
    "nsfw": [pa.field("nsfw_score", pa.float32()), pa.field("nsfw", pa.bool_())],
    "clip": [pa.field("clip_score", pa.float32())],
}
# What the clip score leaves on the device for later stages: each scored output's CLIP image embeddings, by output.
CLIP_IMAGE_EMBEDS = "clip_image_embeds"
# The spec's name for each scorer's model, and its key among the job's model sources.
MODEL_SETTINGS = {"nsfw": "safety_checker", "clip": "clip_model"}


def scored_outputs(spec) -> list[str]:
    """The outputs whose images are scored: the student's, and the teacher's decoded latents when stored."""
    return [name for name, has_images in (("images", "images" in spec.tasks), ("pairs", spec.teacher_images))
            if has_images]


SAFETY_CHECKER = "CompVis/stable-diffusion-safety-checker"
CLIP_MODEL = "openai/clip-vit-large-patch14"


class ScoresStage(Stage):
    name = "scores"
    fails_rows = False  # a score that fails leaves its columns null, with the reason in scores_error
    scores = {"nsfw": "the SD safety checker's score and flag; images are not changed",
              "clip": "CLIP score of image and prompt"}
    settings = {"safety_checker": setting(SAFETY_CHECKER, help="the model of --scores nsfw", effect=MODEL),
                "clip_model": setting(CLIP_MODEL, help="the CLIP model of the scores that read CLIP embeddings",
                                      effect=MODEL)}
    model_kinds = {"safety_checker": ModelKind("--safety-checker", {"config.json": ("StableDiffusionSafetyChecker",)}),
                   "clip_model": ModelKind("--clip-model", {"config.json": ("CLIPModel",)})}

    def __init__(self, spec, safety: SafetyScorer | None, clip: ClipScorer | None):
        self.spec = spec
        self.safety = safety
        self.clip = clip
        self.targets = scored_outputs(spec)

    @classmethod
    def wanted(cls, spec) -> bool:
        return any(score in cls.scores for score in spec.scores)

    @classmethod
    def produces(cls, spec) -> tuple[str, ...]:
        return (CLIP_IMAGE_EMBEDS,) if "clip" in spec.scores else ()

    @classmethod
    def check_settings(cls, spec) -> None:
        spec.safety_checker, spec.clip_model = normalize_model(spec.safety_checker), normalize_model(spec.clip_model)

    @classmethod
    def consumes(cls, spec) -> tuple[str, ...]:
        return tuple(scored_outputs(spec))

    @classmethod
    def sources(cls, spec) -> dict[str, ModelSource]:
        return {MODEL_SETTINGS[score]: resolve_model_source(getattr(spec, MODEL_SETTINGS[score]), spec.dtype,
                                                            spec.storage_options, "module")
                for score in spec.scores if score in cls.scores}

    @classmethod
    def load(cls, spec, sources: dict, cache: ComponentCache) -> "ScoresStage":
        safety = clip = None
        if "nsfw" in spec.scores:
            folder = sources["safety_checker"].local_dir(spec.storage_options)
            checker, processor = cache.load_scorer("safety_checker", folder)
            safety = SafetyScorer(checker, ImagePreprocess.from_processor(processor))
        if "clip" in spec.scores:
            folder = sources["clip_model"].local_dir(spec.storage_options)
            model, processor, tokenizer = cache.load_scorer("clip", folder)
            clip = ClipScorer(model, tokenizer, ImagePreprocess.from_processor(processor))
        return cls(spec, safety, clip)

    @classmethod
    def added_fields(cls, spec) -> dict[str, list[pa.Field]]:
        fields = [field for score in cls.scores if score in spec.scores for field in FIELDS[score]]
        return {target: fields for target in scored_outputs(spec)}

    def prepare(self, batch: PromptBatch) -> None:
        if self.clip is not None:
            pin = self.clip.model.device.type == "cuda"
            batch.stage_inputs[self.name] = self.clip.tokens(batch.prompts, pin_memory=pin)

    def run(self, batch: PromptBatch, n: int, produced: dict, encode: Encode) -> dict:
        """Leaves each scored output's CLIP image embeddings in `produced[CLIP_IMAGE_EMBEDS]` for later stages."""
        result = {}
        for target in self.targets:
            pixels = produced[target]
            clip = None
            if self.clip:
                embeds = produced.setdefault(CLIP_IMAGE_EMBEDS, {})[target] = self.clip.image_embeds(pixels)
                clip = HostCopy(self.clip.scores(embeds, batch.stage_inputs[self.name]))
            result[target] = {"safety": HostCopy(self.safety.cosines(pixels)) if self.safety else None, "clip": clip}
        return result

    def collect(self, keys: list[str], result: dict, outputs: UnitOutputs) -> None:
        """A score that is not finite is never stored: its columns stay null on that row, with the reason."""
        for target, copies in result.items():
            if copies["safety"] is not None:
                nsfw_scores, flags = self.safety.decide(copies["safety"].numpy())
                self.store_values(outputs, target, keys, "nsfw_score", nsfw_scores.tolist(),
                                  {"nsfw": flags.tolist()})
            if copies["clip"] is not None:
                self.store_values(outputs, target, keys, "clip_score", copies["clip"].numpy().tolist())
