"""The work on one GPU: a Ray actor that loads its models once and turns work units into committed shards.

An actor runs two units at a time (Ray `max_concurrency=2`) but only one holds the device: while unit N is
generated, unit N+1's prompts are read and its first batches prepared (inputs read and decoded, tokens, seed
noise); while N+1 is generated, N's shard is built and uploaded. A unit's batches are prepared by a thread of
their own at most `BATCHES_PREPARED_AHEAD` ahead of the device (PreparedBatches), so the host holds a few
batches' decoded inputs per unit, not the unit's; the device's waits for them are recorded (`prepare_wait_s`).
Inside a unit, each batch's outputs are copied to page-locked host memory without stopping the device, and its
images are encoded by processes of their own (pipeline/encoders.py), one per CPU reserved for the worker, while
the device runs the next batches. The device waits for the encoders only when more than
`MAX_BATCHES_AWAITING_ENCODE` batches are still being encoded; that wait is recorded in the shard's stats
(`encode_wait_s`).
"""

import collections
import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import wait
from dataclasses import asdict

import torch

from instaflow.loading import Runtime
from instaflow.models import PromptBatch
from pipeline.commit import Fence, ShardStore
from pipeline.encoders import EncoderProcesses
from pipeline.manifest import identity_digest
from pipeline.metrics import WorkerMetrics
from pipeline.lock import OutputLock
from pipeline.model_source import ModelSource, job_identity
from pipeline.plan import WorkUnit
from pipeline.reader import Sample, read_unit
from pipeline.spec import JobSpec
from pipeline.stages import added_fields, build_stages, input_columns, model_sources
from pipeline.stages.base import HostCopy, Stage, UnitOutputs
from pipeline.storage import filesystem, protect_secrets, raises_redacted, redact_text

logger = logging.getLogger(__name__)

# Errors after which the CUDA context is unusable: the process exits so that Ray restarts it clean.
FATAL_DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert")


def _is_fatal(exc: BaseException) -> bool:
    return any(marker in str(exc) for marker in FATAL_DEVICE_ERRORS)


def _described(exc: BaseException) -> str:
    """An error for a row's record: redacted, then cut short (a secret cut in two is not recognised)."""
    return redact_text(f"{type(exc).__name__}: {exc}")[:300]


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


class GenerationError(RuntimeError):
    """Generation failed in a way no row explains: every valid row of the unit failed, every row of a batch
    failed alike when run alone, or out of memory at batch 1. The try fails as a whole (nothing is committed) and
    the pool retries the unit on another worker, rather than commit the rows as failed."""


MAX_ERRORS_IN_STATS = 20
MAX_BATCHES_AWAITING_ENCODE = 4  # per unit; bounds the page-locked memory that waits for the encoders
BATCHES_PREPARED_AHEAD = 2  # per unit; bounds the host memory of prepared inputs (decoded control images)
PREPARED_POLL_S = 1.0  # how often a wait for a prepared batch, or for room to put one, looks whether to stop


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    clock = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - clock


def encoder_count(cpus: float | None) -> int:
    """One encoder per CPU reserved for the worker; without a reservation (no Ray), one per CPU of the host."""
    return max(1, int(cpus if cpus is not None else os.cpu_count() or 1))


