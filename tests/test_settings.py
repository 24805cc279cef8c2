"""Each JobSpec setting is declared once (pipeline/settings.py), and the flags, job-file keys, `submit`'s model paths
and the identity are read from those declarations: these tests prove it for every field, not for a list."""

import dataclasses
import io
import re
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import encode, generate, reflow_pairs
from jobs.cli import common_spec_args
from jobs.submit import MODEL_FLAGS, REPEATED_MODEL_FLAGS, SCALED_MODEL_FLAGS
from pipeline.manifest import identity_digest
from pipeline.plan import list_input_files, plan_units
from pipeline.settings import MODEL, OUTPUT, RUN, declared_settings, default_of, flag_name, setting
from pipeline.spec import PAIR_KINDS, SETTINGS, TASKS, JobSpec
from pipeline.worker import standalone_worker

PROJECT = Path(__file__).resolve().parents[1]
JOBS_REFERENCE = PROJECT / "jobs" / "README.md"  # the job file table

# Every job kind and stage the tests build: each stage's settings are in the identity in at least one of them.
JOBS = {
    "generate": dict(model="m"),
    "generate, every stage": dict(model="m", scores=("nsfw", "clip"), controlnet="c", control_preprocess="canny",
                                  refiner="r", loras=("a.safetensors:0.5",), merge_finetune="f:0.3", decoder="tiny",
                                  allow_image_sources=("/data/",), samples_per_prompt=2),
    "reflow-pairs sd": dict(tasks=("pairs",), teacher="t"),
    "reflow-pairs rf with images and a ControlNet": dict(tasks=("images", "pairs"), teacher="t", teacher_kind="rf",
                                                         model="m", controlnet="c"),
    "reflow-pairs with teacher images and scores": dict(tasks=("pairs",), teacher="t", teacher_images=True,
                                                        scores=("clip",)),
    "encode": dict(tasks=("pairs",), teacher="t", teacher_kind="encode", allow_image_sources=("/x/",)),
}


def resolved(**settings) -> JobSpec:
    return JobSpec(**{"prompts": "p", "output": "o"} | settings).resolve(has_gpus=False)


