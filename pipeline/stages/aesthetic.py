"""The aesthetic score of each image a job makes (--scores aesthetic): the LAION aesthetic predictor's head on the
image's CLIP embedding, from --clip-model (instaflow/aesthetic.py).

It reads the scored outputs' pixels on the device, as the other scores do. When the clip score is asked for too,
its image embeddings are reused (the scores stage leaves them in `produced`), so each image goes through CLIP's
vision tower once. A row whose image failed has a null score; a score that fails on a row (it raised, or it is not
finite) leaves it null there, with the reason in `aesthetic_error`; the row is kept. This module is the whole
stage: its setting, score kind, checks, model and tiny head.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import torch

from instaflow.aesthetic import AestheticError, AestheticHead, HeadWidthError, read_head
from instaflow.loading import ComponentCache, ModelLoadError
from instaflow.models import PromptBatch
from instaflow.scores import ClipScorer, ImagePreprocess
from pipeline.model_source import ModelSource, resolve_model_source
from pipeline.settings import MODEL, setting
from pipeline.stages.base import Encode, HostCopy, Stage, UnitOutputs
from pipeline.stages.scores import CLIP_IMAGE_EMBEDS, ScoresStage, scored_outputs
from pipeline.storage import normalize_model, redact_text

# NeMo Curator's copy of improved-aesthetic-predictor's sac+logos+ava1-l14-linearMSE, as safetensors
AESTHETIC_MODEL = "ttj/sac-logos-ava1-l14-linearMSE/model.safetensors"
FIELD = pa.field("aesthetic_score", pa.float32())
TINY_SEED = 11


class AestheticStage(Stage):
    name = "aesthetic"
    fails_rows = False  # a score that fails leaves aesthetic_score null, with the reason in aesthetic_error
    scores = {"aesthetic": "the LAION aesthetic predictor's score, about 1 to 10, on --clip-model's image "
                           "embedding"}
    settings = {"aesthetic_model": setting(AESTHETIC_MODEL, help="the head of --scores aesthetic: the LAION "
                                           "aesthetic predictor's MLP as a .safetensors file (a path, a URL or "
                                           "HUB_ID/FILE); not the refiner's --aesthetic-score", effect=MODEL,
                                           metavar="MODEL")}
    model_kinds = {"clip_model": ScoresStage.model_kinds["clip_model"]}

    def __init__(self, spec, head: AestheticHead, clip: ClipScorer):
        self.head = head
        self.clip = clip
        self.targets = scored_outputs(spec)

    @classmethod
    def wanted(cls, spec) -> bool:
        return "aesthetic" in spec.scores

    @classmethod
    def check_settings(cls, spec) -> None:
        spec.aesthetic_model = normalize_model(spec.aesthetic_model)

    @classmethod
    def consumes(cls, spec) -> tuple[str, ...]:
        return (*scored_outputs(spec), *((CLIP_IMAGE_EMBEDS,) if "clip" in spec.scores else ()))

    @classmethod
    def sources(cls, spec) -> dict[str, ModelSource]:
        try:
            head = resolve_model_source(spec.aesthetic_model, spec.dtype, spec.storage_options, "file")
        except ModelLoadError as exc:
            raise ModelLoadError(f"--aesthetic-model: {exc}") from None
        return {"aesthetic_model": head,
                "clip_model": resolve_model_source(spec.clip_model, spec.dtype, spec.storage_options, "module")}

    @classmethod
    def check(cls, spec, sources: dict[str, ModelSource]) -> None:
        """The head must read the CLIP model's embeddings: its input width is the model's projection_dim."""
        from transformers import CLIPConfig

        with sources["clip_model"].config_files(["config.json"], spec.storage_options) as folder:
            width = CLIPConfig.from_pretrained(folder).projection_dim
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ModelLoadError(f"--clip-model {redact_text(spec.clip_model)!r}: its config.json's projection_dim "
                                 f"is {width!r}, not a positive integer")
        _head(spec, sources, width)

    @classmethod
    def load(cls, spec, sources: dict, cache: ComponentCache) -> "AestheticStage":
        model, processor, tokenizer = cache.load_scorer("clip", sources["clip_model"].local_dir(spec.storage_options))
        head = _head(spec, sources, model.config.projection_dim).to(cache.runtime.device)
        return cls(spec, head, ClipScorer(model, tokenizer, ImagePreprocess.from_processor(processor)))

    @classmethod
    def added_fields(cls, spec) -> dict[str, list[pa.Field]]:
        return {target: [FIELD] for target in scored_outputs(spec)}

    def run(self, batch: PromptBatch, n: int, produced: dict, encode: Encode) -> dict:
        shared = produced.get(CLIP_IMAGE_EMBEDS, {})
        return {target: HostCopy(self.head(shared[target] if target in shared else
                                           self.clip.image_embeds(produced[target])))
                for target in self.targets}

    def collect(self, keys: list[str], result: dict, outputs: UnitOutputs) -> None:
        for target, copy in result.items():
            self.store_values(outputs, target, keys, FIELD.name, copy.numpy().tolist())

    @classmethod
    def tiny_models(cls, out_dir: Path, built: dict[str, Path]) -> dict[str, Path]:
        """A random head for the tiny CLIP model (`built["clip"]`), at `OUT_DIR/aesthetic.safetensors`."""
        from safetensors.torch import save_file

        width = json.loads((Path(built["clip"]) / "config.json").read_text())["projection_dim"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            head = AestheticHead(width)
        path = Path(out_dir) / "aesthetic.safetensors"
        save_file({name: value.contiguous() for name, value in head.state_dict().items()}, str(path))
        return {"aesthetic": path}


def _head(spec, sources: dict[str, ModelSource], width: int) -> AestheticHead:
    """The head, for --clip-model's embeddings of `width` values; ModelLoadError naming the flags if it is not one."""
    where = f"--aesthetic-model {redact_text(spec.aesthetic_model)!r}"
    try:
        return read_head(sources["aesthetic_model"].local_file(spec.storage_options), width)
    except HeadWidthError as exc:
        raise ModelLoadError(f"{where} reads embeddings of {exc.width} values, but --clip-model "
                             f"{redact_text(spec.clip_model)!r} makes {width}: give the CLIP model the head was "
                             "trained on") from None
    except AestheticError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
