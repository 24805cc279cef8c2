"""Commit protocol (staged data, exclusive markers, fencing), manifest and storage helpers, on local disk and S3."""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import nullcontext

import fsspec
import pytest

from pipeline import commit, storage
from pipeline.commit import Fence, ShardStore, committed_shards
from pipeline.manifest import ManifestWriter, SpecMismatchError, check_compatible, identity_digest, job_manifest, read_manifest
from pipeline.lock import OutputLock, OutputLostError
from pipeline.storage import get_bytes, put_atomic, redact, storage_env, with_retries


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """(fs, root) of an empty output on local disk or on moto's S3."""
    if request.param == "local":
        return fsspec.filesystem("file"), str(tmp_path / "out")
    s3 = request.getfixturevalue("s3")
    fs, root = storage.filesystem(s3.url(f"out-{os.urandom(4).hex()}"), s3.storage_options)
    return fs, root


@pytest.fixture
def local(tmp_path):
    return fsspec.filesystem("file"), str(tmp_path / "out")


def held(fs, root, lineage=(), identity="spec-1") -> tuple[OutputLock, Fence]:
    """A lock on the output and the fence of a run holding it."""
    lock = OutputLock(fs, root, lease_s=5)
    lock.acquire()
    return lock, Fence(lock.token, (*lineage, lock.token), identity)


def visible(fs, root) -> list[str]:
    """What a reader that globs the output sees: every file outside `_` folders, relative to the root."""
    fs.invalidate_cache()
    return sorted(p[len(root) + 1:] for p in fs.find(root) if not p[len(root) + 1:].startswith("_"))


def test_commit_stages_claims_then_moves_into_place(output, monkeypatch):
    fs, root = output
    store = ShardStore(fs, root)
    lock, fence = held(fs, root)
    assert store.committed(fence) == {}  # nothing there yet
    steps = []
    monkeypatch.setattr(commit, "put_atomic", lambda f, p, d: steps.append(("put", p[len(root) + 1:])) or put_atomic(f, p, d))
    monkeypatch.setattr(commit, "move", lambda f, a, b: steps.append(("move", b[len(root) + 1:])) or storage.move(f, a, b))

    marker, won = store.commit(3, {"00003.tar": b"tar", "images/00003.parquet": b"pq"}, {"count": 2}, fence)
    assert won and marker["count"] == 2 and marker["fence"]["token"] == lock.token
    staged = [path for kind, path in steps if kind == "put"]
    assert all(path.startswith(f"_staging/{lock.token}/00003-") for path in staged) and len(staged) == 2
    assert [step for step in steps if step[0] == "move"] == [("move", "00003.tar"), ("move", "images/00003.parquet")]
    assert marker["files"]["00003.tar"]["bytes"] == 3
    assert visible(fs, root) == ["00003.stats.json", "00003.tar", "images/00003.parquet"]
    assert get_bytes(fs, f"{root}/images/00003.parquet") == b"pq"
    assert store.committed(fence) == {3: marker}
    assert store.staged_tries() == set()


def test_a_try_that_dies_before_its_marker_leaves_nothing_visible(output):
    fs, root = output
    store = ShardStore(fs, root)
    lock, fence = held(fs, root)
    put_atomic(fs, f"{root}/_staging/{lock.token}/00001-deadbeef/00001.tar", b"half a shard")  # died here
    assert visible(fs, root) == []
    assert store.committed(fence) == {}
    store.recover({}, still_held=nullcontext)
    assert store.staged_tries() == set()


def test_a_crash_between_marker_and_move_is_finished_by_the_next_job(output, monkeypatch):
    fs, root = output
    store = ShardStore(fs, root)
    lock, fence = held(fs, root)

    def crash(*args):
        raise KeyboardInterrupt("killed between marker and move")

    monkeypatch.setattr(commit, "move", crash)
    with pytest.raises(KeyboardInterrupt):
        store.commit(5, {"00005.parquet": b"pairs"}, {"count": 1}, fence)
    monkeypatch.undo()
    assert visible(fs, root) == ["00005.stats.json"]  # committed: the marker counts, the data is staged
    committed = store.committed(fence)
    assert list(committed) == [5]
    assert store.recover(committed, still_held=nullcontext) == (1, [])
    assert visible(fs, root) == ["00005.parquet", "00005.stats.json"] and store.staged_tries() == set()


