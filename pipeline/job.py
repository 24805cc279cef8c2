"""The driver: plan the units, take the output, skip what is committed, run the pool, record the outcome.

Resuming is re-running: committed shards are found by their markers and skipped, the rest are done again, and the
result is the same as an uninterrupted run. A different spec on the same output is refused, as is a second live
job on it.
"""

import logging
import os
import time

import ray

from pipeline.commit import (
    ShardStore,
    acquire_lock,
    check_compatible,
    job_manifest,
    read_manifest,
    refresh_lock,
    release_lock,
    write_manifest,
)
from pipeline.plan import input_fingerprint, list_input_files, plan_units
from pipeline.pool import ActorPool, UnitResult, ray_worker_factory
from pipeline.progress import JobProgress
from pipeline.spec import JobSpec
from pipeline.storage import filesystem, redact

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30.0  # lock heartbeat and _job.json progress, well inside commit.LOCK_LEASE_S


def connect_ray(address: str | None) -> None:
    """Joins the cluster named by `address` or RAY_ADDRESS (Ray Jobs sets it), else starts a local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray listens on 127.0.0.1 only
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")


def run_job(spec: JobSpec, pool: ActorPool | None = None, show_progress: bool = True) -> JobProgress:
    """Runs `spec` to the end (or to Ctrl-C) and returns its progress; `pool` lets tests inject workers."""
    input_fs, input_path = filesystem(spec.prompts, spec.storage_options)
    output_fs, root = filesystem(spec.output, spec.storage_options)
    files = list_input_files(input_fs, input_path, spec.prompt_column)
    units = plan_units(files, spec.rows_per_shard)
    inputs = input_fingerprint(files)
    logger.info("%d input files, %d rows, %d units", len(files), sum(f.num_rows for f in files), len(units))

    token = acquire_lock(output_fs, root)
    store = ShardStore(output_fs, root)
    progress = JobProgress(total_units=len(units), total_samples=sum(unit.num_rows for unit in units))
    manifest = {}
    try:
        if spec.overwrite:
            store.remove_outputs()
        existing = read_manifest(output_fs, root)
        if existing is not None:
            check_compatible(existing, spec.identity(), inputs)
        manifest = job_manifest(spec.identity(), inputs) | {
            "storage_options": redact(spec.storage_options),
            "num_units": len(units),
        }
        committed = store.committed()
        todo = [unit for unit in units if unit.unit_id not in committed]
        progress.skipped_units = len(units) - len(todo)
        progress.skipped_samples = progress.total_samples - sum(unit.num_rows for unit in todo)
        write_manifest(output_fs, root, manifest | {"progress": progress.summary()})
        if progress.skipped_units:
            logger.info("resuming: %d of %d shards already committed", progress.skipped_units, len(units))
        if todo:
            heartbeat = lambda: _heartbeat(output_fs, root, token, manifest, progress)  # noqa: E731
            _run_units(spec, todo, pool, progress, heartbeat, show_progress)
    except KeyboardInterrupt:
        progress.interrupted = True
        logger.warning("interrupted: committed shards stay, in-flight shards are left invisible")
    finally:
        progress.close()
        if manifest:
            write_manifest(output_fs, root, manifest | {"progress": progress.summary()})
        release_lock(output_fs, root, token)
    return progress


def _run_units(spec, units, pool, progress: JobProgress, heartbeat, show_progress: bool) -> None:
    if pool is None:
        connect_ray(spec.ray_address)
        make_worker, num_workers = ray_worker_factory(spec)
        pool = ActorPool(make_worker, min(num_workers, len(units)), spec.max_unit_attempts)
    last_beat = time.monotonic()

    def on_idle() -> None:
        nonlocal last_beat
        if time.monotonic() - last_beat >= HEARTBEAT_S:
            heartbeat()
            last_beat = time.monotonic()

    def on_result(result: UnitResult) -> None:
        progress.record(result)
        if result.error is not None:
            logger.error("shard %s failed after %d tries: %s", result.unit.shard, spec.max_unit_attempts, result.error)
        on_idle()

    progress.start_bar(show_progress)
    try:
        pool.run(units, on_result, on_idle)
    finally:
        pool.shutdown()


def _heartbeat(fs, root: str, token: str, manifest: dict, progress: JobProgress) -> None:
    refresh_lock(fs, root, token)
    write_manifest(fs, root, manifest | {"progress": progress.summary()})
