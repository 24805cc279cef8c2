"""The stages a job's spec declares, in the order they run on each batch (see pipeline/stages/base.py)."""

from __future__ import annotations

from instaflow.loading import ComponentCache, Runtime
from pipeline.model_source import ModelSource
from pipeline.stages.base import Stage, check_model_kind
from pipeline.stages.controlnet import ControlNetStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.images import ImagesStage
from pipeline.stages.pairs import PairsStage
from pipeline.stages.refiner import RefinerStage
from pipeline.stages.scores import ScoresStage

# In the order they run on each batch: the refiner refines the student's images, scores read the images made
# before them. A job makes its pairs with a teacher (PairsStage) or by encoding its images (EncodeStage).
STAGES: tuple[type[Stage], ...] = (ControlNetStage, ImagesStage, RefinerStage, PairsStage, EncodeStage, ScoresStage)


def model_sources(spec) -> dict[str, ModelSource]:
    """A resolved spec's models, pinned, by their key in the job's identity: each of its stages' models."""
    sources: dict[str, ModelSource] = {}
    for stage in STAGES:
        if stage.wanted(spec):
            sources |= stage.sources(spec)
    return sources


def input_columns(spec) -> dict[str, str]:
    """The input columns the spec's stages read per row, each with the flag that names it."""
    columns: dict[str, str] = {}
    for stage in STAGES:
        if stage.wanted(spec):
            columns |= stage.input_columns(spec)
    return columns


def check_stages(spec, sources: dict[str, ModelSource]) -> None:
    """The driver's checks of the stages' models (each of the kind its flag needs; a LoRA that does not fit the
    student), before any worker."""
    for stage in STAGES:
        if stage.wanted(spec):
            for key, kind in stage.model_kinds.items():
                if key in sources:
                    check_model_kind(sources[key], kind, spec.storage_options)
            stage.check(spec, sources)


def build_stages(spec, sources: dict[str, ModelSource], runtime: Runtime) -> list[Stage]:
    """The spec's stages with their models loaded; modules equal in their tensors are loaded once and shared."""
    cache = ComponentCache(runtime, allow_pickle=spec.allow_pickle)
    return [stage.load(spec, sources, cache) for stage in STAGES if stage.wanted(spec)]
