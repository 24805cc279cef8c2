"""What a stage is, and what a unit's stages collect: the worker runs a list of stages, knowing none of them.

A stage owns its models (pinned on the driver by `sources`, which also gives its part of the job's identity;
checked there by `check`; loaded once per worker by `load`), the input columns it reads per row and its host work
on them (`prepare_rows`, `end_rows`), its host work on a batch before the device runs it (`prepare`), its device
work per batch (`run`), its collection once copies and encodes are done (`collect`), the metadata columns it adds,
and the files it writes. A
stage that writes rows and files of its own is an output ("images", "pairs"); others add columns to
those outputs (scores). Stages run in order within a batch, and a later stage reads an earlier one's device
tensors from `produced` (scores read the student's images before they are copied to the host).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import torch

from instaflow.loading import UNET_CLASS, UNET_CONFIG, VAE_CONFIG, ComponentCache, LatentGeometry, ModelLoadError, \
    config_geometry, pipeline_geometry
from instaflow.models import PromptBatch
from pipeline.encoders import EncoderLost
from pipeline.model_source import ModelSource
from pipeline.plan import WorkUnit
from pipeline.reader import Sample
from pipeline.storage import redact_text

Encode = Callable[["HostCopy", int], list[Future]]  # the worker's encoders: one future per image of a batch
# What conditioning stages produce and the samplers' stages consume: the batch's conditioners
# (instaflow/conditioning.py). Any number of stages may add one, and a job may have none.
CONDITIONING = "conditioning"
COLLECTED = (CONDITIONING,)  # values many stages add to (the rest are made by one stage, transformed by one more)


@dataclass(frozen=True)
class ModelKind:
    """What the model a flag names must be: for each config file, the classes it may name (diffusers'
    `_class_name`, or the first of transformers' `architectures`). A CLIP model and a safety checker, or a VAE and
    a ControlNet, load into each other's classes without an error and then give wrong values, and a pipeline folder
    whose unet/ holds a VAE fails on every worker: so the classes are checked by name, on the driver. A pipeline
    folder whose VAE runs (`decodes`) is also checked for latents that fit its UNet and the job's image size."""

    flag: str
    classes: dict[str, tuple[str, ...]]  # by config file: "config.json" of a module, "model_index.json" or
    # "unet/config.json" of a pipeline folder
    decodes: bool = False


# A pipeline folder's weighted components, as `ComponentCache.load` reads them (instaflow/loading.py), and the
# class each is loaded into: InstaFlow's and SD-1.5's hub folders name these.
PIPELINE_CLASSES = {UNET_CONFIG: (UNET_CLASS,), VAE_CONFIG: ("AutoencoderKL",),
                    "text_encoder/config.json": ("CLIPTextModel",)}


def pipeline_kind(flag: str, decodes: bool = True) -> ModelKind:
    """A diffusers pipeline folder (a student, a teacher, a fine-tune and its base) whose components are loaded;
    `decodes`: its VAE is the one that runs (a fine-tune's base gives its UNet only)."""
    return ModelKind(flag, PIPELINE_CLASSES, decodes=decodes)


def check_model_kind(source: ModelSource, kind: ModelKind, spec) -> None:
    """Raises ModelLoadError in one line naming the flag, the model, the config file and both classes; for a
    pipeline folder, the files and values whose latents do not fit its UNet or the job's --height and --width."""
    model = f"{kind.flag} {redact_text(source.model)!r}"
    with source.config_files(list(kind.classes), spec.storage_options) as folder:
        for name, classes in kind.classes.items():
            try:
                config = json.loads((folder / name).read_text())
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"{model}: cannot read its {name}: {exc}") from None
            named = config.get("_class_name") if isinstance(config, dict) else None
            if named is None and isinstance(config, dict):
                architectures = config.get("architectures")
                named = architectures[0] if isinstance(architectures, list) and architectures else None
            if named not in classes:
                found = f"names class {named}" if isinstance(named, str) and named else "names no class"
                raise ModelLoadError(f"{model}: its {name} {found}, not {' or '.join(classes)}")
        if kind.decodes:  # a side that is no whole multiple of the latent side fails in the VAE on every worker
            factor = pipeline_geometry(folder, model).scale_factor
            if spec.height % factor or spec.width % factor:
                raise ModelLoadError(f"--height {spec.height} and --width {spec.width} must be multiples of {factor}: "
                                     f"the {VAE_CONFIG} of {model} makes latents at 1/{factor} of the image side")


def module_geometry(source: ModelSource, component: str, what: str, read, storage_options: dict) -> LatentGeometry:
    """`read` of a pinned module's config.json (a tiny decoder, a ControlNet) as diffusers reads it, on the
    driver; a ModelLoadError naming `what` (its flag and model) for a file or value that does not do."""
    with source.config_files(["config.json"], storage_options) as folder:
        return config_geometry(folder / "config.json", component, f"{what}: its config.json", read)