def claim_without_moving(store: ShardStore, fence: Fence, monkeypatch) -> None:
    """A try of unit 3 that claims its marker and dies before it moves its staged files into place."""
    with monkeypatch.context() as patch:
        patch.setattr(commit, "move", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            store.commit(3, {"00003.tar": b"same bytes"}, {"count": 1}, fence)


def test_a_later_try_finishes_the_move_of_a_winner_that_died(output, monkeypatch):
    """A requeued unit, or a resumed job that started before an old worker's last commit, finds the marker
    taken by a try that never moved its files: it moves them, so the shard is whole without another run."""
    fs, root = output
    store = ShardStore(fs, root)
    lock, fence = held(fs, root)
    claim_without_moving(store, fence, monkeypatch)
    marker, won = store.commit(3, {"00003.tar": b"same bytes"}, {"count": 1}, fence)
    assert not won and marker["staging"].startswith(f"_staging/{fence.token}/")
    assert visible(fs, root) == ["00003.stats.json", "00003.tar"] and store.staged_tries() == set()
    assert get_bytes(fs, f"{root}/00003.tar") == b"same bytes"


def test_a_lost_connection_while_checking_a_contested_shard_is_asked_again(output, monkeypatch):
    """Deciding whether another try's marker still has its files looks its staged files up in the store: a
    connection the store drops then (botocore's EndpointConnectionError, no OSError) is asked again, not the job's
    end (a chaos run's driver exited 1 so)."""
    from botocore.exceptions import EndpointConnectionError

    fs, root = output
    store = ShardStore(fs, root)
    lock, fence = held(fs, root)
    claim_without_moving(store, fence, monkeypatch)
    lookups, exists, size = [], fs.exists, fs.size

    def dropped_twice(lookup):
        def first_two_dropped(path, **kwargs):
            lookups.append(path)
            if len(lookups) <= 2:
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/")
            return lookup(path, **kwargs)
        return first_two_dropped

    monkeypatch.setattr(fs, "exists", dropped_twice(exists))
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    marker, won = store.commit(3, {"00003.tar": b"same bytes"}, {"count": 1}, fence)
    assert len(lookups) >= 3 and not won and visible(fs, root) == ["00003.stats.json", "00003.tar"]
    # Its files now in place, another try checks them there, by their size first.
    monkeypatch.setattr(fs, "exists", exists)
    lookups.clear()
    monkeypatch.setattr(fs, "size", dropped_twice(size))
    again, won = store.commit(3, {"00003.tar": b"same bytes"}, {"count": 1}, fence)
    assert len(lookups) >= 3 and not won and again == marker


def test_of_two_tries_at_once_exactly_one_commits(output):
    """Ray may not know whether a try ran, so the pool can run a unit twice at once."""
    fs, root = output
    lock, fence = held(fs, root)
    results = []

    def attempt(tag: bytes):
        results.append(ShardStore(fs, root).commit(2, {"00002.tar": tag}, {"tag": tag.decode()}, fence))

    tries = [threading.Thread(target=attempt, args=(tag,)) for tag in (b"one", b"two", b"three")]
    for thread in tries:
        thread.start()
    for thread in tries:
        thread.join()
    winners = [marker for marker, won in results if won]
    assert len(winners) == 1
    assert all(marker == winners[0] for marker, _ in results)  # the losers report the winner's shard
    assert get_bytes(fs, f"{root}/00002.tar").decode() == winners[0]["tag"]
    assert ShardStore(fs, root).staged_tries() == set()


def test_a_job_that_lost_the_output_cannot_commit(output):
    fs, root = output
    store = ShardStore(fs, root)
    old, old_fence = held(fs, root)
    old.release()
    new, new_fence = held(fs, root)
    with pytest.raises(OutputLostError, match="not committed"):
        store.commit(1, {"00001.tar": b"late"}, {}, old_fence)
    assert visible(fs, root) == [] and store.staged_tries() == set()


def test_only_markers_of_the_lineage_and_spec_count(output):
    fs, root = output
    store = ShardStore(fs, root)
    first, first_fence = held(fs, root, identity="spec-1")
    store.commit(0, {"00000.tar": b"a"}, {}, first_fence)
    first.release()
    # A resume of the same job keeps the lineage: the first run's shard counts.
    second, resumed = held(fs, root, lineage=first_fence.lineage, identity="spec-1")
    assert list(store.committed(resumed)) == [0]
    # Other settings, or a run after --overwrite (a new lineage), do not accept it ...
    assert store.committed(Fence(second.token, resumed.lineage, "spec-2")) == {}
    fresh = Fence(second.token, (second.token,), "spec-1")
    assert store.committed(fresh) == {}
    # ... and their own commit of that unit replaces the marker that does not count.
    marker, won = store.commit(0, {"00000.tar": b"b"}, {}, fresh)
    assert won and list(store.committed(fresh)) == [0] and get_bytes(fs, f"{root}/00000.tar") == b"b"


def test_readers_find_committed_shards_through_the_manifest(output):
    fs, root = output
    with pytest.raises(commit.OutputError, match="no _job.json"):
        committed_shards(fs, root)
    lock, fence = held(fs, root, identity=identity_digest({"steps": 1}))
    ManifestWriter(fs, root, confirm_held=lambda: None).write(job_manifest({"steps": 1}, [], list(fence.lineage)))
    ShardStore(fs, root).commit(4, {"00004.tar": b"x"}, {"count": 1}, fence)
    put_atomic(fs, f"{root}/00005.stats.json", json.dumps({"count": 1}).encode())  # no fence: foreign
    assert list(committed_shards(fs, root)) == [4]


def test_put_atomic_leaves_nothing_partial_on_failure(tmp_path, monkeypatch):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "sub" / "00001.tar")
    put_atomic(fs, path, b"old complete contents")

    def crash(fd):  # fails after the data was written to the temporary file
        raise RuntimeError("disk unplugged")

    monkeypatch.setattr(storage.os, "fsync", crash)
    with pytest.raises(RuntimeError, match="disk unplugged"):
        put_atomic(fs, path, b"new")
    with pytest.raises(RuntimeError):
        put_atomic(fs, str(tmp_path / "sub" / "00002.tar"), b"new")
    assert os.listdir(tmp_path / "sub") == ["00001.tar"]
    assert open(path, "rb").read() == b"old complete contents"


