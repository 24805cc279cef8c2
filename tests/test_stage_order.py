"""Stages run in the order of what they consume of each other's work, whatever order they are listed in; stages
that would overwrite each other's values, columns or files are refused."""

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.plan import list_input_files, plan_units
from pipeline.spec import JobSpec
from pipeline import stages as stages_module
from pipeline.stages import STAGES, StageOrderError, added_fields, check_stages, ordered_stages
from pipeline.stages.base import Stage
from pipeline.worker import GenerationError, standalone_worker

SPECS = {
    "images, ControlNet, refiner, scores": dict(model="m", controlnet="c", refiner="r", scores=("nsfw", "clip")),
    "pairs and images, teacher images, scores": dict(tasks=("images", "pairs"), model="m", teacher="t",
                                                     teacher_images=True, scores=("clip",), controlnet="c"),
    "encode": dict(tasks=("pairs",), teacher="t", teacher_kind="encode"),
}


def spec(**settings) -> JobSpec:
    return JobSpec(**{"prompts": "p", "output": "o"} | settings).resolve(has_gpus=False)


@pytest.mark.parametrize("job", SPECS)
def test_every_listing_of_the_stages_runs_each_after_what_it_consumes(job):
    job_spec = spec(**SPECS[job])
    orders = {tuple(stage.name for stage in ordered_stages(job_spec, registry))
              for registry in itertools.permutations(STAGES)}
    for order in orders:
        position = {name: index for index, name in enumerate(order)}
        for stage in ordered_stages(job_spec):
            for value in stage.consumes(job_spec):
                makers = [other.name for other in ordered_stages(job_spec)
                          if value in other.produces(job_spec) and other is not stage]
                assert makers and all(position[maker] < position[stage.name] for maker in makers), (order, value)
    if job == "images, ControlNet, refiner, scores":  # scores read the refined image, not the student's
        assert orders == {("controlnet", "images", "refiner", "scores")}


class Consumer(Stage):
    name = "consumer"

    @classmethod
    def wanted(cls, spec) -> bool:
        return True

    @classmethod
    def consumes(cls, spec):
        return ("depth_maps",)


class SecondStudent(Stage):
    name = "second_student"

    @classmethod
    def wanted(cls, spec) -> bool:
        return True

    @classmethod
    def produces(cls, spec):
        return ("images",)


class ChickenStage(Consumer):
    name = "chicken"

    @classmethod
    def consumes(cls, spec):
        return ("eggs",)

    @classmethod
    def produces(cls, spec):
        return ("chickens",)


class EggStage(Consumer):
    name = "egg"

    @classmethod
    def consumes(cls, spec):
        return ("chickens",)

    @classmethod
    def produces(cls, spec):
        return ("eggs",)


@pytest.mark.parametrize("extra,message", [
    ((Consumer,), "stage consumer consumes 'depth_maps', which no stage of this job produces"),
    ((SecondStudent,), "stages images, second_student all produce 'images'"),
    ((ChickenStage, EggStage), "in a cycle: chicken, egg"),
])
def test_stages_that_do_not_make_one_order_are_refused(extra, message):
    job_spec = spec(model="m")
    with pytest.raises(StageOrderError, match=message.replace("(", r"\(")):
        ordered_stages(job_spec, (*STAGES, *extra))


class ClipColumnStage(Consumer):
    """A stage that adds a column the scores stage adds too."""

    name = "clip_column"

    @classmethod
    def consumes(cls, spec):
        return ()

    @classmethod
    def added_fields(cls, spec):
        return {"images": [pa.field("clip_score", pa.float32())]}


def test_two_stages_adding_one_column_to_an_output_are_refused_on_the_driver(monkeypatch):
    job_spec = spec(model="m", scores=("clip",))
    assert [field.name for field in added_fields(job_spec)["images"]] == ["clip_score", "scores_error"]
    monkeypatch.setattr(stages_module, "STAGES", (*STAGES, ClipColumnStage))
    assert [field.name for field in added_fields(spec(model="m"))["images"]] == ["clip_score"]  # alone: fine
    with pytest.raises(StageOrderError, match="stages scores and clip_column both add column 'clip_score' to images"):
        check_stages(job_spec, {})


class FileStage(Stage):
    name = "overwriter"

    def run(self, batch, n, produced, encode):
        return {}

    def files(self, shard, samples, extra, outputs):
        return {f"{shard}.tar": b"not the images"}


def test_two_stages_writing_one_file_fail_the_try_and_commit_nothing(tmp_path, tiny_models):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a red fox", "an owl"]}), path)
    job_spec = JobSpec(prompts=str(path), output=str(tmp_path / "out"), model=str(tiny_models["instaflow"]),
                       height=64, width=64, dtype="float32", device="cpu", rows_per_shard=2)
    worker, lock = standalone_worker(job_spec)
    try:
        worker.stages.append(FileStage())
        [unit] = plan_units(list_input_files(worker.input_fs, str(path)), 2)
        with pytest.raises(GenerationError, match=r"stages images and overwriter both write 00000\.tar"):
            worker.process(unit)
    finally:
        worker.close()
        lock.release()
    assert not list((tmp_path / "out").glob("00000*"))
