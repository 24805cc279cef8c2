"""Bounded waits: a hung unit, a cluster without room, workers that keep failing to start, a lost output."""

import json
import os
import sys
import threading
import time

import fsspec
import pytest
import ray
from ray import cloudpickle

from jobhelpers import prompt_table, write_prompts
from jobs import generate
from jobs.cli import exit_status
from pipeline.job import run_job
from pipeline.lock import LOCK_NAME, LockRecord, lock_holder
from pipeline.plan import WorkUnit
from pipeline.pool import ActorPool, NoWorkersError, PoolLimits
from pipeline.spec import JobSpec
from pipeline.storage import conditional_store

FS = fsspec.filesystem("file")
SIZE = ["--height", "64", "--width", "64", "--dtype", "float32"]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module


def stats_for(unit, attempt):
    return {"count": unit.num_rows, "successes": unit.num_rows, "failed": 0, "truncated": 0,
            "timings": {"generate_s": 0.0}, "attempt": attempt, "pid": os.getpid()}


@ray.remote(num_cpus=0.1, max_restarts=-1)
class HangsOnFirstTry:
    """Unit 1's first try never returns, as a hung kernel would not."""

    def describe(self):
        return {"pid": os.getpid()}

    def process(self, unit, attempt):
        if unit.unit_id == 1 and attempt == 1:
            time.sleep(3600)
        return stats_for(unit, attempt)


def units(n):
    return [WorkUnit(i, "in.parquet", 4 * i, 4, 4 * i) for i in range(n)]


def test_a_unit_past_its_deadline_gets_its_worker_restarted_and_is_retried(ray_gpus):
    results = []
    pool = ActorPool(lambda i: HangsOnFirstTry.remote(), 1, 3, PoolLimits(unit_timeout_s=2.0))
    started = time.monotonic()
    pool.run(units(3), results.append, poll_s=0.2)
    pool.shutdown()
    assert time.monotonic() - started < 60
    by_unit = {result.unit.unit_id: result for result in results}
    assert sorted(by_unit) == [0, 1, 2] and all(result.error is None for result in results)
    assert by_unit[1].stats["attempt"] == 2


@ray.remote(num_cpus=0.1, max_restarts=-1)
class NeverStarts:
    def __init__(self):
        raise RuntimeError("CUDA driver too old on this node")

    def describe(self):
        return {}


@ray.remote(num_cpus=0.1, max_restarts=-1)
class StartsOnThirdTry:
    """Fails to start twice (a flaky node), then works: the window must not end the job for it."""

    def __init__(self, counter_path):
        with open(counter_path, "a+") as f:
            f.seek(0)
            tries = len(f.read()) + 1
            f.write("x")
        if tries < 3:
            raise RuntimeError(f"flaky start {tries}")

    def describe(self):
        return {}

    def process(self, unit, attempt):
        return stats_for(unit, attempt)


def test_workers_that_keep_failing_to_start_are_given_up(ray_gpus, tmp_path):
    pool = ActorPool(lambda i: NeverStarts.remote(), 2, 3, PoolLimits(startup_failures=3, start_timeout_s=120))
    started = time.monotonic()
    with pytest.raises(NoWorkersError, match="CUDA driver too old"):
        pool.wait_until_ready(poll_s=0.2)
    assert time.monotonic() - started < 60
    pool.shutdown()

    results = []
    flaky = ActorPool(lambda i: StartsOnThirdTry.remote(str(tmp_path / f"tries-{i}")), 1, 3,
                      PoolLimits(startup_failures=3, start_timeout_s=120))
    flaky.run(units(2), results.append, poll_s=0.2)
    flaky.shutdown()
    assert [result.error for result in results] == [None, None]


def test_no_room_for_any_worker_ends_the_job_with_exit_3_and_writes_nothing(ray_gpus, tiny_models, tmp_path,
                                                                             capsys):
    write_prompts(FS, str(tmp_path / "prompts.parquet"), prompt_table(4))
    started = time.monotonic()
    status = generate.main(["--prompts", str(tmp_path / "prompts.parquet"), "--output", str(tmp_path / "out"),
                            "--model", str(tiny_models["instaflow"]), *SIZE, "--cpus-per-worker", "64",
                            "--start-timeout", "3", "--no-progress"])
    assert status == 3 and time.monotonic() - started < 60
    assert "no worker could start in" in capsys.readouterr().err
    assert not (tmp_path / "out" / "_job.json").exists()
    assert lock_holder(FS, str(tmp_path / "out")) is None  # released: the next try starts at once


@ray.remote(num_cpus=0.1, max_restarts=-1)
class SlowWorker:
    def describe(self):
        return {"pid": os.getpid()}

    def process(self, unit, attempt):
        time.sleep(0.3)
        return stats_for(unit, attempt)


def test_a_job_that_loses_its_output_stops_at_once_with_exit_4(ray_gpus, tiny_models, tmp_path):
    write_prompts(FS, str(tmp_path / "prompts.parquet"), prompt_table(80), row_group_size=4)
    output = tmp_path / "out"
    spec = JobSpec(prompts=str(tmp_path / "prompts.parquet"), output=str(output), model=str(tiny_models["instaflow"]),
                   height=64, width=64, rows_per_shard=4, dtype="float32", lock_lease_s=1.0)
    result = {}
    job = threading.Thread(target=lambda: result.update(progress=run_job(
        spec, lambda *args: ActorPool(lambda i: SlowWorker.remote(), 2, 3), show_progress=False)))
    job.start()
    while not (output / "_job.json").exists():
        time.sleep(0.05)
    # Another job takes the output over, as it may once this one looks stale to it.
    store = conditional_store(FS)
    data, version = store.read(str(output / LOCK_NAME))
    intruder = LockRecord(**{**json.loads(data), "token": "intruder", "host": "elsewhere", "seq": 0})
    store.replace(str(output / LOCK_NAME), intruder.to_bytes(), version)
    taken_at = time.monotonic()
    manifest_then = (output / "_job.json").read_bytes()
    job.join(timeout=60)
    progress = result["progress"]
    assert progress.lost and exit_status(progress) == 4
    assert time.monotonic() - taken_at < 5  # within a refresh interval, not at the end of the job
    assert progress.committed_units < 20
    assert lock_holder(FS, str(output)) == "intruder"  # the new owner's lock and manifest are left alone
    assert (output / "_job.json").read_bytes() == manifest_then
