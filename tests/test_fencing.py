"""Commits that must never count without their data, and manifests only the holder writes (issue: nothing silently
wrong, part 1). Each test interleaves an old run's straggler with the next run through the public store API, on
local disk and on moto's S3."""

from __future__ import annotations

import copy
import errno
import hashlib
import fcntl
import json
import os
import re
import threading
import time
from contextlib import nullcontext
from typing import Callable, ContextManager

import fsspec
import pytest

from jobhelpers import prompt_table, write_prompts
from jobs import cli
from jobs.main import main
from pipeline import commit, job, storage
from pipeline.commit import BrokenCommitError, Fence, ShardStore, committed_shards
from pipeline.job import _audit
from pipeline.lock import LeaseKeeper, OutputLock, OutputLockedError, OutputLostError, lock_holder
from pipeline.manifest import ManifestWriter, job_manifest, read_manifest
from pipeline.plan import WorkUnit
from pipeline.pool import UnitResult
from pipeline.progress import JobProgress
from pipeline.storage import OutputError, check_conditional_writes, get_bytes, put_atomic


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return fsspec.filesystem("file"), str(tmp_path / "out")
    s3 = request.getfixturevalue("s3")
    return storage.filesystem(s3.url(f"fence-{os.urandom(4).hex()}"), s3.storage_options)


def take_over(fs, root, old: OutputLock) -> tuple[OutputLock, Fence]:
    """The next run takes the output from `old` (as after its lease ran out) and resumes its lineage."""
    old.release()
    new = OutputLock(fs, root, lease_s=5)
    new.acquire()
    return new, Fence(new.token, (old.token, new.token), "spec-1")


def lease_holds() -> ContextManager[None]:
    """The driver's lease, where losing it is not what a test is about."""
    return nullcontext()


def old_run(fs, root) -> tuple[OutputLock, Fence]:
    lock = OutputLock(fs, root, lease_s=5)
    lock.acquire()
    return lock, Fence(lock.token, (lock.token,), "spec-1")


def write_job(fs, root, fence: Fence) -> None:
    storage.put_atomic(fs, f"{root}/_job.json", json.dumps(job_manifest({}, [], list(fence.lineage))
                                                           | {"identity": fence.identity}).encode())


def test_a_straggler_whose_staging_was_cleaned_up_never_makes_its_unit_count(output, monkeypatch):
    """The old run's try passes its fence check; the next run takes over and deletes staging without markers;
    then the straggler creates its marker. The marker must not count, and the next run's try of the unit
    commits its own data in its place."""
    fs, root = output
    old, old_fence = old_run(fs, root)
    store = ShardStore(fs, root)
    state = {}
    real_holder = commit.lock_holder

    def holder_then_takeover(fs_, root_):
        token = real_holder(fs_, root_)
        if "new" not in state:  # between the straggler's fence check and its claim
            state["new"] = take_over(fs, root, old)
            new_store = ShardStore(fs, root)
            assert new_store.committed(state["new"][1]) == {}
            new_store.recover({}, still_held=lease_holds)  # deletes every staged try that has no marker: the straggler's
        return token

    monkeypatch.setattr(commit, "lock_holder", holder_then_takeover)
    with pytest.raises(BrokenCommitError):
        store.commit(7, {"00007.tar": b"straggler"}, {"count": 1}, old_fence)
    monkeypatch.undo()
    new, new_fence = state["new"]
    write_job(fs, root, new_fence)
    assert fs.exists(f"{root}/00007.stats.json")  # the straggler's marker is there ...
    scan = ShardStore(fs, root).scan(new_fence)
    assert list(scan.broken) == [7] and not scan.in_place and not scan.pending  # ... and does not count
    assert committed_shards(fs, root) == {}
    marker, won = ShardStore(fs, root).commit(7, {"00007.tar": b"redone"}, {"count": 1}, new_fence)
    assert won and marker["fence"]["token"] == new.token
    assert get_bytes(fs, f"{root}/00007.tar") == b"redone" and list(committed_shards(fs, root)) == [7]


def test_a_try_that_finds_a_winner_without_files_replaces_it(output):
    fs, root = output
    lock, fence = old_run(fs, root)
    store = ShardStore(fs, root)
    store.commit(2, {"00002.tar": b"first"}, {"count": 1}, fence)
    fs.rm(f"{root}/00002.tar")  # its data lost after the commit
    assert store.scan(fence).broken.keys() == {2}
    marker, won = store.commit(2, {"00002.tar": b"again"}, {"count": 1}, fence)
    assert won and get_bytes(fs, f"{root}/00002.tar") == b"again" and store.scan(fence).in_place.keys() == {2}


