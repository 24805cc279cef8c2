"""Bounded waits: a hung unit, a worker that does not die when killed, a fresh worker's warm-up, a cluster without
room, workers that keep failing to start, a lost output, a job whose models fail for every unit."""

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
from pipeline.pool import ActorPool, NoWorkersError, PoolLimits, SystematicFailureError
from pipeline.spec import JobSpec
from pipeline.storage import conditional_store
from pipeline.unit_deadlines import UnitDeadlines
from pipeline.worker import GenerationError

FS = fsspec.filesystem("file")
SIZE = ["--height", "64", "--width", "64", "--dtype", "float32"]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module


def stats_for(unit, attempt):
    return {"count": unit.num_rows, "successes": unit.num_rows, "failed": 0, "truncated": 0,
            "timings": {"generate_s": 0.0}, "attempt": attempt, "pid": os.getpid()}


@ray.remote(num_cpus=0.1, max_restarts=-1)
class HangsOnFirstTry:
    """Each process warms up (`warm_up_s`, as torch.compile does on the first batches); then unit 1's first try
    never returns, as a hung kernel would not. One call at a time: a second waits behind the first."""

    def __init__(self, warm_up_s=0.0):
        self.warm_up_s = warm_up_s

    def describe(self):
        return {"pid": os.getpid()}

    def process(self, unit, attempt):
        time.sleep(self.warm_up_s)
        self.warm_up_s = 0.0
        if unit.unit_id == 1 and attempt == 1:
            time.sleep(3600)
        return stats_for(unit, attempt)


def units(n):
    return [WorkUnit(i, "in.parquet", 4 * i, 4, 4 * i) for i in range(n)]


def by_unit(results) -> dict:
    return {result.unit.unit_id: result for result in results}


def test_a_unit_past_its_deadline_gets_its_worker_restarted_and_is_retried(ray_gpus):
    """Units take no time but the worker's warm-up (1.5 s), longer than the unit timeout (1 s): a fresh worker's
    first units get the warm-up allowance, the restarted one's too. Unit 2, waiting behind the hung unit 1 when
    the worker is killed, is requeued without losing a try."""
    results = []
    # the warm-up allowance covers an actor's start on a loaded machine (two test processes) and its 1.5 s
    limits = PoolLimits(unit_timeout_s=1.0, warmup_timeout_s=10.0)
    pool = ActorPool(lambda i: HangsOnFirstTry.remote(warm_up_s=1.5), 1, 2, limits)
    started = time.monotonic()
    pool.run(units(4), results.append, poll_s=0.2)
    pool.shutdown()
    assert time.monotonic() - started < 60
    assert sorted(by_unit(results)) == [0, 1, 2, 3] and all(result.error is None for result in results)
    assert {unit: result.stats["attempt"] for unit, result in by_unit(results).items()} == {0: 1, 1: 2, 2: 1, 3: 1}
    assert len({result.stats["pid"] for result in results}) == 2  # the one restart, for unit 1


def test_a_killed_worker_whose_calls_never_end_is_replaced(ray_gpus, monkeypatch):
    """A process in uninterruptible sleep (a GPU fault) does not die when killed, and Ray never answers its calls:
    the pool stops waiting for them after `abandon_after_kill_s` and puts a fresh worker in its place."""
    real_kill = ray.kill
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: no_restart and real_kill(actor, no_restart=True))
    made, results = [], []

    def make_worker(index):
        made.append(HangsOnFirstTry.remote())
        return made[-1]

    limits = PoolLimits(unit_timeout_s=1.0, warmup_timeout_s=5.0, abandon_after_kill_s=1.0)
    pool = ActorPool(make_worker, 1, 3, limits)
    run = threading.Thread(target=pool.run, args=(units(3), results.append), kwargs={"poll_s": 0.2}, daemon=True)
    run.start()
    run.join(timeout=60)
    assert not run.is_alive(), "the pool still waits for the calls of a worker that was killed"
    pool.shutdown()
    assert len(made) == 2
    assert all(result.error is None for result in results) and by_unit(results)[1].stats["attempt"] == 2


@ray.remote(num_cpus=0.1, max_restarts=-1)
class FailsInGeneration:
    """A worker whose models fail for every row (`broken`), as a model that raises on every call does."""

    def __init__(self, broken):
        self.broken = broken

    def describe(self):
        return {"pid": os.getpid()}

    def process(self, unit, attempt):
        if self.broken:
            time.sleep(0.2)
            raise GenerationError("generation failed: IndexError: index out of range in self (and every other row)")
        return stats_for(unit, attempt)


def test_units_that_fail_in_generation_everywhere_stop_the_job_early(ray_gpus):
    results = []
    pool = ActorPool(lambda i: FailsInGeneration.remote(True), 2, 2)
    with pytest.raises(SystematicFailureError, match="stopped early: 3 shards failed .* IndexError"):
        pool.run(units(20), results.append, poll_s=0.2)
    pool.shutdown()
    assert len(results) == 3 and all("IndexError" in result.error for result in results)


def test_a_unit_that_fails_in_generation_on_one_worker_is_retried_on_another(ray_gpus):
    """One bad GPU: each unit it fails goes to the other worker, which commits it; the job does not stop."""
    results = []
    pool = ActorPool(lambda i: FailsInGeneration.remote(i == 0), 2, 2)
    pool.start()
    ray.get([worker.describe.remote() for worker in pool.workers])
    pool.run(units(8), results.append, poll_s=0.2)
    pool.shutdown()
    assert sorted(by_unit(results)) == list(range(8)) and all(result.error is None for result in results)


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


def test_deadlines_wait_in_order_allow_for_warm_up_and_charge_only_the_overdue_try():
    """No Ray: a fake clock. A fresh worker's tries get the warm-up allowance and are not measured; a try queued
    behind another is due after it; a kill charges the oldest overdue try only."""
    now = [0.0]
    deadlines = UnitDeadlines(PoolLimits(unit_timeout_s=None, first_units_timeout_s=100.0, warmup_timeout_s=50.0,
                                         units_to_measure=1), lambda: now[0])
    unit = units(1)[0]
    deadlines.on_worker_started(0)
    first = deadlines.start(0, unit, [])
    second = deadlines.start(0, unit, [first])
    assert (first.deadline, second.deadline) == (150.0, 250.0)
    now[0] = 70.0
    deadlines.on_committed(first)  # 70 s with its warm-up: not a measure of a unit's time
    assert deadlines.unit_timeout_s(unit) == 100.0
    warm = deadlines.start(0, unit, [second])
    assert warm.deadline == 350.0 and not warm.on_cold_worker
    now[0] = 72.0
    deadlines.on_committed(warm)  # 2 s for 4 rows, warm: measured
    assert deadlines.unit_timeout_s(unit) == 60.0 + 10 * 0.5 * 4
    in_flight = {"second": second, "next": deadlines.start(0, unit, [second])}
    now[0] = 251.0
    [(index, culprit)] = deadlines.overdue(in_flight)
    assert index == 0 and culprit is second and second.charged and not in_flight["next"].charged
    assert deadlines.overdue(in_flight) == []  # killed once
    now[0] = 251.0 + PoolLimits().abandon_after_kill_s + 1
    assert deadlines.abandoned(in_flight) == {0: ["second", "next"]}
