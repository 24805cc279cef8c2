"""The output lock and the conditional writes under it: local disk, S3 (moto enforces the preconditions), and
GCS's generation logic against a fake (no GCS emulator installs here)."""

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import pytest

from pipeline import storage
from pipeline.lock import (EXITED_HOLDER_GRACE_S, LOCK_NAME, LockRecord, OutputLock, OutputLockedError,
                           OutputLostError, lock_holder, machine_id)
from pipeline.storage import OutputError, PreconditionFailed, check_conditional_writes, conditional_store, put_atomic

LEASE_S = 2.0  # renewals every quarter of it: room for a loaded machine's stalls (two test processes)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """(fs, root) of an empty output on local disk or on moto's S3."""
    if request.param == "local":
        return fsspec.filesystem("file"), str(tmp_path / "out")
    s3 = request.getfixturevalue("s3")
    return s3.fs, f"{s3.bucket}/lock-{uuid.uuid4().hex}"


def test_conditional_writes_enforce_their_preconditions(output):
    fs, root = output
    store = conditional_store(fs)
    path = f"{root}/object.json"
    version = store.create(path, b"one")
    with pytest.raises(PreconditionFailed):
        store.create(path, b"two")
    assert store.read(path) == (b"one", version)
    newer = store.replace(path, b"three", version)
    with pytest.raises(PreconditionFailed):
        store.replace(path, b"four", version)  # the version it was read at is gone
    assert store.read(path) == (b"three", newer)


def test_a_live_holder_is_refused_and_a_released_lock_is_taken_at_once(output):
    fs, root = output
    first = OutputLock(fs, root, lease_s=LEASE_S)
    first.acquire()
    assert lock_holder(fs, root) == first.token
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(first.refresh_interval_s):
            first.refresh()

    beating = threading.Thread(target=heartbeat)
    beating.start()
    try:
        with pytest.raises(OutputLockedError, match="in use by another job"):
            OutputLock(fs, root, lease_s=LEASE_S).acquire()
    finally:
        stop.set()
        beating.join()
    first.release()
    assert lock_holder(fs, root) is None
    second = OutputLock(fs, root, lease_s=LEASE_S)
    started = time.monotonic()
    second.acquire()
    assert time.monotonic() - started < LEASE_S / 2  # released: no watching
    assert lock_holder(fs, root) == second.token


def test_a_stale_lock_is_taken_over_and_its_old_holder_stops(output):
    fs, root = output
    dead = OutputLock(fs, root, lease_s=LEASE_S)
    dead.acquire()  # and never renewed
    taker = OutputLock(fs, root, lease_s=LEASE_S)
    started = time.monotonic()
    taker.acquire()
    assert time.monotonic() - started >= LEASE_S  # judged on the taker's clock, over the holder's lease
    with pytest.raises(OutputLostError, match="lost the lock"):
        dead.refresh()
    dead.release()  # not ours any more: left alone
    assert lock_holder(fs, root) == taker.token


def test_a_holder_stopped_while_writing_its_lock_is_refused_not_waited_for(tmp_path, monkeypatch):
    """On a local disk a replace holds the path's guard (flock) for milliseconds; a driver stopped then (SIGSTOP, a
    suspended VM) keeps it, and its write lands when it wakes. A starter that finds the lock stale does not wait
    for it without end (it waited 180 s in chaos run 32046) and does not take the lock from under that write: it
    refuses, naming the holder, after GUARD_WAIT_S; once the writer is gone, the lock is taken over."""
    import signal

    monkeypatch.setattr(storage, "GUARD_WAIT_S", 0.5)
    fs, root = fsspec.filesystem("file"), str(tmp_path)
    holder = OutputLock(fs, root, lease_s=LEASE_S)
    holder.acquire()  # and never renewed
    writer = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; guard = open(sys.argv[1], 'a'); "
                               "fcntl.flock(guard, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               f"{root}/{LOCK_NAME}.guard"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "held\n"
        os.kill(writer.pid, signal.SIGSTOP)
        taker = OutputLock(fs, root, lease_s=LEASE_S)
        started = time.monotonic()
        with pytest.raises(OutputLockedError, match="stopped or hung in the middle of writing its lock"):
            taker.acquire()
        assert time.monotonic() - started < LEASE_S + 0.5 + 5
    finally:
        os.kill(writer.pid, signal.SIGCONT)
        writer.kill()
        writer.wait()
    taker.acquire()
    assert lock_holder(fs, root) == taker.token