def check_same_geometry(what: str, geometry: LatentGeometry, model: str, model_geometry: LatentGeometry) -> None:
    """`what` (a flag and its model) must take or make the latents of `model`'s VAE."""
    if geometry != model_geometry:
        raise ModelLoadError(f"{what} has {geometry}, but the VAE of {model} has {model_geometry}")


class HostCopy:
    """A device tensor copied to page-locked host memory without blocking the device; `numpy()` waits for it."""

    def __init__(self, tensor: torch.Tensor):
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor

    def numpy(self):
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


class UnitOutputs:
    """What a unit's stages collected, per output and row key: failures, truncation, and values (data files'
    contents and the metadata columns stages add)."""

    def __init__(self, outputs: list[str], added_fields: dict[str, list[pa.Field]]):
        self.outputs = outputs
        self.added_fields = added_fields
        self.failed: dict[str, dict[str, str]] = {output: {} for output in outputs}
        self.truncated: dict[str, dict[str, bool]] = {output: {} for output in outputs}
        self.values: dict[str, dict[str, dict]] = {output: {} for output in outputs}
        self.left_null: dict[tuple[str, str], dict[str, str]] = {}  # by (output, stage): reasons by row key

    def fail(self, output: str, key: str, reason: str) -> None:
        self.failed[output].setdefault(key, reason)

    def fail_everywhere(self, reasons: dict[str, str]) -> None:
        """Rows whose batch raised: no output has them."""
        for output in self.outputs:
            for key, reason in reasons.items():
                self.fail(output, key, reason)

    def leave_null(self, output: str, stage: str, keys: list[str], reason: str) -> None:
        """A stage that does not fail rows failed on these rows of `output`: it left its columns null there (it
        stored no value), and its reason column says why (redacted: a message may quote a URL's secret)."""
        reason = redact_text(reason)
        column = self.column(output, error_column(stage).name)
        for key in keys:
            column[key] = f"{column[key]}; {reason}" if key in column else reason
            self.left_null.setdefault((output, stage), {}).setdefault(key, reason)

    def column(self, output: str, name: str) -> dict:
        """The values by row key of one column (or data) of an output, filled by the stages that make it."""
        return self.values[output].setdefault(name, {})

    def added_columns(self, output: str, samples: list[Sample]) -> list[tuple[pa.Field, list]]:
        """The columns other stages (and the output's own options) add to its metadata, null on failed rows."""
        failed = self.failed[output]
        return [(field, [None if s.error or s.key in failed else self.column(output, field.name).get(s.key)
                         for s in samples]) for field in self.added_fields.get(output, [])]


