"""The driver: plan the units, pin the models, take the output, start workers, then commit what is not done.

Resuming is re-running: committed shards are found by their markers and skipped, the rest are done again, and the
result is the same as an uninterrupted run. A different spec on the same output is refused, as is a second live
job on it. Nothing is written to the output (no `_job.json`, no deletion for --overwrite) until a worker is up,
so a bad model or a cluster without room never binds or costs an output.
"""

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Callable

import ray
import torch

from pipeline.commit import Fence, ShardStore
from pipeline.deadline import call_within, plan_timeout_s
from pipeline.lock import LeaseKeeper, OutputLock, OutputLostError
from pipeline.manifest import ManifestWriter, check_compatible, identity_digest, job_manifest, read_manifest
from pipeline.metrics import JobMetrics
from pipeline.model_source import ModelSource, job_identity, model_folders
from pipeline.plan import check_input_columns, check_output_apart_from_models, check_output_location, \
    input_fingerprint, list_input_files, plan_units
from pipeline.pool import ActorPool, NoWorkersError, PoolLimits, SystematicFailureError, UnitResult, \
    ray_worker_factory, withdraw_resource_request
from pipeline.progress import JobProgress
from pipeline.spec import JobSpec
from pipeline.stages import check_stages, input_columns, model_sources
from pipeline.storage import check_conditional_writes, filesystem, is_transient, protect_secrets, redact, redact_text

logger = logging.getLogger(__name__)


