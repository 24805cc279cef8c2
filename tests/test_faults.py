"""Faults mid-job: a worker killed, the driver interrupted and killed, a unit that keeps failing, a model that
fails for every prompt.

Each run must end with every prompt exactly once and data bytes identical to an uninterrupted run.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import fsspec
import pytest
import ray

from jobs import generate
from jobs.cli import exit_status
from jobs.main import main as instaflow_batch
from jobhelpers import data_files, metadata_rows, prompt_table, stats, write_prompts
from pipeline.commit import ShardStore
from pipeline.job import ray_pool, run_job
from pipeline.lock import lock_holder
from pipeline.pool import ActorPool
from pipeline.spec import JobSpec
from pipeline.storage import filesystem

NUM_PROMPTS = 48
FS = fsspec.filesystem("file")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "prompts.parquet"
    write_prompts(FS, str(path), prompt_table(NUM_PROMPTS), row_group_size=4)
    return path


def pairs_spec(prompts, tiny_models, output, **changes) -> JobSpec:
    """Teacher pairs at 25 DPM-Solver steps: slow enough on the CPU that faults land mid-unit."""
    return JobSpec(**{
        "prompts": str(prompts), "output": str(output), "tasks": ("pairs",), "teacher": str(tiny_models["sd15"]),
        "height": 64, "width": 64, "rows_per_shard": 4, "batch_size": 4, "num_workers": 2, "dtype": "float32",
        "lock_lease_s": 2.0, **changes,
    })


@pytest.fixture(scope="module")
def reference(ray_gpus, prompts, tiny_models, tmp_path_factory):
    """The uninterrupted run every faulty run is compared with."""
    output = tmp_path_factory.mktemp("reference")
    progress = run_job(pairs_spec(prompts, tiny_models, output), show_progress=False)
    assert progress.complete
    return data_files(FS, str(output))


def wait_for_markers(output, count: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(output.glob("*.stats.json"))) < count:
        assert time.monotonic() < deadline, f"fewer than {count} shards committed in {timeout_s}s"
        time.sleep(0.05)


def assert_exactly_once_and_identical(output, reference) -> None:
    rows = metadata_rows(FS, str(output))
    assert len(rows) == NUM_PROMPTS and len({row["key"] for row in rows}) == NUM_PROMPTS
    assert data_files(FS, str(output)) == reference


def started_job(spec: JobSpec, hold: threading.Event | None = None) -> tuple[threading.Thread, list[ActorPool], dict]:
    """The job running in a thread: the thread, the pools it made (to find its workers), and its result. With
    `hold`, the pool hands no unit to a worker that has said where it runs until `hold` is set."""
    pools, result = [], {}

    def watched_pool(*args):
        pool = ray_pool(*args)
        if hold is not None:
            on_probe = pool._on_probe

            def held(ref):
                on_probe(ref)  # the worker's pid is known now; its units are handed out after this returns
                hold.wait(timeout=240)

            pool._on_probe = held
        pools.append(pool)
        return pool

    job = threading.Thread(target=lambda: result.update(progress=run_job(spec, watched_pool, show_progress=False)))
    job.start()
    return job, pools, result


def test_killed_worker_unit_is_redone_elsewhere(ray_gpus, prompts, tiny_models, reference, tmp_path):
    spec = pairs_spec(prompts, tiny_models, tmp_path / "out")
    job, pools, result = started_job(spec)
    wait_for_markers(tmp_path / "out", 1)
    # Each worker holds two units while work is pending, so this kill lands in the middle of one. The worker is one
    # whose start was recorded: on a loaded machine another may commit before the first has said where it runs.
    os.kill(next(iter(pools[0].worker_info.values()))["pid"], signal.SIGKILL)
    job.join(timeout=300)
    assert result["progress"].complete
    assert any(shard["attempt"] > 1 for shard in stats(FS, str(tmp_path / "out")))
    assert_exactly_once_and_identical(tmp_path / "out", reference)


def test_interrupted_then_killed_driver_resumes(ray_gpus, prompts, tiny_models, reference, tmp_path):
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "jobs.reflow_pairs", "--prompts", str(prompts), "--output", str(output),
        "--teacher", str(tiny_models["sd15"]), "--height", "64", "--width", "64", "--rows-per-shard", "4",
        "--batch-size", "4", "--num-workers", "2", "--no-progress", "--dtype", "float32", "--lock-lease", "2",
        "--ray-address", ray.get_runtime_context().gcs_address,
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}

    # Ctrl-C: the driver stops cleanly, exit status 130; every visible shard is complete.
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_markers(output, 1)
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, out.decode()[-3000:]
    for marker in output.glob("*.stats.json"):
        assert (output / marker.name.replace(".stats.json", ".parquet")).exists()
    assert len(list(output.glob("*.stats.json"))) < NUM_PROMPTS // 4
    assert lock_holder(FS, str(output)) is None

    # SIGTERM, as `ray job stop` sends it: the same clean stop, and the output is released at once.
    committed = len(list(output.glob("*.stats.json")))
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_markers(output, committed + 1)
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, out.decode()[-3000:]
    assert lock_holder(FS, str(output)) is None
    for marker in output.glob("*.stats.json"):
        assert (output / marker.name.replace(".stats.json", ".parquet")).exists()

    # kill -9: no clean-up at all; the lock it leaves behind is taken over once unchanged for its lease.
    committed = len(list(output.glob("*.stats.json")))
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_markers(output, committed + 1)
    driver.kill()
    driver.wait(timeout=60)
    assert (output / "_job.lock").exists()

    progress = run_job(pairs_spec(prompts, tiny_models, output), show_progress=False)
    assert progress.complete and progress.skipped_units > 0
    assert_exactly_once_and_identical(output, reference)


@ray.remote(num_cpus=0.1, max_restarts=-1)
class FailingWorker:
    """Stands in for ShardWorker: unit 1 always fails as a storage error would, the others commit a stand-in
    shard (the driver checks at the end that what was reported committed is there)."""

    def __init__(self, spec, sources, fence):
        self.store, self.fence = ShardStore(*filesystem(spec.output, spec.storage_options)), fence

    def describe(self):
        return {"pid": os.getpid()}

    def process(self, unit, attempt):
        if unit.unit_id == 1:
            raise OSError(f"simulated 503 Slow Down reading {unit.path}")
        stats = {"count": unit.num_rows, "successes": unit.num_rows, "failed": 0, "truncated": 0,
                 "timings": {"generate_s": 0.0}, "attempt": attempt}
        marker, committed_here = self.store.commit(unit.unit_id, {f"{unit.shard}.parquet": b"stand-in"}, stats,
                                                   self.fence)
        return marker | {"committed_by_this_try": committed_here}


def test_unit_failing_every_try_is_reported_and_the_rest_completes(ray_gpus, prompts, tiny_models, tmp_path):
    spec = pairs_spec(prompts, tiny_models, tmp_path / "out", max_unit_attempts=3)
    progress = run_job(spec, lambda spec, sources, fence, num_units: ActorPool(
        lambda index: FailingWorker.remote(spec, sources, fence), 2, 3), show_progress=False)
    assert not progress.complete
    assert progress.committed_units == NUM_PROMPTS // 4 - 1
    [failure] = progress.summary()["failed_shards"]
    assert failure["shard"] == "00001" and "simulated 503" in failure["error"]
    assert "00001" in progress.table()
    assert exit_status(progress) == 1


def test_a_model_that_fails_for_every_prompt_stops_the_job_and_commits_nothing(ray_gpus, prompts, tiny_models,
                                                                                tmp_path, capsys):
    """Its tokenizer gives ids the text encoder has no rows for (a tokenizer from another model): every call
    raises. No shard of failed rows may count as done: the job stops early with exit 1 and one line naming the
    error, verify is not OK, and a re-run tries again instead of skipping."""
    model = tmp_path / "mismatched"
    shutil.copytree(tiny_models["instaflow"], model)
    for name in ("vocab.json", "tokenizer.json"):
        path = model / "tokenizer" / name
        data = json.loads(path.read_text())
        vocab = data if name == "vocab.json" else data["model"]["vocab"]
        vocab.update({token: i + 10**6 for token, i in vocab.items() if not token.startswith("<|")})
        path.write_text(json.dumps(data))
    output = tmp_path / "out"
    command = ["--prompts", str(prompts), "--output", str(output), "--model", str(model), "--height", "64",
               "--width", "64", "--dtype", "float32", "--rows-per-shard", "4", "--batch-size", "4",
               "--num-workers", "2", "--max-unit-attempts", "2", "--no-progress"]
    for run in ("first", "re-run"):
        capsys.readouterr()
        started = time.monotonic()
        assert generate.main(command) == 1, run
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "stopped early" in errors[0] and "IndexError" in errors[0], (run, errors)
        assert "a bug" not in errors[0]  # a known outcome, not an unexpected exception
        assert time.monotonic() - started < 120
        assert not list(output.glob("*.stats.json")) and not list(output.glob("*.tar"))
    assert instaflow_batch(["verify", str(output)]) == 1


def encoder_processes(worker_pids) -> list:
    """The image encoder processes of the given workers."""
    import psutil

    found = []
    for pid in worker_pids:
        try:
            found += [child for child in psutil.Process(pid).children()
                      if "pipeline.encoders" in " ".join(child.cmdline())]
        except psutil.Error:  # the worker ended
            pass
    return found


def unread_input(process) -> int:
    """Bytes waiting in a process's standard input pipe (an encoder's tasks not read yet); 0 once it is gone."""
    import fcntl
    import termios

    try:
        fd = os.open(f"/proc/{process.pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)  # the same pipe; nothing is read
    except OSError:  # exited (a zombie has no descriptors)
        return 0
    try:
        waiting = bytearray(4)
        fcntl.ioctl(fd, termios.FIONREAD, waiting)
        return int.from_bytes(waiting, sys.byteorder)
    finally:
        os.close(fd)


def test_an_encoder_killed_mid_batch_fails_the_try_not_its_rows_and_nothing_is_left(ray_gpus, prompts, tiny_models,
                                                                                  tmp_path, caplog):
    """The kernel's OOM killer taking an encoder process while it encodes: the unit's try fails with EncoderLost
    and is redone, no row is committed as failed. After the job, with its workers killed, no encoder process and
    no shared memory of theirs is left (the blocks are memory files without a name in /dev/shm)."""
    import psutil

    # Two encoders per worker share each batch, so the one killed holds some of a unit's rows, not all of them
    # (a unit whose every row fails is retried whatever the cause).
    spec = JobSpec(prompts=str(prompts), output=str(tmp_path / "out"), model=str(tiny_models["instaflow"]),
                   height=64, width=64, image_format="png", rows_per_shard=8, batch_size=8, num_workers=2,
                   cpus_per_worker=2, dtype="float32", lock_lease_s=2.0)
    caplog.set_level(logging.WARNING, logger="pipeline.pool")
    dev_shm = set(os.listdir("/dev/shm"))
    hold = threading.Event()
    job, pools, result = started_job(spec, hold)

    def workers_encoders() -> list:
        return encoder_processes([info["pid"] for pool in pools for info in list(pool.worker_info.values())])

    stopped, killed = [], []
    try:
        deadline = time.monotonic() + 240
        while not (stopped := workers_encoders()):  # the first worker up, held before it gets a unit
            assert time.monotonic() < deadline, "the workers' encoders did not start"
            time.sleep(0.05)
        for process in stopped:
            process.suspend()
        hold.set()  # its units' batches now wait in the stopped encoders' pipes: the job cannot end without them
        while not (holding := [process for process in stopped if unread_input(process)]):
            assert time.monotonic() < deadline, "no batch reached the stopped encoders"
            time.sleep(0.05)
        holding[0].kill()
        killed.append(holding[0])
    finally:
        hold.set()
        for process in stopped:
            if process not in killed:
                with contextlib.suppress(psutil.Error):
                    process.resume()
    seen = {*stopped, *workers_encoders()}  # with the other worker's, and the killed one's replacement
    job.join(timeout=300)
    assert not job.is_alive() and result["progress"].complete
    rows = metadata_rows(FS, str(tmp_path / "out"))
    assert len(rows) == NUM_PROMPTS and all(row["status"] == "ok" for row in rows)
    assert any(shard["attempt"] > 1 for shard in stats(FS, str(tmp_path / "out")))
    # the pool's own lines: Ray logs an earlier test's failed task ("Unhandled error") whenever its result is freed
    pool_log = "\n".join(record.getMessage() for record in caplog.records if record.name == "pipeline.pool")
    assert "EncoderLost: the image encoder process exited" in pool_log and "GenerationError" not in pool_log

    def alive() -> list:
        def running(process) -> bool:
            try:
                return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False
        return [process.pid for process in seen if running(process)]

    deadline = time.monotonic() + 20  # the workers' ends (ray.kill) close their input; they exit on reading it
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive() and not [name for name in set(os.listdir("/dev/shm")) - dev_shm if name.startswith("psm_")]


def test_a_shard_redone_at_start_is_counted_once(ray_gpus, prompts, tiny_models, tmp_path, capsys):
    """A marker whose move a crash interrupted and whose files are gone does not count: its unit is redone, and
    counted as done now, not also as committed before (the job said 'incomplete', exit 1, with every shard
    committed)."""
    output = tmp_path / "out"
    job = ["run", "generate", "--prompts", str(prompts), "--output", str(output), "--model",
           str(tiny_models["instaflow"]), "--height", "64", "--width", "64", "--rows-per-shard", "16",
           "--num-workers", "1", "--no-progress"]
    assert instaflow_batch(job) == 0
    marker = json.loads((output / "00001.stats.json").read_text())
    for name in marker["files"]:
        (output / name).unlink()  # the files neither in place nor staged: a crash between marker and move, ...
    (output / marker["staging"]).mkdir(parents=True)  # ... whose staging folder is still there
    (output / marker["staging"] / "leftover").write_bytes(b"")
    capsys.readouterr()
    assert instaflow_batch(job) == 0
    progress = json.loads((output / "_job.json").read_text())["progress"]
    assert (progress["status"], progress["shards_committed_before"], progress["shards_committed_now"],
            progress["shards_failed"]) == ("complete", 2, 1, 0)
    assert instaflow_batch(["verify", str(output)]) == 0