class ShardWorker:
    """A unit's lifecycle on one device: read, prepare, the device lock, per-row isolation and out-of-memory
    halving, the encoder pool, commit. What is generated, scored and written is the job's stages'."""

    @raises_redacted  # Ray shows why a worker failed to start, and why a call failed
    def __init__(self, spec: JobSpec, sources: dict[str, ModelSource], fence: Fence):
        protect_secrets(spec.storage_options)  # before anything this process logs or writes
        self.spec = spec
        self.fence = fence
        self.runtime = Runtime.default(spec.dtype, spec.compile, device="cpu" if spec.device == "cpu" else None)
        self.stages = self.load_models(sources)
        self.outputs = [stage.name for stage in self.stages if stage.is_output]
        self.added_fields = added_fields(spec, self.stages)
        self.input_fs, _ = filesystem(spec.prompts, spec.storage_options)
        output_fs, root = filesystem(spec.output, spec.storage_options)
        self.store = ShardStore(output_fs, root)
        self.device_lock = threading.Lock()
        self.batch_size = spec.batch_size  # halved for good after an out-of-memory error
        self.metrics = WorkerMetrics(spec.output, worker_tag())
        self.encoders = EncoderProcesses(encoder_count(spec.cpus_per_worker))

    def close(self) -> None:
        """Ends the image encoder processes, for a worker outside Ray (an actor's end ends them with it)."""
        self.encoders.close()

    def load_models(self, sources: dict[str, ModelSource]) -> list[Stage]:
        """The job's stages with their models (the benchmarks override this with stand-ins that take a fixed
        time on a simulated device)."""
        return build_stages(self.spec, sources, self.runtime)

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def describe(self) -> dict:
        """Where this worker runs; the driver waits on it to know the models have loaded.

        Ray's placement is added when the worker runs as an actor; the GPU benchmark runs it without Ray.
        """
        where = {
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(self.runtime.device),
        }
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            where["node_id"] = ray.get_runtime_context().get_node_id()
            where["gpu_ids"] = [str(gpu) for gpu in ray.get_gpu_ids()]
        return where

    @raises_redacted
    def process(self, unit: WorkUnit, attempt: int = 1) -> dict:
        try:
            return self._process(unit, attempt)
        except Exception as exc:
            if _is_fatal(exc):
                logger.error("unit %s: fatal device error, restarting this worker: %s", unit.unit_id, exc)
                os._exit(1)
            raise

    def _process(self, unit: WorkUnit, attempt: int) -> dict:
        started_at = time.time()
        timings = {"encode_wait_s": 0.0, "prepare_wait_s": 0.0}
        with _timed(timings, "read_s"):
            unit_input = read_unit(self.input_fs, unit, self.spec.prompt_column, self.spec.seed,
                                   self.spec.samples_per_prompt, tuple(input_columns(self.spec)))
        valid = [sample for sample in unit_input.samples if sample.error is None]
        rows = {sample.key: sample.row for sample in unit_input.samples}
        with PreparedBatches(self, unit, valid, timings) as prepared, self.device_lock, \
                _timed(timings, "generate_s"):
            pending = self._generate(prepared, timings, rows)
        with _timed(timings, "collect_s"):
            outputs = self._collect(pending)
        valid = [sample for sample in valid if sample.error is None]
        for output_failures in outputs.failed.values():
            if valid and all(sample.key in output_failures for sample in valid):
                raise GenerationError(f"{output_failures[valid[0].key]} (and every other row of the unit)")
        for (output, stage), reasons in outputs.left_null.items():
            kept = [sample for sample in valid if sample.key not in outputs.failed[output]]
            # a scorer that fails on every row: no row's fault, once two rows say so (one row's image is kept)
            if len({sample.row for sample in kept}) > 1 and all(sample.key in reasons for sample in kept):
                raise GenerationError(f"stage {stage}: {reasons[kept[0].key]} (and on every other row of the unit)")
        for output_failures in outputs.failed.values():
            for key, reason in output_failures.items():
                output_failures[key] = f"{unit.path} row {rows[key]}: {reason}"
        with _timed(timings, "shard_s"):
            files = shard_files(self.stages, unit.shard, unit_input, outputs)
        generation_errors = {key: reason for failures in outputs.failed.values() for key, reason in failures.items()}
        errors = [s.error for s in unit_input.samples if s.error] + list(generation_errors.values())
        failed_keys = {s.key for s in unit_input.samples if s.error} | set(generation_errors)
        truncated = {key for flags in outputs.truncated.values() for key, flag in flags.items() if flag}
        stats = {
            "shard": unit.shard,
            "unit": asdict(unit),
            "attempt": attempt,
            "count": len(unit_input.samples),
            "successes": len(unit_input.samples) - len(failed_keys),
            "failed": len(failed_keys),
            "truncated": len(truncated),
            "left_null": len({key for reasons in outputs.left_null.values() for key in reasons}),
            "errors": [redact_text(error) for error in errors[:MAX_ERRORS_IN_STATS]],
            "worker": self.describe(),
            "run": self.run_settings(),
            "started_at": started_at,
            "timings": timings,
        }
        marker, committed_here = self.store.commit(unit.unit_id, files, stats, self.fence)
        self.metrics.unit(stats, time.time() - started_at)
        return marker | {"committed_by_this_try": committed_here}

    def run_settings(self) -> dict:
        """Settings that change speed but not outputs; a resumed job may change them, so each shard records its own."""
        return {
            "batch_size": self.spec.batch_size,
            "batch_size_used": self.batch_size,
            "compile": self.runtime.compile,
            "dtype": str(self.runtime.dtype).removeprefix("torch."),
            "encoder_processes": self.encoders.count,
            "cpus_per_worker": self.spec.cpus_per_worker,
        }

    def prepared_batches(self, unit: WorkUnit, samples: list[Sample]) -> Iterator[tuple[list[str], PromptBatch]]:
        """The unit's batches of valid samples with their host work done. Rows are read and checked by the stages
        (`prepare_rows`) about a batch at a time, a failed row's place taken by the next. Then the stages judge
        the unit as a whole (`end_rows`: every image from a store failed as an outage fails the try), and rows
        whose inputs failed as an outage (`Sample.outages`) are read once more."""
        yield from self._read_and_batch(unit, samples)
        for stage in self.stages:
            stage.end_rows(unit, samples)
        out = [sample for sample in samples if sample.error is not None and any(sample.outages.values())]
        for sample in out:  # a store that was out while the unit ran: the rows it failed get one more read
            sample.error = None
            sample.outages.clear()
        yield from self._read_and_batch(unit, out)

    def _read_and_batch(self, unit: WorkUnit, samples: list[Sample]) -> Iterator[tuple[list[str], PromptBatch]]:
        ready = []
        for rows in _row_chunks(samples, self.batch_size):
            for stage in self.stages:
                stage.prepare_rows(unit, [sample for sample in rows if sample.error is None])
            ready += [sample for sample in rows if sample.error is None]
            while len(ready) >= self.batch_size:
                chunk, ready = ready[: self.batch_size], ready[self.batch_size :]
                yield self._batch(chunk)
        if ready:
            yield self._batch(ready)

    def _batch(self, chunk: list[Sample]) -> tuple[list[str], PromptBatch]:
        """One prepared batch. Compiled models are specialised to one batch shape, so a short batch is padded
        with copies of its last sample, whose outputs are dropped (outputs do not depend on the batch). The batch
        takes its samples' inputs (decoded images among them): they are freed with it, once it has run."""
        keys = [sample.key for sample in chunk]
        if self.runtime.compile:
            chunk = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
        batch = PromptBatch([s.prompt for s in chunk], [s.seed for s in chunk], [s.negative_prompt for s in chunk],
                            row_inputs=[s.inputs for s in chunk])
        for sample in chunk:
            sample.inputs = {}
        for stage in self.stages:
            stage.prepare(batch)
        return keys, batch

    def _generate(self, prepared: "PreparedBatches", timings: dict, rows: dict[str, int]) -> list[dict]:
        """Runs the stages batch by batch under the device lock; copies and encodes proceed without it. Every
        input row of a batch (`rows`: by sample key) failing alike, each run alone, fails the try.

        No batch is kept once it has run: it caches its embeddings and noise on the device, freed then rather than
        when the unit returns. The encodes of every stage count against MAX_BATCHES_AWAITING_ENCODE."""
        pending, awaiting_encode = [], collections.deque()
        while prepared.more():
            results = self._run_isolated(prepared.take())
            keys = [key for result in results for key in result["keys"]]
            causes = {result.get("cause") for result in results}
            if len({rows[key] for key in keys}) > 1 and len(causes) == 1 and None not in causes:
                first = results[0]
                reason = next(iter({**first.get("failed", {}), **first.get("skipped", {})}.values()))
                raise GenerationError(f"{reason} (for all {len(keys)} rows of a batch, each run alone)")
            for result in results:
                pending.append(result)
                encodes = [future for stage_result in result.get("stages", {}).values()
                           for future in stage_result.get("encodes", ())]
                if encodes:
                    awaiting_encode.append(encodes)
                if len(awaiting_encode) > MAX_BATCHES_AWAITING_ENCODE:
                    with _timed(timings, "encode_wait_s"):
                        wait(awaiting_encode.popleft())
        return pending

    def _run_isolated(self, handed: list) -> list[dict]:
        """Runs a batch (`handed`: [keys, batch], emptied here, so that no caller keeps the batch); if it raises,
        its halves are run apart until the failing rows are found, so one bad sample fails alone. Out of memory:
        the worker halves the batch size that ran (padding included) for good and retries; out of memory at batch 1
        is no row's fault, so the try fails (GenerationError)."""
        keys, batch = handed
        handed.clear()
        try:
            return [self._run_batch(keys, batch)]
        except Exception as exc:
            if _is_fatal(exc):
                raise
            ran = len(batch.prompts)  # what the device held: a compiled model's batches are padded
            out_of_memory = _out_of_memory(exc)
            if out_of_memory and ran == 1:
                raise GenerationError(f"out of memory at batch 1: {_described(exc)}") from exc
            if len(keys) == 1 and not out_of_memory:
                reason = f"generation failed: {_described(exc)}"
                logger.warning("sample %s: %s", keys[0], reason)
                return [{"keys": keys, "failed": dict.fromkeys(keys, reason), "cause": type(exc).__qualname__}]
            if out_of_memory and ran <= self.batch_size:  # not a batch made before an earlier halving
                self.batch_size = ran // 2
                logger.warning("out of memory at batch %d: retrying at batch %d", ran, self.batch_size)
            half = self.batch_size if out_of_memory else (len(keys) + 1) // 2
        # The halves run outside the except block, whose traceback holds the failed pass's tensors, and without
        # this batch's own (the caller passed it on, not kept it).
        samples = [Sample(key, prompt, seed, negative, None, inputs=inputs) for key, prompt, seed, negative, inputs in
                   zip(keys, batch.prompts, batch.seeds, batch.negative_prompts, batch.row_inputs or [{}] * len(keys))]
        del batch
        if out_of_memory and self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()
        results = []
        for start in range(0, len(samples), half):
            results += self._run_isolated(list(self._batch(samples[start : start + half])))
        return results

    def _run_batch(self, keys: list[str], batch: PromptBatch) -> dict:
        """Every stage on one batch, in order; a later stage reads what earlier ones left on the device.

        A stage that does not fail rows (`fails_rows` False) and raises on one row is skipped for it, with every
        later stage that consumes what it makes (`skipped`: the reason, by stage); raising on more rows, it raises
        as any stage does, so that the rows are run apart. A stage that fails rows and needs what a skipped stage
        makes raises that stage's error: the row fails."""
        produced, results, skipped, missing = {}, {}, {}, {}
        for stage in self.stages:
            lacking = [missing[value] for value in stage.consumes(self.spec) if value in missing]
            if lacking and stage.fails_rows:
                raise lacking[0][1]
            if lacking:
                maker, error = lacking[0]
                skipped[stage.name] = f"needs what stage {maker} failed to make"
            else:
                try:
                    results[stage.name] = stage.run(batch, len(keys), produced, self._encode_batch)
                    continue
                except Exception as exc:
                    if stage.fails_rows or len(keys) > 1 or _is_fatal(exc) or _out_of_memory(exc):
                        raise
                    skipped[stage.name] = f"{stage.name} failed: {_described(exc)}"
                    logger.warning("sample %s: %s", keys[0], skipped[stage.name])
                    error = exc
            missing |= dict.fromkeys(stage.produces(self.spec), (stage.name, error))
        result = {"keys": keys, "stages": results}
        if skipped:
            result |= {"skipped": skipped, "cause": " ".join(sorted(skipped))}
        return result

    def _encode_batch(self, pixels: HostCopy, n: int) -> list:
        return self.encoders.submit(pixels, n, self.spec.image_format)

    def _collect(self, pending: list[dict]) -> UnitOutputs:
        """Every batch's results by row key, once its copies and encodes are done; rows whose batch raised are
        failed in every output, each stage fails the rows whose outputs it cannot use, and a stage skipped on a row
        leaves its columns null there, with the reason."""
        outputs = UnitOutputs(self.outputs, self.added_fields)
        for result in pending:
            if "failed" in result:
                outputs.fail_everywhere(result["failed"])
                continue
            for stage in self.stages:
                if stage.name in result.get("skipped", {}):
                    for output in stage.added_fields(self.spec):
                        outputs.leave_null(output, stage.name, result["keys"], result["skipped"][stage.name])
                else:
                    stage.collect(result["keys"], result["stages"][stage.name], outputs)
        return outputs


