"""The worker alone (no Ray): one bad sample fails alone, NaN outputs are failed rows, out-of-memory halves the
batch, and the good rows equal those of a run without the fault (to one level: batches of other sizes round
the last bit differently, see pipeline/README.md on determinism). A failure no row explains fails the try, with nothing
committed; a unit's device tensors and encodes are bounded."""

import dataclasses
import re
import functools
import io
import json
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from PIL import Image

from jobhelpers import tar_members
from instaflow.models import Student
from pipeline.plan import list_input_files, plan_units
from pipeline.spec import JobSpec
from pipeline import worker as worker_module
from pipeline.row_images import StoreOutage
from pipeline.worker import GenerationError, ShardWorker, standalone_worker

FS = fsspec.filesystem("file")
PROMPTS = [f"a red fox in the snow, number {i}" for i in range(8)]


def run_unit(tmp_path, tiny_models, prompts, name, patch=None, **changes):
    """Runs the one unit of `prompts` through a worker; returns its marker and its tar's members."""
    marker = process_unit(tmp_path, tiny_models, prompts, name, patch, **changes)
    return marker, tar_members((tmp_path / name / "00000.tar").read_bytes())


def process_unit(tmp_path, tiny_models, prompts, name, patch=None, **changes) -> dict:
    """The marker of the one unit of `prompts`, processed by a worker that `patch` may change."""
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.table({"prompt": prompts}), path)
    spec = JobSpec(prompts=str(path), output=str(tmp_path / name), model=str(tiny_models["instaflow"]), height=64,
                   width=64, rows_per_shard=len(prompts), dtype="float32", image_format="png",
                   **{"batch_size": 4, **changes})
    worker, lock = standalone_worker(spec)
    try:
        if patch:
            patch(worker)
        [unit] = plan_units(list_input_files(FS, str(path)), spec.rows_per_shard)
        return worker.process(unit)
    finally:
        worker.close()
        lock.release()


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_models):
    return run_unit(tmp_path_factory.mktemp("clean"), tiny_models, PROMPTS, "clean")


def images(members: dict) -> dict:
    return {name: np.asarray(Image.open(io.BytesIO(data)), dtype=int) for name, data in members.items()
            if name.endswith(".png")}