class Stage:
    """One step of a unit's work; see the module docstring. Subclasses set `name` and override what they do."""

    name: str
    is_output = False  # writes rows and files of its own
    model_kinds: dict[str, ModelKind] = {}  # by key in `sources`: what each model must be (checked on the driver)
    # The JobSpec fields this stage adds, each a `setting(...)` (pipeline/settings.py): its flag, job-file key,
    # `submit` path handling and place in the identity come from that declaration, as for the spec's own fields.
    settings: dict[str, Any] = {}
    scores: dict[str, str] = {}  # the kinds this stage adds to --scores, each with its help
    # Its failure policy. True: a row this stage fails on fails in its outputs (raising: in every output). False
    # (an optional score): the row is kept, this stage's columns are null on it, and the reason is in a column
    # `<name>_error` that the stage adds to each output it adds columns to (`row_failed`).
    fails_rows = True

    @classmethod
    def check_settings(cls, spec) -> None:
        """Checks and normalises this stage's own settings as the spec is built, wanted or not; raises ValueError."""

    @classmethod
    def tiny_models(cls, out_dir: Path, built: dict[str, Path]) -> dict[str, Path]:
        """Tiny offline models of this stage's kinds, written under `out_dir` by `instaflow-batch tiny` after the
        project's own (`built`, by name), for tests and the demo; returns their paths by name."""
        return {}

    @classmethod
    def wanted(cls, spec) -> bool:
        """Whether the spec's job runs this stage."""
        raise NotImplementedError

    @classmethod
    def consumes(cls, spec) -> tuple[str, ...]:
        """What this stage reads of earlier stages' work on each batch: `produced` device values by name, and the
        batch's conditioners (CONDITIONING). `ordered_stages` orders stages by these."""
        return ()

    @classmethod
    def produces(cls, spec) -> tuple[str, ...]:
        """What this stage leaves for later stages: a name it also consumes is one it transforms (the refiner
        refines the student's images in place)."""
        return ()

    @classmethod
    def input_columns(cls, spec) -> dict[str, str]:
        """Input columns this stage reads per row (into each sample's `inputs`, not carried), each with the flag
        that names it; the driver refuses inputs without them."""
        return {}

    @classmethod
    def sources(cls, spec) -> dict[str, ModelSource]:
        """This stage's models, pinned (on the driver), by their key in the job's identity."""
        return {}

    @classmethod
    def check(cls, spec, sources: dict[str, ModelSource]) -> None:
        """Checks on the driver, before any worker starts, that need the pinned models; raises ValueError."""

    @classmethod
    def load(cls, spec, sources: dict[str, ModelSource], cache: ComponentCache) -> "Stage":
        """The stage with its models loaded, on a worker (modules equal in their tensors come from `cache`)."""
        raise NotImplementedError

    @classmethod
    def added_fields(cls, spec) -> dict[str, list[pa.Field]]:
        """Metadata columns this stage adds, by output, in order (known from the spec, so the driver can check
        that no two stages add one)."""
        return {}

    def prepare_rows(self, unit: WorkUnit, samples: list[Sample]) -> None:
        """Per-row host work on valid samples of the unit, about a batch of them at a time, before their batch is
        made: a row whose inputs cannot be used gets its `error` (naming the file and row) and fails alone."""

    def end_rows(self, unit: WorkUnit, samples: list[Sample]) -> None:
        """Once `prepare_rows` has seen every row of the unit (`samples`: those valid when the unit was read): a
        judgement of the unit as a whole, which raises to fail the try (every image named from a store failed as
        an outage: no row's fault)."""

    def prepare(self, batch: PromptBatch) -> None:
        """Host work for `run`, done before the unit waits for the device."""

    def run(self, batch: PromptBatch, n: int, produced: dict, encode: Encode) -> dict:
        """Device work on one batch, whose first `n` samples are real (the rest pad a compiled model's batch).
        Puts device tensors later stages may read into `produced[self.name]`; returns what `collect` needs,
        with the batch's encode futures under "encodes" (the worker bounds how many batches await encoders)."""
        raise NotImplementedError

    def collect(self, keys: list[str], result: dict, outputs: UnitOutputs) -> None:
        """Once the batch's copies and encodes are done: its values and failures, into `outputs`."""

    def files(self, shard: str, samples: list[Sample], extra: pa.Table, outputs: UnitOutputs) -> dict[str, bytes]:
        """The shard's files of this output, by path relative to the output root."""
        return {}

    def store_values(self, outputs: UnitOutputs, output: str, keys: list[str], name: str, values: list,
                     beside: dict[str, list] | None = None) -> None:
        """Per-row `values` of the column `name` (and the columns `beside` it, stored with it or not at all); a
        value that is not finite is never stored: the row fails there as the stage's policy says (`row_failed`)."""
        beside = beside or {}
        for index, (key, value) in enumerate(zip(keys, values)):
            if not math.isfinite(value):
                self.row_failed(outputs, output, key, f"{name} is not finite ({value})")
                continue
            outputs.column(output, name)[key] = value
            for column, column_values in beside.items():
                outputs.column(output, column)[key] = column_values[index]

    def row_failed(self, outputs: UnitOutputs, output: str, key: str, reason: str) -> None:
        """This stage cannot give a row a value in `output` (which it then must not store): as its policy says,
        the row fails there, or keeps this stage's columns null with the reason (`fails_rows`)."""
        if self.fails_rows:
            outputs.fail(output, key, reason)
        else:
            outputs.leave_null(output, self.name, [key], reason)


def error_column(stage: str) -> pa.Field:
    """The reason column of a stage that does not fail rows."""
    return pa.field(f"{stage}_error", pa.string())


def metadata_rows(spec, samples: list[Sample], outputs: UnitOutputs, output: str, model: str, steps: int,
                  guidance_scale: float, decoder: str | None) -> list[dict]:
    """One row per sample of the unit (failed ones too), in writers.METADATA_SCHEMA's columns. The model and
    decoder are named as the job's identity names them: redacted (a URL's password or signature stays out)."""
    failed, truncated = outputs.failed[output], outputs.truncated[output]
    model, decoder = redact_text(model), redact_text(decoder)
    return [
        {
            "key": s.key,
            "prompt": s.prompt,
            "seed": s.seed,
            "status": "failed" if s.error or s.key in failed else "ok",
            "error_message": redact_text(s.error or failed.get(s.key)),
            "model": model,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "height": spec.height,
            "width": spec.width,
            "truncated": truncated.get(s.key, False),
            "negative_prompt": s.negative_prompt,
            "decoder": decoder,
        }
        for s in samples
    ]


def collect_encoded(keys: list[str], futures: list[Future], outputs: UnitOutputs, output: str, what: str,
                    column: str = "image") -> None:
    """A batch's encoded images into `output`'s image `column`; a row whose image did not encode fails there."""
    images = outputs.column(output, column)
    for key, future in zip(keys, futures):
        try:
            images[key] = future.result()
        except EncoderLost:  # no row's fault: the try fails
            raise
        except Exception as exc:
            outputs.fail(output, key, f"{what} encoding failed: {type(exc).__name__}: {exc}")
