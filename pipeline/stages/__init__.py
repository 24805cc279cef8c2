"""The stages a job's spec declares, in the order they run on each batch (see pipeline/stages/base.py)."""

from __future__ import annotations

from instaflow.loading import ComponentCache, Runtime
from pipeline.stages.base import Stage
from pipeline.stages.images import ImagesStage
from pipeline.stages.pairs import PairsStage


def build_stages(spec, sources: dict, runtime: Runtime) -> list[Stage]:
    """The spec's stages with their models loaded; models equal in their tensors are loaded once and shared."""
    cache = ComponentCache(runtime, allow_pickle=spec.allow_pickle)
    stages: list[Stage] = []
    if "images" in spec.tasks:
        stages.append(ImagesStage.load(spec, sources, cache))
    if "pairs" in spec.tasks:
        stages.append(PairsStage.load(spec, sources, cache))
    return stages