def connect_ray(address: str | None) -> None:
    """Joins the cluster named by `address` or RAY_ADDRESS (Ray Jobs sets it), else starts a local Ray.

    A local Ray's workers inherit this process's environment, credentials included; a cluster's workers use
    their own nodes' credentials.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray listens on 127.0.0.1 only
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")


def resolve_device(spec: JobSpec) -> JobSpec:
    """Decides the device kind and dtype before any worker starts, without starting Ray.

    `auto`: GPUs on any cluster the job joins (even one with no GPU up yet: the autoscaler adds them), and on
    a local machine with a GPU; the CPU only for a local Ray on a machine without one. A Ray this process is
    already connected to (an earlier job's local Ray, a caller's) has GPUs or has not.
    """
    if ray.is_initialized():
        return spec.resolve(has_gpus=ray.cluster_resources().get("GPU", 0) > 0)
    joins_cluster = bool(spec.ray_address or os.environ.get("RAY_ADDRESS"))
    return spec.resolve(has_gpus=joins_cluster or torch.cuda.is_available())


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def handle_sigterm_as_interrupt() -> object:
    """`ray job stop` sends SIGTERM (then SIGKILL 3 s later): handled as Ctrl-C, so the lock is released.
    Returns the previous handler; does nothing off the main thread, where signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def sigterm_as_interrupt():
    previous = handle_sigterm_as_interrupt()
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Heartbeat:
    """Called by the pool while it waits: stops the job once the lease keeper has lost the output, and rewrites
    the manifest's progress now and then (renewing the lock is the keeper's, in every phase)."""

    def __init__(self, keeper: LeaseKeeper, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.keeper, self.interval_s, self.clock = keeper, interval_s, clock
        self.last = clock()
        self.write_manifest: Callable[[], None] | None = None

    def __call__(self) -> None:
        self.keeper.check()  # raises OutputLostError if another job took the output
        if self.write_manifest and self.clock() - self.last >= self.interval_s:
            try:
                self.write_manifest()
            except OutputLostError:
                raise
            except Exception as exc:  # a storage outage: progress is written again at the next interval
                if not is_transient(exc):
                    raise
                logger.warning("could not write the job's progress (%s: %s); trying again later",
                               type(exc).__name__, redact_text(str(exc)))
            self.last = self.clock()


RESUMES = "the job had started on the output: committed shards stay, and re-running the same command resumes"


class StoppedAfterStartError(RuntimeError):
    """An error that stopped the job after it had begun to change its output (deleted for --overwrite, written
    `_job.json`, finished or committed shards). Not bad input with nothing run: what was committed stays, and
    re-running the same command resumes. The error itself is chained as `__cause__`."""


@contextlib.contextmanager
def errors_after_start():
    """Raises what escapes as StoppedAfterStartError, except what has its own meaning here: the output lost, an
    interrupt, no workers, a systematic failure."""
    try:
        yield
    except (OutputLostError, NoWorkersError, SystematicFailureError):
        raise
    except Exception as exc:
        raise StoppedAfterStartError(RESUMES) from exc


PoolFactory = Callable[[JobSpec, dict, Fence, int], ActorPool]


def ray_pool(spec: JobSpec, sources: dict[str, ModelSource], fence: Fence, num_units: int) -> ActorPool:
    """The pool of ShardWorker actors on the Ray cluster the spec names (or a local one)."""
    connect_ray(spec.ray_address)
    handle_sigterm_as_interrupt()  # ray.init puts its own SIGTERM handler (a crash dump) in place of ours
    make_worker, num_workers = ray_worker_factory(spec, sources, fence)
    limits = PoolLimits(start_timeout_s=spec.start_timeout_s, unit_timeout_s=spec.unit_timeout_s)
    return ActorPool(make_worker, min(num_workers, num_units), spec.max_unit_attempts, limits)


def run_job(spec: JobSpec, make_pool: PoolFactory = ray_pool, show_progress: bool = True) -> JobProgress:
    """Runs `spec` to the end (or to Ctrl-C/SIGTERM) and returns its progress; `make_pool` lets tests inject
    workers or watch the pool.

    Raises for what stops a job before it runs: bad input or settings (exit 2), no worker in time (exit 3); what
    stops it once it has started on the output is raised as StoppedAfterStartError (exit 1: a re-run resumes). A
    job that loses its output to another job stops at once and returns with `progress.lost` (exit 4).
    """
    with sigterm_as_interrupt():
        protect_secrets(spec.storage_options)  # in what this process logs, and wherever redact_text is used
        spec = resolve_device(spec)
        input_fs, input_path = filesystem(spec.prompts, spec.storage_options)
        output_fs, root = filesystem(spec.output, spec.storage_options)
        check_output_location(input_fs, input_path, spec.output, output_fs, root)
        files = call_within(plan_timeout_s(), f"list and read the prompts at {spec.prompts}", list_input_files,
                            input_fs, input_path, spec.prompt_column)
        check_input_columns(files, input_columns(spec))
        units = plan_units(files, spec.rows_per_shard)
        inputs = input_fingerprint(files)
        logger.info("%d input files, %d rows, %d units", len(files), sum(f.num_rows for f in files), len(units))
        sources = model_sources(spec)
        check_output_apart_from_models(spec.output, output_fs, root, model_folders(sources), spec.storage_options)
        check_stages(spec, sources)
        identity = job_identity(spec, sources)

        check_conditional_writes(output_fs, root)
        lock = OutputLock(output_fs, root, lease_s=spec.lock_lease_s)
        lock.acquire()
        keeper = LeaseKeeper(lock).start()
        progress = JobProgress(total_units=len(units), samples_per_prompt=spec.samples_per_prompt,
                               total_samples=sum(unit.num_rows for unit in units) * spec.samples_per_prompt)
        try:
            manifests = ManifestWriter(output_fs, root, confirm_held=lock.refresh)  # a failed read releases the lock
            _run_locked(spec, make_pool, units, inputs, identity, sources, keeper, manifests, progress,
                        show_progress)
            keeper.check()
        except KeyboardInterrupt:
            progress.interrupted = True
            logger.warning("interrupted: committed shards stay, in-flight shards are left invisible")
        except OutputLostError as exc:
            progress.lost = True
            logger.error("%s", exc)
        finally:
            withdraw_resource_request()  # a long-lived cluster scales the job's GPU nodes down
            progress.close()
            keeper.stop()
            if keeper.error is not None and not progress.lost:
                progress.lost = True
                logger.error("%s", keeper.error)
            if not progress.lost:
                try:
                    if progress.manifest:
                        manifests.write(progress.manifest | {"progress": progress.summary()})
                    lock.release()
                except OutputLostError as exc:
                    progress.lost = True
                    logger.error("%s", exc)
                except Exception as exc:  # storage down at the very end: the lease runs out by itself
                    if not is_transient(exc):
                        if progress.manifest:
                            raise StoppedAfterStartError(RESUMES) from exc
                        raise
                    logger.error("could not write the final progress or release the lock on %s (%s: %s); "
                                 "the next job takes the output once the lease has run out", root,
                                 type(exc).__name__, redact_text(str(exc)))
    return progress


def _run_locked(spec, make_pool, units, inputs, identity, sources, keeper: LeaseKeeper, manifests: ManifestWriter,
                progress: JobProgress, show_progress):
    output_fs, root = filesystem(spec.output, spec.storage_options)
    store = ShardStore(output_fs, root)
    existing = None if spec.overwrite else read_manifest(output_fs, root)
    if existing is not None:
        check_compatible(existing, identity, inputs)
    lineage = [*(existing or {}).get("lineage", []), keeper.lock.token]
    fence = Fence(keeper.lock.token, tuple(lineage), identity_digest(identity))
    committed = {} if spec.overwrite else store.committed(fence)
    todo = [unit for unit in units if unit.unit_id not in committed]
    progress.skip(units, todo)
    manifest = job_manifest(identity, inputs, lineage) | {
        "prompts": redact_text(spec.prompts),
        "storage_options": redact(spec.storage_options),
        "num_units": len(units),
    }
    if not todo:
        logger.info("all %d shards are committed: nothing to do", len(units))
        with errors_after_start():  # it may finish commits that a crash interrupted
            _recover(store, committed, units, todo, progress, keeper)
        if not todo:
            progress.manifest = manifest
            return
    if progress.skipped_units:
        logger.info("resuming: %d of %d shards already committed", progress.skipped_units, len(units))

    heartbeat = Heartbeat(keeper, interval_s=keeper.lock.refresh_interval_s)
    pool = make_pool(spec, sources, fence, len(todo))
    metrics = JobMetrics(spec.output)  # once Ray is up (the pool started it): it exports them
    pool.events, keeper.on_renewed = metrics, metrics.lock_renewed
    if keeper.lock.took_over:
        metrics.lock_taken_over()
    metrics.progress(progress)
    try:
        pool.wait_until_ready(on_idle=heartbeat)  # a bad model or no capacity: nothing written yet
        keeper.check()
        with errors_after_start():  # from the first change to the output on, a re-run resumes
            if spec.overwrite:
                store.remove_outputs(still_held=keeper.holding)
            progress.manifest = manifest
            write_progress = lambda: manifests.write(manifest | {"progress": progress.summary()})  # noqa: E731
            write_progress()
            heartbeat.write_manifest = write_progress
            _recover(store, committed, units, todo, progress, keeper)

            def on_result(result: UnitResult) -> None:
                progress.record(result)
                metrics.unit_done(result.stats, progress)
                if result.error is not None:
                    logger.error("shard %s failed after %d tries: %s", result.unit.shard, spec.max_unit_attempts,
                                 redact_text(result.error))

            progress.start_bar(show_progress)

            def on_idle() -> None:
                heartbeat()
                progress.log_line()

            pool.run(todo, on_result, on_idle)
            keeper.check()
            _audit(store, fence, todo, progress)
    finally:
        pool.shutdown()  # waits until no worker can commit any more
        if progress.manifest and keeper.error is None:
            with errors_after_start():  # tries that won their marker as the job was stopped
                store.finish_interrupted(fence.token, still_held=keeper.holding)


def _recover(store: ShardStore, committed: dict, units: list, todo: list, progress: JobProgress,
             keeper: LeaseKeeper) -> None:
    """Finishes moves a crash interrupted; units whose committed files turned out to be gone join `todo`, and
    are no longer counted as committed before (each unit is counted once: skipped, done or failed). Stops with
    OutputLostError, before its next move or deletion, once the lease is lost."""
    finished, broken = store.recover(committed, still_held=keeper.holding)
    if finished:
        logger.info("finished %d commits that a crash had interrupted", finished)
    todo += [unit for unit in units if unit.unit_id in broken and unit not in todo]
    progress.skip(units, todo)


def _audit(store: ShardStore, fence: Fence, todo: list, progress: JobProgress) -> None:
    """After the last unit: every unit this run committed must still be committed with its files. One that is
    not (its marker replaced by a straggler of another run, its files deleted) is reported failed, never
    counted: a re-run does it again."""
    scan = store.scan(fence)
    found = scan.in_place | scan.pending
    failed = {result.unit.unit_id for result in progress.failed_units}
    for unit in todo:
        if unit.unit_id not in found and unit.unit_id not in failed:
            reason = "committed, then found without a valid marker or its files at the end of the run"
            logger.error("shard %s: %s; a re-run does it again", unit.shard, reason)
            progress.uncommit(unit, reason)
