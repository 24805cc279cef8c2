"""The stages a job's spec declares, ordered by what each consumes of the others' work (see pipeline/stages/base.py)."""

from __future__ import annotations

import importlib
import pkgutil

from instaflow.loading import ComponentCache, Runtime
from pipeline.model_source import ModelSource
from pipeline.stages.base import COLLECTED, Stage, check_model_kind, error_column


def _discovered() -> tuple[type[Stage], ...]:
    """Every stage of this package (a class that says when it is `wanted`, itself or through a base), by module
    name, then in the order its module defines them: a new stage is a module of its own here, and nothing else
    names it. A job runs those it wants, ordered by `ordered_stages` (this order only breaks ties)."""
    found = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        found += [value for value in vars(module).values()
                  if isinstance(value, type) and issubclass(value, Stage) and value.__module__ == module.__name__
                  and getattr(value.wanted, "__func__", value.wanted) is not Stage.wanted.__func__]
    return tuple(dict.fromkeys(found))  # a class bound to two names in its module is one stage


STAGES: tuple[type[Stage], ...] = _discovered()


class StageOrderError(ValueError):
    """The wanted stages do not make one order: a value nobody makes, made twice, or a cycle."""


def ordered_stages(spec, stages: tuple[type[Stage], ...] | None = None) -> list[type[Stage]]:
    """The spec's stages in the order they run on each batch: each after every stage that makes, transforms or
    adds to what it consumes (scores read the refined image; the samplers run under every conditioner)."""
    wanted = [stage for stage in stages or STAGES if stage.wanted(spec)]
    makers: dict[str, list[type[Stage]]] = {}
    for stage in wanted:
        for value in stage.produces(spec):
            makers.setdefault(value, []).append(stage)
    for value, stages_of_value in makers.items():
        if value in COLLECTED:
            continue
        fresh = [stage.name for stage in stages_of_value if value not in stage.consumes(spec)]
        transforms = [stage.name for stage in stages_of_value if value in stage.consumes(spec)]
        if len(fresh) != 1 or len(transforms) > 1:
            raise StageOrderError(f"stages {', '.join(s.name for s in stages_of_value)} all produce {value!r}: one "
                                  f"stage must make it and at most one transform it (made by {fresh or 'none'})")
    after: dict[type[Stage], set[type[Stage]]] = {}
    for stage in wanted:
        after[stage] = set()
        for value in stage.consumes(spec):
            if value not in makers and value not in COLLECTED:
                raise StageOrderError(f"stage {stage.name} consumes {value!r}, which no stage of this job produces")
            after[stage] |= {maker for maker in makers.get(value, ()) if maker is not stage}
    order: list[type[Stage]] = []
    while len(order) < len(wanted):
        ready = [stage for stage in wanted if stage not in order and after[stage] <= set(order)]
        if not ready:
            raise StageOrderError("stages consume each other's values in a cycle: "
                                  f"{', '.join(stage.name for stage in wanted if stage not in order)}")
        order.append(ready[0])
    return order


def model_sources(spec) -> dict[str, ModelSource]:
    """A resolved spec's models, pinned, by their key in the job's identity: each of its stages' models."""
    sources: dict[str, ModelSource] = {}
    for stage in ordered_stages(spec):
        sources |= stage.sources(spec)
    return sources


def input_columns(spec) -> dict[str, str]:
    """The input columns the spec's stages read per row, each with the flag that names it."""
    columns: dict[str, str] = {}
    for stage in ordered_stages(spec):
        columns |= stage.input_columns(spec)
    return columns


def check_stages(spec, sources: dict[str, ModelSource]) -> None:
    """The driver's checks of the stages, before any worker: one order and no column added twice, and their
    models (each of the kind its flag needs, a pipeline folder's latents fitting its UNet and the image size; a
    LoRA, a tiny decoder or a ControlNet that does not fit the student)."""
    stages = ordered_stages(spec)
    added_fields(spec, stages)  # two stages adding one column
    for stage in stages:
        for key, kind in stage.model_kinds.items():
            if key in sources:
                check_model_kind(sources[key], kind, spec)
    for stage in stages:  # after every model's kind: a stage's check may read another stage's model
        stage.check(spec, sources)


def build_stages(spec, sources: dict[str, ModelSource], runtime: Runtime) -> list[Stage]:
    """The spec's stages with their models loaded, in order; modules equal in their tensors are loaded once and
    shared."""
    cache = ComponentCache(runtime, allow_pickle=spec.allow_pickle)
    return [stage.load(spec, sources, cache) for stage in ordered_stages(spec)]


def added_fields(spec, stages: list | None = None) -> dict[str, list]:
    """The metadata columns the stages add (the spec's, or these), by output, in order, each followed by its
    reason column if it does not fail rows; two stages that would write one column are refused (one would
    overwrite the other's values)."""
    fields: dict[str, list] = {}
    owner: dict[tuple[str, str], str] = {}
    for stage in ordered_stages(spec) if stages is None else stages:
        for output, stage_fields in stage.added_fields(spec).items():
            for field in [*stage_fields, *([] if stage.fails_rows else [error_column(stage.name)])]:
                if (output, field.name) in owner:
                    raise StageOrderError(f"stages {owner[output, field.name]} and {stage.name} both add column "
                                          f"{field.name!r} to {output}")
                owner[output, field.name] = stage.name
                fields.setdefault(output, []).append(field)
    return fields