def _row_chunks(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    """`samples` in runs of about `size`, a row's samples (--samples-per-prompt) never split: they share its inputs."""
    chunk = []
    for sample in samples:
        if len(chunk) >= size and (sample.row is None or sample.row != chunk[-1].row):
            yield chunk
            chunk = []
        chunk.append(sample)
    if chunk:
        yield chunk


class PreparedBatches:
    """A unit's prepared batches, made by a thread of their own at most BATCHES_PREPARED_AHEAD ahead of the device:
    its host work overlaps the device's, and the host holds a few batches of decoded inputs, not the unit's. An error
    while preparing reaches the device's loop at its next batch. Leaving the context stops the thread (it ends
    within one batch's preparation: an image read is bounded by --image-read-timeout)."""

    _END = object()

    def __init__(self, worker: ShardWorker, unit: WorkUnit, samples: list[Sample], timings: dict):
        self._batches = worker.prepared_batches(unit, samples)
        self._timings = timings
        self._queue = queue.Queue(BATCHES_PREPARED_AHEAD)
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._next = None
        self._thread = threading.Thread(target=self._prepare, name=f"prepare-{unit.shard}", daemon=True)

    def __enter__(self) -> "PreparedBatches":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        self._next = None
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()  # frees what was prepared, and unblocks a waiting put

    def _prepare(self) -> None:
        try:
            while True:
                with _timed(self._timings, "prepare_s"):
                    batch = next(self._batches, self._END)
                if not self._put(batch) or batch is self._END:
                    return
                batch = None  # handed over: the device frees it once it has run
        except BaseException as exc:  # the device's loop raises it
            self._error = exc
            self._put(self._END)
        finally:
            self._batches.close()

    def _put(self, item) -> bool:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=PREPARED_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def more(self) -> bool:
        """Waits for the next batch (or the end): whether there is one. Raises what preparing raised."""
        with _timed(self._timings, "prepare_wait_s"):
            while self._next is None and self._error is None:
                try:
                    self._next = self._queue.get(timeout=PREPARED_POLL_S)
                except queue.Empty:
                    if not self._thread.is_alive() and self._queue.empty() and self._error is None:
                        raise RuntimeError("the thread preparing batches ended without a word") from None
        if self._error is not None:
            raise self._error
        return self._next is not self._END

    def take(self) -> list:
        """The batch `more` waited for, as [keys, batch], handed on: nothing here keeps it."""
        batch, self._next = self._next, None
        return list(batch)


def shard_files(stages: list[Stage], shard: str, unit_input, outputs: UnitOutputs) -> dict[str, bytes]:
    """Every stage's files of the shard; two stages that write one path fail the try (one would overwrite the
    other's file) rather than commit either."""
    files, writer = {}, {}
    for stage in stages:
        for path, data in stage.files(shard, unit_input.samples, unit_input.extra, outputs).items():
            if path in files:
                raise GenerationError(f"stages {writer[path]} and {stage.name} both write {path}")
            files[path], writer[path] = data, stage.name
    return files


def worker_tag() -> str:
    """The worker, as a metrics tag: its node and GPUs under Ray (stable across its restarts), else its process."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        gpus = ",".join(str(gpu) for gpu in ray.get_gpu_ids())
        return f"{ray.get_runtime_context().get_node_id()[:8]}/gpu{gpus}" if gpus else \
            f"{ray.get_runtime_context().get_node_id()[:8]}/pid{os.getpid()}"
    return f"pid{os.getpid()}"


def standalone_worker(spec: JobSpec) -> tuple[ShardWorker, OutputLock]:
    """A worker outside Ray, on an output this process locks as a job would: for the GPU benchmark (whose
    machine has no Ray) and for tests of the worker itself. The caller closes the worker and releases the lock."""
    spec = spec.resolve(has_gpus=torch.cuda.is_available())
    sources = model_sources(spec)
    lock = OutputLock(*filesystem(spec.output, spec.storage_options), lease_s=spec.lock_lease_s)
    lock.acquire()
    fence = Fence(lock.token, (lock.token,), identity_digest(job_identity(spec, sources)))
    return ShardWorker(spec, sources, fence), lock