def assert_same_images(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= 1, name


def test_a_sample_that_raises_fails_alone(tmp_path, tiny_models, clean):
    prompts = [*PROMPTS[:5], "POISON", *PROMPTS[6:]]

    def poison(worker):
        real = worker.stage("images").student.generate

        def generate(batch):
            if "POISON" in batch.prompts:
                raise ValueError("this prompt breaks the model")
            return real(batch)

        worker.stage("images").student.generate = generate

    marker, members = run_unit(tmp_path, tiny_models, prompts, "poisoned", poison)
    assert marker["successes"] == 7 and marker["failed"] == 1
    [error] = marker["errors"]
    assert "row 5" in error and "poisoned.parquet" in error and "this prompt breaks the model" in error
    assert "000000000005.png" not in members
    assert_same_images(images(members), {k: v for k, v in images(clean[1]).items() if k != "000000000005.png"})


def test_non_finite_outputs_are_failed_rows_not_black_images(tmp_path, tiny_models, clean, monkeypatch):
    real = Student.sample_latents

    def nan_for_some(self, batch):
        latents, truncated = real(self, batch)
        with torch.inference_mode():
            latents = latents.clone()
            for i, prompt in enumerate(batch.prompts):
                if prompt.endswith(("number 2", "number 7")):
                    latents[i] = float("nan")
        return latents, truncated

    monkeypatch.setattr(Student, "sample_latents", nan_for_some)
    marker, members = run_unit(tmp_path, tiny_models, PROMPTS, "nan")
    assert marker["failed"] == 2 and all("non-finite output" in error for error in marker["errors"]), marker["errors"]
    failed = ("000000000002.png", "000000000007.png")
    assert_same_images(images(members), {k: v for k, v in images(clean[1]).items() if k not in failed})


def test_out_of_memory_halves_the_batch_and_loses_nothing(tmp_path, tiny_models, clean):
    def small_memory(worker):
        real = worker.stage("images").student.generate

        def generate(batch):
            if len(batch.prompts) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(batch)

        worker.stage("images").student.generate = generate

    marker, members = run_unit(tmp_path, tiny_models, PROMPTS, "oom", small_memory)
    assert marker["failed"] == 0 and marker["run"]["batch_size_used"] == 2
    assert_same_images(images(members), images(clean[1]))


def test_the_tiny_decoder_decodes_the_students_latents(tmp_path, tiny_models):
    from diffusers import AutoencoderTiny

    from instaflow.loading import ComponentCache, Runtime
    from instaflow.models import PromptBatch, Settings

    assert JobSpec(prompts="p", output="o", model="m", decoder="tiny").resolve(False).identity() != \
        JobSpec(prompts="p", output="o", model="m").resolve(False).identity()  # other images: another job
    marker, members = run_unit(tmp_path, tiny_models, PROMPTS[:4], "tiny", decoder="tiny",
                               tiny_decoder=str(tiny_models["taesd"]))
    assert marker["failed"] == 0
    meta = json.loads(members["000000000002.json"])
    assert meta["decoder"] == str(tiny_models["taesd"])
    # diffusers' own AutoencoderTiny on the student's latents, mapped to pixels as diffusers rounds
    student = Student(ComponentCache(Runtime.default()).load(str(tiny_models["instaflow"])), Settings(1, 0.0, 64, 64))
    latents, _ = student.sample_latents(PromptBatch(PROMPTS[2:3], [meta["seed"]], [None]))
    taesd = AutoencoderTiny.from_pretrained(tiny_models["taesd"])
    with torch.no_grad():
        images = taesd.decode(latents).sample
    want = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy().astype(int)
    got = np.asarray(Image.open(io.BytesIO(members["000000000002.png"])), dtype=int)
    assert np.abs(got - want).max() <= 1


def fail_generation(when):
    """A patch under which the student's generate raises what `when(batch, calls so far)` returns, if anything."""

    def patch(worker):
        real, calls = worker.stage("images").student.generate, []

        def generate(batch):
            calls.append(len(batch.prompts))
            error = when(batch, len(calls) - 1)
            if error is not None:
                raise error
            return real(batch)

        worker.stage("images").student.generate = generate

    return patch


@pytest.mark.parametrize("num_rows, when, message", [
    (8, lambda batch, calls: IndexError("index out of range in self"), "IndexError: index out of range in self"),
    (8, lambda batch, calls: torch.OutOfMemoryError("CUDA out of memory"), "out of memory at batch 1"),
    (8, lambda batch, calls: RuntimeError("kernel failed") if calls else None, "all 4 rows of a batch"),
    (1, lambda batch, calls: ValueError("wrong dtype"), "ValueError: wrong dtype .and every other row of the unit"),
    (8, lambda batch, calls: RuntimeError(f"kernel failed at {id(batch):#x}") if calls else None,
     "all 4 rows of a batch"),
], ids=["every call", "out of memory at batch 1", "every call after the first", "a unit of one row",
        "one cause in other words for each row"])
def test_a_failure_no_row_explains_fails_the_try_and_commits_nothing(tmp_path, tiny_models, num_rows, when,
                                                                      message):
    """A model or device that fails for every row (or for a whole batch alike) is not a bad sample: no shard of
    failed rows is committed, so verify does not count it and a retry or re-run redoes it."""
    with pytest.raises(GenerationError, match=message):
        process_unit(tmp_path, tiny_models, PROMPTS[:num_rows], "broken", fail_generation(when))
    assert not list((tmp_path / "broken").glob("*.stats.json"))
    assert not list((tmp_path / "broken").glob("*.tar"))


def test_out_of_memory_on_a_padded_batch_halves_the_batch_that_ran(tmp_path, tiny_models, clean):
    """A compiled model's batches are padded to the batch size: 3 rows ran as 4, so half is 2, not 1."""
    def compiled_small_memory(worker):
        worker.runtime = dataclasses.replace(worker.runtime, compile=True)  # pads; the models stay eager
        fail_generation(lambda batch, calls: torch.OutOfMemoryError("CUDA out of memory")
                        if len(batch.prompts) > 2 else None)(worker)

    marker, members = run_unit(tmp_path, tiny_models, PROMPTS[:3], "padded", compiled_small_memory)
    assert marker["failed"] == 0 and marker["run"]["batch_size_used"] == 2
    assert_same_images(images(members), {k: v for k, v in images(clean[1]).items()
                                         if k < "000000000003.png"})


def test_a_batch_is_freed_once_it_has_run(tmp_path, tiny_models):
    """Its embeddings and noise are cached on the device: they must not stay until the unit returns."""
    seen, alive = [], []

    def watch(worker):
        real = worker.stage("images").student.generate

        def generate(batch):
            alive.append(sum(ref() is not None for ref in seen))
            seen.append(weakref.ref(batch))
            return real(batch)

        worker.stage("images").student.generate = generate

    marker = process_unit(tmp_path, tiny_models, PROMPTS, "freed", watch, batch_size=2)
    assert marker["failed"] == 0 and len(seen) == 4
    assert alive == [0, 0, 0, 0]


def test_a_batch_that_ran_out_of_memory_is_freed_before_its_halves_run(tmp_path, tiny_models):
    """Neither the device's loop nor the thread preparing the next batch (slow here) keeps it."""
    seen, alive = [], []

    def watch(worker):
        stage = worker.stage("images")
        real_generate, real_rows = stage.student.generate, stage.prepare_rows

        def prepare_rows(unit, samples):
            if any(sample.prompt == PROMPTS[4] for sample in samples):
                time.sleep(1.0)  # the next batch is still being prepared while the first one's halves run
            return real_rows(unit, samples)

        def generate(batch):
            if len(batch.prompts) == 4 and not seen:
                seen.append(weakref.ref(batch))
                raise torch.OutOfMemoryError("CUDA out of memory")
            alive.append(sum(ref() is not None for ref in seen))
            return real_generate(batch)

        stage.prepare_rows, stage.student.generate = prepare_rows, generate

    marker = process_unit(tmp_path, tiny_models, PROMPTS, "halved", watch, batch_size=4)
    assert marker["failed"] == 0 and len(seen) == 1 and len(alive) > 2 and set(alive) == {0}


def store_out_for(reads: list, out_reads: int, on: set[str]):
    """The images stage's rows as a store would give them that is out for the first `out_reads` reads of the
    prompts `on` (each such read fails as an outage: `Sample.outages`); every row's read is logged in `reads`."""
    def patch(worker):
        stage = worker.stage("images")

        def prepare_rows(unit, samples):
            for sample in samples:
                reads.append(sample.prompt)
                if sample.prompt in on and reads.count(sample.prompt) <= out_reads:
                    sample.error, sample.outages["image"] = "the store is out", True

        def end_rows(unit, samples):
            if all(sample.outages.get("image") for sample in samples):
                raise StoreOutage("every image was out")

        stage.prepare_rows, stage.end_rows = prepare_rows, end_rows

    return patch


def test_rows_whose_inputs_a_store_failed_to_give_are_read_once_more_at_the_units_end(tmp_path, tiny_models):
    """A store out while the unit ran costs no row that it gives later: such rows are read again once the others
    have run; a store out for every row fails the try at once, without reading them all again."""
    reads = []
    marker = process_unit(tmp_path, tiny_models, PROMPTS, "out-once", store_out_for(reads, 1, {PROMPTS[1]}),
                          batch_size=2)
    assert marker["failed"] == 0 and reads == [*PROMPTS, PROMPTS[1]]
    reads.clear()
    with pytest.raises(StoreOutage):
        process_unit(tmp_path, tiny_models, PROMPTS, "all-out", store_out_for(reads, 2, set(PROMPTS)), batch_size=2)
    assert reads == PROMPTS


def test_a_rows_own_failure_fails_it_alone_whatever_the_batch_holds(tmp_path, tiny_models):
    """With --samples-per-prompt, a batch may hold one row's samples only: their failing alike is that row's."""
    marker = process_unit(tmp_path, tiny_models, PROMPTS[:4], "spp", fail_generation(
        lambda batch, calls: ValueError("bad prompt") if PROMPTS[1] in batch.prompts else None),
        batch_size=2, samples_per_prompt=2)
    assert marker["failed"] == 2 and marker["successes"] == 6


def test_batches_are_prepared_a_bounded_number_ahead_of_the_device(tmp_path, tiny_models, monkeypatch):
    """The host holds a few batches' prepared inputs, not the unit's: when the device runs a batch, the rows read
    and prepared but not yet run are that batch's, those waiting (BATCHES_PREPARED_AHEAD) and one being made."""
    prepared, generated, ahead = [0], [0], []

    def watch(worker):
        stage, real_generate = worker.stage("images"), worker.stage("images").student.generate
        real_rows = stage.prepare_rows

        def prepare_rows(unit, samples):
            prepared[0] += len(samples)
            return real_rows(unit, samples)

        def generate(batch):
            ahead.append(prepared[0] - generated[0])
            generated[0] += len(batch.prompts)
            return real_generate(batch)

        stage.prepare_rows, stage.student.generate = prepare_rows, generate

    monkeypatch.setattr(worker_module, "BATCHES_PREPARED_AHEAD", 2, raising=False)
    prompts = PROMPTS * 4
    marker = process_unit(tmp_path, tiny_models, prompts, "ahead", watch, batch_size=2)
    assert marker["failed"] == 0 and generated == [len(prompts)]
    assert max(ahead) <= 2 * (2 + 2), ahead
    assert {"prepare_s", "prepare_wait_s"} <= set(marker["timings"])


def scored_unit(tmp_path, tiny_models, prompts, name, patch, batch_size=4) -> tuple[list[dict], dict]:
    """The rows and marker of one unit of `prompts` with the clip and aesthetic scores, through a worker `patch`
    changes."""
    marker = process_unit(tmp_path, tiny_models, prompts, name, patch, output_format="parquet",
                          scores=("clip", "aesthetic"), clip_model=str(tiny_models["clip"]),
                          aesthetic_model=str(tiny_models["aesthetic"]), batch_size=batch_size)
    assert marker["failed"] == 0, marker
    return pq.read_table(tmp_path / name / "00000.parquet").to_pylist(), marker


SECRET_URL = "https://alice:hunter2@models.example/clip?X-Amz-Signature=deadbeef"


def scorer_that_raises(on: str):
    def patch(worker):
        stage = worker.stage("scores")
        real = stage.run

        def run(batch, n, produced, encode):
            if on in batch.prompts[:n] or on == "*":
                raise RuntimeError(f"the scorer broke {'.' * 240} reading {SECRET_URL}")  # cut inside the URL
            return real(batch, n, produced, encode)

        stage.run = run

    return patch


def clip_scores_not_finite(worker):
    clip = worker.stage("scores").clip
    real = clip.scores
    clip.scores = lambda embeds, tokens: real(embeds, tokens) * float("nan")


def test_a_score_that_raises_on_a_row_leaves_its_columns_null_there_and_the_row_is_kept(tmp_path, tiny_models):
    """Scores do not fail rows (their stages' policy): the row keeps its image, its scores are null, and the
    reason is in each score stage's reason column; the aesthetic score, which reads the clip score's embeddings,
    is null there too, saying so. The other rows of the batch are scored."""
    rows, marker = scored_unit(tmp_path, tiny_models, [*PROMPTS[:5], "POISON", *PROMPTS[6:]], "poison",
                               scorer_that_raises("POISON"))
    assert marker["left_null"] == 1  # counted: the summary adds it up
    assert [row["status"] for row in rows] == ["ok"] * len(PROMPTS) and all(row["image"] for row in rows)
    poisoned = next(row for row in rows if row["prompt"] == "POISON")
    assert poisoned["clip_score"] is None and poisoned["aesthetic_score"] is None
    assert poisoned["scores_error"].startswith("scores failed: RuntimeError: the scorer broke ...")
    assert not {"alice", "hunter2", "deadbeef"} & set(re.findall(r"\w+", poisoned["scores_error"]))
    assert poisoned["aesthetic_error"] == "needs what stage scores failed to make"
    others = [row for row in rows if row["prompt"] != "POISON"]
    assert all(row["clip_score"] is not None and row["aesthetic_score"] is not None for row in others)
    assert all(row["scores_error"] is None and row["aesthetic_error"] is None for row in others)


def test_the_one_row_of_a_unit_keeps_its_image_when_its_score_fails(tmp_path, tiny_models):
    rows, marker = scored_unit(tmp_path, tiny_models, PROMPTS[:1], "one", scorer_that_raises("*"))
    assert marker["left_null"] == 1 and rows[0]["status"] == "ok" and rows[0]["clip_score"] is None


@pytest.mark.parametrize("batch_size, patch, message", [
    (4, scorer_that_raises("*"), r"scores failed: RuntimeError: the scorer broke .* \(for all 4 rows of a batch, "
                                 r"each run alone\)"),
    (1, scorer_that_raises("*"), r"stage scores: scores failed: RuntimeError: the scorer broke .* \(and on every "
                                 r"other row of the unit\)"),
    (4, clip_scores_not_finite, r"stage scores: clip_score is not finite \(nan\) \(and on every other row"),
], ids=["raises, batches of 4", "raises, batches of 1", "not finite"])
def test_a_score_that_fails_on_every_row_fails_the_try(tmp_path, tiny_models, batch_size, patch, message):
    """A scorer that fails on every row is broken, not the rows: the try fails (and is retried elsewhere)."""
    with pytest.raises(GenerationError, match=message):
        scored_unit(tmp_path, tiny_models, PROMPTS, "broken", patch, batch_size)


def test_teacher_images_count_against_the_encodes_awaited(monkeypatch):
    """The device waits for the encoders once MAX_BATCHES_AWAITING_ENCODE batches are encoding, whichever model
    made the images (stand-ins: batches that generate at once, encodes that take 20 ms on one thread)."""
    monkeypatch.setattr(worker_module, "MAX_BATCHES_AWAITING_ENCODE", 2)
    worker = ShardWorker.__new__(ShardWorker)  # no models: only the generate loop runs
    pool, futures, most_encoding = ThreadPoolExecutor(1), [], []

    def run_isolated(handed):
        keys, _ = handed
        most_encoding.append(len({batch_id for batch_id, future in futures if not future.done()}))
        made = [pool.submit(time.sleep, 0.02) for _ in keys]
        futures.extend((keys[0], future) for future in made)
        return [{"keys": keys, "stages": {"pairs": {"encodes": made}}}]

    class Prepared:  # PreparedBatches' two calls, over a list
        batches = [([f"{i}a", f"{i}b"], None) for i in range(12)]
        more = batches.__len__
        take = functools.partial(batches.pop, 0)

    worker._run_isolated = run_isolated
    worker._generate(Prepared, {}, {f"{i}{half}": i for i in range(12) for half in "ab"})
    pool.shutdown()
    assert max(most_encoding) <= 2


def test_a_unit_whose_rows_all_have_bad_input_commits_them_as_failed_rows(tmp_path, tiny_models):
    """Bad input is the rows' own: every row gets its reason and the shard commits, nothing is retried."""
    marker = process_unit(tmp_path, tiny_models, pa.array([None, None, None], pa.string()), "nulls")
    assert marker["committed_by_this_try"] and marker["count"] == 3 and marker["failed"] == 3
    assert all("nulls.parquet row" in error for error in marker["errors"])