def test_remove_outputs_keeps_user_files(local):
    fs, root = local
    ours = ["00001.tar", "00001.parquet", "00001.stats.json", "123456.tar", "_job.json",
            "00002.tar.tmp-" + "a" * 32, "images/00001.parquet", "pairs/00001.parquet",
            "_staging/abc/00003-def/00003.tar", "00003.stats.json.guard"]
    theirs = ["_job.lock", "_job.lock.tmp-" + "b" * 32, "README.md", "123.tar", "00001.tar.bak", "images/notes.txt",
              "other/00001.tar"]
    for name in ours + theirs:
        put_atomic(fs, f"{root}/{name}", b"x")
    ShardStore(fs, root).remove_outputs(still_held=nullcontext)
    left = sorted(p[len(root) + 1:] for p in fs.find(root))
    assert left == sorted(theirs)


def test_an_overwrite_removal_leaves_the_live_locks_renewals_alone(tmp_path):
    """The lock's renewals write a temporary file and rename it over _job.lock: a removal that took it for a
    leftover made the job find its lock deleted and stop (exit 4) in the middle of its own --overwrite."""
    fs, root = fsspec.filesystem("file"), str(tmp_path)
    lock = OutputLock(fs, root, lease_s=2.0)
    lock.acquire()
    lost, stop = [], threading.Event()

    def renew():
        while not stop.is_set():
            try:
                lock.refresh()
            except OutputLostError as exc:
                lost.append(exc)
                return

    renewals = threading.Thread(target=renew)
    renewals.start()
    try:
        for _ in range(300):
            ShardStore(fs, root).remove_outputs(still_held=nullcontext)
            assert not lost, lost
    finally:
        stop.set()
        renewals.join()
        lock.release()


def test_manifest_round_trip_and_mismatch_messages(local):
    fs, root = local
    assert read_manifest(fs, root) is None
    inputs = [{"path": "s3://b/a.parquet", "size": 10, "etag": "e1", "mtime": "t"}]
    identity = {"model": "tiny", "steps": 1, "size": (16, 16)}
    ManifestWriter(fs, root, confirm_held=lambda: None).write(job_manifest(identity, inputs, ["t1"]))
    existing = read_manifest(fs, root)
    check_compatible(existing, identity, inputs)  # same job: resumable

    with pytest.raises(SpecMismatchError) as e:
        check_compatible(existing, {"model": "other", "steps": 1, "size": (16, 16), "seed": 3}, inputs)
    message = str(e.value)
    assert "model: 'tiny' -> 'other'" in message and "seed: (unset) -> 3" in message
    assert "steps" not in message and "--overwrite" in message

    changed = [{**inputs[0], "size": 11, "etag": "e2"}, {"path": "s3://b/new.parquet", "size": 1}]
    with pytest.raises(SpecMismatchError, match="input files changed since the job started") as e:
        check_compatible(existing, identity, changed)
    assert "s3://b/a.parquet (size 10 -> 11, etag e1 -> e2)" in str(e.value)
    assert "s3://b/new.parquet (added)" in str(e.value)

    # An output begun when local inputs were tagged by a digest of their footer resumes once with content digests.
    footer = [{"path": "a.parquet", "size": 10, "etag": "footer-sha256:ab", "mtime": None}]
    stored = json.loads(json.dumps(job_manifest(identity, footer, ["t1"])))
    check_compatible(stored, identity, [{**footer[0], "etag": "sha256:cd"}])
    with pytest.raises(SpecMismatchError, match="size 10 -> 12"):
        check_compatible(stored, identity, [{**footer[0], "size": 12, "etag": "sha256:cd"}])

    put_atomic(fs, f"{root}/_job.json", b"{not json")
    with pytest.raises(commit.OutputError, match="_job.json is not valid JSON"):
        read_manifest(fs, root)