def test_a_straggler_cannot_replace_the_marker_of_the_run_that_took_over(output, monkeypatch):
    fs, root = output
    old, old_fence = old_run(fs, root)
    real_holder = commit.lock_holder
    calls = []

    def holder_then_takeover_and_commit(fs_, root_):
        token = real_holder(fs_, root_)
        if not calls:
            calls.append("taking over")
            new, new_fence = take_over(fs, root, old)
            fresh = Fence(new.token, (new.token,), "spec-2")  # an --overwrite with other settings
            calls.append(ShardStore(fs, root).commit(4, {"00004.tar": b"new settings"}, {}, fresh))
        return token

    monkeypatch.setattr(commit, "lock_holder", holder_then_takeover_and_commit)
    with pytest.raises(OutputLostError):
        ShardStore(fs, root).commit(4, {"00004.tar": b"old settings"}, {}, old_fence)
    marker, _ = calls[1]
    assert json.loads(get_bytes(fs, f"{root}/00004.stats.json"))["fence"] == marker["fence"]
    assert get_bytes(fs, f"{root}/00004.tar") == b"new settings"


@pytest.mark.parametrize("planted", [
    {"staging": "../../victim-dir", "files": {"00003.tar": {"bytes": 6}}},
    {"files": {"../victim.tar": {"bytes": 6}}},
    {"files": {"/tmp/victim.tar": {"bytes": 6}}},
    {"files": {"00004.tar": {"bytes": 6}}},  # another shard's file
    {"staging": "_staging/../../victim-dir", "files": {"00003.tar": {"bytes": 6}}},
])
def test_a_planted_marker_cannot_name_paths_outside_its_shard(tmp_path, planted):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    lock, fence = old_run(fs, root)
    victim = tmp_path / "victim.tar"
    victim.write_bytes(b"victim")
    (tmp_path / "victim-dir").mkdir()
    (tmp_path / "victim-dir" / "00003.tar").write_bytes(b"victim")
    try_id = "0" * 32
    marker = {"fence": {"token": lock.token, "identity": "spec-1", "try": try_id},
              "staging": f"_staging/{lock.token}/00003-{try_id}"} | planted
    put_atomic(fs, f"{root}/00003.stats.json", json.dumps(marker).encode())
    store = ShardStore(fs, root)
    assert store.committed(fence) == {}
    assert store.read_markers([3])[3]["invalid"]
    won_marker, won = store.commit(3, {"00003.tar": b"honest"}, {}, fence)
    assert won and get_bytes(fs, f"{root}/00003.tar") == b"honest"
    assert victim.read_bytes() == b"victim" and (tmp_path / "victim-dir" / "00003.tar").read_bytes() == b"victim"