def exited_process(reap: bool) -> subprocess.Popen:
    """A process that has exited: reaped (its pid is free) or a zombie (its parent has not waited for it)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    if reap:
        process.wait()
        return process
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{process.pid}/stat") as stat:
            if stat.read().rpartition(")")[2].split()[0] == "Z":
                return process
        time.sleep(0.05)
    raise AssertionError("the child never exited")


@pytest.mark.parametrize("reap", [True, False], ids=["exited", "zombie"])
def test_a_holder_that_exited_on_this_machine_is_taken_over_after_a_grace(output, reap):
    """A driver killed and run again on the same host resumes after a short grace, not the lease. The same dead
    pid recorded by another machine, or by a process of this one that lives, still gets its whole lease."""
    fs, root = output
    assert machine_id()
    gone = exited_process(reap)
    waited = []
    clock = lambda: sum(waited)  # noqa: E731 - a clock that moves only when the lock sleeps

    def hold(pid: int, machine: str) -> None:
        record = LockRecord(token=uuid.uuid4().hex, host="h", pid=pid, started="then", heartbeat=0, seq=0,
                            lease_s=60.0, machine=machine)
        put_atomic(fs, f"{root}/{LOCK_NAME}", record.to_bytes())

    expected = {"grace": EXITED_HOLDER_GRACE_S, "lease": 60.0}
    for pid, machine, watched in [(gone.pid, machine_id(), "grace"), (gone.pid, "another-boot/pid:[1]", "lease"),
                                  (os.getpid(), machine_id(), "lease"), (gone.pid, "", "lease")]:
        hold(pid, machine)
        waited.clear()
        taker = OutputLock(fs, root, lease_s=60.0, clock=clock, sleep=waited.append)
        taker.acquire()
        assert lock_holder(fs, root) == taker.token
        assert expected[watched] <= sum(waited) < expected[watched] + 1, (pid, machine)
    gone.wait()


def test_the_writers_clock_is_never_trusted(output):
    """A heartbeat stamped far in the future (a skewed clock) does not keep a dead lock alive."""
    fs, root = output
    record = LockRecord(token="skewed", host="elsewhere", pid=1, started="then", heartbeat=time.time() + 10**6,
                        seq=0, lease_s=LEASE_S)
    put_atomic(fs, f"{root}/{LOCK_NAME}", record.to_bytes())
    taker = OutputLock(fs, root, lease_s=LEASE_S)
    taker.acquire()
    assert lock_holder(fs, root) == taker.token


def test_a_lost_answer_is_recognised_as_our_own_write(output, monkeypatch):
    """The store applies a write, the answer is lost, the retry fails its precondition: still ours."""
    fs, root = output
    lock = OutputLock(fs, root, lease_s=LEASE_S)
    real_create, real_replace = type(lock.store).create, type(lock.store).replace

    def create_then_lose_answer(self, path, data):
        real_create(self, path, data)
        raise PreconditionFailed("retry of a create that had landed")

    def replace_then_lose_answer(self, path, data, version):
        real_replace(self, path, data, version)
        raise PreconditionFailed("retry of a replace that had landed")

    monkeypatch.setattr(type(lock.store), "create", create_then_lose_answer)
    lock.acquire()
    monkeypatch.setattr(type(lock.store), "replace", replace_then_lose_answer)
    lock.refresh()
    lock.refresh()
    monkeypatch.undo()
    lock.refresh()  # the version it adopted after each lost answer is the current one
    assert json.loads(fs.cat_file(f"{root}/{LOCK_NAME}"))["seq"] == 3


def test_a_file_that_is_not_a_lock_is_reported(output):
    fs, root = output
    put_atomic(fs, f"{root}/{LOCK_NAME}", b"garbage")
    with pytest.raises(OutputError, match="not a lock file"):
        OutputLock(fs, root, lease_s=LEASE_S).acquire()


def _race(root: str, endpoint: str | None, results, stop) -> None:
    """One starter of the race, in its own process: acquire, and if it wins, hold and renew until told."""
    if endpoint:
        import s3fs

        fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                               client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})
    else:
        fs = fsspec.filesystem("file")
    lock = OutputLock(fs, root, lease_s=LEASE_S)
    try:
        lock.acquire()
    except OutputLockedError:
        results.put("refused")
        return
    results.put("won")
    while not stop.wait(lock.refresh_interval_s):
        lock.refresh()
    lock.release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_many_starters_at_once_exactly_one_wins(where, tmp_path, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        root, endpoint = f"{s3.bucket}/race-{uuid.uuid4().hex}", s3.endpoint_url
    else:
        root, endpoint = str(tmp_path / "out"), None
    context = multiprocessing.get_context("spawn")
    results, stop = context.Queue(), context.Event()
    starters = [context.Process(target=_race, args=(root, endpoint, results, stop)) for _ in range(6)]
    for process in starters:
        process.start()
    try:
        outcomes = sorted(results.get(timeout=120) for _ in starters)
    finally:
        stop.set()
        for process in starters:
            process.join(timeout=60)
    assert outcomes == ["refused"] * 5 + ["won"]


class FakeGCS:
    """The gcsfs calls GCSConditionalStore and the probe make, with GCS's generation rules (0 means absent) and
    its answers: 412 for a generation that does not match, 400 Bad Request for one that is not an integer (which
    gcsfs raises as ValueError)."""

    protocol = ("gs", "gcs")
    _location = "https://storage.googleapis.com"

    class PreconditionError(Exception):
        code = 412

    def __init__(self):
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.generations = 0

    def split_path(self, path):
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def invalidate_cache(self, path=None):
        pass

    def info(self, path):
        if path not in self.objects:
            raise FileNotFoundError(path)
        return {"generation": self.objects[path][1]}

    def cat_file(self, path):
        return self.info(path) and self.objects[path][0]

    def call(self, method, url, uploadType, name, ifGenerationMatch, data, json_out):
        assert method == "POST" and url.endswith("/upload/storage/v1/b/bucket/o") and uploadType == "media"
        path = f"bucket/{name}"
        current = self.objects.get(path, (None, 0))[1]
        if not str(ifGenerationMatch).isdigit():
            raise ValueError(f"Bad Request: {path}\nInvalid argument ifGenerationMatch={ifGenerationMatch!r}")
        if int(ifGenerationMatch) != current:
            raise self.PreconditionError(f"412: generation {current}, not {ifGenerationMatch}")
        self.generations += 1
        self.objects[path] = (data, self.generations)
        return {"generation": str(self.generations)}

    def rm(self, path):
        self.info(path)
        del self.objects[path]


def test_gcs_generation_preconditions_against_a_fake():
    fs = FakeGCS()
    store = conditional_store(fs)
    assert isinstance(store, storage.GCSConditionalStore)
    first = OutputLock(fs, "bucket/out", lease_s=LEASE_S)
    first.acquire()
    with pytest.raises(PreconditionFailed):
        store.create("bucket/out/_job.lock", b"x")
    first.refresh()
    second = OutputLock(fs, "bucket/out", lease_s=LEASE_S)
    second.acquire()  # first stopped renewing: taken over after the lease
    with pytest.raises(OutputLostError):
        first.refresh()
    second.release()
    assert lock_holder(fs, "bucket/out") is None


def test_the_probe_uses_a_generation_gcs_can_compare():
    """A stale version of GCS's own type (an integer): a malformed one is a 400, which proves nothing."""
    fs = FakeGCS()
    check_conditional_writes(fs, "bucket/out")
    assert fs.objects == {} and fs.generations == 1  # one probe object, created once, then deleted
    careless = FakeGCS()
    careless.call = lambda *args, ifGenerationMatch, **kwargs: FakeGCS.call(careless, *args, ifGenerationMatch=(
        careless.objects.get(f"bucket/{kwargs['name']}", (None, 0))[1]), **kwargs)  # accepts any precondition
    with pytest.raises(OutputError, match="does not honour conditional writes"):
        check_conditional_writes(careless, "bucket/out")


def test_outputs_without_conditional_writes_are_refused():
    with pytest.raises(OutputError, match="conditional writes"):
        OutputLock(fsspec.filesystem("memory"), "/out")