def other_values(name: str, spec: JobSpec):
    """Values to try in place of the spec's, the first that makes a valid spec is used."""
    declared, value = SETTINGS[name], getattr(spec, name)
    choices = {"teacher_kind": PAIR_KINDS, "tasks": [(task,) for task in TASKS] + [TASKS]}.get(
        name, declared.options.get("choices", ()))
    if choices:
        return [choice for choice in choices if choice != value]
    if isinstance(value, bool) or value is None and declared.options.get("action") == "store_true":
        return [not value]
    if isinstance(value, int):
        return [value + 8, value + 1, max(value // 2, 1)]
    if isinstance(value, float):
        return [value * 0.5, value + 0.5, value + 8]
    if isinstance(value, dict):
        return [{"anon": True}]
    if name == "loras":
        return [(("b.safetensors", 0.25),), (("b.safetensors", 0.5),), ()]
    if name == "scores":
        return [("clip",), ("nsfw",), ()]
    if name == "allow_image_sources":
        return [("/elsewhere/",), ()]
    if name in ("steps", "teacher_steps", "cpus_per_worker", "num_workers", "unit_timeout_s", "compile"):
        return [2, 3.5, True]
    if declared.scaled and value:  # another model at the same scale (MODEL[:SCALE] sets both)
        return [f"{value}2:{spec.merge_scale}"]
    return [f"{value}2" if value else "other", None]


def changed(base: dict, name: str):
    """(the base spec, a spec with only `name` changed), or None when no other value is valid for this job."""
    spec = resolved(**base)
    for value in other_values(name, spec):
        try:
            other = resolved(**base | {name: value})
        except (ValueError, TypeError):
            continue
        if getattr(other, name) != getattr(spec, name):
            return spec, other
    return None


@pytest.mark.parametrize("job", JOBS)
def test_a_change_of_a_used_output_setting_changes_the_identity_and_no_other_change_does(job):
    for name, declared in SETTINGS.items():
        pair = changed(JOBS[job], name)
        if pair is None:
            continue
        spec, other = pair
        digests = identity_digest(spec.identity()), identity_digest(other.identity())
        recorded = declared.identity_entries(name, spec) != declared.identity_entries(name, other)
        if declared.in_identity(spec) or declared.in_identity(other) or recorded:
            assert digests[0] != digests[1], f"{job}: {name} is in the identity but its change does not change it"
        elif declared.effect == MODEL and not (getattr(spec, name) and getattr(other, name)):
            continue  # a model added or taken away adds or takes away its stage, and that stage's settings
        else:
            assert digests[0] == digests[1], f"{job}: {name} ({declared.effect}) is not used here, or does not " \
                                             "change outputs, yet it changed the identity"


def test_every_setting_is_exercised_by_the_jobs_above():
    """So that the test above cannot pass by skipping: each field changes in some job, and each output setting
    is in the identity of one."""
    varied = {name for job in JOBS.values() for name in SETTINGS if changed(job, name)}
    assert varied == set(SETTINGS)
    in_identity = {name for job in JOBS.values() for name, declared in SETTINGS.items()
                   if declared.in_identity(resolved(**job))}
    assert in_identity == {name for name, declared in SETTINGS.items() if declared.effect == OUTPUT}


def test_a_field_without_a_declaration_is_refused():
    @dataclasses.dataclass
    class Spec:
        declared: int = setting(1, help="declared")
        forgotten: int = 2

    with pytest.raises(TypeError, match="Spec.forgotten has no setting"):
        declared_settings(Spec)
    assert {declared.effect for declared in SETTINGS.values()} == {OUTPUT, RUN, MODEL}


def test_models_are_recorded_by_what_they_are_not_by_name():
    """A model's name is not in the spec's identity (the job adds each pinned source, pipeline/model_source.py),
    and `submit` resolves every setting that names a model, whatever its form."""
    spec = resolved(**JOBS["generate, every stage"])
    models = {name for name, declared in SETTINGS.items() if declared.effect == MODEL}
    assert not models & set(spec.identity())
    assert set(MODEL_FLAGS) | set(SCALED_MODEL_FLAGS) | set(REPEATED_MODEL_FLAGS) == models


def test_the_columns_stages_add_are_in_the_jobs_identity():
    """Shards of two schemas never mix in one output: a job whose stages add columns has them (names and types,
    reason columns included) in its identity; a job whose stages add none has the identity it had before."""
    from pipeline.model_source import job_identity

    scored = job_identity(resolved(model="m", scores=("clip",)), {})
    assert scored["added_columns"] == {"images": [["clip_score", "float"], ["scores_error", "string"]]}
    assert "added_columns" not in job_identity(resolved(model="m"), {})


@pytest.mark.parametrize("job", [generate, reflow_pairs, encode])
def test_every_common_setting_is_a_flag_of_every_job_with_its_declared_default(job):
    parser = job.parser()
    actions = {action.dest: action for action in parser._actions}
    common = {name for name, declared in SETTINGS.items() if declared.common}
    for name in common:
        declared = SETTINGS[name]
        action = actions[name]
        assert flag_name(name, declared) in action.option_strings
        assert action.help == declared.help
        if not action.required and not declared.repeated:
            expected = declared.flag_default if declared.flag_default is not None else default_of(JobSpec, name)
            assert action.default == expected, name
    args = parser.parse_args(["--prompts", "p", "--output", "o", "--model", "m", "--teacher", "t"]
                             if job is reflow_pairs else ["--prompts", "p", "--output", "o", "--model", "m"])
    assert set(common_spec_args(args)) == common


def _job_file_table() -> dict[str, list[str]]:
    text = JOBS_REFERENCE.read_text()
    table = text[text.index("| key | jobs | type | default | meaning |"):]
    table = table[:table.index("\n\n")]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    return {row[0].strip("| `"): row for row in rows}


def test_the_job_file_table_has_every_common_setting_with_its_default():
    rows = _job_file_table()
    flags = {flag_name(name, declared)[2:].replace("-", "_"): name
             for name, declared in SETTINGS.items() if declared.common}
    assert set(flags) <= set(rows), f"missing from the job file table (jobs/README.md): {sorted(set(flags) - set(rows))}"
    for key, name in flags.items():
        shown = rows[key][3].strip("` ")
        default = default_of(JobSpec, name)
        if isinstance(default, bool):
            assert shown == str(default).lower(), key
        elif isinstance(default, (int, float)):
            assert float(re.sub(r"[^0-9.]", "", shown)) == default, key
        elif isinstance(default, str) and default:
            assert shown == default, key


class RecordingSpec(JobSpec):
    """A spec that notes which settings the engine reads, and where (its own checks and identity aside)."""

    reads: dict[str, str] = {}

    def __getattribute__(self, name):
        if name in SETTINGS:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(str(PROJECT)) and not caller.endswith(("pipeline/spec.py", "pipeline/settings.py")) \
                    and "/tests/" not in caller:
                RecordingSpec.reads.setdefault(name, f"{caller[len(str(PROJECT)) + 1:]}:{sys._getframe(1).f_lineno}")
        return super().__getattribute__(name)


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def worker_jobs(models: dict) -> dict[str, dict]:
    """A job of every stage, run by a worker: the student's with every option, the teacher's with its images, and
    an encode job."""
    return {
        "images, every stage": dict(
            model=models["instaflow"], loras=(f"{models['lora-kohya']}:0.5",), merge_finetune=models["finetune"],
            merge_base=models["sd15"], decoder="tiny", tiny_decoder=models["taesd"], scores=("nsfw", "clip"),
            safety_checker=models["safety_checker"], clip_model=models["clip"], controlnet=models["controlnet"],
            control_preprocess="canny", refiner=models["sdxl-refiner"], refine_size=64, refiner_steps=2,
            refiner_strength=0.5, keep_unrefined=True, samples_per_prompt=2, output_format="parquet"),
        "pairs with teacher images, scores and a ControlNet": dict(
            tasks=("pairs",), teacher=models["sd15"], teacher_steps=2, teacher_images=True, scores=("clip",),
            clip_model=models["clip"], controlnet=models["controlnet"], image_format="png"),
        "encode": dict(tasks=("pairs",), teacher=models["sd15"], teacher_kind="encode"),
    }


def worker_run(tmp_path, settings: dict) -> tuple[dict[str, str], dict[str, bytes]]:
    """The settings the worker read (with where) and the files it wrote, for one unit of two rows."""
    path = tmp_path / "in.parquet"
    if not path.exists():
        pq.write_table(pa.table({"prompt": ["a red fox", "an owl"], "control_image": [png_bytes(0), png_bytes(1)],
                                 "image": [png_bytes(2), png_bytes(3)]}), path)
    output = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    spec = RecordingSpec(prompts=str(path), output=str(output), height=64, width=64, batch_size=4, rows_per_shard=2,
                         dtype="float32", device="cpu", **settings)
    RecordingSpec.reads = {}
    worker, lock = standalone_worker(spec)
    try:
        [unit] = plan_units(list_input_files(fsspec.filesystem("file"), str(path)), 2)
        marker = worker.process(unit)
    finally:
        worker.close()
        lock.release()
    assert marker["successes"] == 2 * spec.samples_per_prompt, marker
    return dict(RecordingSpec.reads), {name: (output / name).read_bytes() for name in marker["files"]}


@pytest.mark.parametrize("job", ["images, every stage", "pairs with teacher images, scores and a ControlNet",
                                 "encode"])
def test_every_output_setting_a_worker_reads_is_in_the_identity_or_cannot_change_its_bytes(tmp_path, tiny_models,
                                                                                          job):
    """What the worker reads of the spec is what the identity must hold: a setting read for a job whose identity
    leaves it out would let a resume with another value mix two kinds of output. Such a read is allowed only where
    the spec refuses any other value for this job, or another value writes the same bytes."""
    settings = worker_jobs({name: str(path) for name, path in tiny_models.items()})[job]
    reads, files = worker_run(tmp_path, settings)
    assert {"height", "seed"} <= set(reads)  # the recording saw the worker's reads
    spec = resolved(**settings)
    for name, where in reads.items():
        if SETTINGS[name].effect != OUTPUT or SETTINGS[name].in_identity(spec):
            continue
        pair = changed(settings, name)
        if pair is not None:
            _, other_files = worker_run(tmp_path, settings | {name: getattr(pair[1], name)})
            assert other_files == files, f"{job}: {name} (read at {where}) changes the outputs but is not in the " \
                                         "identity"