def test_readers_see_a_shard_only_once_its_files_are_in_place(output, monkeypatch):
    fs, root = output
    lock, fence = old_run(fs, root)
    write_job(fs, root, fence)
    store = ShardStore(fs, root)
    monkeypatch.setattr(commit, "move", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        store.commit(5, {"00005.tar": b"data", "images/00005.parquet": b"meta"}, {"count": 1}, fence)
    monkeypatch.undo()
    assert committed_shards(fs, root) == {}  # marker there, files staged: not readable yet
    assert list(store.committed(fence)) == [5]  # but the driver skips it and finishes the move
    assert store.recover(store.committed(fence), still_held=lease_holds) == (1, [])
    assert list(committed_shards(fs, root)) == [5]


def test_only_the_holder_writes_the_manifest(output):
    fs, root = output
    old, old_fence = old_run(fs, root)
    old_writer = ManifestWriter(fs, root, confirm_held=old.refresh)
    old_writer.write({"lineage": [old.token], "who": "old"})
    new, _ = take_over(fs, root, old)
    old.record.state = "held"  # the old driver still believes it holds the output
    new_writer = ManifestWriter(fs, root, confirm_held=new.refresh)
    old_writer.write({"lineage": [old.token], "who": "old, late"})  # before the new job's first write
    new_writer.write({"lineage": [old.token, new.token], "who": "new"})  # wins over the stale write
    with pytest.raises(OutputLostError):
        old_writer.write({"lineage": [old.token], "who": "old, restoring its spec"})
    assert read_manifest(fs, root)["who"] == "new"
    new_writer.write({"lineage": [old.token, new.token], "who": "new, progress"})
    assert read_manifest(fs, root)["who"] == "new, progress"
    fs.rm(f"{root}/_job.json")  # as --overwrite removes the old output
    new_writer.write({"lineage": [new.token], "who": "new, after removing the old output"})
    assert read_manifest(fs, root)["who"] == "new, after removing the old output"


def test_the_lease_keeper_renews_in_every_phase_and_rides_out_a_short_outage(tmp_path, monkeypatch):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    lock = OutputLock(fs, root, lease_s=4.0)  # renewed each second: room for a loaded machine's stalls
    lock.acquire()
    keeper = LeaseKeeper(lock, retry_s=0.05).start()
    time.sleep(2.5)  # the driver busy elsewhere (listing, ray.init, recover): the keeper renews meanwhile
    assert lock.record.seq >= 2
    real_replace, outage = lock.store.replace, {"until": time.monotonic() + 2.0}

    def flaky_replace(*args, **kwargs):
        if time.monotonic() < outage["until"]:
            raise ConnectionError("storage unreachable")
        return real_replace(*args, **kwargs)

    monkeypatch.setattr(lock.store, "replace", flaky_replace)
    seq = lock.record.seq
    time.sleep(3.2)
    keeper.check()  # an outage shorter than the lease is ridden out
    assert lock.record.seq > seq
    outage["until"] = time.monotonic() + 20  # longer than the lease: the output is given up, with the reason
    time.sleep(5.0)
    with pytest.raises(OutputLostError, match="could not renew the lock.*ConnectionError"):
        keeper.check()
    keeper.stop()


def test_the_audit_reports_a_unit_whose_commit_did_not_hold(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    lock, fence = old_run(fs, root)
    store = ShardStore(fs, root)
    units = [WorkUnit(unit_id=i, path="p.parquet", first_row=i, num_rows=1, first_key_index=i) for i in range(2)]
    progress = JobProgress(total_units=2, total_samples=2)
    for unit in units:
        marker, _ = store.commit(unit.unit_id, {f"{unit.shard}.tar": b"x"}, {"count": 1}, fence)
        progress.committed_units += 1
    fs.rm(f"{root}/00001.tar")
    _audit(store, fence, units, progress)
    assert not progress.complete and [r.unit.unit_id for r in progress.failed_units] == [1]


def test_a_store_that_ignores_conditional_writes_is_refused(s3, monkeypatch):
    fs, root = storage.filesystem(s3.url("ignores-conditions"), s3.storage_options)
    check_conditional_writes(fs, root)  # moto honours them
    assert not [p for p in fs.find(root)]  # the probe cleans up after itself
    real_pipe = fs.pipe_file

    def careless_pipe(path, data, mode="overwrite", **kwargs):
        kwargs.pop("IfMatch", None)
        return real_pipe(path, data, **kwargs)  # as stores that accept the headers and ignore them

    monkeypatch.setattr(fs, "pipe_file", careless_pipe)
    with pytest.raises(OutputError, match="does not honour conditional writes") as refused:
        check_conditional_writes(fs, root)
    assert s3.endpoint_url in str(refused.value) and "testing" not in str(refused.value)


def test_the_probe_uses_an_etag_s3_can_compare(s3, monkeypatch):
    """S3 answers a malformed If-Match with 400 (moto with 412): the probe's stale ETag is a well-formed one."""
    fs, root = storage.filesystem(s3.url("well-formed"), s3.storage_options)
    real_pipe, sent = fs.pipe_file, []

    def strict_pipe(path, data, **kwargs):
        if "IfMatch" in kwargs:
            sent.append(kwargs["IfMatch"])
            if not re.fullmatch(r'"[0-9a-f]{32}(-\d+)?"', kwargs["IfMatch"]):
                raise OSError(errno.EINVAL, f"400 Bad Request: If-Match {kwargs['IfMatch']!r} is not an ETag")
        return real_pipe(path, data, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", strict_pipe)
    check_conditional_writes(fs, root)
    assert len(sent) == 1 and not fs.find(root)


def test_a_disk_where_flock_is_a_no_op_is_refused(tmp_path, monkeypatch):
    fs = fsspec.filesystem("file")
    check_conditional_writes(fs, str(tmp_path / "out"))
    monkeypatch.setattr(fcntl, "flock", lambda *args: None)
    with pytest.raises(OutputError, match="flock"):
        check_conditional_writes(fs, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def visible_unclaimed(fs, root, fence: Fence, before: set[str]) -> list[str]:
    """Data files a globbing reader sees that no counted marker (in place or pending) claims, other than those
    in `before` (files no marker claimed to begin with)."""
    fs.invalidate_cache()
    scan = ShardStore(fs, root).scan(fence)
    claimed = {name for marker in [*scan.in_place.values(), *scan.pending.values()] for name in marker["files"]}
    visible = {path[len(root) + 1:] for path in fs.find(root) if path.endswith((".tar", ".parquet"))
               and not path[len(root) + 1:].startswith("_")}
    return sorted(visible - claimed - before)


@pytest.mark.parametrize("cut_after", [*range(12), 100])
def test_an_overwrite_cut_short_leaves_no_visible_file_unclaimed(output, cut_after, monkeypatch):
    """--overwrite's removal is a commit in reverse: killed after any number of its moves and deletes, every
    shard file still visible is claimed by its marker, the project's readers show only whole shards, and the next
    removal (or a re-run of the old job) finishes the job."""
    fs, root = output
    lock, fence = old_run(fs, root)
    write_job(fs, root, fence)
    store = ShardStore(fs, root)
    for unit_id in range(3):
        store.commit(unit_id, {f"{unit_id:05d}.tar": b"t" * (unit_id + 1), f"{unit_id:05d}.parquet": b"p"}, {}, fence)
    put_atomic(fs, f"{root}/00009.tar", b"an orphan no marker claims")
    steps = {"n": 0}

    def counted(real):
        def step(*args, **kwargs):
            if steps["n"] >= cut_after:
                raise KeyboardInterrupt("killed")
            steps["n"] += 1
            return real(*args, **kwargs)
        return step

    monkeypatch.setattr(commit, "move", counted(commit.move))
    monkeypatch.setattr(commit, "with_retries", counted(commit.with_retries))
    try:
        ShardStore(fs, root).remove_outputs(still_held=lease_holds)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert visible_unclaimed(fs, root, fence, {"00009.tar"}) == []
    for unit_id, marker in committed_shards(fs, root).items() if fs.exists(f"{root}/_job.json") else ():
        for name in marker["files"]:
            assert fs.exists(f"{root}/{name}"), (unit_id, name)
    markers_left = [u for u in range(3) if fs.exists(f"{root}/{u:05d}.stats.json")]
    if len(markers_left) == 3 and fs.exists(f"{root}/_job.json"):  # the removal had not reached the markers:
        assert ShardStore(fs, root).recover(ShardStore(fs, root).committed(fence), still_held=lease_holds)[1] == []
        assert sorted(committed_shards(fs, root)) == [0, 1, 2]  # the old job, re-run, moves its shards in again
    ShardStore(fs, root).remove_outputs(still_held=lease_holds)
    fs.invalidate_cache()
    assert sorted(p[len(root) + 1:] for p in fs.find(root)) == ["_job.lock"]
    lock.release()


class PausedDriver:
    """An old driver holding the output, its lease kept by a LeaseKeeper (thread started, as in a job) on a clock
    the test moves. `pause()` is a GC pause or a suspended VM longer than the lease: the clock jumps, the keeper's
    thread sleeps through it, and meanwhile a new job takes the lock over, stages a try and commits a shard of its
    own with other settings (an --overwrite run) of the same size as the old one's."""

    LEASE_S = 600.0  # the keeper's thread would wake only after 75 s: only check() can notice the pause

    def __init__(self, fs, root):
        self.fs, self.root, self.offset = fs, root, [0.0]
        self.lock = OutputLock(fs, root, lease_s=self.LEASE_S)
        self.lock.acquire()
        self.fence = Fence(self.lock.token, (self.lock.token,), "spec-1")
        self.keeper = LeaseKeeper(self.lock, clock=self.clock).start()
        self.new: dict = {}

    def clock(self) -> float:
        return time.monotonic() + self.offset[0]

    def pause(self) -> None:
        self.offset[0] += 2 * self.LEASE_S
        jump = lambda seconds: self.offset.__setitem__(0, self.offset[0] + self.LEASE_S)  # noqa: E731
        new = OutputLock(self.fs, self.root, lease_s=self.LEASE_S, clock=self.clock, sleep=jump)
        new.acquire()  # watches the old lock for a lease of its clock, sees no renewal, takes it over
        assert new.took_over
        fence = Fence(new.token, (new.token,), "spec-2")
        staged = f"{self.root}/_staging/{new.token}/00004-{'e' * 32}/00004.tar"
        put_atomic(self.fs, staged, b"staged by the new job")
        marker, won = ShardStore(self.fs, self.root).commit(0, {"00000.tar": b"new job's"}, {}, fence)
        assert won
        self.new = {"staged": staged, "marker": marker}

    def assert_new_job_untouched(self) -> None:
        fs, root = self.fs, self.root
        fs.invalidate_cache()
        assert get_bytes(fs, self.new["staged"]) == b"staged by the new job"
        assert json.loads(get_bytes(fs, f"{root}/00000.stats.json"))["fence"] == self.new["marker"]["fence"]
        assert get_bytes(fs, f"{root}/00000.tar") == b"new job's"

    def stop(self) -> None:
        self.keeper.stop()


def test_a_renewal_answered_before_a_pause_does_not_count_after_it(output):
    """A driver paused between sending a renewal and reading its answer (chaos run 31008: it woke and deleted a
    batch of files another job then owned): the renewal counts from when it was sent, so the driver's next check
    renews again, finds the lock taken over and stops."""
    fs, root = output
    driver = PausedDriver(fs, root)
    try:
        refresh = driver.lock.refresh

        def answered_then_paused():
            refresh()
            driver.lock.refresh = refresh
            driver.pause()  # the clock jumps past the lease; the new job takes the lock over

        driver.lock.refresh = answered_then_paused
        driver.offset[0] += 2 * driver.lock.refresh_interval_s  # due for a renewal: check() sends it
        driver.keeper.check()
        with pytest.raises(OutputLostError):
            driver.keeper.check()
        driver.assert_new_job_untouched()
    finally:
        driver.stop()


def test_a_driver_paused_between_acquiring_and_keeping_its_lease_stops_at_its_first_check(output):
    """Paused after acquire's answer and before its lease keeper started, past the lease: another job took the
    output over meanwhile, and the keeper's first check says so."""
    fs, root = output
    offset = [0.0]
    clock = lambda: time.monotonic() + offset[0]  # noqa: E731
    lock = OutputLock(fs, root, lease_s=PausedDriver.LEASE_S)
    lock.acquire()
    offset[0] += 2 * PausedDriver.LEASE_S
    jump = lambda seconds: offset.__setitem__(0, offset[0] + PausedDriver.LEASE_S)  # noqa: E731
    new = OutputLock(fs, root, lease_s=PausedDriver.LEASE_S, clock=clock, sleep=jump)
    new.acquire()
    assert new.took_over
    keeper = LeaseKeeper(lock, clock=clock).start()
    try:
        with pytest.raises(OutputLostError):
            keeper.check()
    finally:
        keeper.stop()


def pause_after(monkeypatch, fs, driver: PausedDriver, mutations: int) -> tuple[list[str], Callable]:
    """Counts the store's moves and deletions; the driver pauses once the first `mutations` of them are done (at
    once for 0), before its next change (a change is made holding the lock's guard on a local disk: a pause inside
    one is the refused takeover's test below). Neither the new job's writes during the pause nor the deletion
    inside an S3 move count. Returns the log of counted ones, and the `still_held` that pauses."""
    done, busy, due = [], [], [mutations == 0]

    def counted(kind, real):
        def step(*args, **kwargs):
            if busy:
                return real(*args, **kwargs)
            busy.append(True)
            try:
                result = real(*args, **kwargs)
            finally:
                busy.clear()
            done.append(kind)
            due[0] = due[0] or len(done) == mutations
            return result
        return step

    def still_held():
        if due[0]:
            due[0] = False
            busy.append(True)
            driver.pause()
            busy.clear()
        return driver.keeper.holding()

    monkeypatch.setattr(commit, "move", counted("move", commit.move))
    monkeypatch.setattr(fs, "rm", counted("rm", fs.rm))
    return done, still_held


def commits_interrupted_before_their_moves(driver: PausedDriver, monkeypatch) -> None:
    """Units 0-2 committed by the old driver's run with their moves cut off by a crash, and two tries of it that
    lost their marker, still staged: what its next start, or its stop, finishes and cleans up."""
    fs, root, store = driver.fs, driver.root, ShardStore(driver.fs, driver.root)
    with monkeypatch.context() as crash:
        crash.setattr(commit, "move", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        for unit_id in range(3):
            with pytest.raises(KeyboardInterrupt):
                store.commit(unit_id, {f"{unit_id:05d}.tar": b"old job's"}, {}, driver.fence)
    for unit_id in (1, 2):
        put_atomic(fs, f"{root}/_staging/{driver.lock.token}/{unit_id:05d}-{'d' * 32}/{unit_id:05d}.tar", b"loser")


@pytest.mark.parametrize("mutations", [0, 4, 9])
def test_an_overwrite_removal_stops_at_once_when_its_driver_wakes_past_its_lease(output, mutations, monkeypatch):
    fs, root = output
    driver = PausedDriver(fs, root)
    write_job(fs, root, driver.fence)
    store = ShardStore(fs, root)
    for unit_id in range(3):
        store.commit(unit_id, {f"{unit_id:05d}.tar": b"old job's", f"{unit_id:05d}.parquet": b"p"}, {}, driver.fence)
    put_atomic(fs, f"{root}/_staging/{driver.lock.token}/00003-{'d' * 32}/00003.tar", b"a try that never committed")
    monkeypatch.setattr(commit, "DELETE_BATCH", 2)  # a check between every two deletions: more places to pause
    monkeypatch.setattr(commit, "_READ_THREADS", 1)  # one move at a time, so that "after the pause" is one point
    done, still_held = pause_after(monkeypatch, fs, driver, mutations)
    with pytest.raises(OutputLostError, match="lost the lock"):
        store.remove_outputs(still_held=still_held)
    monkeypatch.undo()
    assert len(done) == mutations  # nothing moved or deleted after waking
    assert driver.keeper.error is not None
    driver.assert_new_job_untouched()
    driver.stop()


@pytest.mark.parametrize("phase", ["recover", "finish_interrupted"])
@pytest.mark.parametrize("mutations", [0, 3])
def test_recovery_stops_at_once_when_its_driver_wakes_past_its_lease(output, phase, mutations, monkeypatch):
    fs, root = output
    driver = PausedDriver(fs, root)
    commits_interrupted_before_their_moves(driver, monkeypatch)
    store = ShardStore(fs, root)
    done, still_held = pause_after(monkeypatch, fs, driver, mutations)
    with pytest.raises(OutputLostError, match="lost the lock"):
        if phase == "recover":
            store.recover(store.committed(driver.fence), still_held=still_held)
        else:
            store.finish_interrupted(driver.lock.token, still_held=still_held)
    monkeypatch.undo()
    assert len(done) == mutations
    driver.assert_new_job_untouched()
    driver.stop()


def files_hold_their_digests(fs, root) -> bool:
    """What `verify` checks of each committed shard's files: in place with the size and sha256 its marker records."""
    shards = committed_shards(fs, root)
    return bool(shards) and all(
        hashlib.sha256(get_bytes(fs, f"{root}/{name}")).hexdigest() == info["sha256"] and
        fs.size(f"{root}/{name}") == info["bytes"]
        for marker in shards.values() for name, info in marker["files"].items())


@pytest.mark.parametrize("paused", ["before its look at the marker", "between its look and its move"])
def test_a_stragglers_late_move_never_puts_old_bytes_under_a_newer_marker(output, paused, monkeypatch):
    """An old run's try wins its marker and pauses before moving its tar; an --overwrite run takes the output,
    commits the unit with other settings (a tar of the same size) and moves it in; then the straggler wakes. Its
    move is refused (the marker is not its own), or, if it had looked just before the pause, the file it moved is
    found under another's marker and deleted again: the unit is then redone. Never does the old tar stand in
    place under the new marker, which readers (checking sizes only) would take for the new one."""
    fs, root = output
    old, old_fence = old_run(fs, root)
    state = {}

    def newer_run_commits():
        state["new"], _ = take_over(fs, root, old)
        new_fence = Fence(state["new"].token, (state["new"].token,), "spec-2")
        write_job(fs, root, new_fence)
        state["fence"] = new_fence
        state["marker"], won = ShardStore(fs, root).commit(6, {"00006.tar": b"new settings"}, {}, new_fence)
        assert won

    real_claim, real_move = ShardStore._claim, commit.move

    def claim_then_pause(self, unit_id, marker, fence):
        winner = real_claim(self, unit_id, marker, fence)
        if fence is old_fence and paused == "before its look at the marker" and "new" not in state:
            newer_run_commits()
        return winner

    def pause_then_move(fs_, source, target):
        if paused == "between its look and its move" and "new" not in state:
            newer_run_commits()
        return real_move(fs_, source, target)

    monkeypatch.setattr(ShardStore, "_claim", claim_then_pause)
    monkeypatch.setattr(commit, "move", pause_then_move)
    with pytest.raises(OutputLostError, match="not committed"):
        ShardStore(fs, root).commit(6, {"00006.tar": b"old settings"}, {}, old_fence)
    monkeypatch.undo()
    store = ShardStore(fs, root)
    scan = store.scan(state["fence"])
    if paused == "before its look at the marker":
        assert list(scan.in_place) == [6] and get_bytes(fs, f"{root}/00006.tar") == b"new settings"
    else:  # the newer try's tar was overwritten, then the straggler's deleted: the newer run redoes the unit
        assert list(scan.broken) == [6] and committed_shards(fs, root) == {}
        marker, won = store.commit(6, {"00006.tar": b"new settings"}, {}, state["fence"])
        assert won and get_bytes(fs, f"{root}/00006.tar") == b"new settings"
    assert files_hold_their_digests(fs, root) and store.staged_tries() == set()


def test_a_pending_commit_whose_placed_file_has_other_bytes_of_its_size_is_redone(output, monkeypatch):
    """A commit whose moves a crash cut off after its first file, and that file then replaced in place by other
    bytes of the same size (a straggler's late move): the next start finishes the moves, finds the digest wrong,
    and redoes the unit instead of counting it."""
    fs, root = output
    lock, fence = old_run(fs, root)
    store = ShardStore(fs, root)
    moves = []

    def killed_after_the_first_move(*args):
        if moves:
            raise KeyboardInterrupt("killed")
        moves.append(args)
        storage.move(*args)

    monkeypatch.setattr(commit, "move", killed_after_the_first_move)
    with pytest.raises(KeyboardInterrupt):
        store.commit(8, {"00008.parquet": b"rows", "00008.tar": b"images"}, {}, fence)
    monkeypatch.undo()
    put_atomic(fs, f"{root}/00008.parquet", b"ROWS")  # same size, other bytes
    assert store.recover(store.committed(fence), still_held=lease_holds) == (0, [8])


class CommittingPool:
    """A pool without Ray whose 'workers' commit each unit's shard at once, as ShardWorker does."""

    def __init__(self, spec, sources, fence, num_units):
        self.store, self.fence = ShardStore(*storage.filesystem(spec.output, spec.storage_options)), fence
        self.events = None

    def wait_until_ready(self, on_idle):
        on_idle()

    def run(self, todo, on_result, on_idle):
        for unit in todo:
            stats = {"count": unit.num_rows, "successes": unit.num_rows, "failed": 0, "truncated": 0,
                     "timings": {"generate_s": 0.0}}
            marker, _ = self.store.commit(unit.unit_id, {f"{unit.shard}.tar": b"t" * 512}, stats, self.fence)
            on_result(UnitResult(unit, marker))

    def shutdown(self):
        pass


def test_an_overwrite_whose_driver_wakes_past_its_lease_exits_4_through_the_command(tiny_models, tmp_path,
                                                                                     monkeypatch):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    write_prompts(fs, str(tmp_path / "prompts.parquet"), prompt_table(12), row_group_size=4)
    argv = ["run", "generate", "--prompts", str(tmp_path / "prompts.parquet"), "--output", root,
            "--model", str(tiny_models["instaflow"]), "--height", "64", "--width", "64", "--dtype", "float32",
            "--rows-per-shard", "4", "--no-progress"]
    monkeypatch.setattr(cli, "run_job", lambda spec, show_progress: job.run_job(spec, CommittingPool, False))
    assert main(argv) == 0 and len(committed_shards(fs, root)) == 3
    offset, pauses = [0.0], []
    clock = lambda: time.monotonic() + offset[0]  # noqa: E731

    class PausedBetweenChanges(LeaseKeeper):
        def check(self) -> None:  # a pause lands between two changes (one inside a change is refused: above)
            if pauses:
                pauses.pop()()
            super().check()

    monkeypatch.setattr(job, "LeaseKeeper", lambda lock: PausedBetweenChanges(lock, clock=clock))
    monkeypatch.setattr(commit, "_READ_THREADS", 1)
    staged_by_intruder, real_move = f"{root}/_staging/intruder/00001-{'e' * 32}/00001.tar", commit.move

    def sleep_past_the_lease():
        old_lease = json.loads(get_bytes(fs, f"{root}/_job.lock"))["lease_s"]
        offset[0] += 2 * old_lease
        intruder = OutputLock(fs, root, clock=clock, sleep=lambda s: offset.__setitem__(0, offset[0] + old_lease))
        intruder.acquire()
        put_atomic(fs, staged_by_intruder, b"staged by the job that took over")

    def move_then_pause(*args):  # the overwrite's first move back to staging, then the driver sleeps past its lease
        real_move(*args)
        if not pauses and not fs.exists(staged_by_intruder):
            pauses.append(sleep_past_the_lease)

    monkeypatch.setattr(commit, "move", move_then_pause)
    assert main([*argv, "--overwrite"]) == 4
    assert get_bytes(fs, staged_by_intruder) == b"staged by the job that took over"
    assert fs.exists(f"{root}/_job.json") and len([p for p in fs.find(root) if p.endswith(".stats.json")]) == 3


def test_a_driver_stopped_inside_a_fenced_deletion_keeps_the_output_and_no_takeover_lands(tmp_path, monkeypatch):
    """On a local disk each deletion of --overwrite's removal is made holding the lock's guard, after reading that
    the lock is still the driver's (chaos run 33003: a driver stopped between its lease check and an unlink deleted
    the next job's marker on waking). A job that finds the lock stale meanwhile waits GUARD_WAIT_S for the guard
    and refuses, naming why; the stopped driver wakes still holding the output and finishes its removal."""
    monkeypatch.setattr(storage, "GUARD_WAIT_S", 0.5)
    fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    driver = PausedDriver(fs, root)
    write_job(fs, root, driver.fence)
    store = ShardStore(fs, root)
    for unit_id in range(3):
        store.commit(unit_id, {f"{unit_id:05d}.tar": b"old job's"}, {}, driver.fence)
    stopped, woken, real_rm = threading.Event(), threading.Event(), fs.rm

    def rm_after_a_stop(*args, **kwargs):
        if not stopped.is_set():
            stopped.set()
            assert woken.wait(30)
        return real_rm(*args, **kwargs)

    monkeypatch.setattr(fs, "rm", rm_after_a_stop)
    errors = []
    removal = threading.Thread(target=lambda: errors.extend(
        _raised(store.remove_outputs, still_held=driver.keeper.holding)))
    removal.start()
    try:
        assert stopped.wait(30)  # checked, about to delete, and stopped there
        jump = lambda seconds: driver.offset.__setitem__(0, driver.offset[0] + driver.LEASE_S)  # noqa: E731
        starter = OutputLock(fs, root, lease_s=driver.LEASE_S, clock=driver.clock, sleep=jump)
        with pytest.raises(OutputLockedError, match="in the middle of writing its lock or a change that the lock"):
            starter.acquire()  # the lock looks stale on its clock, but the guard is held
    finally:
        woken.set()
        removal.join(30)
    monkeypatch.undo()
    assert errors == []
    assert lock_holder(fs, root) == driver.lock.token
    fs.invalidate_cache()
    assert sorted(p[len(root) + 1:] for p in fs.find(root)) == ["_job.lock", "_job.lock.guard"]
    driver.stop()


def _raised(fn, *args, **kwargs) -> list[BaseException]:
    try:
        fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the test's thread
        return [exc]
    return []


def test_a_withdrawal_in_recovery_stops_at_once_when_its_driver_wakes_past_its_lease(output, monkeypatch):
    """Recovery finishes unit 0's moves; a straggler of the old run replaces its marker meanwhile, so `finish`
    deletes again the file it moved (`_withdraw`). The driver is stopped after reading the marker, before that
    deletion; a new job takes the output over and commits unit 0 in place. On waking, the deletion must not land
    on the new job's file (review of the fence: `_withdraw` deleted outside it)."""
    fs, root = output
    driver = PausedDriver(fs, root)
    commits_interrupted_before_their_moves(driver, monkeypatch)
    store = ShardStore(fs, root)
    committed = store.committed(driver.fence)
    marker_path, target = f"{root}/00000.stats.json", f"{root}/00000.tar"
    real_move, straggled, paused = commit.move, [], []

    def move_then_straggle(fs_, source, destination):
        real_move(fs_, source, destination)
        if destination == target and not straggled:  # a straggler of the old run replaces the marker now
            straggler = copy.deepcopy(committed[0])
            straggler["fence"]["try"] = "f" * 32
            straggler["staging"] = f"_staging/{driver.lock.token}/00000-{'f' * 32}"
            data = b"straggler's bytes"
            straggler["files"]["00000.tar"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            put_atomic(fs, marker_path, json.dumps(straggler).encode())
            straggled.append(True)

    real_in_place = ShardStore._in_place

    def judged_then_stopped(self, name, info):  # _withdraw has judged its moved file not the marker's: stopped
        in_place = real_in_place(self, name, info)
        if straggled and not paused:
            paused.append(True)
            driver.pause()  # the new job takes over and commits unit 0, its 00000.tar in place
        return in_place

    monkeypatch.setattr(commit, "move", move_then_straggle)
    monkeypatch.setattr(ShardStore, "_in_place", judged_then_stopped)
    with pytest.raises(OutputLostError):
        store.recover(committed, still_held=driver.keeper.holding)
    monkeypatch.undo()
    assert paused
    driver.assert_new_job_untouched()
    driver.stop()


def test_a_lock_read_in_a_fence_rides_out_an_outage_and_a_damaged_lock_is_lost(output, monkeypatch):
    """The fence reads the lock before each change: a transient error there is retried as renewals are (within
    the lease), and a lock that is no longer this tool's stops the job as a lost lock (exit 4), not as a bug."""
    fs, root = output
    driver = PausedDriver(fs, root)
    real_read, failures = driver.lock.store.read, [ConnectionError("reset"), ConnectionError("reset")]

    def flaky_read(path):
        if failures:
            raise failures.pop()
        return real_read(path)

    monkeypatch.setattr(driver.lock.store, "read", flaky_read)
    monkeypatch.setattr(driver.keeper, "retry_s", 0.01)
    with driver.keeper.holding():
        pass
    assert failures == [] and driver.keeper.error is None
    monkeypatch.undo()
    put_atomic(fs, f"{root}/_job.lock", b"not a lock")
    with pytest.raises(OutputLostError, match="a file this tool did not write"):
        with driver.keeper.holding():
            pytest.fail("changed the output under a lock that is not this job's")
    assert isinstance(driver.keeper.error, OutputLostError)
    driver.stop()