def test_with_retries_retries_transient_errors_only(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "done"

    with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        assert with_retries(flaky, what="fetch thing", base_delay_s=0) == "done"
    assert len(calls) == 3 and caplog.text.count("fetch thing failed") == 2

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, what="read", base_delay_s=0)
    assert len(calls) == 1

    def down():
        calls.append(1)
        raise ConnectionError("refused")

    calls.clear()
    with pytest.raises(ConnectionError, match="refused"):
        with_retries(down, what="read", attempts=2, base_delay_s=0)
    assert len(calls) == 2


def test_transient_classification():
    from botocore.exceptions import ClientError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert storage.is_transient(client_error("SlowDown", 503))
    assert storage.is_transient(client_error("Whatever", 500))
    assert not storage.is_transient(client_error("AccessDenied", 403))
    assert storage.is_transient(TimeoutError()) and storage.is_transient(OSError(5, "EIO"))
    assert not storage.is_transient(PermissionError()) and not storage.is_transient(ValueError())
    # the clients' own connection errors, which derive from neither OSError nor ConnectionError
    from aiohttp import ServerDisconnectedError
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, NoCredentialsError

    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1/"))
    assert storage.is_transient(ConnectionClosedError(endpoint_url="http://127.0.0.1:1/"))
    assert storage.is_transient(ServerDisconnectedError())
    assert not storage.is_transient(NoCredentialsError())


def test_redact_and_storage_env(monkeypatch):
    options = {"key": "AKIA", "secret": "s", "anon": False,
               "client_kwargs": {"endpoint_url": "http://u:pw@h", "aws_session_token": "t"},
               "Credentials": {"a": 1}, "profiles": [{"password": "p"}],
               "url": "https://h/o?X-Amz-Signature=abc&x=1", "connection_string": "AccountKey=k"}
    assert redact(options) == {"key": "***", "secret": "***", "anon": False,
                               "client_kwargs": {"endpoint_url": "http://***@h", "aws_session_token": "***"},
                               "Credentials": "***", "profiles": [{"password": "***"}],
                               "url": "https://h/o?X-Amz-Signature=***&x=1", "connection_string": "***"}
    assert options["key"] == "AKIA"
    assert storage.redact_text("failed: DefaultEndpointsProtocol=https;AccountKey=abc==;x") == \
        "failed: DefaultEndpointsProtocol=https;AccountKey=***;x"
    # a quoted file name in a message is no field name, whatever words it holds; field names still are
    for message in ("image 'data/secret.png': outside the prompts root", "'monkey.png': cannot be decoded"):
        assert storage.redact_text(message) == message
    assert storage.redact_text("{'X-Amz-Signature': 'zzz', 'api_key': 'q'}") == "{'X-Amz-Signature': ***, 'api_key': ***}"
    for name in ("AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL", "HF_HUB_OFFLINE", "S3_ENDPOINT_URL", "GCSFS_X"):
        monkeypatch.setenv(name, "v")
    secrets = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
               "GOOGLE_APPLICATION_CREDENTIALS", "FSSPEC_S3_SECRET")
    for name in secrets:
        monkeypatch.setenv(name, "planted-secret")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", "http://user:planted@host")
    monkeypatch.setenv("MY_S3_ENDPOINT_URL", "no")
    env = storage_env()
    assert {"AWS_ENDPOINT_URL", "HF_HUB_OFFLINE", "S3_ENDPOINT_URL", "GCSFS_X"} <= set(env)
    assert not set(secrets) & set(env) and "FSSPEC_S3_ENDPOINT_URL" not in env and "MY_S3_ENDPOINT_URL" not in env
    assert "planted" not in json.dumps(env)
